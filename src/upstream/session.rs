//! What the session table holds: one client's session with one endpoint,
//! the client's network (for the per-network cap), and each pool as one
//! worker uses it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pools::{Configured, EndpointCounters, Pools};
use crate::config::SharedSpec;
use crate::upstream::pool::Pool;

/// One client's conversation with one endpoint.
pub(super) struct Session {
    /// The client as the listener socket received it (where replies go).
    pub(super) client: SocketAddr,
    pub(super) pool: usize,
    pub(super) endpoint: SocketAddr,
    /// The endpoint's place in its pool; `None` once a reload removed it (the
    /// session then drains: it carries on until idle).
    pub(super) index: Option<usize>,
    pub(super) counters: Arc<EndpointCounters>,
    pub(super) last_active: Instant,
    /// `POOL/ip:port`, as `upstream` tells the guest.
    pub(super) label: String,
    /// Datagrams forwarded and not yet answered (an estimate for the shutdown drain).
    pub(super) awaiting: u32,
    /// When a reload removed its endpoint; it ends `drain_timeout` later.
    pub(super) draining_since: Option<Instant>,
    /// The client's network, for `max_sessions_per_prefix`.
    pub(super) prefix: Prefix,
}

/// A client's network: the first 24 bits of an IPv4 address, or 48 of an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Prefix([u8; 6]);

impl Prefix {
    pub(super) fn of(client: SocketAddr) -> Self {
        let mut bytes = [0; 6];
        match client.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => bytes[..3].copy_from_slice(&v4.octets()[..3]),
            std::net::IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()[..6]),
        }
        Self(bytes)
    }
}

/// One pool, as one worker uses it. Its place in the worker's list never
/// changes, so sessions can name it by index across reloads.
pub(super) struct WorkerPool {
    pub(super) name: String,
    pub(super) pool: Pool,
    /// This worker's counters of each endpoint of `pool`.
    pub(super) counters: Vec<Arc<EndpointCounters>>,
    pub(super) idle_timeout: Duration,
    pub(super) eject_for: Duration,
    pub(super) eject_after: u32,
    pub(super) unanswered_timeout: Duration,
    pub(super) drain_timeout: Duration,
    /// This worker's share of the pool's `max_sessions`.
    pub(super) max: usize,
    /// This worker's share of the pool's `max_sessions_per_prefix`.
    pub(super) max_per_prefix: usize,
    pub(super) open: usize,
    /// A reload removed the pool: no new sessions; the open ones drain.
    pub(super) retired: bool,
    /// Forwards start with a PROXY v2 header naming the client.
    pub(super) proxy_protocol: bool,
    /// `sessions = "shared"`: no session per client (see `shared.rs`).
    pub(super) shared: Option<SharedSpec>,
}

impl WorkerPool {
    /// Worker `w`'s pools, `pools`, as of `shared`: a pool still there keeps
    /// its place and its sessions; one no longer there is retired.
    pub(super) fn adopt(pools: &mut Vec<Self>, shared: &Pools, w: usize) {
        let workers = shared.workers.max(1);
        let w = w.min(workers - 1);
        for wp in pools.iter_mut() {
            wp.retired = true;
        }
        for c in &shared.pools {
            let fresh = Self::of(c, w, workers);
            match pools.iter_mut().find(|wp| wp.name == c.spec.name) {
                Some(wp) => *wp = Self { open: wp.open, ..fresh },
                // A retired pool whose sessions have all ended gives its place
                // to a new one, so that reloads of changing pool names do not
                // grow the list without end (sessions name pools by place).
                None => match pools.iter_mut().find(|wp| wp.retired && wp.open == 0) {
                    Some(wp) => *wp = fresh,
                    None => pools.push(fresh),
                },
            }
        }
    }

    /// Worker `w`'s view of pool `c`, with its share of the pool's caps.
    pub(super) fn of(c: &Configured, w: usize, workers: usize) -> Self {
        Self {
            name: c.spec.name.clone(),
            pool: c.pool.clone(),
            counters: c.counters.iter().map(|per| Arc::clone(&per[w])).collect(),
            idle_timeout: c.spec.idle_timeout,
            eject_for: c.spec.eject_for,
            eject_after: c.spec.eject_after,
            unanswered_timeout: c.spec.unanswered_timeout,
            drain_timeout: c.spec.drain_timeout,
            max: share(c.spec.max_sessions, workers, w),
            max_per_prefix: share(c.spec.max_sessions_per_prefix, workers, w),
            open: 0,
            retired: false,
            proxy_protocol: c.spec.proxy_protocol,
            shared: c.spec.shared,
        }
    }
}

/// Worker `w`'s share of `total` among `workers`: the shares add up to
/// `total` exactly (rounding up for every worker would let `workers - 1` more
/// sessions open than the pool allows).
pub(super) fn share(total: usize, workers: usize, w: usize) -> usize {
    total / workers + usize::from(w < total % workers)
}
