//! The datagram path: a group of `SO_REUSEPORT` sockets on one address, a worker
//! thread per socket, and every datagram through that worker's guest and back.
//!
//! The kernel spreads clients over the sockets by their address, so each client's
//! datagrams are always handled by the same worker, in order. Workers share nothing
//! on the hot path but the published program, read through a lock-free `ArcSwap`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::{Counters, DropReason, RateLimit, Snapshot, Stats};
use crate::sandbox::{Guest, Isolation, Program, Sandbox, WORKER_STACK_BYTES};

/// How long a worker waits for a datagram before it looks for shutdown or a new program.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Larger than any UDP payload (65,527 bytes over IPv6), so nothing is truncated:
/// oversize datagrams are seen whole and dropped by count.
const RECV_BUFFER: usize = 65_536;

/// Requested kernel socket buffers; they absorb bursts. Linux may cap them at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

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
}

impl Gateway {
    /// Binds `config.listen` and starts the workers serving `program`.
    pub fn start(sandbox: &Sandbox, program: Program, config: &ServeConfig) -> anyhow::Result<Self> {
        let sockets = bind_group(config.listen, config.workers.max(1))
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = sockets[0].local_addr()?;
        let shared = Arc::new(Shared {
            program: ArcSwap::from_pointee(program),
            stats: Stats::with_workers(sockets.len()),
            stop: AtomicBool::new(false),
            warnings: std::array::from_fn(|_| RateLimit::new(WARNINGS_PER_SECOND)),
        });
        let mut gateway = Self {
            local_addr,
            shared,
            workers: Vec::new(),
        };
        for (i, socket) in sockets.into_iter().enumerate() {
            let guest = Guest::new(
                sandbox.clone(),
                gateway.shared.program.load_full(),
                config.isolation,
                config.max_reply_ratio,
            );
            let worker = Worker {
                socket,
                guest,
                shared: Arc::clone(&gateway.shared),
                counters: gateway.shared.stats.worker(i),
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
    }
}

/// Publishes programs to a running gateway; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// The program serving now.
    pub fn current(&self) -> Arc<Program> {
        self.shared.program.load_full()
    }

    /// Makes `program` the one every datagram from now on is handled by, counts a
    /// reload, and returns the program it replaced. Datagrams already inside the old
    /// program finish there; it is freed once no worker holds it.
    pub fn publish(&self, program: Program) -> Arc<Program> {
        let old = self.shared.program.swap(Arc::new(program));
        self.shared.stats.reloaded();
        old
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

/// One worker: its socket, its guest, its counters.
struct Worker {
    socket: UdpSocket,
    guest: Guest,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(mut self) {
        // Allocated once; every datagram is received into it.
        let mut buf = vec![0u8; RECV_BUFFER];
        while !self.shared.stop.load(Ordering::Relaxed) {
            match self.socket.recv_from(&mut buf) {
                Ok((len, peer)) => self.serve(&buf[..len], peer),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    // Idle: let go of a replaced program now rather than at the next datagram.
                    self.guest.set_program(&self.shared.program.load());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors (ECONNREFUSED), ENOBUFS, …: one datagram's trouble, not ours.
                    self.counters.recv_error();
                    if let Some(suppressed) = self.shared.warnings[DropReason::ALL.len()].allow() {
                        tracing::warn!(error = %e, suppressed, "receive failed; serving on");
                    }
                }
            }
        }
    }

    fn serve(&mut self, datagram: &[u8], peer: SocketAddr) {
        self.counters.received(datagram.len());
        self.guest.set_program(&self.shared.program.load());
        match self.guest.handle(datagram, peer) {
            Ok(reply) => match self.socket.send_to(reply, peer) {
                Ok(_) => self.counters.replied(reply.len()),
                Err(e) => self.drop_datagram(
                    DropReason::SendError,
                    peer,
                    &format_args!("the reply could not be sent: {e}"),
                ),
            },
            Err(rejection) => self.drop_datagram(rejection.reason, peer, &rejection),
        }
    }

    /// Counts a dropped datagram, and says why unless that was said too often lately.
    fn drop_datagram(&self, reason: DropReason, peer: SocketAddr, why: &dyn std::fmt::Display) {
        self.counters.dropped(reason);
        if reason == DropReason::NoReply {
            return; // the guest's choice, not a problem
        }
        if let Some(suppressed) = self.shared.warnings[reason.index()].allow() {
            tracing::warn!(
                %peer,
                %reason,
                module = self.guest.program().origin(),
                suppressed,
                "dropped a datagram: {why}"
            );
        }
    }
}
