//! An upstream pool's settings, from a `--upstream` flag or an
//! `[upstreams.NAME]` table, and their checks.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::text::quote;
use crate::upstream::pool::Policy;

/// An upstream pool, as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    /// As written: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`; see [`PoolSpec::resolve`].
    pub endpoints: Vec<String>,
    pub policy: Policy,
    /// A session ends after this long without a datagram either way.
    pub idle_timeout: Duration,
    /// Sessions per listener; past it, new sessions are refused.
    pub max_sessions: usize,
    /// How long an endpoint that refused a datagram is left out.
    pub eject_for: Duration,
    /// Refusals (ICMP port unreachable) in a row, with no answer between them,
    /// that eject an endpoint: one forged ICMP message must not.
    pub eject_after: u32,
    /// A session that has never had an answer ends after this long without a
    /// datagram: spoofed clients hold a session for this long, not `idle_timeout`.
    pub unanswered_timeout: Duration,
    /// Sessions to an endpoint a reload removed end this long after the reload,
    /// even if both sides still talk; their clients then move.
    pub drain_timeout: Duration,
    /// Sessions per listener from one source network (IPv4 /24, IPv6 /48).
    pub max_sessions_per_prefix: usize,
    /// How often host names are looked up again, so that a name with several
    /// addresses (a Kubernetes headless Service) is a pool that grows and shrinks.
    pub resolve_every: Duration,
    /// `proxy_protocol = "v2"`: each forwarded datagram starts with a PROXY v2
    /// header naming the client; a header on an answer is checked and taken off.
    pub proxy_protocol: bool,
    /// `[upstreams.NAME.health]`: active health checks; without them,
    /// endpoints are ejected by ICMP refusals alone (`eject_after`).
    pub health: Option<HealthSpec>,
    /// Endpoints (as written in `endpoints`) that take no new sessions while
    /// their sessions finish, as if removed, yet are still known as endpoints.
    pub drain: Vec<String>,
    /// `sessions = "shared"`: no session per client; each worker keeps a few
    /// sockets per endpoint that carry every client's datagrams, and the
    /// guest's `on_reply` names the client each answer is for (docs/ABI.md).
    pub shared: Option<SharedSpec>,
}

/// A shared pool's sockets: `sockets` per endpoint and worker, each replaced
/// by one on a new random port every `reroll_every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedSpec {
    pub sockets: usize,
    pub reroll_every: Duration,
}

pub const DEFAULT_SHARED_SOCKETS: usize = 4;
/// The most sockets per endpoint and worker a shared pool may ask for.
pub const MAX_SHARED_SOCKETS: usize = 64;
pub const DEFAULT_REROLL_EVERY: Duration = Duration::from_secs(60);

impl Default for SharedSpec {
    fn default() -> Self {
        Self {
            sockets: DEFAULT_SHARED_SOCKETS,
            reroll_every: DEFAULT_REROLL_EVERY,
        }
    }
}

/// Active health checks of a pool's endpoints: a probe every `interval`, each
/// answered within `timeout` or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub interval: Duration,
    pub timeout: Duration,
    /// Probes passed in a row that bring an unhealthy endpoint back.
    pub healthy_after: u32,
    /// Probes failed in a row that take a healthy endpoint out.
    pub unhealthy_after: u32,
    /// The probe datagram.
    pub send: Vec<u8>,
    /// What an answer must start with to pass (empty: any answer passes).
    pub expect: Vec<u8>,
    /// `probe = "guest"`: the module writes the probe and judges the answer
    /// (its `probe` and `probe_reply` exports), when it has them.
    pub guest: bool,
    /// How long an endpoint that passed its checks again takes to get its
    /// full share of new clients, growing from none (zero: at once).
    pub slow_start: Duration,
}

pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
/// The most probes in a row `healthy_after` and `unhealthy_after` may ask for.
pub const MAX_HEALTH_STREAK: u32 = 100;

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            send: Vec::new(),
            expect: Vec::new(),
            guest: false,
            slow_start: Duration::ZERO,
        }
    }
}

/// Defaults of a pool, as Envoy's udp_proxy and Quilkin have them.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
pub const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(10);
pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(30);
pub const DEFAULT_EJECT_AFTER: u32 = 3;
pub const DEFAULT_UNANSWERED_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_SESSIONS_PER_PREFIX: usize = 1_000;

