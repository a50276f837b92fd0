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

use crate::config::PoolSpec;
use crate::metrics::{Counters, RateLimit};
use crate::pool::{Pool, Refusal};
use crate::source_filter::PortCounts;
use crate::udp::RecvBatch;
use crate::verdict::{Allowance, CallError, MAX_CALLS_PER_DATAGRAM};

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
    pools: Vec<Configured>,
    /// Every endpoint's address: none of them is ever answered as a client.
    endpoints: std::collections::HashSet<SocketAddr>,
    workers: usize,
    health_lines: Arc<RateLimit>,
}

struct Configured {
    spec: PoolSpec,
    /// What the endpoints resolved to.
    addrs: Vec<SocketAddr>,
    pool: Pool,
    /// `counters[e][w]`: worker `w`'s counters of endpoint `e`.
    counters: Vec<Vec<Arc<EndpointCounters>>>,
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

/// One client's conversation with one endpoint.
pub struct Session {
    socket: mio::net::UdpSocket,
    /// The socket's local port, registered as one of the gateway's own.
    port: u16,
    /// The client as the listener socket received it (where replies go).
    pub client: SocketAddr,
    pool: usize,
    endpoint: SocketAddr,
    /// The endpoint's place in its pool; `None` once a reload removed it (the
    /// session then drains: it carries on until idle).
    index: Option<usize>,
    counters: Arc<EndpointCounters>,
    last_active: Instant,
    /// `POOL/ip:port`, as `upstream` tells the guest.
    pub label: String,
    /// Datagrams forwarded and not yet answered (an estimate for the shutdown drain).
    awaiting: u32,
    /// Whether the endpoint ever answered on it; until then it is cheap to
    /// close (`unanswered_timeout`, eviction when the table is full).
    answered: bool,
    /// Its place in the order sessions were opened.
    seq: u64,
    /// When a reload removed its endpoint; it ends `drain_timeout` later.
    draining_since: Option<Instant>,
    /// The client's network, for `max_sessions_per_prefix`.
    prefix: Prefix,
}

/// A client's network: the first 24 bits of an IPv4 address, or 48 of an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Prefix([u8; 6]);

impl Prefix {
    fn of(client: SocketAddr) -> Self {
        let mut bytes = [0; 6];
        match client.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => bytes[..3].copy_from_slice(&v4.octets()[..3]),
            std::net::IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()[..6]),
        }
        Self(bytes)
    }
}

/// What reading a session's socket gave.
pub enum Recv {
    /// This many datagrams, in the receive batch.
    Datagrams(usize),
    /// Nothing more to read now.
    Empty,
    /// The session is gone (closed after its endpoint refused, or never existed).
    Gone,
}

/// One pool, as one worker uses it. Its place in the worker's list never
/// changes, so sessions can name it by index across reloads.
struct WorkerPool {
    name: String,
    pool: Pool,
    /// This worker's counters of each endpoint of `pool`.
    counters: Vec<Arc<EndpointCounters>>,
    idle_timeout: Duration,
    eject_for: Duration,
    eject_after: u32,
    unanswered_timeout: Duration,
    drain_timeout: Duration,
    /// This worker's share of the pool's `max_sessions`.
    max: usize,
    /// This worker's share of the pool's `max_sessions_per_prefix`.
    max_per_prefix: usize,
    open: usize,
    /// A reload removed the pool: no new sessions; the open ones drain.
    retired: bool,
}

/// Client datagrams sent after the first answer that make a client count as
/// having proven its address: a spoofer does not see the answers it causes, a
/// real client goes on talking.
pub const VALIDATED_AFTER: u32 = 2;

/// What one client with sessions has earned and spent: the upstream answers it
/// may be sent, and the `forward`/`send` calls `on_reply` may still make for
/// it. Kept while the client has a session.
#[derive(Debug)]
struct Ledger {
    /// Bytes the client sent (its datagrams that reached the guest).
    received: u64,
    /// Bytes of upstream answers (through `on_reply` or straight) sent to it.
    sent: u64,
    /// Whether any answer was sent to it.
    answered: bool,
    /// Its datagrams after the first answer.
    after_answer: u32,
    /// Calls `on_reply` may still make until the client's next datagram.
    calls_left: u32,
    sessions: u32,
}

