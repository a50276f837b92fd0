//! A listener's pools, resolved, with what every worker shares: each
//! endpoint's health (an atomic) and its counters (one set per worker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::config::PoolSpec;
use crate::metrics::RateLimit;
use crate::upstream::pool::Pool;

/// Ejections and returns logged per second, per listener.
const HEALTH_LINES_PER_SECOND: u64 = 5;

/// One endpoint's traffic, as one worker counts it.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct EndpointCounters {
    pub to: AtomicU64,
    pub to_bytes: AtomicU64,
    pub from: AtomicU64,
    pub from_bytes: AtomicU64,
    pub sessions_created: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Open now (written by the one worker these counters belong to).
    pub sessions_active: AtomicU64,
    /// Refusals (ICMP port unreachable) seen on its sessions.
    pub refusals: AtomicU64,
    /// Times it was ejected.
    pub ejections: AtomicU64,
    /// Sessions that never had an answer, closed to make room for a new client.
    pub sessions_evicted: AtomicU64,
    /// Sessions closed `drain_timeout` after a reload removed the endpoint.
    pub sessions_drained: AtomicU64,
}

/// The pools of one listener, resolved, with what every worker shares: endpoint
/// health (inside each [`Pool`]) and each endpoint's per-worker counters. A
/// reload builds a new `Pools` from the old one ([`Pools::rebuilt`]) and each
/// worker adopts it at its next wake-up.
pub struct Pools {
    pub(super) pools: Vec<Configured>,
    /// Every endpoint's address: none of them is ever answered as a client.
    endpoints: std::collections::HashSet<SocketAddr>,
    pub(super) workers: usize,
    pub(super) health_lines: Arc<RateLimit>,
}

pub(super) struct Configured {
    pub(super) spec: PoolSpec,
    /// What the endpoints resolved to.
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) pool: Pool,
    /// `counters[e][w]`: worker `w`'s counters of endpoint `e`.
    pub(super) counters: Vec<Vec<Arc<EndpointCounters>>>,
}

/// One endpoint, for metrics.
pub struct EndpointView<'a> {
    pub pool: &'a str,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub to: u64,
    pub to_bytes: u64,
    pub from: u64,
    pub from_bytes: u64,
    pub sessions_created: u64,
    pub sessions_expired: u64,
    pub sessions_active: u64,
    pub refusals: u64,
    pub ejections: u64,
    pub sessions_evicted: u64,
    pub sessions_drained: u64,
}

impl Pools {
    /// Resolves every endpoint of `specs` (host names too) for a listener with
    /// `workers` workers. An error names the pool and endpoint.
    pub fn new(specs: &[PoolSpec], workers: usize) -> anyhow::Result<Self> {
        Self::build(specs, workers, None)
    }

    /// The workers the sessions are shared out between.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// New pools from `specs`, resolved now: an endpoint that the old pools had
    /// keeps its health and counters. Sessions to removed endpoints drain in
    /// the workers until idle.
    pub fn rebuilt(&self, specs: &[PoolSpec]) -> anyhow::Result<Self> {
        Self::build(specs, self.workers, Some(self))
    }

    fn build(specs: &[PoolSpec], workers: usize, old: Option<&Self>) -> anyhow::Result<Self> {
        crate::config::check_pools(specs)?;
        let mut pools = Vec::with_capacity(specs.len());
        for spec in specs {
            for (key, n) in [
                ("max_sessions", spec.max_sessions),
                ("max_sessions_per_prefix", spec.max_sessions_per_prefix),
            ] {
                if n < workers {
                    anyhow::bail!(
                        "upstreams.{}: {key} ({n}) is below the listener's {workers} workers: each worker \
                         holds its own share of the sessions, so give at least one per worker",
                        spec.name
                    );
                }
            }
            let addrs = spec.resolve()?;
            let before = old.and_then(|o| o.pools.iter().find(|c| c.spec.name == spec.name));
            let pool = match before {
                Some(b) => b.pool.rebuilt(spec.policy, &addrs),
                None => Pool::new(spec.name.clone(), spec.policy, &addrs),
            };
            let counters = pool
                .endpoints()
                .iter()
                .map(|e| {
                    let kept = before.and_then(|b| Some(&b.counters[b.pool.position(e.addr)?]));
                    match kept {
                        Some(c) => c.clone(),
                        None => (0..workers).map(|_| Arc::default()).collect(),
                    }
                })
                .collect();
            pools.push(Configured {
                spec: spec.clone(),
                addrs,
                pool,
                counters,
            });
        }
        Ok(Self {
            endpoints: pools.iter().flat_map(|c| c.addrs.iter().copied()).collect(),
            pools,
            workers,
            health_lines: old.map_or_else(
                || Arc::new(RateLimit::new(HEALTH_LINES_PER_SECOND)),
                |o| Arc::clone(&o.health_lines),
            ),
        })
    }

