//! Sockets and addresses: batched receive and send, the sessions' connected
//! UDP sockets (applying the session table's commands, reading what upstreams
//! send back), and the client sources a listener never answers.

pub mod batch;
pub mod proxy_v2;
pub mod sessions;
pub mod source_filter;
