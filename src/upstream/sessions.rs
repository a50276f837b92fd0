//! One worker's session table, with no socket and no clock of its own: which
//! session each client's forward goes to (affinity, policy, key), the caps
//! (`max_sessions`, per network), eviction of unvalidated sessions, idle expiry,
//! the drain of removed endpoints, and what each client may be sent (the reply
//! ratio) and may cause (the call allowance). Passive health from refusals is
//! in `refusals.rs`, shared pools (sockets and client handles) in
//! `shared_pool.rs`.
//!
//! Like quinn-proto's endpoint it performs no I/O: time comes in (`set_now`,
//! `expire`), and socket work goes out as [`Command`]s that the worker applies
//! (`poll_commands`), telling back what each did. So every rule here is unit
//! tested with a made-up clock and no network.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::commands::{Applied, Apply, Command, Queue, Queued, QueuedSend, Retry, SessionId};
use super::handles::{Handles, Target};
use super::ledger::Ledgers;
use super::pools::Pools;
use super::session::{Prefix, Session, WorkerPool};
use super::shared::SharedSockets;
use crate::metrics::Counters;
use crate::net::proxy_v2;
use crate::verdict::{Allowance, CallError};

/// A worker's sessions as the worker holds them: `None` without pools, and
/// taken out while a guest call borrows them (see `guest::host`).
pub type Lent = Option<Box<Sessions>>;

/// A worker's forwarding state.
pub struct Sessions {
    pub(super) shared: Arc<Pools>,
    pub(super) worker: usize,
    pub(super) pools: Vec<WorkerPool>,
    pub(super) sessions: HashMap<SessionId, Session>,
    /// (client, pool, endpoint) → session.
    pub(super) routes: HashMap<(SocketAddr, usize, SocketAddr), SessionId>,
    /// (client, pool) → the session plain `forward` keeps using while it is healthy.
    pub(super) affinity: HashMap<(SocketAddr, usize), SessionId>,
    /// Sessions of clients not yet validated, oldest first; entries of
    /// sessions closed or of clients since validated are skipped when met.
    pub(super) unvalidated: VecDeque<SessionId>,
    /// Ids are never reused, so a command queued for a closed session can
    /// never reach a newer one.
    pub(super) next_id: u64,
    /// Opens, sends and closes for the worker to apply, in order
    /// ([`Sessions::poll_commands`]).
    pub(super) queue: Queue,
    /// (pool, client network) → sessions open.
    pub(super) prefixes: HashMap<(usize, Prefix), usize>,
    pub(super) counters: Arc<Counters>,
    /// The time of the batch being handled (read once per wake-up, not per datagram).
    pub(super) now: Instant,
    /// The client the guest is answering, as received, and its hash key.
    pub(super) client: Option<SocketAddr>,
    pub(super) client_key: [u8; 18],
    pub(super) client_key_len: usize,
    /// What each client with a session has earned and spent.
    pub(super) ledgers: Ledgers,
    /// The listener's address: the destination a PROXY v2 header names.
    pub(super) listener: SocketAddr,
    /// Shared pools' sockets, and the handles that name their clients.
    pub(super) carriers: SharedSockets,
    pub(super) handles: Handles,
    /// While a shared socket's answers are handled: its endpoint.
    pub(super) answering: Option<Target>,
}

/// Where datagrams read from an upstream socket go.
pub struct Received<'a> {
    /// The session's client (as received); `None` on a shared pool's socket:
    /// `on_reply` names the client of each answer.
    pub client: Option<SocketAddr>,
    /// The endpoint's `POOL/ip:port`.
    pub label: &'a str,
    /// Whether the pool speaks the PROXY protocol (a header on an answer is
    /// to check and take off).
    pub proxy_protocol: bool,
}

impl Sessions {
    /// Worker `worker`'s share of `shared`, as of `now`.
    pub fn new(shared: Arc<Pools>, worker: usize, counters: Arc<Counters>, max_ratio: f64, now: Instant) -> Self {
        let mut this = Self {
            shared: Arc::clone(&shared),
            worker,
            pools: Vec::new(),
            sessions: HashMap::new(),
            routes: HashMap::new(),
            affinity: HashMap::new(),
            unvalidated: VecDeque::new(),
            next_id: 0,
            queue: Queue::default(),
            prefixes: HashMap::new(),
            counters,
            now,
            client: None,
            client_key: [0; 18],
            client_key_len: 0,
            ledgers: Ledgers::new(max_ratio),
            listener: SocketAddr::from(([0, 0, 0, 0], 0)),
            carriers: SharedSockets::default(),
            handles: Handles::new(),
            answering: None,
        };
        this.adopt(shared);
        this
    }

    /// The listener these sessions forward for (a PROXY v2 header's destination).
    pub fn serving(mut self, listener: SocketAddr) -> Self {
        self.listener = listener;
        self
    }

    /// Whether `pools` is the version this worker uses.
    pub fn uses(&self, pools: &Arc<Pools>) -> bool {
        Arc::ptr_eq(&self.shared, pools)
    }

