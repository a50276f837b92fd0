//! Sockets and addresses: batched receive and send, the sessions' connected
//! UDP sockets (applying the session table's commands, reading what upstreams
//! send back, a turn's sends in one system call with io_uring), the client sources a listener never answers, the clients
//! behind a trusted proxy (PROXY protocol v2), and the health checks' probes.

pub mod batch;
pub mod gso;
pub mod prober;
pub mod proxied;
pub mod proxy_v2;
pub mod sessions;
pub mod source_filter;
pub mod uring;

/// An IPv4 client of a dual-stack `[::]` socket arrives as `[::ffff:a.b.c.d]:port`;
/// guests and logs see it as the IPv4 address it is. (Replies still go to the
/// address as received, which is what the IPv6 socket can send to.)
pub fn unmapped(peer: std::net::SocketAddr) -> std::net::SocketAddr {
    match peer {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        std::net::SocketAddr::V4(_) => peer,
    }
}
