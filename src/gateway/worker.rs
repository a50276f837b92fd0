//! One worker thread: its listener socket, its guest (or native handler), and
//! with pools its session table and session sockets, in one of three loops
//! (one `recvfrom` at a time, batched, or the forwarding event loop).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Handler, NativeAnswer, POLL_INTERVAL, RECV_BUFFER, Shared};
use crate::metrics::Counters;
use crate::net::sessions::{LISTENER, SessionSockets, session_of};
use crate::sandbox::Guest;
use crate::source_filter::SourceFilter;
use crate::udp::{RecvBatch, SendBatch, Sent, report_queue_overflows};
use crate::upstream::Upstreams;
use crate::verdict::{DropReason, MAX_DATAGRAM};

/// One worker: its socket and everything else it owns.
pub(super) struct Worker {
    pub(super) socket: UdpSocket,
    /// Datagrams per receive call; 1 means plain `recvfrom`/`sendto`.
    pub(super) batch: usize,
    pub(super) forwarding: Option<Forwarding>,
    pub(super) core: Core,
}

/// With upstream pools: the poller that waits on the listener and session
/// sockets together, the session sockets, and the session table.
pub(super) struct Forwarding {
    pub(super) poll: mio::Poll,
    pub(super) sockets: SessionSockets,
    pub(super) net: Box<Upstreams>,
}

/// The per-datagram work of a worker, apart from the socket.
pub(super) struct Core {
    pub(super) handler: Handler,
    pub(super) shared: Arc<Shared>,
    pub(super) counters: Arc<Counters>,
    /// The sources this worker never answers.
    pub(super) filter: SourceFilter,
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