    /// Takes a reloaded version of the pools: new endpoints take new sessions at
    /// once; sessions to removed endpoints (or pools) carry on until idle.
    pub fn adopt(&mut self, shared: Arc<Pools>) {
        WorkerPool::adopt(&mut self.pools, &shared, self.worker);
        // Sessions find their endpoint in the new lists (and count for least-sessions).
        for s in self.sessions.values_mut() {
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
        self.answering = None;
        self.ledgers.on_datagram(client, len);
        self.begin(client);
    }

    /// What an upstream answer to `client` may still bring it: bytes within the
    /// reply ratio, and calls of the `on_reply` chain its last datagram started.
    pub fn allowance(&self, client: SocketAddr) -> Allowance {
        self.ledgers.allowance(client)
    }

    /// Counts `bytes` sent to `client` from upstream answers, and `calls` made
    /// by `on_reply` on its behalf.
    pub fn charge(&mut self, client: SocketAddr, bytes: usize, calls: u32) {
        self.ledgers.charge(client, bytes, calls);
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

    /// Queues `data` for an endpoint of the pool named `pool`, for the current
    /// client: by the pool's policy (keeping the client's session while its
    /// endpoint is healthy), or by hashing `key`. `Ok` means queued; what the
    /// socket then says is counted when the worker applies the commands.
    pub fn forward(&mut self, pool: &[u8], key: Option<&[u8]>, data: &[u8]) -> Result<(), CallError> {
        let client = self.client.ok_or(CallError::NoClient)?;
        let p = self
            .pools
            .iter()
            .position(|wp| !wp.retired && wp.name.as_bytes() == pool)
            .ok_or(CallError::UnknownPool)?;
        let id = self.route(client, p, key)?;
        let key = key.map(|k| self.stash(k));
        let header = self.pools[p].proxy_protocol.then_some(self.listener);
        let bytes = self
            .queue
            .stash_with(data, |arena| header.map_or((), |l| proxy_v2::write(client, l, arena)));
        let retry = Some(Retry { client, pool: p, key });
        self.queue_send(id, bytes, retry);
        Ok(())
    }

    fn stash(&mut self, bytes: &[u8]) -> Range<usize> {
        self.queue.stash(bytes)
    }

    /// The session (or shared socket) for `client`'s datagram to pool `p`.
    fn route(&mut self, client: SocketAddr, p: usize, key: Option<&[u8]>) -> Result<SessionId, CallError> {
        match self.pools[p].shared {
            Some(spec) => self.shared_route(client, p, spec, key),
            None => self.session_for(client, p, key),
        }
    }

    fn queue_send(&mut self, id: SessionId, bytes: Range<usize>, retry: Option<Retry>) {
        let counters = match self.sessions.get(&id) {
            Some(session) => Some(&session.counters),
            None => self.carriers.get(id).map(|s| &s.counters),
        };
        if let Some(counters) = counters {
            let counters = Arc::clone(counters);
            self.queue.push(Queued::Send(QueuedSend {
                id,
                bytes,
                counters,
                retry,
            }));
        }
    }

    /// The session for `client` in pool `p`, opened if needed.
    fn session_for(&mut self, client: SocketAddr, p: usize, key: Option<&[u8]>) -> Result<SessionId, CallError> {
        let now = self.now;
        let wp = &mut self.pools[p];
        let endpoint = match key {
            Some(key) => wp.pool.by_hash(key, now).ok_or(CallError::NoHealthyEndpoint)?,
            None => {
                // The client keeps its session while its endpoint is healthy, and
                // also when a reload removed the endpoint (the session drains).
                if let Some(&s) = self.affinity.get(&(client, p))
                    && let Some(session) = self.sessions.get(&s)
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

    fn open(&mut self, client: SocketAddr, p: usize, endpoint: usize) -> Result<SessionId, CallError> {
        // A full table, or a network at its share, makes room by closing its
        // oldest session of a client that never proved its address (most
        // likely a spoofed one, whatever the upstream answered) before
        // refusing anyone. A validated client is never closed for another.
        let prefix = Prefix::of(client);
        let from_prefix = self.prefixes.get(&(p, prefix)).copied().unwrap_or(0);
        if from_prefix >= self.pools[p].max_per_prefix && !self.evict_unvalidated(p, Some(prefix)) {
            return Err(CallError::SessionOverflow);
        }
        if self.pools[p].open >= self.pools[p].max && !self.evict_unvalidated(p, None) {
            return Err(CallError::SessionOverflow);
        }
        let wp = &mut self.pools[p];
        let addr = wp.pool.endpoints()[endpoint].addr;
        let id = SessionId::from_raw(self.next_id);
        self.next_id += 1;
        self.sessions.insert(
            id,
            Session {
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
            },
        );
        self.queue.push(Queued::Open { id, to: addr });
        wp.open += 1;
        wp.pool.session_opened(endpoint);
        wp.counters[endpoint].sessions_created.fetch_add(1, Relaxed);
        wp.counters[endpoint].sessions_active.fetch_add(1, Relaxed);
        self.routes.insert((client, p, addr), id);
        self.unvalidated.push_back(id);
        *self.prefixes.entry((p, prefix)).or_insert(0) += 1;
        self.ledgers.opened(client);
        self.counters.session_created(self.sessions.len());
        Ok(id)
    }

    /// Closes the oldest session of pool `p` (from `prefix`, if given) whose
    /// client has not proven its address, if any.
    fn evict_unvalidated(&mut self, p: usize, prefix: Option<Prefix>) -> bool {
        let found = self.unvalidated.iter().position(|s| {
            self.sessions.get(s).is_some_and(|x| {
                !self.ledgers.validated(x.client) && x.pool == p && prefix.is_none_or(|pf| x.prefix == pf)
            })
        });
        // Entries in front of it are of sessions validated or gone, or of other pools.
        let Some(at) = found else { return false };
        let Some(s) = self.unvalidated.remove(at) else {
            return false;
        };
        self.skip_validated();
        if let Some(session) = self.sessions.get(&s) {
            session.counters.sessions_evicted.fetch_add(1, Relaxed);
        }
        self.close(s, false);
        true
    }

    /// Drops the entries at the front of `unvalidated` of sessions gone or of
    /// clients since validated.
    fn skip_validated(&mut self) {
        while self
            .unvalidated
            .front()
            .is_some_and(|s| self.sessions.get(s).is_none_or(|x| self.ledgers.validated(x.client)))
        {
            self.unvalidated.pop_front();
        }
    }

    pub(super) fn close(&mut self, s: SessionId, expired: bool) {
        let Some(session) = self.sessions.remove(&s) else {
            if self.carriers.remove(s).is_some() {
                self.queue.push(Queued::Close { id: s });
            }
            return;
        };
        self.queue.push(Queued::Close { id: s });
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
        self.ledgers.closed(session.client);
        session.counters.sessions_active.fetch_sub(1, Relaxed);
        if expired {
            session.counters.sessions_expired.fetch_add(1, Relaxed);
        }
        let wp = &mut self.pools[session.pool];
        wp.open = wp.open.saturating_sub(1);
        if let Some(i) = session.index {
            wp.pool.session_closed(i, expired && session.awaiting > 0);
        }
        self.counters.session_closed(self.sessions.len(), expired);
    }

    /// The opens, sends and closes queued since the last poll, in order, each
    /// handed to `apply`, which says what the socket did. A send refused (ICMP
    /// port unreachable) counts against its endpoint, closes the session and is
    /// forwarded once more, on another endpoint if that one was ejected; a send
    /// that fails otherwise (its session's socket could not be opened, say) is
    /// counted as a refused call (`upstream_error`).
    pub fn poll_commands<A: Apply + ?Sized>(&mut self, apply: &mut A) {
        let (mut sends, mut fates) = self.queue.take_scratch();
        while !self.queue.is_empty() {
            let (mut queue, arena) = self.queue.take();
            for queued in queue.drain(..) {
                // Sends gather to go out together; an open or a close is
                // applied after the sends queued before it, as queued.
                match queued {
                    Queued::Send(send) => sends.push(send),
                    Queued::Open { id, to } => {
                        self.send_all(apply, &mut sends, &mut fates, &arena);
                        // Its datagrams then fail to send, and are counted there.
                        if apply.apply(Command::Open { id, to }) != Applied::Done {
                            self.close(id, false);
                        }
                    }
                    Queued::Close { id } => {
                        self.send_all(apply, &mut sends, &mut fates, &arena);
                        apply.apply(Command::Close { id });
                    }
                }
            }
            self.send_all(apply, &mut sends, &mut fates, &arena);
            self.queue.recycle(queue, arena);
        }
        self.queue.give_scratch(sends, fates);
    }

    /// Sends `sends` together and settles each by its fate.
    fn send_all<A: Apply + ?Sized>(
        &mut self,
        apply: &mut A,
        sends: &mut Vec<QueuedSend>,
        fates: &mut Vec<Applied>,
        arena: &[u8],
    ) {
        if sends.is_empty() {
            return;
        }
        fates.clear();
        let bytes = |s: &QueuedSend| arena.get(s.bytes.clone()).unwrap_or_default();
        apply.send_all(sends.iter().map(|s| (s.id, bytes(s))), fates);
        for (i, send) in sends.drain(..).enumerate() {
            let (datagram, counters) = (bytes(&send), &send.counters);
            match fates.get(i).copied().unwrap_or(Applied::Failed) {
                Applied::Done => {
                    counters.to.fetch_add(1, Relaxed);
                    counters.to_bytes.fetch_add(datagram.len() as u64, Relaxed);
                    if let Some(session) = self.sessions.get_mut(&send.id) {
                        session.last_active = self.now;
                        session.awaiting = session.awaiting.saturating_add(1);
                    } else if let Some(socket) = self.carriers.get_mut(send.id) {
                        socket.awaiting = socket.awaiting.saturating_add(1);
                    }
                }
                Applied::Refused => {
                    if self.sessions.contains_key(&send.id) || self.carriers.get(send.id).is_some() {
                        self.refused(send.id);
                    } else {
                        counters.refusals.fetch_add(1, Relaxed);
                    }
                    match send.retry {
                        Some(retry) => self.retry(retry, datagram, arena),
                        None => self.counters.refused(CallError::UpstreamError, 1),
                    }
                }
                Applied::Failed => self.counters.refused(CallError::UpstreamError, 1),
            }
        }
    }

    /// Forwards a refused datagram once more, as the guest asked for it.
    fn retry(&mut self, retry: Retry, datagram: &[u8], arena: &[u8]) {
        self.begin(retry.client);
        let key = retry.key.map(|k| &arena[k]);
        match self.route(retry.client, retry.pool, key) {
            Ok(id) => {
                let bytes = self.stash(datagram);
                self.queue_send(id, bytes, None);
            }
            Err(error) => self.counters.refused(error, 1),
        }
    }

    /// How many commands are queued: a mark for [`Sessions::sends_since`].
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The datagrams of the sends queued after `mark` (from [`Sessions::queued`]
    /// before the guest ran), in order: what one client datagram forwarded.
    pub fn sends_since(&self, mark: usize) -> impl Iterator<Item = &[u8]> {
        self.queue.sends_since(mark)
    }

    /// The endpoint (`POOL/ip:port`) of the first send queued after `mark`:
    /// where one client datagram was forwarded, for the access log.
    pub fn forwarded_to_since(&self, mark: usize) -> Option<&str> {
        let id = self.queue.first_send_since(mark)?;
        match self.sessions.get(&id) {
            Some(session) => Some(&session.label),
            None => self.carriers.get(id).map(|socket| socket.label.as_str()),
        }
    }

    /// Session `id`'s client (as received) and endpoint, while it is open.
    pub fn session(&self, id: SessionId) -> Option<(SocketAddr, SocketAddr)> {
        self.sessions.get(&id).map(|s| (s.client, s.endpoint))
    }

    /// `n` datagrams of these sizes came back on session `id`: the client they
    /// are for, the endpoint's `POOL/ip:port` label and whether the pool speaks
    /// the PROXY protocol (a header on them is to check and take off), or
    /// `None` if the session is gone.
    pub fn received(&mut self, id: SessionId, sizes: impl IntoIterator<Item = usize>) -> Option<Received<'_>> {
        self.answering = None;
        if !self.sessions.contains_key(&id) {
            return self.shared_received(id, sizes);
        }
        let session = self.sessions.get_mut(&id)?;
        let n = session.counters.answers(&self.counters, sizes);
        if n > 0 {
            session.last_active = self.now;
            session.awaiting = session.awaiting.saturating_sub(n);
            if let Some(i) = session.index {
                self.pools[session.pool].pool.answered(i);
            }
        }
        Some(Received {
            client: Some(session.client),
            label: &session.label,
            proxy_protocol: self.pools[session.pool].proxy_protocol,
        })
    }

    /// Closes the sessions idle for longer than their pool's `idle_timeout` (or
    /// `unanswered_timeout`, for those whose client has not proven its address)
    /// and those that drained for `drain_timeout`, and reports endpoints whose
    /// ejection has ended.
    pub fn expire(&mut self, now: Instant) {
        let mut idle = Vec::new();
        let mut drained = Vec::new();
        for (&k, s) in &self.sessions {
            let wp = &self.pools[s.pool];
            let timeout = if self.ledgers.validated(s.client) {
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
            if let Some(session) = self.sessions.get(&s) {
                session.counters.sessions_drained.fetch_add(1, Relaxed);
            }
            self.close(s, false);
        }
        // Entries of sessions validated or gone are dropped; a long-lived
        // unvalidated session at the front must not keep the rest forever.
        if self.unvalidated.len() > 2 * self.sessions.len() + 64 {
            let (sessions, ledgers) = (&self.sessions, &self.ledgers);
            self.unvalidated
                .retain(|s| sessions.get(s).is_some_and(|x| !ledgers.validated(x.client)));
        }
        self.skip_validated();
        self.expire_shared(now);
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

    /// How often [`Sessions::expire`] should run: a quarter of the shortest idle
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
        self.sessions.values().any(|s| s.awaiting > 0) || self.carriers.awaiting()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::VALIDATED_AFTER;
    use crate::upstream::session::share;
    use crate::verdict::MAX_CALLS_PER_DATAGRAM;

    // The session table driven by hand: a made-up clock, commands read back as
    // values, socket outcomes chosen by the test. No socket, no sleep.

    use crate::config::PoolSpec;
    use crate::metrics::Stats;
    use crate::upstream::pool::Policy;

    const A: &str = "192.0.2.10:53";
    const B: &str = "192.0.2.11:53";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Client `i`, each on its own network (so per-network caps stay out of the way).
    fn client(i: u8) -> SocketAddr {
        SocketAddr::new([198, 51, i, 1].into(), 5000)
    }

    fn pool(endpoints: &[&str]) -> PoolSpec {
        PoolSpec::new("backend", endpoints.iter().map(|e| e.to_string()).collect())
    }

    /// What a command did, owned, for comparing.
    #[derive(Debug, PartialEq)]
    enum Cmd {
        Open(u64, SocketAddr),
        Send(u64, Vec<u8>),
        Close(u64),
    }

    struct Harness {
        table: Sessions,
        pools: Arc<Pools>,
        stats: Stats,
        t0: Instant,
    }

    fn harness(spec: PoolSpec) -> Harness {
        harness_of(spec, 1, 0)
    }

    /// Worker `worker` of `workers`.
    fn harness_of(spec: PoolSpec, workers: usize, worker: usize) -> Harness {
        let pools = Arc::new(Pools::new(&[spec], workers).unwrap());
        let stats = Stats::with_workers(1);
        let t0 = Instant::now();
        let table = Sessions::new(Arc::clone(&pools), worker, stats.worker(0), 3.0, t0);
        Harness {
            table,
            pools,
            stats,
            t0,
        }
    }

    impl Harness {
        /// `client`'s datagram reached the guest, which forwards it to "backend".
        fn forward(&mut self, client: SocketAddr, data: &[u8]) -> Result<(), CallError> {
            self.table.client_datagram(client, data.len());
            self.table.forward(b"backend", None, data)
        }

        /// Every queued command, each applied as `fate` says.
        fn commands_with(&mut self, mut fate: impl FnMut(&Command<'_>) -> Applied) -> Vec<Cmd> {
            let mut out = Vec::new();
            self.table.poll_commands(&mut |c: Command<'_>| {
                out.push(match &c {
                    Command::Open { id, to } => Cmd::Open(id.raw(), *to),
                    Command::Send { id, datagram } => Cmd::Send(id.raw(), datagram.to_vec()),
                    Command::Close { id } => Cmd::Close(id.raw()),
                });
                fate(&c)
            });
            out
        }

        fn commands(&mut self) -> Vec<Cmd> {
            self.commands_with(|_| Applied::Done)
        }

        /// The upstream answers on session `id`, and the answer goes to `client`.
        fn answer(&mut self, client: SocketAddr, id: SessionId) {
            assert_eq!(self.table.received(id, [1]).and_then(|r| r.client), Some(client));
            self.table.charge(client, 1, 0);
        }

        /// `client` gets an answer on session `id`, then talks on: validated.
        fn validate(&mut self, client: SocketAddr, id: SessionId) {
            self.answer(client, id);
            for _ in 0..VALIDATED_AFTER {
                self.forward(client, b"more").unwrap();
            }
            self.commands();
        }

        fn at(&mut self, after: Duration) -> Instant {
            let now = self.t0 + after;
            self.table.set_now(now);
            now
        }

        fn endpoint(&self, a: &str) -> EndpointView_ {
            let e = self
                .pools
                .endpoints(self.table.now)
                .into_iter()
                .find(|e| e.addr == addr(a))
                .unwrap();
            EndpointView_ {
                healthy: e.healthy,
                active: e.totals.sessions_active,
                expired: e.totals.sessions_expired,
                evicted: e.totals.sessions_evicted,
                ejections: e.totals.ejections,
                to: e.totals.to,
            }
        }
    }

    #[derive(Debug)]
    struct EndpointView_ {
        healthy: bool,
        active: u64,
        expired: u64,
        evicted: u64,
        ejections: u64,
        to: u64,
    }

    #[test]
    fn a_forward_opens_one_session_and_queues_the_datagrams_in_order() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"one").unwrap();
        h.forward(client(1), b"two").unwrap();
        assert_eq!(
            h.commands(),
            [
                Cmd::Open(0, addr(A)),
                Cmd::Send(0, b"one".to_vec()),
                Cmd::Send(0, b"two".to_vec())
            ]
        );
        assert_eq!(h.commands(), [], "each command is given once");
        assert_eq!(h.endpoint(A).to, 2, "sent datagrams are counted when applied");
    }

    /// Says how the commands reached it: one at a time, or sends together.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Apply for Recorder {
        fn apply(&mut self, c: Command<'_>) -> Applied {
            self.0.push(match c {
                Command::Open { id, .. } => format!("open {}", id.raw()),
                Command::Send { id, .. } => format!("send {}", id.raw()),
                Command::Close { id } => format!("close {}", id.raw()),
            });
            Applied::Done
        }

        fn send_all<'b>(
            &mut self,
            sends: impl ExactSizeIterator<Item = (SessionId, &'b [u8])> + Clone,
            fates: &mut Vec<Applied>,
        ) {
            let sends: Vec<String> = sends
                .map(|(id, d)| format!("{}:{}", id.raw(), String::from_utf8_lossy(d)))
                .collect();
            fates.extend(sends.iter().map(|_| Applied::Done));
            self.0.push(format!("together {}", sends.join(" ")));
        }
    }

    #[test]
    fn the_sends_between_opens_and_closes_go_out_together_in_order() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"a").unwrap();
        h.forward(client(1), b"b").unwrap();
        h.forward(client(2), b"c").unwrap();
        h.forward(client(1), b"d").unwrap();
        let mut r = Recorder::default();
        h.table.poll_commands(&mut r);
        // Each open goes after the sends queued before it, so that a send
        // never reaches a socket before its open.
        assert_eq!(r.0, ["open 0", "together 0:a 0:b", "open 1", "together 1:c 0:d"]);
        assert_eq!(h.endpoint(A).to, 4, "each send's fate is settled");
    }

    #[test]
    fn clients_keep_their_endpoint_and_round_robin_spreads_new_ones() {
        let mut h = harness(PoolSpec {
            policy: Policy::RoundRobin,
            ..pool(&[A, B])
        });
        h.forward(client(1), b"x").unwrap();
        h.forward(client(2), b"x").unwrap();
        h.forward(client(1), b"y").unwrap();
        let opened: Vec<SocketAddr> = h
            .commands()
            .into_iter()
            .filter_map(|c| match c {
                Cmd::Open(_, to) => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(opened.len(), 2, "client 1's second datagram reuses its session");
        assert_ne!(
            opened[0], opened[1],
            "round-robin gives the second client the other endpoint"
        );
    }

    #[test]
    fn forward_key_goes_to_the_endpoint_the_key_hashes_to_whatever_the_client() {
        let mut h = harness(pool(&[A, B]));
        let key = b"session-token-7";
        let expected = h.pools.pools[0].pool.by_hash(key, h.t0).unwrap();
        let expected = h.pools.pools[0].pool.endpoints()[expected].addr;
        for i in 0..5 {
            h.table.client_datagram(client(i), 1);
            h.table.forward(b"backend", Some(key), b"k").unwrap();
        }
        let opened: Vec<SocketAddr> = h
            .commands()
            .into_iter()
            .filter_map(|c| match c {
                Cmd::Open(_, to) => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(opened, [expected; 5], "a session per client, all to the key's endpoint");
    }

    #[test]
    fn unvalidated_sessions_end_after_unanswered_timeout_validated_ones_after_idle_timeout() {
        let mut h = harness(PoolSpec {
            idle_timeout: Duration::from_secs(60),
            unanswered_timeout: Duration::from_secs(5),
            ..pool(&[A])
        });
        h.forward(client(1), b"a").unwrap();
        h.forward(client(2), b"b").unwrap();
        h.forward(client(3), b"c").unwrap();
        h.commands();
        // Client 1 proves its address; client 2's session is answered by the
        // upstream, which proves nothing about client 2.
        h.validate(client(1), SessionId::from_raw(0));
        h.answer(client(2), SessionId::from_raw(1));
        let now = h.at(Duration::from_millis(4_999));
        h.table.expire(now);
        assert_eq!(h.commands(), []);
        let now = h.at(Duration::from_secs(5));
        h.table.expire(now);
        let mut closed = h.commands();
        closed.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            closed,
            [Cmd::Close(1), Cmd::Close(2)],
            "the unvalidated ones end at 5 s, answered or not"
        );
        let now = h.at(Duration::from_secs(59));
        h.table.expire(now);
        assert_eq!(h.commands(), []);
        let now = h.at(Duration::from_secs(60));
        h.table.expire(now);
        assert_eq!(h.commands(), [Cmd::Close(0)], "the validated one ends after 60 s idle");
        assert_eq!(h.endpoint(A).expired, 3);
        assert_eq!(h.endpoint(A).active, 0);
    }

    #[test]
    fn a_full_table_evicts_its_oldest_unvalidated_session_then_refuses() {
        let mut h = harness(PoolSpec {
            max_sessions: 2,
            ..pool(&[A])
        });
        h.forward(client(1), b"1").unwrap();
        h.forward(client(2), b"2").unwrap();
        h.commands();
        h.forward(client(3), b"3").unwrap();
        assert_eq!(
            h.commands(),
            [Cmd::Close(0), Cmd::Open(2, addr(A)), Cmd::Send(2, b"3".to_vec())],
            "client 1's session, the oldest unvalidated, makes room"
        );
        h.validate(client(2), SessionId::from_raw(1));
        h.validate(client(3), SessionId::from_raw(2));
        h.commands();
        assert_eq!(h.forward(client(4), b"4"), Err(CallError::SessionOverflow));
        assert_eq!(h.commands(), []);
        assert_eq!(h.endpoint(A).evicted, 1);
    }

    #[test]
    fn spoofed_sessions_the_upstream_answers_are_still_evicted_for_new_clients() {
        // An echoing upstream answers every spoofed source: the answers reach
        // addresses that never talk again, so none of them is validated.
        let mut h = harness(PoolSpec {
            max_sessions: 100,
            max_sessions_per_prefix: 1_000,
            ..pool(&[A])
        });
        for i in 0..100u16 {
            let spoofed = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4000));
            h.forward(spoofed, b"x").unwrap();
            h.commands();
            h.answer(spoofed, SessionId::from_raw(u64::from(i)));
        }
        let mut served = 0;
        for c in 1..=5 {
            if h.forward(client(c), b"new").is_ok() {
                served += 1;
            }
        }
        assert_eq!(served, 5, "every new client gets in by evicting a spoofed session");
        assert_eq!(h.endpoint(A).evicted, 5);
    }

    #[test]
    fn a_validated_client_is_never_evicted_for_an_unvalidated_one() {
        let mut h = harness(PoolSpec {
            max_sessions: 3,
            ..pool(&[A])
        });
        for c in 1..=3 {
            h.forward(client(c), b"q").unwrap();
            h.commands();
            h.validate(client(c), SessionId::from_raw(u64::from(c) - 1));
        }
        h.commands();
        for spoofed in 10..20 {
            assert_eq!(h.forward(client(spoofed), b"x"), Err(CallError::SessionOverflow));
        }
        assert_eq!(h.endpoint(A).evicted, 0);
        assert_eq!(h.endpoint(A).active, 3);
    }

    #[test]
    fn reloads_of_ever_new_pool_names_reuse_the_places_of_retired_pools() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"x").unwrap();
        h.commands();
        // The pool of client 1's session is renamed away, then a hundred more
        // names come and go: the drained places are taken again.
        for i in 0..100 {
            let spec = PoolSpec::new(format!("p{i}"), vec![B.to_string()]);
            let next = Arc::new(h.pools.rebuilt(&[spec]).unwrap());
            h.table.adopt(Arc::clone(&next));
            h.pools = next;
        }
        assert_eq!(h.table.pools.len(), 2, "the draining pool and the one in use");
        // The draining session still finds its pool.
        assert_eq!(h.table.session(SessionId::from_raw(0)).map(|(c, _)| c), Some(client(1)));
    }

    #[test]
    fn the_workers_shares_add_up_to_max_sessions_exactly() {
        for (total, workers) in [(1, 1), (4, 4), (6, 4), (7, 3), (1000, 7), (10_000, 64)] {
            let shares: Vec<_> = (0..workers).map(|w| share(total, workers, w)).collect();
            assert_eq!(
                shares.iter().sum::<usize>(),
                total,
                "{total} among {workers}: {shares:?}"
            );
            assert!(shares.iter().all(|&s| s >= 1));
        }
        let spec = PoolSpec {
            max_sessions: 1,
            ..pool(&[A])
        };
        let err = Pools::new(&[spec], 4)
            .err()
            .expect("one session cannot be shared by four workers");
        assert!(
            format!("{err:#}").contains("max_sessions (1) is below the listener's 4 workers"),
            "{err:#}"
        );
    }

    #[test]
    fn max_sessions_is_shared_out_between_workers() {
        let spec = PoolSpec {
            max_sessions: 4,
            ..pool(&[A])
        };
        let (mut w0, mut w1) = (harness_of(spec.clone(), 2, 0), harness_of(spec, 2, 1));
        let mut served = [0; 2];
        for (i, h) in [&mut w0, &mut w1].into_iter().enumerate() {
            for c in 0..3u8 {
                let who = client(10 * i as u8 + c);
                if h.forward(who, b"x").is_ok() {
                    served[i] += 1;
                    h.commands();
                    h.validate(who, SessionId::from_raw(u64::from(c)));
                }
            }
        }
        assert_eq!(
            served,
            [2, 2],
            "two sessions per worker, validated so none can be evicted"
        );
    }

    #[test]
    fn a_refused_send_is_forwarded_once_more_and_eject_after_refusals_eject_the_endpoint() {
        let mut h = harness(PoolSpec {
            eject_after: 2,
            eject_for: Duration::from_secs(10),
            policy: Policy::RoundRobin,
            ..pool(&[A, B])
        });
        // Two clients refused by A, in a row: A is ejected; each datagram goes on to B.
        let refuse_a = |c: &Command<'_>| match c {
            Command::Send { id, .. } if id.raw() == 0 => Applied::Refused,
            _ => Applied::Done,
        };
        h.forward(client(1), b"1").unwrap();
        let first = h.commands_with(refuse_a);
        let to_a = matches!(first[0], Cmd::Open(0, to) if to == addr(A));
        assert!(to_a, "round-robin starts with A: {first:?}");
        assert_eq!(
            first[1..],
            [
                Cmd::Send(0, b"1".to_vec()),
                Cmd::Close(0),
                Cmd::Open(1, addr(B)),
                Cmd::Send(1, b"1".to_vec())
            ]
        );
        assert!(h.endpoint(A).healthy, "one refusal does not eject");
        h.forward(client(2), b"2").unwrap();
        let cmds = h.commands_with(|c| match c {
            Command::Send { id, .. } if id.raw() == 2 => Applied::Refused,
            _ => Applied::Done,
        });
        assert_eq!(cmds[0], Cmd::Open(2, addr(A)), "{cmds:?}");
        let a = h.endpoint(A);
        assert!(!a.healthy && a.ejections == 1, "{a:?}");
        assert_eq!(cmds.last(), Some(&Cmd::Send(3, b"2".to_vec())));
        // Ejected for 10 s: new clients go to B; then A is back.
        h.forward(client(3), b"3").unwrap();
        assert_eq!(h.commands()[0], Cmd::Open(4, addr(B)));
        let now = h.at(Duration::from_secs(10));
        h.table.expire(now);
        assert!(h.endpoint(A).healthy);
    }

