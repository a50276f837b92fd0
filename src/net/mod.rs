//! Sockets and addresses: batched receive and send, the sessions' connected
//! UDP sockets (applying the session table's commands, reading what upstreams
//! send back, a turn's sends in one system call with io_uring), the client sources a listener never answers, the clients
//! behind a trusted proxy (PROXY protocol v2), and the health checks' probes.

pub mod batch;
pub mod prober;
pub mod proxied;
pub mod proxy_v2;
pub mod sessions;
pub mod source_filter;
pub mod uring;
