//! One worker's runs of a [`Program`]: the instance lifecycle, the same for
//! every kind (made on first use, kept or not by the isolation, replaced
//! after the guest misbehaves or a reload), and the time budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::env::Env;
use super::kind::{Call, Entry, Instance};
use super::outcome::{Answer, NO_CALLS, Rejection};
use super::program::Program;
use crate::config::Isolation;
use crate::metrics::guest::MetricsWriter;
use crate::upstream::Lent;
use crate::verdict::{Allowance, CallError, DropReason, MAX_DATAGRAM};

/// Runs one [`Program`] for one worker, datagram after datagram.
pub struct Guest {
    env: Env,
    pub(super) program: Arc<Program>,
    live: Option<Box<dyn Instance>>,
    /// The live instance misbehaved and must not see another datagram.
    poisoned: bool,
    pub(super) isolation: Isolation,
    pub(super) max_ratio: f64,
    /// How long the last call took, start function included (wall time).
    last_time: Duration,
    /// This worker's writer of the guest metrics, lent to each call.
    metrics: Option<Box<MetricsWriter>>,
}

impl Guest {
    /// `max_ratio` caps reply size at that multiple of the request (0: no cap).
    pub fn new(mut env: Env, program: Arc<Program>, isolation: Isolation, max_ratio: f64) -> Self {
        env.serial = program.serial;
        Self {
            metrics: Some(Box::new(env.metrics_writer())),
            env,
            program,
            live: None,
            poisoned: false,
            isolation,
            max_ratio,
            last_time: Duration::ZERO,
        }
    }

    /// How long the last call took (instantiating included), as the
    /// `wasmgate_guest_duration_seconds` histogram counts it.
    pub fn last_time(&self) -> Duration {
        self.last_time
    }

    /// Switches to `program` if it is not the one running; the next datagram then
    /// gets an instance of it, and the old instance is freed now.
    pub fn set_program(&mut self, program: &Arc<Program>) {
        if !Arc::ptr_eq(&self.program, program) {
            self.program = Arc::clone(program);
            self.env.serial = program.serial;
            self.live = None;
            self.poisoned = false;
        }
    }

    /// Runs the guest on one datagram from `peer` and returns the reply to send.
    /// After a trap, timeout or bad alloc/reply the instance is thrown away, so the
    /// next datagram starts from a fresh one. (Without sessions to forward to:
    /// see [`Guest::handle_with`].)
    pub fn handle(&mut self, datagram: &[u8], peer: SocketAddr) -> Result<&[u8], Rejection> {
        match self.handle_with(datagram, peer, &mut None)?.reply {
            Some(reply) => Ok(reply),
            None => Err(DropReason::NoReply.into()),
        }
    }