impl Ledger {
    fn new(received: usize) -> Self {
        Self {
            received: received as u64,
            sent: 0,
            answered: false,
            after_answer: 0,
            calls_left: MAX_CALLS_PER_DATAGRAM,
            sessions: 0,
        }
    }

    fn on_datagram(&mut self, len: usize) {
        self.received = self.received.saturating_add(len as u64);
        if self.answered {
            self.after_answer = self.after_answer.saturating_add(1);
        }
        self.calls_left = MAX_CALLS_PER_DATAGRAM;
    }

    /// Bytes the client may still be sent: `ratio` × what it sent, less what it
    /// was sent; no cap once it is validated or with a ratio of 0.
    fn bytes_left(&self, ratio: f64) -> usize {
        if ratio <= 0.0 || self.after_answer >= VALIDATED_AFTER {
            return usize::MAX;
        }
        let earned = (ratio * self.received as f64).floor() as u64;
        usize::try_from(earned.saturating_sub(self.sent)).unwrap_or(usize::MAX)
    }

    fn charge(&mut self, bytes: usize, calls: u32) {
        if bytes > 0 {
            self.sent = self.sent.saturating_add(bytes as u64);
            self.answered = true;
        }
        self.calls_left = self.calls_left.saturating_sub(calls);
    }
}

/// A worker's forwarding state.
pub struct Upstreams {
    shared: Arc<Pools>,
    worker: usize,
    pools: Vec<WorkerPool>,
    sessions: Slab<Session>,
    /// (client, pool, endpoint) → session.
    routes: HashMap<(SocketAddr, usize, SocketAddr), usize>,
    /// (client, pool) → the session plain `forward` keeps using while it is healthy.
    affinity: HashMap<(SocketAddr, usize), usize>,
    /// Sessions not yet answered, oldest first, as (key, seq); entries of
    /// sessions since answered or closed are skipped when met.
    unanswered: std::collections::VecDeque<(usize, u64)>,
    next_seq: u64,
    /// (pool, client network) → sessions open.
    prefixes: HashMap<(usize, Prefix), usize>,
    registry: Registry,
    counters: Arc<Counters>,
    /// The local ports of every session of the gateway (all workers).
    ports: Arc<PortCounts>,
    /// The time of the batch being handled (read once per wake-up, not per datagram).
    now: Instant,
    /// The client the guest is answering, as received, and its hash key.
    client: Option<SocketAddr>,
    client_key: [u8; 18],
    client_key_len: usize,
    /// The size of the client datagram being handled, for a new ledger.
    client_len: usize,
    /// What each client with a session has earned and spent.
    ledgers: HashMap<SocketAddr, Ledger>,
    /// The listener's `max_reply_ratio`, which holds for upstream answers too.
    max_ratio: f64,
}

impl Upstreams {
    /// Worker `worker`'s share of `shared`, registering session sockets with `registry`.
    pub fn new(
        shared: Arc<Pools>,
        worker: usize,
        registry: Registry,
        counters: Arc<Counters>,
        ports: Arc<PortCounts>,
        max_ratio: f64,
    ) -> Self {
        let mut this = Self {
            shared: Arc::clone(&shared),
            worker,
            pools: Vec::new(),
            sessions: Slab::new(),
            routes: HashMap::new(),
            affinity: HashMap::new(),
            unanswered: std::collections::VecDeque::new(),
            next_seq: 0,
            prefixes: HashMap::new(),
            registry,
            counters,
            ports,
            now: Instant::now(),
            client: None,
            client_key: [0; 18],
            client_key_len: 0,
            client_len: 0,
            ledgers: HashMap::new(),
            max_ratio,
        };
        this.adopt(shared);
        this
    }

    /// Whether `pools` is the version this worker uses.
    pub fn uses(&self, pools: &Arc<Pools>) -> bool {
        Arc::ptr_eq(&self.shared, pools)
    }

