//! One worker's decisions, with no socket and no clock of its own, in the
//! manner of quinn-proto's endpoint: a client datagram in ([`Core::on_client`])
//! gives replies out (through `emit`) and session commands queued
//! ([`Core::poll_commands`]); an upstream datagram in ([`Core::on_upstream`])
//! goes through `on_reply` or straight on; time in ([`Core::on_timeout`], due
//! at [`Core::poll_timeout`]) ends idle sessions. `now` is always passed in.
//! Every drop is counted here. The worker owns the sockets.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::mpsc::{SyncSender, TrySendError};

use super::candidate::{self, Candidate, Job};
use super::loop_guard::{LOOP_AFTER, LoopGuard};
use super::shared::{Handler, NativeAnswer, Shared};
use crate::guest::Guest;
use crate::metrics::Counters;
use crate::net::source_filter::SourceFilter;
use crate::prove::capture::Hop;
use crate::upstream::{Applied, Command, Lent, SessionId};
use crate::verdict::{DropReason, MAX_DATAGRAM};

/// Without pools, how often an idle worker lets go of a replaced program.
const IDLE_REFRESH: Duration = Duration::from_secs(1);

/// The per-datagram work of a worker, apart from the sockets.
pub(super) struct Core {
    pub(super) handler: Handler,
    pub(super) shared: Arc<Shared>,
    pub(super) counters: Arc<Counters>,
    /// The sources this worker never answers.
    pub(super) filter: SourceFilter,
    /// With pools: this worker's session table (lent to the guest during a call).
    pub(super) sessions: Lent,
    /// The `POOL/ip:port` of the session being read (kept to reuse its allocation).
    pub(super) label: String,
    /// When [`Core::on_timeout`] is due.
    pub(super) next_timeout: Instant,
    /// The recorder's sampling state (`--record-sample`).
    sample_state: u64,
    /// Where shadow samples go (`--candidate` with `--shadow-sample` above 0).
    shadow: Option<SyncSender<Job>>,
    shadow_threshold: u64,
    shadow_state: u64,
    /// The candidate this worker serves canary clients with, and its handler.
    canary: Option<(Arc<Candidate>, Handler)>,
    /// What this worker last sent each source, to end loops between gateways.
    loops: LoopGuard,
}

/// The candidate as loaded for one datagram (always `Some` inside a [`Trial`]):
/// an `arc_swap` guard, so reading it costs no reference count.
type Loaded = arc_swap::Guard<Option<Arc<Candidate>>>;

/// Whether the datagram in hand goes to the candidate for real, or to the
/// active and from there to the shadow, or neither.
enum Trial {
    None,
    Canary(Loaded),
    Active { shadowed: bool, candidate: Loaded },
}

impl Trial {
    fn canary(&self) -> bool {
        matches!(self, Self::Canary(_))
    }

    fn shadowed(&self) -> bool {
        matches!(self, Self::Active { shadowed: true, .. })
    }
}

