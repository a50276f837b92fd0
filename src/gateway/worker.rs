//! One worker thread: the I/O around its [`Core`], in one loop. It owns the
//! listener socket, the session sockets and the poller that waits on them all;
//! it reads datagrams in batches into the core, sends what the core emits, and
//! applies the session commands the core queues.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use super::core::{Core, sent};
use super::handler::Handler;
use super::shared::{POLL_INTERVAL, RECV_BUFFER, Shared};
use super::tap::Tap;
use crate::metrics::Counters;
use crate::net::batch::{RecvBatch, SendBatch, Sent, report_queue_overflows};
use crate::net::proxied::{Accepted, Proxied};
use crate::net::proxy_v2;
use crate::net::sessions::{LISTENER, SessionSockets, session_of};
use crate::verdict::MAX_DATAGRAM;

/// One worker: its sockets and everything else it owns.
pub(super) struct Worker<H, T> {
    pub(super) socket: UdpSocket,
    /// Datagrams per receive and send system call.
    pub(super) batch: usize,
    /// Waits on the listener and the session sockets together.
    pub(super) poll: Poll,
    /// The session sockets (the table is in the core); none without pools.
    pub(super) sockets: SessionSockets,
    pub(super) core: Core<H, T>,
    /// With `proxy_protocol_from`: the clients trusted proxies relay.
    pub(super) proxied: Option<Proxied>,
}

/// How long the shutdown drain waits for upstream replies still on their way.
const DRAIN: Duration = Duration::from_millis(500);

/// Listener batches taken per turn before the sessions get theirs.
const LISTENER_ROUNDS: usize = 8;

/// Session batches taken per turn (one per ready session, oldest first) before
/// the listener gets its turn: a flooding upstream costs its own sessions, not
/// the clients waiting on the listener.
const SESSION_ROUNDS: usize = 16;

/// Sockets with datagrams still to read. The poller is edge-triggered: a
/// socket is read a bounded amount per turn and stays here while it may hold
/// more; the listener and each session take turns, so that no socket, however
/// flooded, starves the others.
#[derive(Default)]
struct Ready {
    listener: bool,
    sessions: VecDeque<Token>,
    queued: HashSet<Token>,
}

impl Ready {
    fn any(&self) -> bool {
        self.listener || !self.sessions.is_empty()
    }

    fn session(&mut self, token: Token) {
        if self.queued.insert(token) {
            self.sessions.push_back(token);
        }
    }

    fn drained(&mut self, token: Token) {
        self.queued.remove(&token);
    }
}

impl<H: Handler, T: Tap> Worker<H, T> {
    pub(super) fn new(
        socket: UdpSocket,
        batch: usize,
        poll: Poll,
        sockets: SessionSockets,
        core: Core<H, T>,
        proxied: Option<Proxied>,
    ) -> Self {
        Self {
            socket,
            batch,
            poll,
            sockets,
            core,
            proxied,
        }
    }

