//! What watches the datagram path without changing it: a [`Tap`], in the
//! manner of Quilkin's filters with their pass-through defaults. Recording
//! and the shadow are one (`prove::tap`); [`NoTap`] watches nothing.
//!
//! A tap is asked before each exchange whether it watches it; only then does
//! the core copy the replies and forwards for it.

use std::net::SocketAddr;
use std::time::Instant;

use super::handler::Route;

/// A client datagram's exchange, as the core saw it.
pub struct ClientExchange<'a> {
    pub now: Instant,
    /// The client, as guests see it (IPv4 unmapped).
    pub client: SocketAddr,
    pub datagram: &'a [u8],
    /// `reply`, `forward`, or the drop reason.
    pub verdict: &'static str,
    /// What went back to the client, in order.
    pub replies: Vec<Vec<u8>>,
    /// What it forwarded upstream, in order.
    pub forwards: Vec<Vec<u8>>,
}

/// An upstream datagram for a client, and what went back to the client.
pub struct UpstreamExchange<'a> {
    pub now: Instant,
    pub client: SocketAddr,
    /// The endpoint that sent it.
    pub endpoint: Option<SocketAddr>,
    pub datagram: &'a [u8],
    pub replies: Vec<Vec<u8>>,
}

/// Watches the datagram path. Every method has a default that watches nothing.
pub trait Tap: Send {
    /// Whether it may watch anything; when not, the core asks nothing more.
    fn active(&self) -> bool {
        false
    }

    /// Whether it watches the exchange `client`'s datagram starts (routed to `route`).
    fn watch_client(&mut self, client: SocketAddr, route: Route) -> bool {
        let _ = (client, route);
        false
    }

    /// A watched client exchange, once handled.
    fn client(&mut self, exchange: ClientExchange<'_>) {
        let _ = exchange;
    }

    /// Whether it watches the upstream datagrams now arriving for `client`.
    fn watch_upstream(&mut self, client: SocketAddr, route: Route) -> bool {
        let _ = (client, route);
        false
    }

    /// A watched upstream datagram, once handled.
    fn upstream(&mut self, exchange: UpstreamExchange<'_>) {
        let _ = exchange;
    }

    /// Whether it wants forwards as they are sent ([`Tap::forwarded`]).
    fn watches_forwards(&self) -> bool {
        false
    }

    /// A datagram sent to `endpoint` for `client`.
    fn forwarded(&mut self, client: SocketAddr, endpoint: SocketAddr, datagram: &[u8]) {
        let _ = (client, endpoint, datagram);
    }
}

/// Watches nothing: the offline driver's tap, and the benchmarks'.
pub struct NoTap;

impl Tap for NoTap {}
