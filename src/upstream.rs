//! Forwarding as one worker sees it: its clone of every pool, its sessions (one
//! connected UDP socket per client, pool and endpoint), their idle expiry, and
//! passive health (an endpoint whose socket reports ICMP port unreachable is
//! ejected for a while, in every worker).
//!
//! The kernel sends each client to one worker, so a worker owns its clients'
//! sessions outright: nothing here is shared between workers or locked, except
//! each endpoint's health flag (an atomic) and its counters (one set per worker).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::abi::CallError;
use crate::config::PoolSpec;
use crate::metrics::{Counters, RateLimit};
use crate::pool::Pool;

/// The token of the listener socket; session `k` has token `k + 1`.
pub const LISTENER: Token = Token(0);

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
}

/// The pools of one listener, resolved, with what every worker shares: endpoint
/// health (inside each [`Pool`]) and the per-worker endpoint counters.
pub struct Pools {
    pools: Vec<Configured>,
    /// `workers[w][i]`: worker `w`'s counters of endpoint `i` (pools' endpoints
    /// numbered one after another).
    workers: Vec<Arc<[EndpointCounters]>>,
    health_lines: RateLimit,
}

struct Configured {
    spec: PoolSpec,
    pool: Pool,
    /// The number of this pool's first endpoint among all of them.
    first: usize,
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
}

impl Pools {
    /// Resolves every endpoint of `specs` (host names too) for a listener with
    /// `workers` workers. An error names the pool and endpoint.
    pub fn new(specs: &[PoolSpec], workers: usize) -> anyhow::Result<Self> {
        let mut pools = Vec::with_capacity(specs.len());
        let mut first = 0;
        for spec in specs {
            let addrs = spec.resolve()?;
            let pool = Pool::new(spec.name.clone(), spec.policy, &addrs);
            let n = pool.endpoints().len();
            pools.push(Configured {
                spec: spec.clone(),
                pool,
                first,
            });
            first += n;
        }
        Ok(Self {
            pools,
            workers: (0..workers)
                .map(|_| (0..first).map(|_| EndpointCounters::default()).collect())
                .collect(),
            health_lines: RateLimit::new(HEALTH_LINES_PER_SECOND),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The pools' names and resolved endpoints, for the "serving" line.
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
                let sum = |f: fn(&EndpointCounters) -> &AtomicU64| {
                    self.workers.iter().map(|w| f(&w[c.first + i]).load(Relaxed)).sum()
                };
                out.push(EndpointView {
                    pool: &c.spec.name,
                    addr: e.addr,
                    healthy: c.pool.is_healthy(i, now),
                    to: sum(|e| &e.to),
                    to_bytes: sum(|e| &e.to_bytes),
                    from: sum(|e| &e.from),
                    from_bytes: sum(|e| &e.from_bytes),
                });
            }
        }
        out
    }

    /// The most file descriptors the sessions of all workers may hold.
    pub fn max_sockets(&self) -> usize {
        self.pools.iter().map(|c| c.spec.max_sessions).sum()
    }
}

/// One client's conversation with one endpoint.
pub struct Session {
    socket: mio::net::UdpSocket,
    /// The client as the listener socket received it (where replies go).
    pub client: SocketAddr,
    pool: usize,
    endpoint: usize,
    last_active: Instant,
    /// `POOL/ip:port`, as `upstream` tells the guest.
    pub label: String,
    /// Datagrams forwarded and not yet answered (an estimate for the shutdown drain).
    awaiting: u32,
}

/// What reading a session's socket gave.
pub enum Recv {
    /// A datagram of this many bytes.
    Datagram(usize),
    /// Nothing more to read now.
    Empty,
    /// The session is gone (closed after its endpoint refused, or never existed).
    Gone,
}

/// One pool, as one worker uses it.
struct WorkerPool {
    pool: Pool,
    idle_timeout: Duration,
    eject_for: Duration,
    /// This worker's share of the pool's `max_sessions`.
    max: usize,
    open: usize,
}

/// A worker's forwarding state.
pub struct Upstreams {
    shared: Arc<Pools>,
    pools: Vec<WorkerPool>,
    sessions: Slab<Session>,
    /// (client, pool, endpoint) → session.
    routes: HashMap<(SocketAddr, usize, usize), usize>,
    /// (client, pool) → the session plain `forward` keeps using while it is healthy.
    affinity: HashMap<(SocketAddr, usize), usize>,
    registry: Registry,
    counters: Arc<Counters>,
    endpoint_counters: Arc<[EndpointCounters]>,
    /// The time of the batch being handled (read once per wake-up, not per datagram).
    now: Instant,
    /// The client the guest is answering, as received, and its hash key.
    client: Option<SocketAddr>,
    client_key: [u8; 18],
    client_key_len: usize,
}