    /// The same pools as resolved now, for one worker, with health and
    /// counters of their own: for a shadow, whose stubbed sessions must not
    /// count against the real endpoints.
    pub fn copy(&self) -> Self {
        let pools: Vec<Configured> = self
            .pools
            .iter()
            .map(|c| {
                let pool = Pool::new(c.spec.name.clone(), c.spec.policy, &c.addrs);
                let counters = pool.endpoints().iter().map(|_| vec![Arc::default()]).collect();
                Configured {
                    spec: c.spec.clone(),
                    addrs: c.addrs.clone(),
                    pool,
                    counters,
                }
            })
            .collect();
        Self {
            endpoints: self.endpoints.clone(),
            pools,
            workers: 1,
            health_lines: Arc::new(RateLimit::new(HEALTH_LINES_PER_SECOND)),
        }
    }

    /// Whether both have the same settings and resolved addresses, pool by
    /// pool: a reload that would change nothing is skipped.
    pub fn same_as(&self, other: &Self) -> bool {
        self.pools.len() == other.pools.len()
            && self
                .pools
                .iter()
                .zip(&other.pools)
                .all(|(a, b)| a.spec == b.spec && a.addrs == b.addrs)
    }

    /// Whether `addr` is an endpoint of one of the pools.
    pub fn is_endpoint(&self, addr: SocketAddr) -> bool {
        self.endpoints.contains(&addr)
    }

    /// The configured pools.
    pub fn specs(&self) -> Vec<PoolSpec> {
        self.pools.iter().map(|c| c.spec.clone()).collect()
    }

    /// The pools' names and resolved endpoints, for logs.
    pub fn describe(&self) -> String {
        self.pools
            .iter()
            .map(|c| {
                let addrs: Vec<String> = c.pool.endpoints().iter().map(|e| e.addr.to_string()).collect();
                format!("{}={}", c.spec.name, addrs.join(","))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Every endpoint with its health at `now` and its traffic summed over workers.
    pub fn endpoints(&self, now: Instant) -> Vec<EndpointView<'_>> {
        let mut out = Vec::new();
        for c in &self.pools {
            for (i, e) in c.pool.endpoints().iter().enumerate() {
                let sum =
                    |f: fn(&EndpointCounters) -> &AtomicU64| c.counters[i].iter().map(|w| f(w).load(Relaxed)).sum();
                out.push(EndpointView {
                    pool: &c.spec.name,
                    addr: e.addr,
                    healthy: c.pool.is_healthy(i, now),
                    to: sum(|e| &e.to),
                    to_bytes: sum(|e| &e.to_bytes),
                    from: sum(|e| &e.from),
                    from_bytes: sum(|e| &e.from_bytes),
                    sessions_created: sum(|e| &e.sessions_created),
                    sessions_expired: sum(|e| &e.sessions_expired),
                    sessions_active: sum(|e| &e.sessions_active),
                    refusals: sum(|e| &e.refusals),
                    ejections: sum(|e| &e.ejections),
                    sessions_evicted: sum(|e| &e.sessions_evicted),
                    sessions_drained: sum(|e| &e.sessions_drained),
                });
            }
        }
        out
    }
}
