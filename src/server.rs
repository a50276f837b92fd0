//! The datagram path: a group of `SO_REUSEPORT` sockets on one address, a worker
//! thread per socket, and every datagram through that worker's guest and back.
//!
//! The kernel spreads clients over the sockets by their address, so each client's
//! datagrams are always handled by the same worker, in order. A worker takes up to
//! a batch of datagrams per `recvmmsg` and sends their replies with one `sendmmsg`.
//! Workers share nothing on the hot path but the published program, read through
//! a lock-free `ArcSwap`.
//!
//! With upstream pools, a worker instead waits on its listener socket and its
//! sessions' sockets together (one `mio` poller): it owns the sessions of its
//! clients ([`crate::upstream::Upstreams`]), lends them to the guest for each
//! call, then applies the opens, sends and closes the calls queued to the
//! session sockets ([`crate::net::sessions`]), and passes upstream datagrams
//! through `on_reply` (or straight back) into the same `sendmmsg` batch as the
//! replies.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::PoolSpec;
use crate::metrics::{Counters, RateLimit, Snapshot, Stats};
use crate::net::sessions::{LISTENER, SessionSockets, session_of};
use crate::sandbox::{Guest, Isolation, Program, Sandbox, WORKER_STACK_BYTES};
use crate::source_filter::{PortCounts, PortSet, SourceFilter, listening_ports};
use crate::udp::{RecvBatch, SendBatch, Sent, report_queue_overflows};
use crate::upstream::{Pools, Upstreams};
use crate::verdict::{CallError, DropReason, MAX_DATAGRAM};

/// How long a worker waits for a datagram before it looks for shutdown or a new program.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Larger than any UDP payload (65,527 bytes over IPv6), so nothing is truncated:
/// oversize datagrams are seen whole and dropped by count.
const RECV_BUFFER: usize = 65_536;

/// Requested kernel socket buffers; they absorb bursts. Linux may cap them at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

pub use crate::config::DEFAULT_BATCH;

/// Log lines per second for each kind of problem; the rest are only counted.
const WARNINGS_PER_SECOND: u64 = 5;

/// How the datagram path is set up.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Worker threads, each with its own socket and guest instance.
    pub workers: usize,
    pub isolation: Isolation,
    /// Replies larger than this multiple of their request are dropped (0: no cap).
    pub max_reply_ratio: f64,
    /// Datagrams taken per receive system call (`recvmmsg`); 1 means one
    /// `recvfrom` and one `sendto` per datagram.
    pub batch: usize,
    /// A handler written in Rust to run instead of the guest (the program is
    /// then only reported): one per worker, made by this function. For
    /// benchmarks, whose native baseline is the same data path without the
    /// WebAssembly hop, and for embedders.
    pub native: Option<fn() -> Box<dyn Native>>,
    /// Upstream pools the guest may forward to; none: the guest only answers.
    pub pools: Vec<PoolSpec>,
    /// Client source ports never answered (a loop defence); the gateway's own
    /// sockets and its pools' endpoints are never answered either.
    pub deny_source_ports: PortSet,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            workers: 1,
            isolation: Isolation::Reuse,
            max_reply_ratio: 3.0,
            batch: DEFAULT_BATCH,
            native: None,
            pools: Vec::new(),
            deny_source_ports: PortSet::default(),
        }
    }
}