    /// Takes a reloaded version of the pools: new endpoints take new sessions at
    /// once; sessions to removed endpoints (or pools) carry on until idle.
    pub fn adopt(&mut self, shared: Arc<Pools>) {
        let workers = shared.workers.max(1);
        let w = self.worker.min(workers - 1);
        for wp in &mut self.pools {
            wp.retired = true;
        }
        for c in &shared.pools {
            let fresh = WorkerPool {
                name: c.spec.name.clone(),
                pool: c.pool.clone(),
                counters: c.counters.iter().map(|per| Arc::clone(&per[w])).collect(),
                idle_timeout: c.spec.idle_timeout,
                eject_for: c.spec.eject_for,
                eject_after: c.spec.eject_after,
                unanswered_timeout: c.spec.unanswered_timeout,
                drain_timeout: c.spec.drain_timeout,
                max: c.spec.max_sessions.div_ceil(workers),
                max_per_prefix: c.spec.max_sessions_per_prefix.div_ceil(workers),
                open: 0,
                retired: false,
            };
            match self.pools.iter_mut().find(|wp| wp.name == c.spec.name) {
                Some(wp) => *wp = WorkerPool { open: wp.open, ..fresh },
                None => self.pools.push(fresh),
            }
        }
        // Sessions find their endpoint in the new lists (and count for least-sessions).
        for (_, s) in &mut self.sessions {
            let wp = &mut self.pools[s.pool];
            s.index = if wp.retired { None } else { wp.pool.position(s.endpoint) };
            match s.index {
                Some(i) => {
                    wp.pool.session_opened(i);
                    s.draining_since = None;
                }
                None => {
                    s.draining_since.get_or_insert(self.now);
                }
            }
        }
        self.shared = shared;
    }

    /// Whether `addr` is an endpoint of the pools in use.
    pub fn is_endpoint(&self, addr: SocketAddr) -> bool {
        self.shared.is_endpoint(addr)
    }

    /// Sets the time for what follows.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// A datagram of `len` bytes from `client` is about to reach the guest: what
    /// it earns (answers within the reply ratio, a new chain of calls) is noted.
    pub fn client_datagram(&mut self, client: SocketAddr, len: usize) {
        self.client_len = len;
        if let Some(ledger) = self.ledgers.get_mut(&client) {
            ledger.on_datagram(len);
        }
        self.begin(client);
    }

    /// What an upstream answer to `client` may still bring it: bytes within the
    /// reply ratio, and calls of the `on_reply` chain its last datagram started.
    pub fn allowance(&self, client: SocketAddr) -> Allowance {
        match self.ledgers.get(&client) {
            Some(l) => Allowance {
                bytes: l.bytes_left(self.max_ratio),
                calls: l.calls_left,
            },
            None => Allowance { bytes: 0, calls: 0 },
        }
    }