impl Upstreams {
    /// Worker `worker`'s share of `shared`, registering session sockets with `registry`.
    pub fn new(shared: Arc<Pools>, worker: usize, registry: Registry, counters: Arc<Counters>) -> Self {
        let workers = shared.workers.len().max(1);
        let pools = shared
            .pools
            .iter()
            .map(|c| WorkerPool {
                pool: c.pool.clone(),
                idle_timeout: c.spec.idle_timeout,
                eject_for: c.spec.eject_for,
                max: c.spec.max_sessions.div_ceil(workers),
                open: 0,
            })
            .collect();
        let endpoint_counters = Arc::clone(&shared.workers[worker.min(shared.workers.len() - 1)]);
        Self {
            shared,
            pools,
            sessions: Slab::new(),
            routes: HashMap::new(),
            affinity: HashMap::new(),
            registry,
            counters,
            endpoint_counters,
            now: Instant::now(),
            client: None,
            client_key: [0; 18],
            client_key_len: 0,
        }
    }

    /// Sets the time for what follows.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The guest is about to answer `client` (as received by the listener socket).
    pub fn begin(&mut self, client: SocketAddr) {
        self.client = Some(client);
        // The key plain `forward` hashes: the client's IP (IPv4 as 4 bytes, also
        // when it reached a dual-stack socket) and port, so that replicas agree.
        let (ip, port) = (client.ip().to_canonical(), client.port());
        let n = match ip {
            std::net::IpAddr::V4(v4) => {
                self.client_key[..4].copy_from_slice(&v4.octets());
                4
            }
            std::net::IpAddr::V6(v6) => {
                self.client_key[..16].copy_from_slice(&v6.octets());
                16
            }
        };
        self.client_key[n..n + 2].copy_from_slice(&port.to_be_bytes());
        self.client_key_len = n + 2;
    }