/// A running gateway. Dropping it stops the workers after the datagram each is
/// handling and waits for them.
pub struct Gateway {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// What the workers share.
struct Shared {
    program: ArcSwap<Program>,
    stats: Stats,
    stop: AtomicBool,
    /// One limit per drop reason, plus one for receive errors.
    warnings: [RateLimit; DropReason::ALL.len() + 1],
    /// The upstream pools, when the guest may forward; replaced by a reload.
    pools: Option<ArcSwap<Pools>>,
    /// The local ports of this gateway's session sockets, which it never answers.
    session_ports: Arc<PortCounts>,
}

impl Gateway {
    /// Binds `config.listen` and starts the workers serving `program`.
    pub fn start(sandbox: &Sandbox, program: Program, config: &ServeConfig) -> anyhow::Result<Self> {
        let workers = config.workers.max(1);
        let pools = if config.pools.is_empty() {
            None
        } else {
            Some(ArcSwap::from_pointee(Pools::new(&config.pools, workers)?))
        };
        let sockets =
            bind_group(config.listen, workers).with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = sockets[0].local_addr()?;
        // Unregistered when the gateway is dropped.
        listening_ports().add(local_addr.port());
        let shared = Arc::new(Shared {
            program: ArcSwap::from_pointee(program),
            stats: Stats::with_workers(sockets.len()),
            stop: AtomicBool::new(false),
            warnings: std::array::from_fn(|_| RateLimit::new(WARNINGS_PER_SECOND)),
            pools,
            session_ports: Arc::new(PortCounts::default()),
        });
        let mut gateway = Self {
            local_addr,
            shared,
            workers: Vec::new(),
        };
        for (i, socket) in sockets.into_iter().enumerate() {
            let handler = if let Some(make) = config.native {
                Handler::Native(make(), Vec::with_capacity(MAX_DATAGRAM))
            } else {
                Handler::Guest(Box::new(Guest::new(
                    sandbox.clone(),
                    gateway.shared.program.load_full(),
                    config.isolation,
                    config.max_reply_ratio,
                )))
            };
            let counters = gateway.shared.stats.worker(i);
            let forwarding = match &gateway.shared.pools {
                Some(pools) => {
                    let poll = mio::Poll::new().context("cannot create a poller")?;
                    let registry = poll.registry().try_clone().context("cannot create a poller")?;
                    let sockets = SessionSockets::new(registry, Arc::clone(&gateway.shared.session_ports));
                    let net = Upstreams::new(
                        pools.load_full(),
                        i,
                        Arc::clone(&counters),
                        config.max_reply_ratio,
                        Instant::now(),
                    );
                    Some(Forwarding {
                        poll,
                        sockets,
                        net: Box::new(net),
                    })
                }
                None => None,
            };
            let worker = Worker {
                socket,
                batch: config.batch.max(1),
                forwarding,
                core: Core {
                    handler,
                    shared: Arc::clone(&gateway.shared),
                    counters,
                    filter: SourceFilter::new(config.deny_source_ports.clone(), local_addr),
                },
            };
            let thread = std::thread::Builder::new()
                .name(format!("wasmgate-worker-{i}"))
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || worker.run())
                .context("cannot start a worker thread")?;
            gateway.workers.push(thread);
        }
        Ok(gateway)
    }

    /// The bound address (with the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters, summed over all workers.
    pub fn stats(&self) -> Snapshot {
        self.shared.stats.snapshot()
    }

    /// The program serving now.
    pub fn program(&self) -> Arc<Program> {
        self.shared.program.load_full()
    }

    /// A handle that publishes new programs to this gateway, for the reloader.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Tells the workers to stop reading; [`Gateway::shutdown`] then waits for them.
    pub fn stop_reading(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the workers (each finishes and answers the datagram it holds), waits
    /// for them, and returns the final counters.
    pub fn shutdown(mut self) -> Snapshot {
        self.stop();
        self.shared.stats.snapshot()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        listening_ports().remove(self.local_addr.port());
    }
}

/// A handle to a running gateway, for the reloader and the metrics endpoint:
/// publishes programs and reads counters. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// The gateway's counters.
    pub fn stats(&self) -> Snapshot {
        self.shared.stats.snapshot()
    }

    /// The upstream pools, when the guest may forward.
    pub fn pools(&self) -> Option<Arc<Pools>> {
        self.shared.pools.as_ref().map(ArcSwap::load_full)
    }

