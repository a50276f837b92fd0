//! One worker thread: the I/O around its [`Core`]. It owns the listener socket
//! and, with pools, the session sockets and the poller; it reads datagrams into
//! the core, sends what the core emits, and applies the session commands the
//! core queues. One of three loops: one `recvfrom` at a time, batched, or the
//! forwarding event loop.

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::core::{Core, sent};
use super::{POLL_INTERVAL, RECV_BUFFER, Shared};
use crate::metrics::Counters;
use crate::net::sessions::{LISTENER, SessionSockets, session_of};
use crate::udp::{RecvBatch, SendBatch, Sent, report_queue_overflows};
use crate::verdict::MAX_DATAGRAM;

/// One worker: its socket and everything else it owns.
pub(super) struct Worker {
    pub(super) socket: UdpSocket,
    /// Datagrams per receive call; 1 means plain `recvfrom`/`sendto`.
    pub(super) batch: usize,
    /// With upstream pools: the poller that waits on the listener and session
    /// sockets together, and the session sockets (the table is in the core).
    pub(super) forwarding: Option<(mio::Poll, SessionSockets)>,
    pub(super) core: Core,
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
    pub(super) fn run(mut self) {
        if let Some((poll, sockets)) = self.forwarding.take() {
            self.run_forwarding(poll, sockets);
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
        let (shared, counters) = (Arc::clone(&self.core.shared), Arc::clone(&self.core.counters));
        while !self.stopping() {
            match self.socket.recv_from(&mut buf) {
                Ok((len, peer)) => {
                    self.core.counters.received(len);
                    let socket = &self.socket;
                    self.core.on_client(&buf[..len], peer, &mut |reply, to| {
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
        // The kernel's running count of datagrams it dropped on this socket.
        let mut overflows_seen = 0u32;
        if let Err(e) = report_queue_overflows(&self.socket) {
            tracing::debug!(error = %e, "queue overflows will not be counted");
        }
        while !self.stopping() {
            match rx.recv(&self.socket) {
                Ok(n) => {
                    take_batch(&mut self.core, &rx, n, &mut overflows_seen, &mut tx, &self.socket);
                    flush(&self.core.shared, &self.core.counters, &mut tx, &self.socket);
                }
                Err(e) => self.core.recv_failed(e),
            }
        }
    }

    /// With upstream pools: one poller waits on the listener socket and every
    /// session socket; client datagrams go through `handle`, upstream datagrams
    /// through `on_reply` (or straight back), and idle sessions expire.
    fn run_forwarding(&mut self, mut poll: mio::Poll, mut sockets: SessionSockets) {
        let mut events = mio::Events::with_capacity(256);
        let mut rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut tx = SendBatch::new(self.batch, MAX_DATAGRAM);
        let mut upstream_rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut overflows_seen = 0u32;
        let (shared, counters) = (Arc::clone(&self.core.shared), Arc::clone(&self.core.counters));
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
                && (now >= until || !self.core.awaiting())
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
            self.core.set_now(now);
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
                let Some(id) = session_of(token) else {
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
                        self.core.on_refused(id);
                        self.core.poll_commands(|c| sockets.apply(c));
                        queued.remove(&token);
                        continue;
                    }
                };
                if count < upstream_rx.capacity() {
                    queued.remove(&token);
                } else {
                    ready.push_back(token);
                }
                let datagrams = (0..count).filter_map(|i| upstream_rx.get(i)).map(|(d, _)| d);
                let socket = &self.socket;
                self.core.on_upstream(id, datagrams, &mut |d, to| {
                    tx.push(d, to);
                    if tx.is_full() {
                        flush(&shared, &counters, &mut tx, socket);
                    }
                });
                self.core.poll_commands(|c| sockets.apply(c));
            }
            if listener_ready {
                listener_ready = false;
                for _ in 0..LISTENER_ROUNDS {
                    match rx.recv(&self.socket) {
                        Ok(n) => {
                            take_batch(&mut self.core, &rx, n, &mut overflows_seen, &mut tx, &self.socket);
                            self.core.poll_commands(|c| sockets.apply(c));
                            flush(&shared, &counters, &mut tx, &self.socket);
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
            flush(&shared, &counters, &mut tx, &self.socket);
            if now >= next_sweep {
                self.core.on_timeout(now);
                self.core.poll_commands(|c| sockets.apply(c));
                next_sweep = now + self.core.timeout_every();
            }
        }
    }
}

/// Hands the `n` datagrams of a receive batch to the core, queueing answers in `tx`.
fn take_batch(
    core: &mut Core,
    rx: &RecvBatch,
    n: usize,
    overflows_seen: &mut u32,
    tx: &mut SendBatch,
    socket: &UdpSocket,
) {
    if let Some(total) = rx.queue_overflows() {
        core.counters
            .queue_overflows(u64::from(total.wrapping_sub(*overflows_seen)));
        *overflows_seen = total;
    }
    // Counted as read before any is handled, so that a batch abandoned
    // half-way would show as received but unanswered.
    for i in 0..n {
        if let Some((datagram, _)) = rx.get(i) {
            core.counters.received(datagram.len());
        }
    }
    for i in 0..n {
        let Some((datagram, peer)) = rx.get(i) else {
            core.counters.recv_error();
            continue;
        };
        // The batch grows past its size if one datagram brings many (`send`s);
        // it goes out as soon as it is full.
        core.on_client(datagram, peer, &mut |reply, to| tx.push(reply, to));
        if tx.is_full() {
            flush(&core.shared, &core.counters, tx, socket);
        }
    }
}

/// Sends what `tx` holds and counts each fate.
fn flush(shared: &Shared, counters: &Counters, tx: &mut SendBatch, socket: &UdpSocket) {
    tx.flush(socket, |fate| match fate {
        Sent::Ok { bytes } => counters.replied(bytes),
        Sent::Failed { peer, error } => sent(shared, counters, peer, Err(error)),
    });
}