/// The most refusals in a row `eject_after` may ask for.
pub const MAX_EJECT_AFTER: u32 = 1_000;

/// The most sessions a pool may allow per listener.
pub const MAX_SESSIONS: usize = 1_000_000;

impl PoolSpec {
    /// A pool with the default settings.
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        Self {
            name: name.into(),
            endpoints,
            policy: Policy::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            eject_for: DEFAULT_EJECT_FOR,
            eject_after: DEFAULT_EJECT_AFTER,
            unanswered_timeout: DEFAULT_UNANSWERED_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_sessions_per_prefix: DEFAULT_MAX_SESSIONS_PER_PREFIX,
            resolve_every: DEFAULT_RESOLVE_EVERY,
            proxy_protocol: false,
            health: None,
            drain: Vec::new(),
            shared: None,
        }
    }

    /// Whether an endpoint is a host name, to be looked up again every `resolve_every`.
    pub fn has_host_names(&self) -> bool {
        self.endpoints.iter().any(|e| e.parse::<SocketAddr>().is_err())
    }

    /// The endpoints' addresses: host names are looked up (every address of a
    /// name becomes an endpoint). An error names the endpoint that failed.
    pub fn resolve(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.resolve_these(&self.endpoints)
    }

    /// The addresses of the endpoints listed in `drain`.
    pub fn resolve_drained(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.resolve_these(&self.drain)
    }

    fn resolve_these(&self, endpoints: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
        let mut addrs = Vec::new();
        for endpoint in endpoints {
            let found: Vec<SocketAddr> = endpoint
                .to_socket_addrs()
                .with_context(|| format!("pool `{}`: cannot resolve endpoint `{}`", self.name, quote(endpoint)))?
                .collect();
            if found.is_empty() {
                bail!("pool `{}`: endpoint `{}` has no address", self.name, quote(endpoint));
            }
            addrs.extend(found);
        }
        Ok(addrs)
    }
}

/// Checks a pool name: letters, digits, `-` and `_`, as guests write it.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "`{}` is not a pool name: use 1 to 64 letters, digits, `-` or `_`",
            quote(name)
        ));
    }
    Ok(())
}

/// Checks an endpoint's form without looking it up: `IP:PORT`, `[IPv6]:PORT` or
/// `HOST:PORT`, with a port from 1 to 65535.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let err = || {
        format!(
            "`{}` is not an endpoint: give IP:PORT, [IPv6]:PORT or HOST:PORT, such as 10.0.0.7:53",
            quote(s)
        )
    };
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return if addr.port() == 0 || addr.ip().is_unspecified() {
            Err(err())
        } else {
            Ok(())
        };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(err()),
    }
}

/// Parses `--upstream NAME=ENDPOINT[,ENDPOINT…]`.
pub fn parse_upstream_flag(s: &str) -> Result<PoolSpec, String> {
    let (name, list) = s.split_once('=').ok_or_else(|| {
        format!(
            "`{}` is not NAME=ENDPOINT[,ENDPOINT…], such as resolvers=10.0.0.7:53,10.0.0.8:53",
            quote(s)
        )
    })?;
    check_pool_name(name)?;
    let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
    for e in &endpoints {
        check_endpoint(e)?;
    }
    Ok(PoolSpec::new(name, endpoints))
}

/// Refuses two pools with one name.
pub fn check_pools(pools: &[PoolSpec]) -> anyhow::Result<()> {
    for (i, a) in pools.iter().enumerate() {
        if pools[..i].iter().any(|b| b.name == a.name) {
            bail!("two pools are named `{}`", a.name);
        }
        if let Some(d) = a.drain.iter().find(|d| !a.endpoints.contains(d)) {
            bail!(
                "upstreams.{}: drain: `{}` is not one of the pool's endpoints (write it as in `endpoints`)",
                a.name,
                quote(d)
            );
        }
        if !a.endpoints.is_empty() && a.endpoints.iter().all(|e| a.drain.contains(e)) {
            bail!(
                "upstreams.{}: drain lists every endpoint: the pool would take no new sessions",
                a.name
            );
        }
    }
    Ok(())
}