    /// Replaces the pools with `specs` (resolved now), unless that changes
    /// nothing; true when new pools were published. Workers take them at their
    /// next wake-up: new endpoints get new sessions at once, and sessions to
    /// removed endpoints carry on until idle. A gateway started without pools
    /// cannot take any (its workers do not wait on upstream sockets).
    pub fn set_pools(&self, specs: &[PoolSpec]) -> anyhow::Result<bool> {
        let Some(pools) = &self.shared.pools else {
            anyhow::bail!("the listener was started without upstream pools; restart it to add some");
        };
        if specs.is_empty() {
            anyhow::bail!("every pool would be removed; restart the listener to serve without pools");
        }
        // Names are looked up once, here; the new pools replace the old only
        // when they differ.
        let current = pools.load_full();
        let new = current.rebuilt(specs)?;
        if new.same_as(&current) {
            return Ok(false);
        }
        pools.store(Arc::new(new));
        Ok(true)
    }

    /// The program serving now.
    pub fn current(&self) -> Arc<Program> {
        self.shared.program.load_full()
    }

    /// Makes `program` the one every datagram from now on is handled by, counts a
    /// reload, and returns the program it replaced. Datagrams already inside the old
    /// program finish there; it is freed once no worker holds it.
    pub fn publish(&self, program: Program) -> Arc<Program> {
        // Counted first, so whoever sees the new program also sees the count.
        self.shared.stats.reloaded();
        self.shared.program.swap(Arc::new(program))
    }

    /// Counts a reload that was refused.
    pub fn failed(&self) {
        self.shared.stats.reload_failed();
    }
}

/// Binds `n` sockets to `addr` as one `SO_REUSEPORT` group.
fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    if addr.port() != 0 {
        return (0..n).map(|_| bind_one(addr, true)).collect();
    }
    // Linux may give a port-0 bind with SO_REUSEPORT a port that another reuseport
    // group of the same user already has, and the two would then share traffic.
    // So pick a free port without SO_REUSEPORT first, then bind the group to it,
    // trying again if someone takes the port in between.
    let mut last_error = None;
    for _ in 0..16 {
        let port = bind_one(addr, false)?.local_addr()?.port();
        let addr = SocketAddr::new(addr.ip(), port);
        match (0..n).map(|_| bind_one(addr, true)).collect() {
            Ok(sockets) => return Ok(sockets),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(reuse_port)?;
    // Best effort: a smaller buffer than asked for is not a reason to refuse to serve.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    Ok(socket.into())
}

/// What turns a datagram into a reply.
enum Handler {
    Guest(Box<Guest>),
    /// A Rust handler instead of the guest, and its reply buffer.
    Native(Box<dyn Native>, Vec<u8>),
}

impl Handler {
    fn refresh(&mut self, program: &Arc<Program>) {
        if let Self::Guest(guest) = self {
            guest.set_program(program);
        }
    }
}

/// A handler written in Rust, run on the datagram path in place of a guest
/// ([`ServeConfig::native`]). Upstream datagrams go to the client unchanged.
pub trait Native: Send {
    /// Handles one datagram: writes a reply into `reply` (which starts empty),
    /// or forwards through `net` (present when the listener has pools; the
    /// current client is already set).
    fn handle(&mut self, datagram: &[u8], net: Option<&mut Upstreams>, reply: &mut Vec<u8>) -> NativeAnswer;
}

/// What a [`Native`] handler did with a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeAnswer {
    /// Send `reply` to the client.
    Reply,
    /// Forwarded upstream.
    Forwarded,
    /// Nothing: counted as `no_reply`.
    Nothing,
    /// A forward was refused.
    Refused(CallError),
}

/// One worker: its socket and everything else it owns.
struct Worker {
    socket: UdpSocket,
    /// Datagrams per receive call; 1 means plain `recvfrom`/`sendto`.
    batch: usize,
    forwarding: Option<Forwarding>,
    core: Core,
}

/// With upstream pools: the poller that waits on the listener and session
/// sockets together, the session sockets, and the session table.
struct Forwarding {
    poll: mio::Poll,
    sockets: SessionSockets,
    net: Box<Upstreams>,
}

/// The per-datagram work of a worker, apart from the socket.
struct Core {
    handler: Handler,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    /// The sources this worker never answers.
    filter: SourceFilter,
}

/// How long the shutdown drain waits for upstream replies still on their way.
const DRAIN: Duration = Duration::from_millis(500);