    /// Sends `data` to an endpoint of the pool named `pool`, for the current client:
    /// by the pool's policy (keeping the client's session while its endpoint is
    /// healthy), or by hashing `key`.
    pub fn forward(&mut self, pool: &[u8], key: Option<&[u8]>, data: &[u8]) -> Result<(), CallError> {
        let client = self.client.ok_or(CallError::NoClient)?;
        let p = self
            .pools
            .iter()
            .position(|wp| wp.pool.name().as_bytes() == pool)
            .ok_or(CallError::UnknownPool)?;
        // A second try after an endpoint turned out to be down, on another one.
        for _ in 0..2 {
            let s = self.session_for(client, p, key)?;
            let session = &mut self.sessions[s];
            match session.socket.send(data) {
                Ok(_) => {
                    session.last_active = self.now;
                    session.awaiting = session.awaiting.saturating_add(1);
                    let c = &self.endpoint_counters[self.shared.pools[p].first + session.endpoint];
                    c.to.fetch_add(1, Relaxed);
                    c.to_bytes.fetch_add(data.len() as u64, Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.refused(s),
                Err(_) => return Err(CallError::UpstreamError),
            }
        }
        Err(CallError::UpstreamError)
    }

    /// The session for `client` in pool `p`, opened if needed.
    fn session_for(&mut self, client: SocketAddr, p: usize, key: Option<&[u8]>) -> Result<usize, CallError> {
        let now = self.now;
        let wp = &mut self.pools[p];
        let endpoint = match key {
            Some(key) => wp.pool.by_hash(key, now).ok_or(CallError::NoHealthyEndpoint)?,
            None => {
                if let Some(&s) = self.affinity.get(&(client, p))
                    && let Some(session) = self.sessions.get(s)
                    && wp.pool.is_healthy(session.endpoint, now)
                {
                    return Ok(s);
                }
                let key = &self.client_key[..self.client_key_len];
                wp.pool.pick(key, now).ok_or(CallError::NoHealthyEndpoint)?
            }
        };
        let s = match self.routes.get(&(client, p, endpoint)) {
            Some(&s) => s,
            None => self.open(client, p, endpoint)?,
        };
        if key.is_none() {
            self.affinity.insert((client, p), s);
        }
        Ok(s)
    }

    fn open(&mut self, client: SocketAddr, p: usize, endpoint: usize) -> Result<usize, CallError> {
        let wp = &mut self.pools[p];
        if wp.open >= wp.max {
            return Err(CallError::SessionOverflow);
        }
        let addr = wp.pool.endpoints()[endpoint].addr;
        let socket = connect(addr).map_err(|_| CallError::UpstreamError)?;
        let entry = self.sessions.vacant_entry();
        let s = entry.key();
        let mut socket = mio::net::UdpSocket::from_std(socket);
        self.registry
            .register(&mut socket, Token(s + 1), Interest::READABLE)
            .map_err(|_| CallError::UpstreamError)?;
        entry.insert(Session {
            socket,
            client,
            pool: p,
            endpoint,
            last_active: self.now,
            label: format!("{}/{addr}", wp.pool.name()),
            awaiting: 0,
        });
        wp.open += 1;
        wp.pool.session_opened(endpoint);
        self.routes.insert((client, p, endpoint), s);
        self.counters.session_created(self.sessions.len());
        Ok(s)
    }

    /// Ejects the endpoint of session `s`, which refused a datagram, and closes it;
    /// the client's next datagram opens a session to a healthy endpoint.
    fn refused(&mut self, s: usize) {
        let Some(session) = self.sessions.get(s) else {
            return;
        };
        let (p, endpoint) = (session.pool, session.endpoint);
        let wp = &self.pools[p];
        if wp.pool.eject(endpoint, self.now + wp.eject_for)
            && let Some(suppressed) = self.shared.health_lines.allow()
        {
            tracing::warn!(
                pool = wp.pool.name(),
                endpoint = %wp.pool.endpoints()[endpoint].addr,
                eject_for = ?wp.eject_for,
                suppressed,
                "endpoint ejected: it answered with ICMP port unreachable"
            );
        }
        self.close(s, false);
    }

    fn close(&mut self, s: usize, expired: bool) {
        if !self.sessions.contains(s) {
            return;
        }
        let mut session = self.sessions.remove(s);
        let _ = self.registry.deregister(&mut session.socket);
        self.routes.remove(&(session.client, session.pool, session.endpoint));
        if self.affinity.get(&(session.client, session.pool)) == Some(&s) {
            self.affinity.remove(&(session.client, session.pool));
        }
        let wp = &mut self.pools[session.pool];
        wp.open -= 1;
        wp.pool.session_closed(session.endpoint);
        self.counters.session_closed(self.sessions.len(), expired);
    }

    /// Reads one datagram from the session with `token` into `buf`.
    pub fn recv(&mut self, token: Token, buf: &mut [u8]) -> Recv {
        let Some(s) = token.0.checked_sub(1) else {
            return Recv::Gone;
        };
        let Some(session) = self.sessions.get_mut(s) else {
            return Recv::Gone;
        };
        loop {
            match session.socket.recv(buf) {
                Ok(n) => {
                    session.last_active = self.now;
                    session.awaiting = session.awaiting.saturating_sub(1);
                    let c = &self.endpoint_counters[self.shared.pools[session.pool].first + session.endpoint];
                    c.from.fetch_add(1, Relaxed);
                    c.from_bytes.fetch_add(n as u64, Relaxed);
                    self.counters.upstream_received(n);
                    return Recv::Datagram(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Recv::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.refused(s);
                    return Recv::Gone;
                }
                // Another queued socket error (host unreachable, …): read past it.
                Err(_) => {}
            }
        }
    }

    /// The session with `token`, if it is open.
    pub fn session(&self, token: Token) -> Option<&Session> {
        self.sessions.get(token.0.checked_sub(1)?)
    }

    /// Closes the sessions idle for longer than their pool's `idle_timeout`, and
    /// reports endpoints whose ejection has ended.
    pub fn expire(&mut self, now: Instant) {
        let idle: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_active) >= self.pools[s.pool].idle_timeout)
            .map(|(k, _)| k)
            .collect();
        for s in idle {
            self.close(s, true);
        }
        for wp in &self.pools {
            for (i, e) in wp.pool.endpoints().iter().enumerate() {
                if wp.pool.came_back(i, now)
                    && let Some(suppressed) = self.shared.health_lines.allow()
                {
                    tracing::info!(pool = wp.pool.name(), endpoint = %e.addr, suppressed, "endpoint back after ejection");
                }
            }
        }
    }

    /// How often [`Upstreams::expire`] should run: a quarter of the shortest idle
    /// timeout, between 10 ms and 1 s.
    pub fn sweep_every(&self) -> Duration {
        self.pools
            .iter()
            .map(|wp| wp.idle_timeout / 4)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Whether some session still waits for an answer (for the shutdown drain).
    pub fn awaiting(&self) -> bool {
        self.sessions.iter().any(|(_, s)| s.awaiting > 0)
    }
}

/// A non-blocking UDP socket connected to `addr`, so that it receives only what
/// `addr` sends and the kernel reports ICMP errors from it.
fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Raises the soft limit on open files to the hard limit, for sessions' sockets,
/// and returns it.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    crate::udp::raise_nofile_limit().context("cannot raise the open-file limit")
}