    /// Counts `bytes` sent to `client` from upstream answers, and `calls` made
    /// by `on_reply` on its behalf.
    pub fn charge(&mut self, client: SocketAddr, bytes: usize, calls: u32) {
        if let Some(ledger) = self.ledgers.get_mut(&client) {
            ledger.charge(bytes, calls);
        }
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
            .position(|wp| !wp.retired && wp.name.as_bytes() == pool)
            .ok_or(CallError::UnknownPool)?;
        // A second try after an endpoint turned out to be down, on another one.
        for _ in 0..2 {
            let s = self.session_for(client, p, key)?;
            let session = &mut self.sessions[s];
            match session.socket.send(data) {
                Ok(_) => {
                    session.last_active = self.now;
                    session.awaiting = session.awaiting.saturating_add(1);
                    session.counters.to.fetch_add(1, Relaxed);
                    session.counters.to_bytes.fetch_add(data.len() as u64, Relaxed);
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
                // The client keeps its session while its endpoint is healthy, and
                // also when a reload removed the endpoint (the session drains).
                if let Some(&s) = self.affinity.get(&(client, p))
                    && let Some(session) = self.sessions.get(s)
                    && session.index.is_none_or(|i| wp.pool.is_healthy(i, now))
                {
                    return Ok(s);
                }
                let key = &self.client_key[..self.client_key_len];
                wp.pool.pick(key, now).ok_or(CallError::NoHealthyEndpoint)?
            }
        };
        let addr = wp.pool.endpoints()[endpoint].addr;
        let s = match self.routes.get(&(client, p, addr)) {
            Some(&s) => s,
            None => self.open(client, p, endpoint)?,
        };
        if key.is_none() {
            self.affinity.insert((client, p), s);
        }
        Ok(s)
    }

    fn open(&mut self, client: SocketAddr, p: usize, endpoint: usize) -> Result<usize, CallError> {
        // A full table, or a network at its share, makes room by closing its
        // oldest session that never had an answer (most likely a spoofed
        // client's) before refusing anyone.
        let prefix = Prefix::of(client);
        let from_prefix = self.prefixes.get(&(p, prefix)).copied().unwrap_or(0);
        if from_prefix >= self.pools[p].max_per_prefix && !self.evict_unanswered(p, Some(prefix)) {
            return Err(CallError::SessionOverflow);
        }
        if self.pools[p].open >= self.pools[p].max && !self.evict_unanswered(p, None) {
            return Err(CallError::SessionOverflow);
        }
        let wp = &mut self.pools[p];
        let addr = wp.pool.endpoints()[endpoint].addr;
        let socket = connect(addr).map_err(|_| CallError::UpstreamError)?;
        let port = socket.local_addr().map_err(|_| CallError::UpstreamError)?.port();
        let entry = self.sessions.vacant_entry();
        let s = entry.key();
        let mut socket = mio::net::UdpSocket::from_std(socket);
        self.registry
            .register(&mut socket, Token(s + 1), Interest::READABLE)
            .map_err(|_| CallError::UpstreamError)?;
        self.ports.add(port);
        let seq = self.next_seq;
        self.next_seq += 1;
        entry.insert(Session {
            socket,
            port,
            answered: false,
            seq,
            draining_since: None,
            prefix,
            client,
            pool: p,
            endpoint: addr,
            index: Some(endpoint),
            counters: Arc::clone(&wp.counters[endpoint]),
            last_active: self.now,
            label: format!("{}/{addr}", wp.name),
            awaiting: 0,
        });
        wp.open += 1;
        wp.pool.session_opened(endpoint);
        wp.counters[endpoint].sessions_created.fetch_add(1, Relaxed);
        wp.counters[endpoint].sessions_active.fetch_add(1, Relaxed);
        self.routes.insert((client, p, addr), s);
        self.unanswered.push_back((s, seq));
        *self.prefixes.entry((p, prefix)).or_insert(0) += 1;
        let client_len = self.client_len;
        self.ledgers
            .entry(client)
            .or_insert_with(|| Ledger::new(client_len))
            .sessions += 1;
        self.counters.session_created(self.sessions.len());
        Ok(s)
    }

    /// Closes the oldest session of pool `p` (from `prefix`, if given) that
    /// never had an answer, if any.
    fn evict_unanswered(&mut self, p: usize, prefix: Option<Prefix>) -> bool {
        let found = self.unanswered.iter().position(|&(s, seq)| {
            self.sessions
                .get(s)
                .is_some_and(|x| x.seq == seq && !x.answered && x.pool == p && prefix.is_none_or(|pf| x.prefix == pf))
        });
        // Entries in front of it are of sessions answered or gone, or of other pools.
        let Some(at) = found else { return false };
        let Some((s, _)) = self.unanswered.remove(at) else {
            return false;
        };
        while self
            .unanswered
            .front()
            .is_some_and(|&(s, seq)| self.sessions.get(s).is_none_or(|x| x.seq != seq || x.answered))
        {
            self.unanswered.pop_front();
        }
        if let Some(session) = self.sessions.get(s) {
            session.counters.sessions_evicted.fetch_add(1, Relaxed);
        }
        self.close(s, false);
        true
    }

    /// Session `s` was refused (ICMP port unreachable): counted against its
    /// endpoint, which is ejected after `eject_after` in a row (never the last
    /// healthy one), and closed; the client's next datagram opens another.
    fn refused(&mut self, s: usize) {
        let Some(session) = self.sessions.get(s) else {
            return;
        };
        session.counters.refusals.fetch_add(1, Relaxed);
        let wp = &self.pools[session.pool];
        if let Some(i) = session.index {
            match wp.pool.refused(i, wp.eject_after, self.now, self.now + wp.eject_for) {
                Refusal::Ejected { news } => {
                    session.counters.ejections.fetch_add(1, Relaxed);
                    if news && let Some(suppressed) = self.shared.health_lines.allow() {
                        tracing::warn!(
                            pool = wp.name,
                            endpoint = %session.endpoint,
                            eject_for = ?wp.eject_for,
                            refusals = wp.eject_after,
                            suppressed,
                            "endpoint ejected: it answered with ICMP port unreachable"
                        );
                    }
                }
                Refusal::Spared => {
                    if let Some(suppressed) = self.shared.health_lines.allow() {
                        tracing::warn!(
                            pool = wp.name,
                            endpoint = %session.endpoint,
                            suppressed,
                            "endpoint refuses datagrams but is the pool's last healthy one: kept in use"
                        );
                    }
                }
                Refusal::Counted => {}
            }
        }
        self.close(s, false);
    }

    fn close(&mut self, s: usize, expired: bool) {
        if !self.sessions.contains(s) {
            return;
        }
        let mut session = self.sessions.remove(s);
        let _ = self.registry.deregister(&mut session.socket);
        self.ports.remove(session.port);
        self.routes.remove(&(session.client, session.pool, session.endpoint));
        if let Some(n) = self.prefixes.get_mut(&(session.pool, session.prefix)) {
            *n -= 1;
            if *n == 0 {
                self.prefixes.remove(&(session.pool, session.prefix));
            }
        }
        if self.affinity.get(&(session.client, session.pool)) == Some(&s) {
            self.affinity.remove(&(session.client, session.pool));
        }
        if let Some(ledger) = self.ledgers.get_mut(&session.client) {
            ledger.sessions -= 1;
            if ledger.sessions == 0 {
                self.ledgers.remove(&session.client);
            }
        }
        session.counters.sessions_active.fetch_sub(1, Relaxed);
        if expired {
            session.counters.sessions_expired.fetch_add(1, Relaxed);
        }
        let wp = &mut self.pools[session.pool];
        wp.open = wp.open.saturating_sub(1);
        if let Some(i) = session.index {
            wp.pool.session_closed(i);
        }
        self.counters.session_closed(self.sessions.len(), expired);
    }

    /// Reads what the session with `token` holds, up to a batch, into `rx`
    /// (one `recvmmsg`).
    pub fn recv(&mut self, token: Token, rx: &mut RecvBatch) -> Recv {
        let Some(s) = token.0.checked_sub(1) else {
            return Recv::Gone;
        };
        let Some(session) = self.sessions.get_mut(s) else {
            return Recv::Gone;
        };
        loop {
            match rx.recv(&session.socket) {
                Ok(n) => {
                    session.last_active = self.now;
                    session.awaiting = session.awaiting.saturating_sub(n as u32);
                    session.answered = true;
                    if let Some(i) = session.index {
                        self.pools[session.pool].pool.answered(i);
                    }
                    for (datagram, _) in (0..n).filter_map(|i| rx.get(i)) {
                        session.counters.from.fetch_add(1, Relaxed);
                        session.counters.from_bytes.fetch_add(datagram.len() as u64, Relaxed);
                        self.counters.upstream_received(datagram.len());
                    }
                    return Recv::Datagrams(n);
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

    /// Closes the sessions idle for longer than their pool's `idle_timeout` (or
    /// `unanswered_timeout`, for those that never had an answer) and those that
    /// drained for `drain_timeout`, and reports endpoints whose ejection has ended.
    pub fn expire(&mut self, now: Instant) {
        let mut idle = Vec::new();
        let mut drained = Vec::new();
        for (k, s) in &self.sessions {
            let wp = &self.pools[s.pool];
            let timeout = if s.answered {
                wp.idle_timeout
            } else {
                wp.unanswered_timeout.min(wp.idle_timeout)
            };
            if s.draining_since
                .is_some_and(|t| now.saturating_duration_since(t) >= wp.drain_timeout)
            {
                drained.push(k);
            } else if now.saturating_duration_since(s.last_active) >= timeout {
                idle.push(k);
            }
        }
        for s in idle {
            self.close(s, true);
        }
        for s in drained {
            if let Some(session) = self.sessions.get(s) {
                session.counters.sessions_drained.fetch_add(1, Relaxed);
            }
            self.close(s, false);
        }
        // Entries of sessions answered or gone are dropped; a long-lived
        // unanswered session at the front must not keep the rest forever.
        let sessions = &self.sessions;
        let valid = |&(s, seq): &(usize, u64)| sessions.get(s).is_some_and(|x| x.seq == seq && !x.answered);
        if self.unanswered.len() > 2 * self.sessions.len() + 64 {
            self.unanswered.retain(valid);
        }
        while self.unanswered.front().is_some_and(|e| !valid(e)) {
            self.unanswered.pop_front();
        }
        for wp in self.pools.iter().filter(|wp| !wp.retired) {
            for (i, e) in wp.pool.endpoints().iter().enumerate() {
                if wp.pool.came_back(i, now)
                    && let Some(suppressed) = self.shared.health_lines.allow()
                {
                    tracing::info!(pool = wp.name, endpoint = %e.addr, suppressed, "endpoint back after ejection");
                }
            }
        }
    }

    /// How often [`Upstreams::expire`] should run: a quarter of the shortest idle
    /// timeout, between 10 ms and 1 s.
    pub fn sweep_every(&self) -> Duration {
        self.pools
            .iter()
            .map(|wp| wp.idle_timeout.min(wp.unanswered_timeout).min(wp.drain_timeout) / 4)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_held_to_the_ratio_until_it_talks_on_after_an_answer() {
        let mut l = Ledger::new(20);
        assert_eq!(l.bytes_left(3.0), 60);
        l.charge(50, 0);
        assert_eq!(l.bytes_left(3.0), 10);
        // Its own datagrams earn more, and count toward proving its address.
        l.on_datagram(10);
        assert_eq!(l.bytes_left(3.0), 40);
        l.on_datagram(10);
        assert_eq!(l.after_answer, VALIDATED_AFTER);
        assert_eq!(l.bytes_left(3.0), usize::MAX);
        // No ratio: no cap from the start.
        assert_eq!(Ledger::new(1).bytes_left(0.0), usize::MAX);
        // Datagrams before any answer prove nothing.
        let mut spoofed = Ledger::new(10);
        for _ in 0..10 {
            spoofed.on_datagram(10);
        }
        assert_eq!(spoofed.bytes_left(3.0), 330);
    }

    #[test]
    fn on_reply_calls_come_from_one_allowance_that_the_clients_datagram_renews() {
        let mut l = Ledger::new(5);
        l.charge(0, 40);
        l.charge(0, 40);
        assert_eq!(l.calls_left, 0);
        l.on_datagram(5);
        assert_eq!(l.calls_left, MAX_CALLS_PER_DATAGRAM);
    }

    #[test]
    fn clients_of_one_network_share_a_prefix() {
        let p = |s: &str| Prefix::of(s.parse().unwrap());
        assert_eq!(p("192.0.2.1:53"), p("192.0.2.200:9"));
        assert_ne!(p("192.0.2.1:53"), p("192.0.3.1:53"));
        assert_eq!(p("[::ffff:192.0.2.1]:53"), p("192.0.2.7:1"));
        assert_eq!(p("[2001:db8:1::1]:53"), p("[2001:db8:1:ffff::2]:53"));
        assert_ne!(p("[2001:db8:1::1]:53"), p("[2001:db8:2::1]:53"));
    }
}