/// Listener batches taken per turn before the sessions get theirs.
const LISTENER_ROUNDS: usize = 8;

/// Session batches taken per turn (one per ready session, oldest first) before
/// the listener gets its turn: a flooding upstream costs its own sessions, not
/// the clients waiting on the listener.
const SESSION_ROUNDS: usize = 16;

impl Worker {
    fn run(mut self) {
        if let Some(forwarding) = self.forwarding.take() {
            self.run_forwarding(forwarding);
        } else if self.batch > 1 {
            self.run_batched();
        } else {
            self.run_single();
        }
    }

    fn stopping(&self) -> bool {
        self.core.shared.stop.load(Ordering::Relaxed)
    }

    /// One `recvfrom` and one `sendto` per datagram.
    fn run_single(&mut self) {
        // Allocated once; every datagram is received into it.
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut net = None;
        let (shared, counters) = (Arc::clone(&self.core.shared), Arc::clone(&self.core.counters));
        while !self.stopping() {
            match self.socket.recv_from(&mut buf) {
                Ok((len, peer)) => {
                    self.core.counters.received(len);
                    let socket = &self.socket;
                    self.core.respond(&buf[..len], peer, &mut net, &mut |reply, to| {
                        let result = socket.send_to(reply, to).map(|_| reply.len());
                        sent(&shared, &counters, to, result);
                    });
                }
                Err(e) => self.core.recv_failed(e),
            }
        }
    }

    /// Many datagrams per `recvmmsg`, their replies sent with one `sendmmsg`.
    fn run_batched(&mut self) {
        let mut rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut tx = SendBatch::new(self.batch, MAX_DATAGRAM);
        let mut net = None;
        // The kernel's running count of datagrams it dropped on this socket.
        let mut overflows_seen = 0u32;
        if let Err(e) = report_queue_overflows(&self.socket) {
            tracing::debug!(error = %e, "queue overflows will not be counted");
        }
        while !self.stopping() {
            match rx.recv(&self.socket) {
                Ok(n) => {
                    self.core
                        .take_batch(&rx, n, &mut overflows_seen, &mut net, &mut tx, &self.socket);
                    self.core.flush(&mut tx, &self.socket);
                }
                Err(e) => self.core.recv_failed(e),
            }
        }
    }