    /// Runs `handle` on one datagram from `peer`, with the worker's sessions `net`
    /// (lent to the guest's `forward` calls for the length of the call).
    pub fn handle_with(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        sessions: &mut Lent,
    ) -> Result<Answer<'_>, Rejection> {
        let call = Call {
            entry: Entry::Handle,
            datagram,
            peer,
            claimable: false,
            upstream: "",
            allowance: None,
            max_ratio: self.max_ratio,
        };
        self.run(&call, sessions)
    }

    /// The `forward`/`send` calls refused since this was last asked, as
    /// (reason, count): after the call that made them, whether it answered,
    /// trapped or ran out of time; each refusal is given once.
    pub fn take_refused(&mut self) -> impl Iterator<Item = (CallError, u32)> + use<> {
        self.live
            .as_mut()
            .and_then(|live| live.calls_mut())
            .map(|calls| calls.out.take_refused())
            .into_iter()
            .flatten()
    }

    /// The `forward`/`send` calls the last call made, refused ones included,
    /// whatever its outcome.
    pub fn last_calls(&mut self) -> u32 {
        self.live
            .as_ref()
            .and_then(|live| live.calls())
            .map_or(0, |calls| calls.out.calls())
    }

    /// Whether the program exports `on_reply`; without it, upstream datagrams go
    /// to the client unchanged and never enter the guest.
    pub fn has_on_reply(&self) -> bool {
        self.program.on_reply
    }

    /// Runs `on_reply` on a datagram that `upstream` (`POOL/ip:port`) sent back
    /// for client `peer`, within `allowance`: what is left of what the client's
    /// own datagrams earned (bytes by the reply ratio, calls by the chain limit).
    /// Without `peer` (a shared pool's answer) the guest names the client with
    /// `reply_to`, and draws on its allowance from then on.
    /// Call only when [`Guest::has_on_reply`].
    pub fn on_reply(
        &mut self,
        datagram: &[u8],
        peer: Option<SocketAddr>,
        upstream: &str,
        sessions: &mut Lent,
        allowance: Allowance,
    ) -> Result<Answer<'_>, Rejection> {
        let call = Call {
            entry: Entry::OnReply,
            datagram,
            peer: peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            claimable: peer.is_none(),
            upstream,
            allowance: Some(allowance),
            max_ratio: self.max_ratio,
        };
        self.run(&call, sessions)
    }

    /// Whether the program writes health probes (`probe` and `probe_reply`).
    pub fn writes_probes(&self) -> bool {
        self.program.probes
    }

    /// The probe datagram for `endpoint` (`POOL/ip:port`), from the guest's
    /// `probe`: `None` when it returned -1. Under the same limits as any
    /// call; it may not forward or send. Call only when [`Guest::writes_probes`].
    pub fn probe(&mut self, endpoint: &str) -> Result<Option<Vec<u8>>, Rejection> {
        let answer = self.run(&Self::probe_call(Entry::Probe, b"", endpoint), &mut None)?;
        Ok(answer.reply.map(<[u8]>::to_vec))
    }

    /// Whether the guest's `probe_reply` judges `answer` from `endpoint` healthy.
    pub fn probe_reply(&mut self, endpoint: &str, answer: &[u8]) -> Result<bool, Rejection> {
        let judged = self.run(&Self::probe_call(Entry::ProbeReply, answer, endpoint), &mut None)?;
        Ok(judged.reply.is_some())
    }

    fn probe_call<'a>(entry: Entry, datagram: &'a [u8], endpoint: &'a str) -> Call<'a> {
        Call {
            entry,
            datagram,
            // No client: `peer` gives the unspecified address.
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            claimable: false,
            upstream: endpoint,
            allowance: Some(Allowance {
                bytes: MAX_DATAGRAM,
                calls: 0,
            }),
            max_ratio: 0.0,
        }
    }

    fn run(&mut self, call: &Call<'_>, sessions: &mut Lent) -> Result<Answer<'_>, Rejection> {
        self.last_time = Duration::ZERO;
        if call.datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        let started = Instant::now();
        let meter = self.env.start_meter();
        // A poisoned instance is replaced here, at the start of the next datagram,
        // so that the reply to this one can still borrow from its memory.
        if self.isolation == Isolation::Fresh || self.poisoned {
            self.live = None;
            self.poisoned = false;
        }
        let live = match self.live.take() {
            Some(live) => live,
            None => self.program.pre.instantiate(&self.env)?,
        };
        let live = self.live.insert(live);
        // The one place the sessions are lent to a store and taken back,
        // whatever the call's outcome.
        if let Some(calls) = live.calls_mut() {
            let peer = (!call.claimable).then_some(call.peer);
            calls.lend(peer, sessions, &mut self.metrics, call.allowance(), call.upstream);
        }
        let result = live.call(call, &self.env);
        if let Some(calls) = live.calls_mut() {
            calls.take_back(sessions, &mut self.metrics);
        }
        let result = result.and_then(|has_reply| self.env.check_budget(&meter).map(|()| has_reply));
        self.last_time = started.elapsed();
        match result {
            Ok(has_reply) => Ok(Answer::new(
                has_reply.then(|| live.reply()),
                live.calls().map_or(&NO_CALLS, |calls| &calls.out),
            )),
            Err(rejection) => {
                self.poisoned = rejection.reason.poisons_instance();
                Err(rejection)
            }
        }
    }
}