    pub(super) fn run(mut self) {
        if let Err(e) = self.prepare() {
            tracing::error!(error = %e, "cannot wait on the listener socket; this worker stops");
            return;
        }
        let mut events = Events::with_capacity(256);
        let mut rx = RecvBatch::new(self.batch, RECV_BUFFER);
        let mut tx = SendBatch::new(self.batch, MAX_DATAGRAM);
        let mut upstream_rx = RecvBatch::new(self.batch, RECV_BUFFER);
        // The kernel's running count of datagrams it dropped on the listener.
        let mut overflows_seen = 0u32;
        let (shared, counters) = (Arc::clone(&self.core.shared), Arc::clone(&self.core.counters));
        let mut ready = Ready {
            listener: true,
            ..Ready::default()
        };
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if drain_until.is_none() && self.stopping() {
                drain_until = Some(now + DRAIN);
                ready.listener = false;
            }
            if let Some(until) = drain_until
                && (now >= until || !self.core.awaiting())
            {
                break;
            }
            if !ready.any() && self.sockets.is_empty() && drain_until.is_none() {
                // Only the listener to watch: wait in its receive call (up to
                // its read timeout), one system call per wake-up rather than
                // a poll and then a read.
                events.clear();
                match rx.recv(&self.socket) {
                    Ok(n) => {
                        let now = Instant::now();
                        self.take_batch(now, &rx, n, &mut overflows_seen, &mut tx);
                        self.core.poll_commands(&mut self.sockets);
                        flush(&shared, &counters, &mut tx, &self.socket);
                        ready.listener = n == rx.capacity();
                    }
                    Err(e) => self.core.recv_failed(e),
                }
            } else {
                let timeout = if ready.any() {
                    Duration::ZERO
                } else {
                    // The stop flag is looked at every POLL_INTERVAL.
                    POLL_INTERVAL.min(self.core.poll_timeout().saturating_duration_since(now))
                };
                if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    tracing::error!(error = %e, "waiting for datagrams failed; this worker stops");
                    return;
                }
            }
            let now = Instant::now();
            for event in &events {
                if event.token() == LISTENER {
                    ready.listener = drain_until.is_none();
                } else {
                    ready.session(event.token());
                }
            }
            // One batch from each ready session, each datagram through
            // `on_reply` or straight on; a session that filled its batch may
            // hold more and waits for its next turn at the back.
            for _ in 0..ready.sessions.len().min(SESSION_ROUNDS) {
                let Some(token) = ready.sessions.pop_front() else { break };
                let Some(id) = session_of(token) else {
                    ready.drained(token);
                    continue;
                };
                let count = match self.sockets.recv(id, &mut upstream_rx) {
                    Ok(0) => {
                        ready.drained(token);
                        continue;
                    }
                    Ok(count) => count,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        // ICMP port unreachable: counted against the endpoint, session closed.
                        self.core.on_refused(now, id);
                        self.core.poll_commands(&mut self.sockets);
                        ready.drained(token);
                        continue;
                    }
                    Err(e) => {
                        // An error that persists: counted and said (rate-limited);
                        // the session is looked at again when it next has data.
                        self.core.recv_failed(e);
                        ready.drained(token);
                        continue;
                    }
                };
                if count < upstream_rx.capacity() {
                    ready.drained(token);
                } else {
                    ready.sessions.push_back(token);
                }
                let datagrams = (0..count).filter_map(|i| upstream_rx.get(i)).map(|(d, _)| d);
                let (socket, proxied) = (&self.socket, &mut self.proxied);
                self.core.on_upstream(now, id, datagrams, &mut |d, to| {
                    push_answer(&mut tx, proxied, now, d, to);
                    if tx.is_full() {
                        flush(&shared, &counters, &mut tx, socket);
                    }
                });
                self.core.poll_commands(&mut self.sockets);
            }
            if ready.listener {
                ready.listener = false;
                for _ in 0..LISTENER_ROUNDS {
                    match rx.try_recv(&self.socket) {
                        Ok(n) => {
                            self.take_batch(now, &rx, n, &mut overflows_seen, &mut tx);
                            self.core.poll_commands(&mut self.sockets);
                            flush(&shared, &counters, &mut tx, &self.socket);
                            // A short batch emptied the queue: the next datagram
                            // to arrive raises a new event.
                            ready.listener = n == rx.capacity();
                            if !ready.listener {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => self.core.recv_failed(e),
                    }
                }
            }
            flush(&shared, &counters, &mut tx, &self.socket);
            if now >= self.core.poll_timeout() {
                if let Some(p) = &mut self.proxied {
                    p.expire(now);
                }
                self.core.on_timeout(now);
                self.core.poll_commands(&mut self.sockets);
            }
        }
    }

    /// Hands the `n` datagrams of a receive batch to the core, queueing
    /// answers in `tx`. A datagram from a trusted proxy is the client's its
    /// header names, and without a valid header it is dropped here, before the core.
    fn take_batch(&mut self, now: Instant, rx: &RecvBatch, n: usize, overflows_seen: &mut u32, tx: &mut SendBatch) {
        let Self {
            core, proxied, socket, ..
        } = self;
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
            let (client, payload) = match proxied {
                None => (peer, datagram),
                Some(p) => match p.accept(now, peer, datagram) {
                    Accepted::Client { client, payload } => {
                        if client != peer {
                            core.counters.proxied();
                        }
                        (client, payload)
                    }
                    Accepted::BadHeader(error) => {
                        core.counters.proxy_header_error(error);
                        core.proxy_header_dropped(peer, &error);
                        continue;
                    }
                    Accepted::Full => {
                        core.counters.proxied_full();
                        core.proxy_header_dropped(
                            peer,
                            &"the proxy names a new client past the clients a worker keeps",
                        );
                        continue;
                    }
                },
            };
            // The batch grows past its size if one datagram brings many (`send`s);
            // it goes out as soon as it is full.
            core.on_client(now, payload, client, &mut |reply, to| {
                push_answer(tx, proxied, now, reply, to)
            });
            if tx.is_full() {
                flush(&core.shared, &core.counters, tx, socket);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.core.shared.stop.load(Ordering::Relaxed)
    }

    /// Has the listener's overflows counted and its datagrams watched by the
    /// poller. It stays blocking: reads that must not wait say so.
    fn prepare(&mut self) -> io::Result<()> {
        if let Err(e) = report_queue_overflows(&self.socket) {
            tracing::debug!(error = %e, "queue overflows will not be counted");
        }
        let fd = self.socket.as_raw_fd();
        self.poll
            .registry()
            .register(&mut mio::unix::SourceFd(&fd), LISTENER, Interest::READABLE)
    }
}

/// Queues an answer to client `to`: straight to it, or, if a trusted proxy
/// relayed it, back to the proxy behind a v2 header from the address the
/// client sent to, to the client.
fn push_answer(tx: &mut SendBatch, proxied: &mut Option<Proxied>, now: Instant, answer: &[u8], to: SocketAddr) {
    match proxied.as_mut().and_then(|p| p.route(now, to)) {
        None => tx.push(answer, to),
        Some(via) => tx.push_with(answer, via.proxy, |out| proxy_v2::write(via.service, to, out)),
    }
}

/// Sends what `tx` holds and counts each fate.
fn flush(shared: &Shared, counters: &Counters, tx: &mut SendBatch, socket: &UdpSocket) {
    tx.flush(socket, |fate| match fate {
        Sent::Ok { bytes } => counters.replied(bytes),
        Sent::Failed { peer, error } => sent(shared, counters, peer, Err(error)),
    });
}