    /// With upstream pools: one poller waits on the listener socket and every
    /// session socket; client datagrams go through `handle`, upstream datagrams
    /// through `on_reply` (or straight back), and idle sessions expire.
    fn run_forwarding(&mut self, forwarding: Forwarding) {
        let Forwarding {
            mut poll,
            mut sockets,
            net,
        } = forwarding;
        // An Option because the guest's store holds it during a call.
        let mut net = Some(net);
        let mut events = mio::Events::with_capacity(256);
        let mut rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut tx = SendBatch::new(self.batch, MAX_DATAGRAM);
        let mut upstream_rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut label = String::new();
        let mut overflows_seen = 0u32;
        if let Err(e) = report_queue_overflows(&self.socket)
            .and_then(|()| self.socket.set_nonblocking(true))
            .and_then(|()| {
                poll.registry().register(
                    &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&self.socket)),
                    LISTENER,
                    mio::Interest::READABLE,
                )
            })
        {
            tracing::error!(error = %e, "cannot wait on the listener socket; this worker stops");
            return;
        }
        let mut next_sweep = Instant::now();
        // Edge-triggered: a socket is read a bounded amount per turn and kept
        // as ready while it may hold more; the listener and each session take
        // turns, so that no socket, however flooded, starves the others.
        let mut listener_ready = true;
        let mut ready = std::collections::VecDeque::new();
        let mut queued = std::collections::HashSet::new();
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if drain_until.is_none() && self.stopping() {
                drain_until = Some(now + DRAIN);
                listener_ready = false;
            }
            if let Some(until) = drain_until
                && (now >= until || !net.as_ref().is_some_and(|n| n.awaiting()))
            {
                break;
            }
            let timeout = if listener_ready || !ready.is_empty() {
                Duration::ZERO
            } else {
                POLL_INTERVAL.min(next_sweep.saturating_duration_since(now))
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "waiting for datagrams failed; this worker stops");
                return;
            }
            let now = Instant::now();
            if let Some(n) = net.as_mut() {
                n.set_now(now);
                if let Some(pools) = &self.core.shared.pools {
                    let current = pools.load();
                    if !n.uses(&current) {
                        n.adopt(Arc::clone(&current));
                    }
                }
            }
            for event in &events {
                if event.token() == LISTENER {
                    listener_ready = drain_until.is_none();
                } else if queued.insert(event.token()) {
                    ready.push_back(event.token());
                }
            }
            // One batch from each ready session, each datagram through
            // `on_reply` or straight on; a session that filled its batch may
            // hold more and waits for its next turn at the back.
            for _ in 0..ready.len().min(SESSION_ROUNDS) {
                let Some(token) = ready.pop_front() else { break };
                let (Some(n), Some(id)) = (net.as_mut(), session_of(token)) else {
                    queued.remove(&token);
                    continue;
                };
                let count = match sockets.recv(id, &mut upstream_rx) {
                    Ok(0) => {
                        queued.remove(&token);
                        continue;
                    }
                    Ok(count) => count,
                    Err(_) => {
                        // ICMP port unreachable: counted against the endpoint, session closed.
                        n.refused_on(id);
                        apply(&mut net, &mut sockets);
                        queued.remove(&token);
                        continue;
                    }
                };
                if count < upstream_rx.capacity() {
                    queued.remove(&token);
                } else {
                    ready.push_back(token);
                }
                let sizes = (0..count).filter_map(|i| upstream_rx.get(i)).map(|(d, _)| d.len());
                let Some((client, upstream)) = n.received(id, sizes) else {
                    continue;
                };
                label.clear();
                label.push_str(upstream);
                for (datagram, _) in (0..count).filter_map(|i| upstream_rx.get(i)) {
                    self.core.upstream_datagram(datagram, client, &label, &mut net, &mut tx);
                    if tx.is_full() {
                        self.core.flush(&mut tx, &self.socket);
                    }
                }
                apply(&mut net, &mut sockets);
            }
            if listener_ready {
                listener_ready = false;
                for _ in 0..LISTENER_ROUNDS {
                    match rx.recv(&self.socket) {
                        Ok(n) => {
                            self.core
                                .take_batch(&rx, n, &mut overflows_seen, &mut net, &mut tx, &self.socket);
                            apply(&mut net, &mut sockets);
                            self.core.flush(&mut tx, &self.socket);
                            listener_ready = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            listener_ready = false;
                            break;
                        }
                        Err(e) => self.core.recv_failed(e),
                    }
                }
            }
            self.core.flush(&mut tx, &self.socket);
            if now >= next_sweep {
                let mut sweep_every = Duration::from_secs(1);
                if let Some(n) = net.as_mut() {
                    n.expire(now);
                    sweep_every = n.sweep_every();
                }
                apply(&mut net, &mut sockets);
                self.core.handler.refresh(&self.core.shared.program.load());
                next_sweep = now + sweep_every;
            }
        }
    }
}

impl Core {
    /// Handles the `n` datagrams of a receive batch, queueing answers in `tx`.
    fn take_batch(
        &mut self,
        rx: &RecvBatch,
        n: usize,
        overflows_seen: &mut u32,
        net: &mut Option<Box<Upstreams>>,
        tx: &mut SendBatch,
        socket: &UdpSocket,
    ) {
        if let Some(total) = rx.queue_overflows() {
            self.counters
                .queue_overflows(u64::from(total.wrapping_sub(*overflows_seen)));
            *overflows_seen = total;
        }
        // Counted as read before any is handled, so that a batch abandoned
        // half-way would show as received but unanswered.
        for i in 0..n {
            if let Some((datagram, _)) = rx.get(i) {
                self.counters.received(datagram.len());
            }
        }
        for i in 0..n {
            let Some((datagram, peer)) = rx.get(i) else {
                self.counters.recv_error();
                continue;
            };
            self.respond(datagram, peer, net, &mut |reply, to| tx.push(reply, to));
            if tx.is_full() {
                self.flush(tx, socket);
            }
        }
    }

