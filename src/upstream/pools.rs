//! A listener's pools, resolved, with what every worker shares: each
//! endpoint's health (an atomic) and its counters (one set per worker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::PoolSpec;
use crate::metrics::RateLimit;
use crate::upstream::pool::Pool;

/// Ejections and returns logged per second, per listener.
const HEALTH_LINES_PER_SECOND: u64 = 5;

/// Declares every per-endpoint counter once: the per-worker atomics
/// ([`EndpointCounters`]), their sum over workers ([`EndpointTotals`]), and
/// each one's metric family and help ([`EndpointTotals::COUNTERS`] and
/// [`EndpointTotals::GAUGES`]), which the exposition walks.
macro_rules! endpoint_counters {
    (
        counters { $( $(#[$cdoc:meta])* $counter:ident => $cname:literal, $chelp:literal; )* }
        gauges { $( $(#[$gdoc:meta])* $gauge:ident => $gname:literal, $ghelp:literal; )* }
    ) => {
        /// One endpoint's traffic, as one worker counts it.
        #[derive(Debug, Default)]
        #[repr(align(64))]
        pub struct EndpointCounters {
            $( $(#[$cdoc])* pub $counter: AtomicU64, )*
            $( $(#[$gdoc])* pub $gauge: AtomicU64, )*
        }

        /// One endpoint's counters summed over every worker, for metrics.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct EndpointTotals {
            $( pub $counter: u64, )*
            $( pub $gauge: u64, )*
        }

        impl EndpointTotals {
            /// Adds one worker's counters.
            fn add(&mut self, worker: &EndpointCounters) {
                $( self.$counter += worker.$counter.load(Relaxed); )*
                $( self.$gauge += worker.$gauge.load(Relaxed); )*
            }

            /// The counter families: name, help, and the value.
            pub const COUNTERS: &[(&'static str, &'static str, fn(&Self) -> u64)] =
                &[ $( ($cname, $chelp, |t| t.$counter), )* ];

            /// The gauge families: name, help, and the value.
            pub const GAUGES: &[(&'static str, &'static str, fn(&Self) -> u64)] =
                &[ $( ($gname, $ghelp, |t| t.$gauge), )* ];
        }
    };
}

endpoint_counters! {
    counters {
        to => "wasmgate_endpoint_datagrams_sent", "Datagrams forwarded to the endpoint.";
        to_bytes => "wasmgate_endpoint_bytes_sent", "Payload bytes forwarded to the endpoint.";
        from => "wasmgate_endpoint_datagrams_received", "Datagrams the endpoint sent back.";
        from_bytes => "wasmgate_endpoint_bytes_received", "Payload bytes the endpoint sent back.";
        sessions_created => "wasmgate_endpoint_sessions_created", "Sessions opened to the endpoint.";
        sessions_expired => "wasmgate_endpoint_session_idle_timeouts",
            "Sessions to the endpoint closed after idle_timeout (or unanswered_timeout).";
        /// Refusals (ICMP port unreachable) seen on its sessions.
        refusals => "wasmgate_endpoint_refusals", "ICMP port unreachable seen on sessions to the endpoint.";
        /// Times it was ejected.
        ejections => "wasmgate_endpoint_ejections", "Times the endpoint was ejected (eject_after refusals in a row).";
        /// Sessions that never had an answer, closed to make room for a new client.
        sessions_evicted => "wasmgate_endpoint_sessions_evicted",
            "Sessions to the endpoint that never had an answer, closed to make room for a new client.";
        /// Sessions closed `drain_timeout` after a reload removed the endpoint.
        sessions_drained => "wasmgate_endpoint_sessions_drained",
            "Sessions closed drain_timeout after a reload removed the endpoint.";
        /// Active health checks (counted in the first worker's cells by the prober).
        probes => "wasmgate_endpoint_probes", "Health probes sent to the endpoint.";
        probes_timeout => "wasmgate_endpoint_probes_timed_out", "Health probes not answered within the timeout.";
        probes_mismatch => "wasmgate_endpoint_probes_mismatched",
            "Health probes answered with something other than expected (or judged unhealthy by the guest).";
        probes_refused => "wasmgate_endpoint_probes_refused",
            "Health probes refused (ICMP port unreachable) or that could not be sent.";
        probe_ejections => "wasmgate_endpoint_probe_ejections",
            "Times the endpoint was taken out after unhealthy_after failed probes in a row.";
        probe_spared => "wasmgate_endpoint_probe_spared",
            "Times the endpoint failed its probes but was kept as the pool's last healthy one (panic mode).";
    }
    gauges {
        /// Open now (written by the one worker these counters belong to).
        sessions_active => "wasmgate_endpoint_sessions_active", "Sessions open to the endpoint now.";
    }
}

impl EndpointCounters {
    /// Counts datagrams of these sizes from the endpoint, for it and for the
    /// `worker`; how many there were.
    pub(super) fn answers(&self, worker: &crate::metrics::Counters, sizes: impl IntoIterator<Item = usize>) -> u32 {
        let mut n = 0u32;
        for len in sizes {
            n = n.saturating_add(1);
            self.from.fetch_add(1, Relaxed);
            self.from_bytes.fetch_add(len as u64, Relaxed);
            worker.upstream_received(len);
        }
        n
    }
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
    /// What the endpoints in service resolved to.
    pub(super) addrs: Vec<SocketAddr>,
    /// What the drained endpoints resolved to: in no choice, but still endpoints.
    pub(super) drained: Vec<SocketAddr>,
    pub(super) pool: Pool,
    /// `counters[e][w]`: worker `w`'s counters of endpoint `e`.
    pub(super) counters: Vec<Vec<Arc<EndpointCounters>>>,
}

/// One endpoint, for metrics.
pub struct EndpointView<'a> {
    pub pool: &'a str,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub totals: EndpointTotals,
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
            let drained = spec.resolve_drained()?;
            let addrs: Vec<SocketAddr> = spec.resolve()?.into_iter().filter(|a| !drained.contains(a)).collect();
            let before = old.and_then(|o| o.pools.iter().find(|c| c.spec.name == spec.name));
            let pool = match before {
                Some(b) => b.pool.rebuilt(spec.policy, &addrs),
                None => Pool::new(spec.name.clone(), spec.policy, &addrs),
            }
            .with_active_checks(spec.health.is_some())
            .with_slow_start(spec.health.as_ref().map_or(Duration::ZERO, |h| h.slow_start));
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
                drained,
                pool,
                counters,
            });
        }
        Ok(Self {
            endpoints: pools
                .iter()
                .flat_map(|c| c.addrs.iter().chain(&c.drained).copied())
                .collect(),
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
                    drained: c.drained.clone(),
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
                .all(|(a, b)| a.spec == b.spec && a.addrs == b.addrs && a.drained == b.drained)
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
                let mut totals = EndpointTotals::default();
                for worker in &c.counters[i] {
                    totals.add(worker);
                }
                out.push(EndpointView {
                    pool: &c.spec.name,
                    addr: e.addr,
                    healthy: c.pool.is_healthy(i, now),
                    totals,
                });
            }
        }
        out
    }
}
