//! One worker's decisions, with no socket and no clock of its own, in the
//! manner of quinn-proto's endpoint. Its methods come in three kinds, called
//! in this order:
//!
//! - events in: a client datagram ([`Core::on_client`]) runs the handler and
//!   passes what goes back to the client to `emit`; upstream datagrams
//!   ([`Core::on_upstream`]) go through `on_reply` or straight on; an ICMP
//!   refusal ([`Core::on_refused`]); time ([`Core::on_timeout`]);
//! - then what the events left to do: the session opens, sends and closes
//!   ([`Core::poll_commands`]), applied by the worker in order;
//! - then when to wake next ([`Core::poll_timeout`]).
//!
//! `now` is always passed in. Every drop is counted here. What answers is a
//! [`Handler`] (the guest, or one that routes some clients elsewhere); what
//! watches is a [`Tap`], asked before each exchange whether it wants it. The
//! worker owns the sockets.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::handler::{Handler, Route};
use super::loop_guard::{LOOP_AFTER, LoopGuard};
use super::shared::Shared;
use super::tap::{ClientExchange, Tap, UpstreamExchange};
use crate::guest::Rejection;
use crate::metrics::Counters;
use crate::net::proxy_v2;
use crate::net::source_filter::SourceFilter;
use crate::net::unmapped;
use crate::upstream::{Applied, Apply, Command, Lent, SessionId};
use crate::verdict::{Allowance, DropReason, MAX_CALLS_PER_DATAGRAM};

/// Without pools, how often an idle worker lets go of a replaced program.
const IDLE_REFRESH: Duration = Duration::from_secs(1);

/// The per-datagram work of a worker, apart from the sockets.
pub(crate) struct Core<H, T> {
    pub(super) handler: H,
    pub(super) tap: T,
    pub(crate) shared: Arc<Shared>,
    pub(super) counters: Arc<Counters>,
    /// The sources this worker never answers.
    pub(super) filter: SourceFilter,
    /// With pools: this worker's session table (lent to the handler during a call).
    pub(crate) sessions: Lent,
    /// The `POOL/ip:port` of the session being read (kept to reuse its allocation).
    pub(super) label: String,
    /// When [`Core::on_timeout`] is due.
    pub(super) next_timeout: Instant,
    /// What this worker last sent each source, to end loops between gateways.
    loops: LoopGuard,
    /// The access log's sampling state (`--access-log-sample`).
    log_state: u64,
}