impl Core {
    pub(super) fn new(
        handler: Handler,
        shared: Arc<Shared>,
        counters: Arc<Counters>,
        filter: SourceFilter,
        sessions: Lent,
        worker: usize,
        shadow: Option<SyncSender<Job>>,
    ) -> Self {
        let share = shared.spec.candidate.as_ref().map_or(0.0, |c| c.shadow_sample);
        Self {
            handler,
            shared,
            counters,
            filter,
            sessions,
            label: String::new(),
            next_timeout: Instant::now(),
            sample_state: 0x9e37_79b9_7f4a_7c15 ^ worker as u64,
            shadow,
            shadow_threshold: crate::prove::capture::threshold(share),
            shadow_state: 0x2545_f491_4f6c_dd1d ^ worker as u64,
            canary: None,
            // A seed no client can know, so that no choice of sources can
            // push a loop's slots out of the table.
            loops: LoopGuard::new(std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                worker,
            )),
        }
    }

    /// What the candidate (if one is loaded) has to do with `client`'s
    /// datagram; a new candidate gets its canary handler here.
    fn trial(&mut self, client: SocketAddr) -> Trial {
        let Some(spec) = &self.shared.spec.candidate else {
            return Trial::None;
        };
        let loaded = self.shared.candidate.load();
        let Some(candidate) = loaded.as_ref() else {
            self.canary = None;
            return Trial::None;
        };
        if spec.canary_percent > 0.0 && candidate::canary(client.ip(), spec.canary_percent) {
            if !self.canary.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, candidate)) {
                let guest = Guest::new(
                    self.shared.env.clone(),
                    Arc::clone(&candidate.program),
                    self.shared.spec.isolation,
                    self.shared.spec.max_reply_ratio,
                );
                self.canary = Some((Arc::clone(candidate), Handler::Guest(Box::new(guest))));
            }
            return Trial::Canary(loaded);
        }
        let shadowed =
            self.shadow.is_some() && crate::prove::capture::chance(&mut self.shadow_state, self.shadow_threshold);
        Trial::Active {
            shadowed,
            candidate: loaded,
        }
    }

    /// Puts the canary handler in the active's place, or back.
    fn swap_canary(&mut self) {
        if let Some((_, handler)) = self.canary.as_mut() {
            std::mem::swap(&mut self.handler, handler);
        }
    }

    /// Tells the candidate's judge how a datagram went, and acts on its ruling.
    fn judged(&self, trial: &Trial, verdict: &str, client: SocketAddr) {
        let failed = candidate::failed(verdict);
        match trial {
            Trial::None => {}
            Trial::Active { candidate, .. } => {
                if let Some(candidate) = candidate.as_ref() {
                    candidate.active_ran(failed);
                }
            }
            Trial::Canary(candidate) => {
                let rules = candidate::Rules::of(&self.shared.spec);
                let Some(candidate) = candidate.as_ref() else { return };
                if !failed && self.shadow.is_some() {
                    // Judged once the active module ran it too, in the shadow
                    // thread: served is not the same as right.
                    candidate.counted(false);
                } else if let Some(action) = candidate.candidate_ran(failed, false, client.ip(), &rules) {
                    self.shared.settle(candidate, action);
                }
            }
        }
    }

    /// Hands a shadow sample to the shadow thread; a full queue skips it.
    fn shadow(&self, job: Job) {
        let Some(tx) = &self.shadow else { return };
        let bytes = job.bytes();
        if !self.shared.shadow.reserve(bytes) {
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(job) {
            self.shared.shadow.release(bytes);
            self.shared.shadow.skipped();
        }
    }

    /// Whether this exchange is recorded (`--record`, sampled).
    fn recording(&mut self) -> bool {
        match &self.shared.recorder {
            Some(r) => r.sampled(&mut self.sample_state),
            None => false,
        }
    }

    /// Records one datagram of the exchange being handled.
    fn record(
        &self,
        hop: Hop,
        src: SocketAddr,
        dst: SocketAddr,
        datagram: &[u8],
        verdict: Option<&'static str>,
        client: Option<SocketAddr>,
    ) {
        if let Some(r) = &self.shared.recorder {
            let module = self.shared.program.load().sha256();
            r.record(hop, src, dst, datagram, module, verdict, client);
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
    pub(super) fn on_upstream<'a>(
        &mut self,
        now: Instant,
        id: SessionId,
        datagrams: impl Iterator<Item = &'a [u8]> + Clone,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        self.set_now(now);
        let recording = self.recording();
        let Some(n) = self.sessions.as_mut() else { return };
        let endpoint = if recording {
            n.session(id).map(|(_, endpoint)| endpoint)
        } else {
            None
        };
        let Some((client, upstream)) = n.received(id, datagrams.clone().map(<[u8]>::len)) else {
            return;
        };
        let mut label = std::mem::take(&mut self.label);
        label.clear();
        label.push_str(upstream);
        let shown = unmapped(client);
        let trial = self.trial(shown);
        // A canary client's answers go through the candidate's `on_reply`.
        if trial.canary() {
            self.swap_canary();
        }
        let shadowed = trial.shadowed();
        if !recording && !shadowed {
            for datagram in datagrams {
                self.upstream_datagram(datagram, client, &label, emit);
            }
        } else {
            let local = self.shared.local;
            for datagram in datagrams {
                if recording && let Some(endpoint) = endpoint {
                    self.record(Hop::Upstream, endpoint, local, datagram, None, Some(shown));
                }
                let mut replies = Vec::new();
                self.upstream_datagram(datagram, client, &label, &mut |d, to| {
                    replies.push(d.to_vec());
                    emit(d, to);
                });
                if recording {
                    for reply in &replies {
                        self.record(Hop::Reply, local, shown, reply, None, None);
                    }
                }
                if shadowed {
                    self.shadow(Job::Upstream {
                        at: now,
                        client: shown,
                        datagram: datagram.to_vec(),
                        replies,
                    });
                }
            }
        }
        if trial.canary() {
            self.swap_canary();
        }
        self.label = label;
    }

    /// Session `id`'s socket reported ICMP port unreachable.
    pub(super) fn on_refused(&mut self, now: Instant, id: SessionId) {
        self.set_now(now);
        if let Some(n) = self.sessions.as_mut() {
            n.refused(id);
        }
    }

    /// Idle sessions end, ejections end, and a replaced program is let go.
    pub(super) fn on_timeout(&mut self, now: Instant) {
        self.set_now(now);
        if let Some(n) = self.sessions.as_mut() {
            n.expire(now);
        }
        self.handler.refresh(&self.shared.program.load());
        let every = self.sessions.as_ref().map_or(IDLE_REFRESH, |n| n.sweep_every());
        self.next_timeout = now + every;
    }

    /// When [`Core::on_timeout`] is due next.
    pub(super) fn poll_timeout(&self) -> Instant {
        self.next_timeout
    }

    /// The session opens, sends and closes queued since the last poll, in order.
    pub(super) fn poll_commands(&mut self, mut apply: impl FnMut(Command<'_>) -> Applied) {
        let Some(n) = self.sessions.as_mut() else { return };
        if self.shared.recorder.is_none() {
            n.poll_commands(apply);
            return;
        }
        // Forwards are sampled on their own: by the time they are sent, the
        // client datagram that asked for them may be a batch behind.
        let mut sent = Vec::new();
        n.poll_commands(|command| {
            let applied = apply(command);
            if let (Command::Send { id, datagram }, Applied::Done) = (command, applied) {
                sent.push((id, datagram.to_vec()));
            }
            applied
        });
        let local = self.shared.local;
        for (id, datagram) in sent {
            let session = self.sessions.as_ref().and_then(|n| n.session(id));
            if let Some((client, endpoint)) = session
                && self.recording()
            {
                self.record(Hop::Forward, local, endpoint, &datagram, None, Some(unmapped(client)));
            }
        }
    }

    /// Whether a forwarded datagram still waits for its answer (the shutdown drain).
    pub(super) fn awaiting(&self) -> bool {
        self.sessions.as_ref().is_some_and(|n| n.awaiting())
    }

    /// A client datagram (already counted as received): the handler runs on it,
    /// what goes back to `peer` is passed to `emit` (`send`s first), forwards are
    /// queued as session commands. Drops are counted here.
    pub(super) fn on_client(
        &mut self,
        now: Instant,
        datagram: &[u8],
        peer: SocketAddr,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        self.set_now(now);
        let shown = unmapped(peer);
        let sessions = &self.sessions;
        let endpoint = |addr| sessions.as_ref().is_some_and(|n| n.is_endpoint(addr));
        if let Err(why) = self.filter.check(shown, Some(&self.shared.session_ports), endpoint) {
            drop_datagram(&self.shared, &self.counters, DropReason::DeniedSource, shown, &why);
            return;
        }
        if self.loops.is_loop(shown, datagram) {
            let why = format_args!(
                "the source sent back what this gateway last sent it, {LOOP_AFTER} times in a row: a loop with another gateway"
            );
            drop_datagram(&self.shared, &self.counters, DropReason::Loop, shown, &why);
            return;
        }
        self.handler.refresh(&self.shared.program.load());
        let recording = self.recording();
        let trial = self.trial(shown);
        let shadowed = trial.shadowed();
        // A canaried datagram goes to the shadow thread with what the
        // candidate did, for the active module to run and compare.
        let canaried = trial.canary() && self.shadow.is_some();
        let mark = self.sessions.as_ref().map_or(0, |n| n.queued());
        let mut replies = Vec::new();
        let mut last_sent = None;
        let hash = self.loops.hasher();
        let mut emit = |d: &[u8], to: SocketAddr| {
            if recording || shadowed || canaried {
                replies.push(d.to_vec());
            }
            last_sent = Some(hash(d));
            emit(d, to);
        };
        let verdict = if trial.canary() {
            self.swap_canary();
            let verdict = self.handle_client(datagram, peer, shown, &mut emit);
            self.swap_canary();
            verdict
        } else {
            self.handle_client(datagram, peer, shown, &mut emit)
        };
        if let Some(hash) = last_sent {
            self.loops.sent_hash(shown, hash);
        }
        self.judged(&trial, verdict, shown);
        // What the handler did goes to the shadow thread: for the candidate to
        // run too (shadowed), or for the active to (canaried, unless the
        // candidate failed, which is judged already).
        let canary_sample = canaried && !candidate::failed(verdict);
        if shadowed || canary_sample {
            let forwards = self
                .sessions
                .as_ref()
                .map(|n| n.sends_since(mark).map(<[u8]>::to_vec).collect())
                .unwrap_or_default();
            let replies = if recording {
                replies.clone()
            } else {
                std::mem::take(&mut replies)
            };
            self.shadow(Job::Client {
                at: now,
                client: shown,
                datagram: datagram.to_vec(),
                verdict,
                replies,
                forwards,
                canaried: !shadowed,
            });
        }
        if recording {
            let local = self.shared.local;
            self.record(Hop::Client, shown, local, datagram, Some(verdict), None);
            for reply in &replies {
                self.record(Hop::Reply, local, shown, reply, None, None);
            }
        }
    }

    /// The handler on a client datagram that passed the source filter; what
    /// became of it (`reply`, `forward`, or the drop reason).
    fn handle_client(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        shown: SocketAddr,
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) -> &'static str {
        let started = Instant::now();
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
        match handler {
            Handler::Native(native, out) => {
                if datagram.len() > MAX_DATAGRAM {
                    drop_datagram(shared, counters, DropReason::Oversize, shown, &"oversize");
                    return DropReason::Oversize.as_str();
                }
                out.clear();
                let answer = native.handle(datagram, sessions.as_deref_mut(), out);
                counters.guest_time(started.elapsed());
                match answer {
                    NativeAnswer::Reply => {
                        emit(out, peer);
                        "reply"
                    }
                    NativeAnswer::Forwarded => {
                        counters.forwarded();
                        "forward"
                    }
                    NativeAnswer::Nothing => {
                        counters.dropped(DropReason::NoReply);
                        DropReason::NoReply.as_str()
                    }
                    NativeAnswer::Refused(error) => {
                        counters.refused(error, 1);
                        drop_datagram(shared, counters, error.drop_reason(), shown, &error);
                        error.drop_reason().as_str()
                    }
                }
            }
            Handler::Guest(guest) => {
                let result = guest.handle_with(datagram, shown, sessions);
                counters.guest_time(started.elapsed());
                let verdict = match result {
                    Ok(answer) => {
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
                count_refused(counters, guest);
                verdict
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
        emit: &mut dyn FnMut(&[u8], SocketAddr),
    ) {
        let Some(n) = self.sessions.as_mut() else { return };
        let allowance = n.allowance(client);
        let shown = unmapped(client);
        let guest = match &mut self.handler {
            Handler::Guest(guest) if guest.has_on_reply() => guest,
            _ => {
                if datagram.len() <= allowance.bytes {
                    n.charge(client, datagram.len(), 0);
                    emit(datagram, client);
                } else {
                    let why = "the answer is larger than the reply ratio allows for what the client sent";
                    self.upstream_dropped(DropReason::Amplification, shown, upstream, &why);
                }
                return;
            }
        };
        n.begin(client);
        let started = Instant::now();
        let result = guest.on_reply(datagram, shown, upstream, &mut self.sessions, allowance);
        self.counters.guest_time(started.elapsed());
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
        if let Handler::Guest(guest) = &mut self.handler {
            // Counted whatever the outcome: a call that trapped after forwarding
            // has still spent them.
            if let Some(n) = self.sessions.as_mut() {
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

    pub(super) fn recv_failed(&mut self, e: io::Error) {
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

/// An IPv4 client of a dual-stack `[::]` socket arrives as `[::ffff:a.b.c.d]:port`;
/// guests and logs see it as the IPv4 address it is. (Replies still go to the
/// address as received, which is what the IPv6 socket can send to.)
pub(super) fn unmapped(peer: SocketAddr) -> SocketAddr {
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

#[cfg(test)]
mod tests {
    use super::*;

    // The core driven by hand: inline WAT guests, session commands read back as
    // values, upstream answers fed in, no socket and no sleep.

    use arc_swap::ArcSwap;

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

    fn core_with(wat: &str, pool: PoolSpec) -> Core {
        core_of(wat, Some(pool))
    }

    fn core_of(wat: &str, pool: Option<PoolSpec>) -> Core {
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
            Handler::Guest(Box::new(guest)),
            shared,
            counters,
            SourceFilter::new(PortSet::default(), addr("127.0.0.1:5353")),
            sessions,
            0,
            None,
        )
    }

    fn backend() -> PoolSpec {
        PoolSpec::new("backend", vec![A.to_string()])
    }

    /// Datagrams for the client, and datagrams sent upstream on each session.
    type Outcome = (Vec<Vec<u8>>, Vec<(SessionId, Vec<u8>)>);

    /// A client datagram in: what was emitted, and the datagrams sent upstream.
    fn client_says(core: &mut Core, from: SocketAddr, datagram: &[u8]) -> Outcome {
        client_says_at(core, Instant::now(), from, datagram)
    }

    fn client_says_at(core: &mut Core, now: Instant, from: SocketAddr, datagram: &[u8]) -> Outcome {
        let mut out = Vec::new();
        core.on_client(now, datagram, from, &mut |d, to| {
            assert_eq!(to, from);
            out.push(d.to_vec());
        });
        (out, sends(core))
    }

    /// Applies the queued commands (every one succeeds) and returns the sends.
    fn sends(core: &mut Core) -> Vec<(SessionId, Vec<u8>)> {
        let mut sent = Vec::new();
        core.poll_commands(|c| {
            if let Command::Send { id, datagram } = c {
                sent.push((id, datagram.to_vec()));
            }
            Applied::Done
        });
        sent
    }

    /// Upstream answers on `id`: what reached the client, and what was forwarded again.
    fn upstream_says(core: &mut Core, id: SessionId, answers: &[&[u8]]) -> Outcome {
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
        let chain = |core: &mut Core, first: &[u8]| {
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
        let closes_at = |core: &mut Core, at: Duration| {
            let mut closed = Vec::new();
            core.on_timeout(t0 + at);
            core.poll_commands(|c| {
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