    /// Sends what `tx` holds and counts each fate.
    fn flush(&self, tx: &mut SendBatch, socket: &UdpSocket) {
        tx.flush(socket, |fate| match fate {
            Sent::Ok { bytes } => self.counters.replied(bytes),
            Sent::Failed { peer, error } => sent(&self.shared, &self.counters, peer, Err(error)),
        });
    }

    /// Runs the handler on one datagram (already counted as received) and passes
    /// what goes back to `peer` to `emit`, `send`s first. Drops are counted here.
    fn respond(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        net: &mut Option<Box<Upstreams>>,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        let shown = unmapped(peer);
        let endpoint = |addr| net.as_ref().is_some_and(|n| n.is_endpoint(addr));
        if let Err(why) = self.filter.check(shown, Some(&self.shared.session_ports), endpoint) {
            drop_datagram(&self.shared, &self.counters, DropReason::DeniedSource, shown, &why);
            return;
        }
        self.handler.refresh(&self.shared.program.load());
        let started = Instant::now();
        if let Some(n) = net.as_mut() {
            n.client_datagram(peer, datagram.len());
        }
        let Self {
            handler,
            shared,
            counters,
            ..
        } = self;
        match handler {
            Handler::Native(native, out) => {
                if datagram.len() > MAX_DATAGRAM {
                    drop_datagram(shared, counters, DropReason::Oversize, shown, &"oversize");
                    return;
                }
                out.clear();
                let answer = native.handle(datagram, net.as_deref_mut(), out);
                counters.guest_time(started.elapsed());
                match answer {
                    NativeAnswer::Reply => emit(out, peer),
                    NativeAnswer::Forwarded => counters.forwarded(),
                    NativeAnswer::Nothing => counters.dropped(DropReason::NoReply),
                    NativeAnswer::Refused(error) => {
                        counters.refused(error, 1);
                        drop_datagram(shared, counters, error.drop_reason(), shown, &error);
                    }
                }
            }
            Handler::Guest(guest) => {
                let result = guest.handle_with(datagram, shown, net);
                counters.guest_time(started.elapsed());
                match result {
                    Ok(answer) => {
                        if answer.each_datagram(|d| emit(d, peer)) {
                        } else if answer.forwarded() > 0 {
                            counters.forwarded();
                        } else if let Some(error) = answer.first_refusal() {
                            let why = format_args!("every forward was refused: {error}");
                            drop_datagram(shared, counters, error.drop_reason(), shown, &why);
                        } else {
                            counters.dropped(DropReason::NoReply);
                        }
                    }
                    Err(rejection) => drop_datagram(shared, counters, rejection.reason, shown, &rejection),
                }
                count_refused(counters, guest);
            }
        }
    }

    /// A datagram an upstream sent back for `client` (as received): through
    /// `on_reply` when the guest has it, else straight to the client. Either
    /// way what reaches a client that has not proven its address is held to
    /// the reply ratio of what it sent, and the calls `on_reply` makes count
    /// against the chain its last datagram started.
    fn upstream_datagram(
        &mut self,
        datagram: &[u8],
        client: SocketAddr,
        upstream: &str,
        net: &mut Option<Box<Upstreams>>,
        tx: &mut SendBatch,
    ) {
        let Some(n) = net.as_mut() else { return };
        let allowance = n.allowance(client);
        let shown = unmapped(client);
        let guest = match &mut self.handler {
            Handler::Guest(guest) if guest.has_on_reply() => guest,
            _ => {
                if datagram.len() <= allowance.bytes {
                    n.charge(client, datagram.len(), 0);
                    tx.push(datagram, client);
                } else {
                    let why = "the answer is larger than --max-reply-ratio times what the client sent";
                    self.upstream_dropped(DropReason::Amplification, shown, upstream, &why);
                }
                return;
            }
        };
        n.begin(client);
        let started = Instant::now();
        let result = guest.on_reply(datagram, shown, upstream, net, allowance);
        self.counters.guest_time(started.elapsed());
        let mut bytes = 0;
        match result {
            Ok(answer) => {
                if !answer.each_datagram(|d| {
                    bytes += d.len();
                    tx.push(d, client);
                }) && answer.forwarded() == 0
                {
                    self.counters.upstream_dropped(DropReason::NoReply);
                }
            }
            Err(rejection) => {
                let reason = rejection.reason;
                self.upstream_dropped(reason, shown, upstream, &rejection);
            }
        }
        if let Handler::Guest(guest) = &mut self.handler {
            // Counted whatever the outcome: a call that trapped after forwarding
            // has still spent them.
            if let Some(n) = net.as_mut() {
                n.charge(client, bytes, guest.last_calls());
            }
            count_refused(&self.counters, guest);
        }
    }