impl<H: Handler, T: Tap> Core<H, T> {
    pub(crate) fn new(
        handler: H,
        tap: T,
        shared: Arc<Shared>,
        counters: Arc<Counters>,
        filter: SourceFilter,
        sessions: Lent,
        now: Instant,
    ) -> Self {
        Self {
            handler,
            tap,
            shared,
            counters,
            filter,
            sessions,
            label: String::new(),
            next_timeout: now,
            log_state: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 1u8),
            // A seed no client can know (random keys, new for every table),
            // so that no choice of sources can push a loop's slots out of it.
            loops: LoopGuard::new(std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u8,
            )),
        }
    }

    /// Sets the time for what follows, and takes a reload's pools.
    fn set_now(&mut self, now: Instant) {
        if let Some(n) = self.sessions.as_mut() {
            n.set_now(now);
            if let Some(pools) = &self.shared.pools {
                let current = pools.load();
                if !n.uses(&current) {
                    n.adopt(Arc::clone(&current));
                }
            }
        }
    }

    /// Datagrams that came back on session `id`, each through `on_reply` (or
    /// straight on) to its client via `emit`.
    pub(crate) fn on_upstream<'a>(
        &mut self,
        now: Instant,
        id: SessionId,
        datagrams: impl Iterator<Item = &'a [u8]> + Clone,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        self.set_now(now);
        let tapped = self.tap.active();
        let Some(n) = self.sessions.as_mut() else { return };
        // Looked up first: the answer may end the session.
        let endpoint = if tapped {
            n.session(id).map(|(_, endpoint)| endpoint)
        } else {
            None
        };
        let Some(received) = n.received(id, datagrams.clone().map(<[u8]>::len)) else {
            return;
        };
        let (client, proxy_protocol) = (received.client, received.proxy_protocol);
        let mut label = std::mem::take(&mut self.label);
        label.clear();
        label.push_str(received.label);
        let Some(client) = client else {
            // A shared pool's socket: the guest names each answer's client.
            self.handler.route_active(&self.shared.program.load());
            for datagram in datagrams {
                if let Some(datagram) = self.answer_payload(proxy_protocol, datagram, UNSPECIFIED, &label) {
                    self.shared_datagram(datagram, &label, emit);
                }
            }
            self.label = label;
            return;
        };
        let shown = unmapped(client);
        let route = self.handler.route(shown, &self.shared.program.load());
        if !(tapped && self.tap.watch_upstream(shown, route)) {
            for datagram in datagrams {
                let Some(datagram) = self.answer_payload(proxy_protocol, datagram, shown, &label) else {
                    continue;
                };
                self.upstream_datagram(datagram, client, &label, emit);
            }
        } else {
            for datagram in datagrams {
                let Some(datagram) = self.answer_payload(proxy_protocol, datagram, shown, &label) else {
                    continue;
                };
                let mut replies = Vec::new();
                self.upstream_datagram(datagram, client, &label, &mut |d, to| {
                    replies.push(d.to_vec());
                    emit(d, to);
                });
                self.tap.upstream(UpstreamExchange {
                    now,
                    client: shown,
                    endpoint,
                    datagram,
                    replies,
                });
            }
        }
        self.label = label;
    }

    /// An upstream answer as the client gets it: from a pool that speaks the
    /// PROXY protocol, a header it starts with is checked and taken off (and
    /// a malformed one drops the answer, counted); else the answer as sent.
    fn answer_payload<'d>(
        &self,
        proxy_protocol: bool,
        datagram: &'d [u8],
        client: SocketAddr,
        upstream: &str,
    ) -> Option<&'d [u8]> {
        if !proxy_protocol || !datagram.starts_with(&proxy_v2::SIGNATURE) {
            return Some(datagram);
        }
        match proxy_v2::parse(datagram) {
            Ok(proxy_v2::Parsed::Proxied { payload, .. } | proxy_v2::Parsed::Local { payload }) => Some(payload),
            Err(error) => {
                self.counters.proxy_header_error(error);
                self.upstream_dropped(DropReason::ProxyHeader, client, upstream, &error);
                None
            }
        }
    }

    /// Session `id`'s socket reported ICMP port unreachable.
    pub(crate) fn on_refused(&mut self, now: Instant, id: SessionId) {
        self.set_now(now);
        if let Some(n) = self.sessions.as_mut() {
            n.refused(id);
        }
    }

    /// Idle sessions end, ejections end, and a replaced program is let go.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        self.set_now(now);
        if let Some(n) = self.sessions.as_mut() {
            n.expire(now);
        }
        self.handler.refresh(&self.shared.program.load());
        let every = self.sessions.as_ref().map_or(IDLE_REFRESH, |n| n.sweep_every());
        self.next_timeout = now + every;
    }

    /// When [`Core::on_timeout`] is due next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        self.next_timeout
    }

    /// The session opens, sends and closes queued since the last poll, in order.
    pub(crate) fn poll_commands<A: Apply + ?Sized>(&mut self, apply: &mut A) {
        let Some(n) = self.sessions.as_mut() else { return };
        if !self.tap.watches_forwards() {
            n.poll_commands(apply);
            return;
        }
        // Forwards are watched on their own: by the time they are sent, the
        // client datagram that asked for them may be a batch behind.
        let mut noting = Noting {
            inner: apply,
            sent: Vec::new(),
        };
        n.poll_commands(&mut noting);
        for (id, datagram) in noting.sent {
            if let Some((client, endpoint)) = self.sessions.as_ref().and_then(|n| n.session(id)) {
                self.tap.forwarded(unmapped(client), endpoint, &datagram);
            }
        }
    }

    /// A datagram from a trusted proxy that could not be taken (no valid
    /// header, or too many clients): counted and said, rate-limited.
    pub(crate) fn proxy_header_dropped(&self, proxy: SocketAddr, why: &dyn std::fmt::Display) {
        drop_datagram(
            &self.shared,
            &self.counters,
            DropReason::ProxyHeader,
            unmapped(proxy),
            why,
        );
    }

    /// Whether a forwarded datagram still waits for its answer (the shutdown drain).
    pub(crate) fn awaiting(&self) -> bool {
        self.sessions.as_ref().is_some_and(|n| n.awaiting())
    }

    /// A client datagram (already counted as received): the handler runs on it,
    /// what goes back to `peer` is passed to `emit` (`send`s first), forwards are
    /// queued as session commands. Drops are counted here.
    pub(crate) fn on_client(
        &mut self,
        now: Instant,
        datagram: &[u8],
        peer: SocketAddr,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        self.set_now(now);
        let shown = unmapped(peer);
        let logged = (self.shared.access_log.as_ref()).is_some_and(|log| log.sampled(&mut self.log_state));
        let sessions = &self.sessions;
        let endpoint = |addr| sessions.as_ref().is_some_and(|n| n.is_endpoint(addr));
        let refused = match self.filter.check(shown, Some(&self.shared.session_ports), endpoint) {
            Err(why) => {
                drop_datagram(&self.shared, &self.counters, DropReason::DeniedSource, shown, &why);
                Some(DropReason::DeniedSource)
            }
            Ok(()) if self.loops.is_loop(shown, datagram) => {
                let why = format_args!(
                    "the source sent back what this gateway last sent it, {LOOP_AFTER} times in a row: a loop with another gateway"
                );
                drop_datagram(&self.shared, &self.counters, DropReason::Loop, shown, &why);
                Some(DropReason::Loop)
            }
            Ok(()) => None,
        };
        if let Some(reason) = refused {
            if logged {
                let exchange = (shown, datagram.len(), 0, reason.as_str());
                self.log_access(exchange, None, usize::MAX, Route::Active);
            }
            return;
        }
        let route = self.handler.route(shown, &self.shared.program.load());
        let watched = self.tap.active() && self.tap.watch_client(shown, route);
        let mark = self.sessions.as_ref().map_or(0, |n| n.queued());
        let mut replies = Vec::new();
        let mut last_sent = None;
        let mut bytes_out = 0;
        let hash = self.loops.hasher();
        let mut emit = |d: &[u8], to: SocketAddr| {
            if watched {
                replies.push(d.to_vec());
            }
            bytes_out += d.len();
            last_sent = Some(hash(d));
            emit(d, to);
        };
        let (verdict, note) = self.handle_client(datagram, peer, shown, &mut emit, logged);
        if logged {
            let exchange = (shown, datagram.len(), bytes_out, verdict);
            self.log_access(exchange, note, mark, route);
        }
        if let Some(hash) = last_sent {
            self.loops.sent_hash(shown, hash);
        }
        self.handler.judged(shown, verdict);
        if watched {
            let forwards = self
                .sessions
                .as_ref()
                .map(|n| n.sends_since(mark).map(<[u8]>::to_vec).collect())
                .unwrap_or_default();
            self.tap.client(ClientExchange {
                now,
                client: shown,
                datagram,
                verdict,
                replies,
                forwards,
            });
        }
    }

    /// The handler on a client datagram that passed the source filter; what
    /// became of it (`reply`, `forward`, or the drop reason) and, if `note`,
    /// what the guest noted for the access log.
    fn handle_client(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        shown: SocketAddr,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
        note: bool,
    ) -> (&'static str, Option<Box<str>>) {
        if let Some(n) = self.sessions.as_mut() {
            n.client_datagram(peer, datagram.len());
        }
        let Self {
            handler,
            shared,
            counters,
            sessions,
            ..
        } = self;
        let result = handler.handle(datagram, shown, sessions);
        let mut noted = None;
        let verdict = match result {
            Ok(answer) => {
                if note && let Some(text) = answer.note() {
                    noted = Some(String::from_utf8_lossy(text).into());
                }
                if answer.each_datagram(|d| emit(d, peer)) {
                    "reply"
                } else if answer.forwarded() > 0 {
                    counters.forwarded();
                    "forward"
                } else if let Some(error) = answer.first_refusal() {
                    let why = format_args!("every forward was refused: {error}");
                    drop_datagram(shared, counters, error.drop_reason(), shown, &why);
                    error.drop_reason().as_str()
                } else {
                    counters.dropped(DropReason::NoReply);
                    DropReason::NoReply.as_str()
                }
            }
            Err(rejection) => {
                drop_datagram(shared, counters, rejection.reason, shown, &rejection);
                rejection.reason.as_str()
            }
        };
        counters.guest_time(handler.last_time());
        handler.take_refused(&mut |error, n| counters.refused(error, u64::from(n)));
        (verdict, noted)
    }

    /// A datagram an upstream sent back for `client` (as received): through
    /// `on_reply` when the handler has it, else straight to the client. Either
    /// way what reaches a client that has not proven its address is held to
    /// the reply ratio of what it sent, and the calls `on_reply` makes count
    /// against the chain its last datagram started.
    fn upstream_datagram(
        &mut self,
        datagram: &[u8],
        client: SocketAddr,
        upstream: &str,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        let Some(n) = self.sessions.as_mut() else { return };
        let allowance = n.allowance(client);
        let shown = unmapped(client);
        if !self.handler.has_on_reply() {
            if datagram.len() <= allowance.bytes {
                n.charge(client, datagram.len(), 0);
                emit(datagram, client);
            } else {
                let why = "the answer is larger than the reply ratio allows for what the client sent";
                self.upstream_dropped(DropReason::Amplification, shown, upstream, &why);
            }
            return;
        }
        n.begin(client);
        let result = self
            .handler
            .on_reply(datagram, Some(shown), upstream, &mut self.sessions, allowance);
        let mut bytes = 0;
        match result {
            Ok(answer) => {
                if !answer.each_datagram(|d| {
                    bytes += d.len();
                    emit(d, client);
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
        self.counters.guest_time(self.handler.last_time());
        // Counted whatever the outcome: a call that trapped after forwarding
        // has still spent them.
        let calls = self.handler.last_calls();
        if let Some(n) = self.sessions.as_mut() {
            n.charge(client, bytes, calls);
        }
        let counters = &self.counters;
        self.handler
            .take_refused(&mut |error, n| counters.refused(error, u64::from(n)));
    }

    /// An answer on a shared pool's socket: `on_reply` names its client by the
    /// handle it kept, and what it returns and `send`s goes to that client,
    /// held to the client's reply ratio and call allowance; an answer it names
    /// no client for is dropped, counted by why (`unclaimed`, `stale_handle`,
    /// `wrong_endpoint`).
    fn shared_datagram(&mut self, datagram: &[u8], upstream: &str, emit: &mut dyn FnMut(&[u8], SocketAddr)) {
        if !self.handler.has_on_reply() {
            let why = "a shared pool's answers need the module's on_reply to name their client";
            self.upstream_dropped(DropReason::Unclaimed, UNSPECIFIED, upstream, &why);
            return;
        }
        if let Some(n) = self.sessions.as_mut() {
            n.unclaimed();
        }
        let unclaimed = Allowance {
            bytes: 0,
            calls: MAX_CALLS_PER_DATAGRAM,
        };
        let result = self
            .handler
            .on_reply(datagram, None, upstream, &mut self.sessions, unclaimed);
        let (mut bytes, mut claimed) = (0, None);
        let dropped: Option<Rejection> = match result {
            Ok(answer) => match answer.claimed() {
                Ok(client) => {
                    claimed = Some(client);
                    let any = answer.each_datagram(|d| {
                        bytes += d.len();
                        emit(d, client);
                    });
                    (!any && answer.forwarded() == 0).then(|| DropReason::NoReply.into())
                }
                Err(reason) => Some(reason.into()),
            },
            Err(rejection) => Some(rejection),
        };
        match dropped {
            // The guest's choice, as for any `on_reply`: counted, not said.
            Some(r) if r.reason == DropReason::NoReply => self.counters.upstream_dropped(DropReason::NoReply),
            Some(r) => self.upstream_dropped(r.reason, UNSPECIFIED, upstream, &r),
            None => {}
        }
        self.counters.guest_time(self.handler.last_time());
        let calls = self.handler.last_calls();
        if let (Some(client), Some(n)) = (claimed, self.sessions.as_mut()) {
            n.charge(client, bytes, calls);
        }
        let counters = &self.counters;
        self.handler
            .take_refused(&mut |error, n| counters.refused(error, u64::from(n)));
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

    pub(crate) fn recv_failed(&mut self, e: io::Error) {
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

/// No client (yet): what a shared pool's answer is about until `on_reply` names one.
const UNSPECIFIED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Counts a reply as sent, or as a send error.
pub(super) fn sent(shared: &Shared, counters: &Counters, peer: SocketAddr, result: io::Result<usize>) {
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

/// Applies commands through `inner`, noting each datagram that went out (for
/// a tap that watches forwards).
struct Noting<'a, A: ?Sized> {
    inner: &'a mut A,
    sent: Vec<(SessionId, Vec<u8>)>,
}

impl<A: Apply + ?Sized> Apply for Noting<'_, A> {
    fn apply(&mut self, command: Command<'_>) -> Applied {
        let applied = self.inner.apply(command);
        if let (Command::Send { id, datagram }, Applied::Done) = (command, applied) {
            self.sent.push((id, datagram.to_vec()));
        }
        applied
    }

    fn send_all<'b>(
        &mut self,
        sends: impl ExactSizeIterator<Item = (SessionId, &'b [u8])> + Clone,
        fates: &mut Vec<Applied>,
    ) {
        let first = fates.len();
        self.inner.send_all(sends.clone(), fates);
        for ((id, datagram), fate) in sends.zip(fates.get(first..).unwrap_or_default()) {
            if *fate == Applied::Done {
                self.sent.push((id, datagram.to_vec()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The core driven by hand: inline WAT guests, session commands read back as
    // values, upstream answers fed in, no socket and no sleep.

    use arc_swap::ArcSwap;

    use crate::gateway::tap::NoTap;
    use crate::guest::Guest;

    use crate::config::PoolSpec;
    use crate::config::{Isolation, Limits};
    use crate::guest::Env;
    use crate::net::source_filter::PortSet;
    use crate::upstream::{Pools, Sessions};
    use crate::verdict::CallError;

    /// An endpoint on an unprivileged port, so that only being an endpoint denies it.
    const A: &str = "192.0.2.10:8053";
    const CLIENT: &str = "198.51.100.7:40000";

    /// Forwards every client datagram to `backend`.
    const FORWARD: &str = include_str!("../../examples/forward.wat");
    /// "s…": `send`s the datagram four times; "r…": three times, then replies with it.
    const SENDER: &str = include_str!("../../tests/guests/sender.wat");

    /// Forwards every client datagram, and every upstream answer twice more.
    const REFORWARD: &str = r#"(module
      (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (data (i32.const 0) "backend")
      (func (export "alloc") (param i32) (result i32) i32.const 64)
      (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
        (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
        i64.const -1)
      (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
        (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
        (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
        i64.const -1))"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn core_with(wat: &str, pool: PoolSpec) -> Core<Guest, NoTap> {
        core_of(wat, Some(pool))
    }

    fn core_of(wat: &str, pool: Option<PoolSpec>) -> Core<Guest, NoTap> {
        let env = Env::new(Limits::default()).unwrap();
        let program = env.load("test.wat", wat.as_bytes()).unwrap();
        let pools = pool.map(|pool| ArcSwap::from_pointee(Pools::new(&[pool], 1).unwrap()));
        let shared = Arc::new(Shared::new(
            env.clone(),
            crate::config::ListenerSpec::default(),
            Arc::new(program),
            1,
            pools,
            None,
            addr("127.0.0.1:5353"),
        ));
        let counters = shared.stats.worker(0);
        let guest = Guest::new(env, shared.program.load_full(), Isolation::Reuse, 3.0);
        let sessions = shared.pools.as_ref().map(|p| {
            Box::new(Sessions::new(
                p.load_full(),
                0,
                Arc::clone(&counters),
                3.0,
                Instant::now(),
            ))
        });
        Core::new(
            guest,
            NoTap,
            shared,
            counters,
            SourceFilter::new(PortSet::default(), addr("127.0.0.1:5353")),
            sessions,
            Instant::now(),
        )
    }

    fn backend() -> PoolSpec {
        PoolSpec::new("backend", vec![A.to_string()])
    }

    /// Datagrams for the client, and datagrams sent upstream on each session.
    type Outcome = (Vec<Vec<u8>>, Vec<(SessionId, Vec<u8>)>);

    /// A client datagram in: what was emitted, and the datagrams sent upstream.
    fn client_says(core: &mut Core<Guest, NoTap>, from: SocketAddr, datagram: &[u8]) -> Outcome {
        client_says_at(core, Instant::now(), from, datagram)
    }

    fn client_says_at(core: &mut Core<Guest, NoTap>, now: Instant, from: SocketAddr, datagram: &[u8]) -> Outcome {
        let mut out = Vec::new();
        core.on_client(now, datagram, from, &mut |d, to| {
            assert_eq!(to, from);
            out.push(d.to_vec());
        });
        (out, sends(core))
    }

    /// Applies the queued commands (every one succeeds) and returns the sends.
    fn sends(core: &mut Core<Guest, NoTap>) -> Vec<(SessionId, Vec<u8>)> {
        let mut sent = Vec::new();
        core.poll_commands(&mut |c: Command<'_>| {
            if let Command::Send { id, datagram } = c {
                sent.push((id, datagram.to_vec()));
            }
            Applied::Done
        });
        sent
    }

    /// Upstream answers on `id`: what reached the client, and what was forwarded again.
    fn upstream_says(core: &mut Core<Guest, NoTap>, id: SessionId, answers: &[&[u8]]) -> Outcome {
        let mut out = Vec::new();
        core.on_upstream(Instant::now(), id, answers.iter().copied(), &mut |d, to| {
            assert_eq!(to, addr(CLIENT));
            out.push(d.to_vec());
        });
        (out, sends(core))
    }

    #[test]
    fn a_forwarded_datagram_is_sent_on_a_session_and_its_answer_reaches_the_client() {
        let mut core = core_with(FORWARD, backend());
        let (replies, sent) = client_says(&mut core, addr(CLIENT), b"query");
        assert!(replies.is_empty());
        assert_eq!(sent, [(SessionId::from_raw(0), b"query".to_vec())]);
        let (out, again) = upstream_says(&mut core, SessionId::from_raw(0), &[b"answer"]);
        assert_eq!(out, [b"answer".to_vec()]);
        assert!(again.is_empty());
        let stats = core.shared.stats.snapshot();
        assert_eq!(stats.forwarded, 1);
    }

    #[test]
    fn answers_to_an_unproven_client_are_held_to_the_ratio_of_what_it_sent() {
        let mut core = core_with(FORWARD, backend());
        client_says(&mut core, addr(CLIENT), &[b'q'; 10]);
        // 3 × 10 bytes: two answers of 12 fit, the third does not.
        let (out, _) = upstream_says(
            &mut core,
            SessionId::from_raw(0),
            &[&[b'a'; 12], &[b'b'; 12], &[b'c'; 12]],
        );
        assert_eq!(out, [vec![b'a'; 12], vec![b'b'; 12]]);
        assert_eq!(
            core.shared.stats.snapshot().upstream_dropped(DropReason::Amplification),
            1
        );
    }

    #[test]
    fn the_work_of_one_client_datagram_through_on_reply_is_bounded_in_total() {
        // Before the chain had one allowance, the call limit started afresh in
        // every on_reply, and one datagram led to 520,000 upstream datagrams in 5 s.
        let mut core = core_with(REFORWARD, backend());
        let chain = |core: &mut Core<Guest, NoTap>, first: &[u8]| {
            let (_, mut pending) = client_says(core, addr(CLIENT), first);
            let mut upstream = pending.len();
            // Every datagram sent upstream is answered; each answer forwards twice.
            while let Some((id, datagram)) = pending.pop() {
                let (_, more) = upstream_says(core, id, &[&datagram]);
                upstream += more.len();
                pending.extend(more);
                assert!(upstream < 1_000, "the chain does not end");
            }
            upstream
        };
        let limit = crate::verdict::MAX_CALLS_PER_DATAGRAM as usize;
        assert_eq!(
            chain(&mut core, b"once"),
            1 + limit,
            "the first forward, then the chain's allowance"
        );
        assert!(core.shared.stats.snapshot().refused(crate::verdict::CallError::TooMany) > 0);
        assert_eq!(
            chain(&mut core, b"twice"),
            1 + limit,
            "the client's next datagram starts a new chain"
        );
    }

    #[test]
    fn sends_and_the_reply_share_one_budget_and_what_fits_still_goes_out() {
        let mut core = core_of(SENDER, None);
        // Four sends of 7 bytes against 3 × 7: three go out, the fourth is refused.
        let (out, _) = client_says(&mut core, addr(CLIENT), b"s-hello");
        assert_eq!(out, vec![b"s-hello".to_vec(); 3]);
        // Three sends use the whole budget: the reply is refused, not the sends.
        let (out, _) = client_says(&mut core, addr(CLIENT), b"r-hello");
        assert_eq!(out, vec![b"r-hello".to_vec(); 3]);
        let stats = core.shared.stats.snapshot();
        assert_eq!(stats.refused(CallError::Amplification), 2);
        assert_eq!(stats.dropped_total(), 0, "both datagrams were answered");
    }

    #[test]
    fn datagrams_from_an_endpoint_or_a_denied_port_never_reach_the_guest() {
        let mut core = core_with(FORWARD, backend());
        assert_eq!(client_says(&mut core, addr(A), b"loop?"), (vec![], vec![]));
        assert_eq!(client_says(&mut core, addr("198.51.100.7:53"), b"x"), (vec![], vec![]));
        assert_eq!(core.shared.stats.snapshot().dropped(DropReason::DeniedSource), 2);
    }

    /// Keeps each client's handle under its datagram's first byte; `on_reply`
    /// names the client kept under the answer's (tests/guests/shared.wat).
    const SHARED: &str = include_str!("../../tests/guests/shared.wat");
    const B: &str = "192.0.2.11:8053";

    fn shared_pool(endpoints: &[&str]) -> PoolSpec {
        PoolSpec {
            shared: Some(crate::config::SharedSpec {
                sockets: 2,
                reroll_every: Duration::from_secs(60),
            }),
            policy: crate::upstream::pool::Policy::RoundRobin,
            ..PoolSpec::new("backend", endpoints.iter().map(|e| e.to_string()).collect())
        }
    }

    /// Applies the queued commands: the sockets opened (id → endpoint), and the sends.
    type Opened = Vec<(SessionId, SocketAddr)>;

    fn opens_and_sends(core: &mut Core<Guest, NoTap>) -> (Opened, Vec<(SessionId, Vec<u8>)>) {
        let (mut opened, mut sent) = (Vec::new(), Vec::new());
        core.poll_commands(&mut |c: Command<'_>| {
            match c {
                Command::Open { id, to } => opened.push((id, to)),
                Command::Send { id, datagram } => sent.push((id, datagram.to_vec())),
                Command::Close { .. } => {}
            }
            Applied::Done
        });
        (opened, sent)
    }

    /// Answers on shared socket `id`: each datagram that reached a client, with the client.
    fn shared_answers(
        core: &mut Core<Guest, NoTap>,
        now: Instant,
        id: SessionId,
        answers: &[&[u8]],
    ) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut out = Vec::new();
        core.on_upstream(now, id, answers.iter().copied(), &mut |d, to| {
            out.push((d.to_vec(), to))
        });
        out
    }

    fn client_n(i: u8) -> SocketAddr {
        SocketAddr::new([198, 51, 100, i].into(), 40_000 + u16::from(i))
    }

    fn upstream_drops(core: &Core<Guest, NoTap>, reason: DropReason) -> u64 {
        core.shared.stats.snapshot().upstream_dropped[reason.index()]
    }

    #[test]
    fn a_shared_pool_carries_every_client_on_a_few_sockets_and_on_reply_names_each_answers_client() {
        let mut core = core_with(SHARED, shared_pool(&[A]));
        let now = Instant::now();
        let mut sockets = Vec::new();
        for i in 1..=6 {
            core.on_client(now, &[i, b'q'], client_n(i), &mut |_, _| {
                panic!("nothing goes straight back")
            });
            let (opened, sent) = opens_and_sends(&mut core);
            assert!(opened.iter().all(|&(_, to)| to == addr(A)));
            sockets.extend(sent.iter().map(|(id, _)| *id));
            assert_eq!(sent.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(), [vec![i, b'q']]);
        }
        sockets.sort();
        sockets.dedup();
        assert_eq!(sockets.len(), 2, "six clients, two sockets");
        // Answers come back on either socket, in any order, each to its client.
        let out = shared_answers(&mut core, now, sockets[1], &[&[4, b'a'], &[1, b'a']]);
        assert_eq!(out, [(vec![4, b'a'], client_n(4)), (vec![1, b'a'], client_n(1))]);
        // A duplicate, and an ID nobody asked for, reach no one.
        assert!(shared_answers(&mut core, now, sockets[0], &[&[4, b'a'], &[99, b'a']]).is_empty());
        assert_eq!(upstream_drops(&core, DropReason::Unclaimed), 2);
        // The client is still held to the reply ratio: 3 × 2 bytes.
        assert!(shared_answers(&mut core, now, sockets[0], &[&[2, b'a', b'b', b'c', b'd', b'e', b'f']]).is_empty());
        assert_eq!(upstream_drops(&core, DropReason::Amplification), 1);
        assert_eq!(core.shared.stats.snapshot().handles_active, 6);
    }

    #[test]
    fn an_answer_from_an_endpoint_the_client_never_reached_or_for_an_expired_handle_is_dropped() {
        let mut core = core_with(SHARED, shared_pool(&[A, B]));
        let t0 = Instant::now();
        // Round robin: client 1's datagram goes to one endpoint, client 2's to the other.
        let mut socket_of = std::collections::HashMap::new();
        let mut endpoint_of = std::collections::HashMap::new();
        for i in 1..=2 {
            core.on_client(t0, &[i], client_n(i), &mut |_, _| {});
            let (opened, sent) = opens_and_sends(&mut core);
            socket_of.extend(opened);
            endpoint_of.insert(i, socket_of[&sent[0].0]);
        }
        assert_ne!(endpoint_of[&1], endpoint_of[&2]);
        let socket_to = |e: SocketAddr| *socket_of.iter().find(|(_, to)| **to == e).unwrap().0;
        // Client 1's ID, answered by client 2's endpoint: the handle is live but
        // its client never sent there.
        assert!(shared_answers(&mut core, t0, socket_to(endpoint_of[&2]), &[&[1]]).is_empty());
        assert_eq!(upstream_drops(&core, DropReason::WrongEndpoint), 1);
        // Client 2 is quiet past unanswered_timeout (5 s): its handle goes, and
        // the late answer names no one.
        core.on_timeout(t0 + Duration::from_secs(5));
        opens_and_sends(&mut core);
        assert!(
            shared_answers(
                &mut core,
                t0 + Duration::from_secs(5),
                socket_to(endpoint_of[&2]),
                &[&[2]]
            )
            .is_empty()
        );
        assert_eq!(upstream_drops(&core, DropReason::StaleHandle), 1);
        assert_eq!(core.shared.stats.snapshot().handles_active, 0);
    }

    #[test]
    fn an_answer_is_refused_to_a_guest_without_on_reply_and_client_works_without_shared_pools() {
        let mut core = core_with(FORWARD, shared_pool(&[A]));
        let now = Instant::now();
        let (_, sent) = client_says(&mut core, addr(CLIENT), b"q");
        let socket = SessionId::from_raw(0);
        assert_eq!(sent, [(socket, b"q".to_vec())], "forwarded on the shared socket");
        assert!(shared_answers(&mut core, now, socket, &[b"a"]).is_empty());
        assert_eq!(upstream_drops(&core, DropReason::Unclaimed), 1);
        // `client` with a per-client pool gives a handle; with no pool, unknown_pool (-1).
        let mut per_client = core_with(SHARED, backend());
        let (out, _) = client_says(&mut per_client, addr(CLIENT), b"?-------");
        assert!(i64::from_le_bytes(out[0].clone().try_into().unwrap()) > 0);
        let mut no_pool = core_of(SHARED, None);
        let (out, _) = client_says(&mut no_pool, addr(CLIENT), b"?-------");
        assert_eq!(i64::from_le_bytes(out[0].clone().try_into().unwrap()), -1);
    }

    #[test]
    fn an_idle_session_ends_on_timeout_and_its_late_answer_goes_nowhere() {
        let mut core = core_with(
            FORWARD,
            PoolSpec {
                unanswered_timeout: Duration::from_secs(5),
                ..backend()
            },
        );
        let t0 = Instant::now();
        client_says_at(&mut core, t0, addr(CLIENT), b"q");
        let closes_at = |core: &mut Core<Guest, NoTap>, at: Duration| {
            let mut closed = Vec::new();
            core.on_timeout(t0 + at);
            core.poll_commands(&mut |c: Command<'_>| {
                if let Command::Close { id } = c {
                    closed.push(id);
                }
                Applied::Done
            });
            closed
        };
        // Not a moment before its timeout…
        assert_eq!(
            closes_at(&mut core, Duration::from_millis(4_999)),
            [],
            "closed before its timeout"
        );
        // …and at it.
        assert_eq!(closes_at(&mut core, Duration::from_secs(5)), [SessionId::from_raw(0)]);
        let (out, _) = upstream_says(&mut core, SessionId::from_raw(0), &[b"late"]);
        assert!(out.is_empty());
        assert!(!core.awaiting());
    }

    #[test]
    fn mapped_ipv4_clients_are_shown_as_ipv4() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(unmapped(p("[::ffff:10.1.2.3]:53")), p("10.1.2.3:53"));
        assert_eq!(unmapped(p("[::1]:53")), p("[::1]:53"));
        assert_eq!(unmapped(p("127.0.0.1:9")), p("127.0.0.1:9"));
    }
}