    #[test]
    fn a_refused_retry_is_not_retried_again_and_is_counted() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"1").unwrap();
        let cmds = h.commands_with(|c| match c {
            Command::Send { .. } => Applied::Refused,
            _ => Applied::Done,
        });
        assert_eq!(
            cmds.iter().filter(|c| matches!(c, Cmd::Send(..))).count(),
            2,
            "{cmds:?}"
        );
        assert_eq!(h.stats.snapshot().refused(CallError::UpstreamError), 1);
        assert!(h.endpoint(A).healthy, "a pool's last endpoint is never ejected");
    }

    #[test]
    fn a_session_that_cannot_be_opened_is_counted_and_forgotten() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"1").unwrap();
        // As the sockets answer when a socket cannot be had: its send fails too.
        let cmds = h.commands_with(|c| match c {
            Command::Open { .. } | Command::Send { .. } => Applied::Failed,
            Command::Close { .. } => Applied::Done,
        });
        assert_eq!(
            cmds,
            [Cmd::Open(0, addr(A)), Cmd::Send(0, b"1".to_vec()), Cmd::Close(0)],
            "the send fails on the missing socket; the close comes after what was queued"
        );
        assert_eq!(
            h.stats.snapshot().refused(CallError::UpstreamError),
            1,
            "one datagram lost"
        );
        assert_eq!(h.endpoint(A).active, 0);
        h.forward(client(1), b"again").unwrap();
        assert_eq!(
            h.commands()[0],
            Cmd::Open(1, addr(A)),
            "the next datagram tries a new session"
        );
    }

    #[test]
    fn a_removed_endpoint_drains_for_drain_timeout_then_its_client_moves() {
        let spec = PoolSpec {
            drain_timeout: Duration::from_secs(30),
            policy: Policy::RoundRobin,
            ..pool(&[A, B])
        };
        let mut h = harness(spec.clone());
        h.forward(client(1), b"1").unwrap();
        assert_eq!(h.commands()[0], Cmd::Open(0, addr(A)));
        // A real client: its session would otherwise end after unanswered_timeout.
        h.validate(client(1), SessionId::from_raw(0));
        // A reload removes A.
        let now = h.at(Duration::from_secs(1));
        let with_a = Arc::clone(&h.pools);
        let without_a = Arc::new(h.pools.rebuilt(&[pool(&[B])]).unwrap());
        h.table.adopt(Arc::clone(&without_a));
        h.pools = without_a;
        h.forward(client(1), b"2").unwrap();
        assert_eq!(
            h.commands(),
            [Cmd::Send(0, b"2".to_vec())],
            "the session drains: still used"
        );
        h.table.received(SessionId::from_raw(0), [1]);
        let now2 = h.at(Duration::from_secs(30) + (now - h.t0) - Duration::from_millis(1));
        h.table.expire(now2);
        assert_eq!(
            h.commands(),
            [],
            "talking does not keep it past drain_timeout, but it is not over yet"
        );
        let end = h.at(Duration::from_secs(31));
        h.table.expire(end);
        assert_eq!(h.commands(), [Cmd::Close(0)]);
        let a = with_a.endpoints(end).into_iter().find(|e| e.addr == addr(A)).unwrap();
        assert_eq!((a.totals.sessions_drained, a.totals.sessions_active), (1, 0));
        h.forward(client(1), b"3").unwrap();
        assert_eq!(h.commands()[0], Cmd::Open(1, addr(B)), "then the client moves");
    }

    #[test]
    fn a_reload_that_makes_a_pool_shared_and_back_drains_what_the_other_mode_had() {
        let per_client = pool(&[A]);
        let shared = PoolSpec {
            shared: Some(crate::config::SharedSpec {
                sockets: 1,
                reroll_every: Duration::from_secs(60),
            }),
            ..pool(&[A])
        };
        let mut h = harness(per_client.clone());
        h.forward(client(1), b"1").unwrap();
        assert_eq!(h.commands(), [Cmd::Open(0, addr(A)), Cmd::Send(0, b"1".to_vec())]);
        // Made shared: the next forward goes on a shared socket; the session stays until idle.
        let next = Arc::new(h.pools.rebuilt(&[shared]).unwrap());
        h.table.adopt(Arc::clone(&next));
        h.pools = next;
        h.forward(client(1), b"2").unwrap();
        h.forward(client(2), b"3").unwrap();
        assert_eq!(
            h.commands(),
            [
                Cmd::Open(1, addr(A)),
                Cmd::Send(1, b"2".to_vec()),
                Cmd::Send(1, b"3".to_vec())
            ]
        );
        assert_eq!(h.table.session(SessionId::from_raw(0)).map(|(c, _)| c), Some(client(1)));
        let t = h.at(Duration::from_secs(5));
        h.table.expire(t);
        assert_eq!(
            h.commands(),
            [Cmd::Close(0)],
            "the unanswered session ends; the socket stays"
        );
        // Back to per-client: the shared socket takes no more datagrams and
        // closes after lingering unanswered_timeout for late answers.
        let back = Arc::new(h.pools.rebuilt(&[per_client]).unwrap());
        h.table.adopt(Arc::clone(&back));
        h.pools = back;
        h.forward(client(2), b"4").unwrap();
        assert_eq!(h.commands(), [Cmd::Open(2, addr(A)), Cmd::Send(2, b"4".to_vec())]);
        let t = h.at(Duration::from_secs(6));
        h.table.expire(t);
        assert_eq!(h.commands(), [], "retired, lingering");
        let t = h.at(Duration::from_secs(11));
        h.table.expire(t);
        assert!(h.commands().contains(&Cmd::Close(1)), "closed after lingering");
    }

    #[test]
    fn upstream_answers_to_a_client_are_held_to_the_ratio_until_it_is_validated() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), &[0; 10]).unwrap();
        h.commands();
        assert_eq!(h.table.allowance(client(1)).bytes, 30, "3 × the 10 bytes it sent");
        h.table.charge(client(1), 30, 0);
        assert_eq!(h.table.allowance(client(1)).bytes, 0);
        // Two more datagrams after an answer: a real client, no cap.
        h.forward(client(1), b"x").unwrap();
        h.forward(client(1), b"y").unwrap();
        assert_eq!(h.table.allowance(client(1)).bytes, usize::MAX);
        assert_eq!(h.table.allowance(client(9)).bytes, 0, "no session, nothing to pass on");
    }

    #[test]
    fn the_call_allowance_spans_an_on_reply_chain_and_the_clients_next_datagram_renews_it() {
        let mut h = harness(pool(&[A]));
        h.forward(client(1), b"q").unwrap();
        assert_eq!(h.table.allowance(client(1)).calls, MAX_CALLS_PER_DATAGRAM);
        // Each on_reply of the chain forwards again, spending from one allowance.
        for _ in 0..MAX_CALLS_PER_DATAGRAM {
            h.table.charge(client(1), 0, 1);
        }
        assert_eq!(h.table.allowance(client(1)).calls, 0, "the chain stops here");
        h.forward(client(1), b"q2").unwrap();
        assert_eq!(h.table.allowance(client(1)).calls, MAX_CALLS_PER_DATAGRAM);
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
