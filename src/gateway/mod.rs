//! The datagram path: a group of `SO_REUSEPORT` sockets on one address, a worker
//! thread per socket, and every datagram through that worker's guest and back.
//!
//! The kernel spreads clients over the sockets by their address, so each client's
//! datagrams are always handled by the same worker, in order. Each worker is a
//! socket-free core (`core.rs`: a [`Handler`] and a [`Tap`], the handler, the session table, every decision and
//! counter, time passed in) inside an I/O shell (`worker.rs`): one `mio` loop
//! over its listener socket and its session sockets ([`crate::net::sessions`]),
//! a batch of datagrams per `recvmmsg`, replies and forwards out through one
//! `sendmmsg`. Workers share nothing on the hot path but the published program
//! and pools, read through a lock-free `ArcSwap`.

use crate::net::proxied::Proxied;
use crate::upstream::health::{NoWriter, ProbeWriter};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{ListenerSpec, PoolSpec};
use crate::guest::{Env, Guest, Program, WORKER_STACK_BYTES};
use crate::metrics::Snapshot;
use crate::net::sessions::SessionSockets;
use crate::net::source_filter::{HostPorts, SourceFilter, listening_ports};
use crate::prove::canary::Canary;
use crate::prove::capture::{MismatchLog, Recorder};
use crate::prove::tap::Proving;
use crate::upstream::{Pools, Sessions};
use access_log::AccessLog;

/// Requested kernel socket buffers; they absorb bursts. Linux may cap them at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

/// A running gateway. Dropping it stops the workers after the datagram each is
/// handling and waits for them.
pub struct Gateway {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds `spec.listen` and starts `spec.workers` workers serving `program`.
    /// (The listener's module, watch and limits are the caller's: `program`
    /// was loaded by `env` already.)
    pub fn start(env: &Env, program: Program, spec: &ListenerSpec) -> anyhow::Result<Self> {
        Self::start_with(env, program, spec, None::<fn() -> Guest>)
    }