    /// Counts an upstream datagram dropped, and says why unless said too often lately.
    fn upstream_dropped(&self, reason: DropReason, peer: SocketAddr, upstream: &str, why: &dyn std::fmt::Display) {
        self.counters.upstream_dropped(reason);
        if let Some(suppressed) = self.shared.warnings[reason.index()].allow() {
            let program = self.shared.program.load();
            tracing::warn!(
                %peer,
                upstream,
                %reason,
                module = program.origin(),
                suppressed,
                "dropped an upstream datagram: {why}"
            );
        }
    }

    fn recv_failed(&mut self, e: io::Error) {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                // Idle: let go of a replaced program now rather than at the next datagram.
                self.handler.refresh(&self.shared.program.load());
            }
            io::ErrorKind::Interrupted => {}
            _ => {
                // ENOBUFS, ENOMEM, …: one datagram's trouble, not ours.
                self.counters.recv_error();
                if let Some(suppressed) = self.shared.warnings[DropReason::ALL.len()].allow() {
                    tracing::warn!(error = %e, suppressed, "receive failed; serving on");
                }
            }
        }
    }
}

/// Applies the session table's queued opens, sends and closes to the sockets.
fn apply(net: &mut Option<Box<Upstreams>>, sockets: &mut SessionSockets) {
    if let Some(n) = net.as_mut() {
        n.poll_commands(|command| sockets.apply(command));
    }
}

/// An IPv4 client of a dual-stack `[::]` socket arrives as `[::ffff:a.b.c.d]:port`;
/// guests and logs see it as the IPv4 address it is. (Replies still go to the
/// address as received, which is what the IPv6 socket can send to.)
fn unmapped(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        SocketAddr::V4(_) => peer,
    }
}

/// Counts the guest's refused `forward`/`send` calls of the call just made.
fn count_refused(counters: &Counters, guest: &mut Guest) {
    for (error, n) in guest.take_refused() {
        counters.refused(error, u64::from(n));
    }
}

/// Counts a reply as sent, or as a send error.
fn sent(shared: &Shared, counters: &Counters, peer: SocketAddr, result: io::Result<usize>) {
    match result {
        Ok(bytes) => counters.replied(bytes),
        Err(e) => drop_datagram(
            shared,
            counters,
            DropReason::SendError,
            peer,
            &format_args!("the reply could not be sent: {e}"),
        ),
    }
}

/// Counts a dropped datagram, and says why unless that was said too often lately.
fn drop_datagram(
    shared: &Shared,
    counters: &Counters,
    reason: DropReason,
    peer: SocketAddr,
    why: &dyn std::fmt::Display,
) {
    counters.dropped(reason);
    if reason == DropReason::NoReply {
        return; // the guest's choice, not a problem
    }
    if let Some(suppressed) = shared.warnings[reason.index()].allow() {
        let program = shared.program.load();
        tracing::warn!(%peer, %reason, module = program.origin(), suppressed, "dropped a datagram: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_clients_are_shown_as_ipv4() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(unmapped(p("[::ffff:10.1.2.3]:53")), p("10.1.2.3:53"));
        assert_eq!(unmapped(p("[::1]:53")), p("[::1]:53"));
        assert_eq!(unmapped(p("127.0.0.1:9")), p("127.0.0.1:9"));
    }
}