    /// Like [`Gateway::start`], with a [`Handler`] of the caller's run instead
    /// of the guest (`program` is then only reported), one per worker, made by
    /// `make`: for benchmarks, whose native baseline is the same data path
    /// without the WebAssembly hop, and for embedders. Nothing is recorded or
    /// shadowed.
    pub fn start_with_handler<H: Handler + 'static>(
        env: &Env,
        program: Program,
        spec: &ListenerSpec,
        make: fn() -> H,
    ) -> anyhow::Result<Self> {
        Self::start_with(env, program, spec, Some(make))
    }

    fn start_with<H: Handler + 'static>(
        env: &Env,
        program: Program,
        config: &ListenerSpec,
        native: Option<fn() -> H>,
    ) -> anyhow::Result<Self> {
        let workers = config.workers.max(1);
        let pools = if config.pools.is_empty() {
            None
        } else {
            Some(ArcSwap::from_pointee(Pools::new(&config.pools, workers)?))
        };
        let sockets =
            bind_group(config.listen, workers).with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = sockets[0].local_addr()?;
        let recorder = config.record.as_ref().map(Recorder::start).transpose()?;
        let mut shared = Shared::new(
            env.clone(),
            config.clone(),
            Arc::new(program),
            sockets.len(),
            pools,
            recorder,
            local_addr,
        );
        if let Some(spec) = &config.access_log {
            shared.access_log = Some(AccessLog::start(spec, &config.name)?);
        }
        let mut shadow = None;
        if let Some(c) = &config.candidate {
            if let Some(path) = &c.mismatches {
                shared.mismatches = Some(MismatchLog::start(path)?);
            }
            // Canaried datagrams are compared there too (the active runs them).
            if c.shadow_sample > 0.0 || c.canary_percent > 0.0 {
                shadow = Some(std::sync::mpsc::sync_channel(candidate::QUEUE));
            }
        }
        // Unregistered when the gateway is dropped.
        listening_ports().add(local_addr.port());
        let mut gateway = Self {
            local_addr,
            shared: Arc::new(shared),
            workers: Vec::new(),
        };
        for (i, socket) in sockets.into_iter().enumerate() {
            let counters = gateway.shared.stats.worker(i);
            let poll = mio::Poll::new().context("cannot create a poller")?;
            let registry = poll.registry().try_clone().context("cannot create a poller")?;
            let sessions = gateway.shared.pools.as_ref().map(|pools| {
                Box::new(
                    Sessions::new(
                        pools.load_full(),
                        i,
                        Arc::clone(&counters),
                        config.max_reply_ratio,
                        Instant::now(),
                    )
                    .serving(local_addr),
                )
            });
            let shared = Arc::clone(&gateway.shared);
            let filter = SourceFilter::new(config.deny_source_ports.clone(), local_addr).watching(HostPorts::watched());
            let sockets = SessionSockets::new(registry, Arc::clone(&gateway.shared.session_ports));
            let batch = config.batch.max(1);
            let proxied = proxied_clients(config);
            let spawned = if let Some(make) = native {
                let core = Core::new(make(), NoTap, shared, counters, filter, sessions, Instant::now());
                spawn_worker(i, Worker::new(socket, batch, poll, sockets, core, proxied))
            } else {
                let guest = Guest::new(
                    env.clone(),
                    gateway.shared.program.load_full(),
                    config.isolation,
                    config.max_reply_ratio,
                );
                let canary = Canary::new(guest, Arc::clone(&shared), shadow.is_some());
                let tap = Proving::new(Arc::clone(&shared), shadow.as_ref().map(|(tx, _)| tx.clone()), i);
                let core = Core::new(canary, tap, shared, counters, filter, sessions, Instant::now());
                spawn_worker(i, Worker::new(socket, batch, poll, sockets, core, proxied))
            };
            let thread = spawned?;
            gateway.workers.push(thread);
        }
        if gateway.shared.pools.is_some() {
            // One prober per listener; idle unless a pool has a `health` table
            // (a reload may add one).
            let (pools, stop) = (Arc::clone(&gateway.shared), Arc::clone(&gateway.shared));
            let writer: Box<dyn ProbeWriter + Send> = match native {
                Some(_) => Box::new(NoWriter),
                None => Box::new(probe::GuestProbes::new(env, Arc::clone(&gateway.shared))),
            };
            let thread = crate::net::prober::spawn(
                move || pools.pools.as_ref().map(ArcSwap::load_full),
                Arc::clone(&gateway.shared.session_ports),
                move || stop.stop.load(Ordering::Relaxed),
                writer,
            )
            .context("cannot start the health checker")?;
            gateway.workers.push(thread);
        }
        if let Some(c) = &config.candidate {
            let program = env.load_file(Some(&c.path)).context("--candidate")?;
            gateway.publisher().publish_candidate(program)?;
        }
        if let Some((_, rx)) = shadow {
            // Ends once every worker (and with it every sender) is gone.
            let shared = Arc::clone(&gateway.shared);
            let thread = std::thread::Builder::new()
                .name("wasmgate-shadow".into())
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || shadow::run(&shared, &rx))
                .context("cannot start the shadow thread")?;
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
        self.shared.snapshot()
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
        self.shared.snapshot()
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
    /// Opens the access log's file again before its next line (SIGHUP).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// The metrics its guests define, by role.
    pub fn guest_metrics(&self) -> &Arc<crate::metrics::guest::ListenerMetrics> {
        self.shared.env.metrics()
    }

    /// The gateway's counters.
    pub fn stats(&self) -> Snapshot {
        self.shared.snapshot()
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

    /// The candidate loaded now, if any.
    pub fn candidate(&self) -> Option<Arc<Program>> {
        self.shared.candidate.load().as_ref().map(|c| Arc::clone(&c.program))
    }

    /// Makes `program` the candidate (`--candidate`) every worker shadows or
    /// canaries from now on, with a fresh record; returns the one it replaced.
    pub fn publish_candidate(&self, program: Program) -> anyhow::Result<Option<Arc<Program>>> {
        anyhow::ensure!(
            self.shared.spec.candidate.is_some(),
            "the listener was started without --candidate"
        );
        // Its own pools: the shadow's stubbed sessions must not count as the active's.
        let pools = self.shared.pools.as_ref().map(|p| Arc::new(p.load().copy()));
        let candidate = Candidate::new(Arc::new(program), pools);
        self.shared.env.metrics().new_candidate();
        let previous = self.shared.candidate.swap(Some(Arc::new(candidate)));
        Ok(previous.map(|c| Arc::clone(&c.program)))
    }

    /// Promotes the candidate by hand (SIGUSR1); false when none is loaded.
    pub fn promote(&self) -> bool {
        match self.shared.candidate.load_full() {
            Some(candidate) => {
                self.shared.settle(&candidate, Action::Promote);
                true
            }
            None => false,
        }
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
    // Blocking, for the worker's wait when it has no session to watch too;
    // the timeout is how often it looks for shutdown.
    socket.set_read_timeout(Some(POLL_INTERVAL))?;
    Ok(socket.into())
}

/// A worker's table of the clients behind trusted proxies, if the listener
/// trusts any. A client is remembered for twice the longest session idle
/// timeout (at least two minutes) after its last datagram or answer, so that
/// an answer never outlives the knowledge of the proxy it goes back through.
fn proxied_clients(config: &ListenerSpec) -> Option<Proxied> {
    if config.proxy_protocol_from.is_empty() {
        return None;
    }
    let longest = config.pools.iter().map(|p| p.idle_timeout).max().unwrap_or_default();
    let ttl = (longest * 2).max(std::time::Duration::from_secs(120));
    Some(Proxied::new(config.proxy_protocol_from.clone(), ttl))
}

/// Starts worker `i`'s thread.
fn spawn_worker<H: Handler + 'static, T: Tap + 'static>(
    i: usize,
    worker: Worker<H, T>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("wasmgate-worker-{i}"))
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || worker.run())
        .context("cannot start a worker thread")
}

mod access_line;
mod access_log;
pub(crate) mod core;
pub(crate) mod handler;
mod loop_guard;
mod probe;
pub(crate) mod shared;
pub(crate) mod tap;
mod worker;

pub use handler::{Handler, Route};
pub use loop_guard::LOOP_AFTER;
pub use tap::{NoTap, Tap};

use self::core::Core;
use self::shared::{POLL_INTERVAL, Shared};
use self::worker::Worker;
use crate::prove::candidate::{self, Action, Candidate};
use crate::prove::shadow;
