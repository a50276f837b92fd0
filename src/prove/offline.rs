//! A worker's core with no socket at all, for `wasmgate replay`: datagrams and
//! the time they arrived go in, and what the gateway would have sent comes out.
//! Forwards are reported, never sent; a recorded upstream answer can be fed
//! back in, through `on_reply` as when serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The latest a capture's datagram may be, after its first: later ones are
/// taken as this late (a century).
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

use arc_swap::ArcSwap;

use super::candidate::Candidate;
use crate::config::ListenerSpec;
use crate::gateway::core::Core;
use crate::gateway::shared::Shared;
use crate::gateway::tap::NoTap;
use crate::guest::{Env, Guest, Program};
use crate::metrics::Snapshot;
use crate::net::source_filter::SourceFilter;
use crate::upstream::{Applied, Command, Pools, SessionId, Sessions};
use crate::verdict::DropReason;

/// What the gateway did with one datagram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Datagrams to the client, in order.
    pub replies: Vec<Vec<u8>>,
    /// Datagrams to upstream endpoints, in order.
    pub forwards: Vec<(SocketAddr, Vec<u8>)>,
    /// Why it was dropped, if it was.
    pub dropped: Option<DropReason>,
    /// Time spent in the guest.
    pub guest_time: Duration,
}

impl Outcome {
    /// What became of the datagram, as a recording names it: `reply`,
    /// `forward`, or the drop reason.
    pub fn verdict(&self) -> &'static str {
        if !self.replies.is_empty() {
            "reply"
        } else if !self.forwards.is_empty() {
            "forward"
        } else {
            self.dropped.map_or(DropReason::NoReply.as_str(), DropReason::as_str)
        }
    }
}

/// A listener's core driven by hand with a virtual clock.
pub struct Offline {
    core: Core<Guest, NoTap>,
    /// The virtual clock: the first datagram's time is `start`.
    start: Instant,
    first: Option<Duration>,
    /// Open sessions by client and endpoint, to feed recorded answers to.
    sessions: HashMap<(SocketAddr, SocketAddr), SessionId>,
    /// The session each client opened last, for answers whose endpoint is not known.
    by_client: HashMap<SocketAddr, SessionId>,
}

impl Offline {
    /// A core running `program` as `spec`'s listener at `local` would (its
    /// pools, isolation, reply ratio and denied ports).
    pub fn new(env: &Env, program: Program, spec: &ListenerSpec, local: SocketAddr) -> anyhow::Result<Self> {
        let pools = if spec.pools.is_empty() {
            None
        } else {
            Some(Arc::new(Pools::new(&spec.pools, 1)?))
        };
        Ok(Self::with(env, Arc::new(program), spec, local, pools))
    }

    /// A core running `candidate` beside the listener `shared` serves, with
    /// the candidate's own copy of the pools (for the shadow).
    pub(super) fn beside(shared: &Shared, candidate: &Candidate) -> anyhow::Result<Self> {
        // Its own state: a shadowed module must not spend the listener's
        // limits or fill its cache. Its metrics are the listener's candidate's.
        Ok(Self::with(
            &shared.env.with_own_state().as_candidate(),
            Arc::clone(&candidate.program),
            &shared.spec,
            shared.local,
            candidate.pools.clone(),
        ))
    }

    /// A core running the active `program` beside the listener `shared`
    /// serves, stubbed as the candidate is (its pools' copy, a state of its
    /// own): what the active would have done for a canaried datagram.
    pub(super) fn active_beside(shared: &Shared, candidate: &Candidate, program: Arc<Program>) -> Self {
        Self::with(
            &shared.env.with_own_state().with_own_metrics(),
            program,
            &shared.spec,
            shared.local,
            candidate.pools.clone(),
        )
    }

    fn with(
        env: &Env,
        program: Arc<Program>,
        spec: &ListenerSpec,
        local: SocketAddr,
        pools: Option<Arc<Pools>>,
    ) -> Self {
        let start = Instant::now();
        let shared = Arc::new(Shared::new(
            env.clone(),
            spec.clone(),
            program,
            1,
            pools.map(ArcSwap::new),
            None,
            local,
        ));
        let counters = shared.stats.worker(0);
        let guest = Guest::new(
            env.clone(),
            shared.program.load_full(),
            spec.isolation,
            spec.max_reply_ratio,
        );
        let sessions = shared.pools.as_ref().map(|p| {
            Box::new(Sessions::new(
                p.load_full(),
                0,
                Arc::clone(&counters),
                spec.max_reply_ratio,
                start,
            ))
        });
        let filter = SourceFilter::new(spec.deny_source_ports.clone(), local);
        let core = Core::new(guest, NoTap, shared, counters, filter, sessions, start);
        Self {
            core,
            start,
            first: None,
            sessions: HashMap::new(),
            by_client: HashMap::new(),
        }
    }

    /// The virtual time of a datagram captured at `at`; sessions due to
    /// expire by then expire first.
    fn now(&mut self, at: Duration) -> Instant {
        let first = *self.first.get_or_insert(at);
        // A capture's times are the file's to choose: one far in the future
        // (or at the end of time) is as late as an Instant can be, never a panic.
        let since = at.saturating_sub(first).min(FAR_FUTURE);
        let now = self.start.checked_add(since).unwrap_or(self.start + FAR_FUTURE);
        // The handlers' state runs on the capture's clock too.
        self.core.shared.env.state().set_clock(since);
        if now >= self.core.poll_timeout() {
            self.core.on_timeout(now);
            let open = |id: &SessionId| self.core.sessions.as_ref().is_some_and(|n| n.session(*id).is_some());
            self.sessions.retain(|_, id| open(id));
            self.by_client.retain(|_, id| open(id));
        }
        now
    }

    /// A client datagram captured at `at`.
    pub fn client(&mut self, at: Duration, datagram: &[u8], client: SocketAddr) -> Outcome {
        let now = self.now(at);
        let before = self.core.shared.stats.snapshot();
        let mut outcome = Outcome::default();
        self.core
            .on_client(now, datagram, client, &mut |d, _| outcome.replies.push(d.to_vec()));
        self.apply_commands(&mut outcome);
        self.finish(&before, &mut outcome, |s| &s.dropped);
        outcome
    }

    /// An upstream's answer for `client`, captured at `at`: `None` when no
    /// session from this client to `endpoint` is open (the module did not
    /// forward there).
    pub fn upstream(
        &mut self,
        at: Duration,
        endpoint: SocketAddr,
        client: SocketAddr,
        datagram: &[u8],
    ) -> Option<Outcome> {
        let now = self.now(at);
        let id = *self.sessions.get(&(client, endpoint))?;
        Some(self.answer_on(now, id, datagram))
    }

    /// An upstream's answer for `client` on the session it opened last (the
    /// shadow's, whose endpoints are not the active's): `None` when it has none.
    pub(super) fn answer(&mut self, at: Duration, client: SocketAddr, datagram: &[u8]) -> Option<Outcome> {
        let now = self.now(at);
        let id = *self.by_client.get(&client)?;
        Some(self.answer_on(now, id, datagram))
    }

    fn answer_on(&mut self, now: Instant, id: SessionId, datagram: &[u8]) -> Outcome {
        let before = self.core.shared.stats.snapshot();
        let mut outcome = Outcome::default();
        self.core.on_upstream(now, id, std::iter::once(datagram), &mut |d, _| {
            outcome.replies.push(d.to_vec())
        });
        self.apply_commands(&mut outcome);
        self.finish(&before, &mut outcome, |s| &s.upstream_dropped);
        outcome
    }

    /// The session commands as if every socket did as told: opens noted,
    /// sends reported as forwards.
    fn apply_commands(&mut self, outcome: &mut Outcome) {
        let mut opened = Vec::new();
        let mut sent = Vec::new();
        self.core.poll_commands(&mut |command: Command<'_>| {
            match command {
                Command::Open { id, to } => opened.push((id, to)),
                Command::Send { id, datagram } => sent.push((id, datagram.to_vec())),
                Command::Close { .. } => {}
            }
            Applied::Done
        });
        let Some(sessions) = self.core.sessions.as_ref() else {
            return;
        };
        for (id, to) in opened {
            if let Some((client, _)) = sessions.session(id) {
                let client = crate::net::unmapped(client);
                self.sessions.insert((client, to), id);
                self.by_client.insert(client, id);
            }
        }
        for (id, datagram) in sent {
            if let Some((_, endpoint)) = sessions.session(id) {
                outcome.forwards.push((endpoint, datagram));
            }
        }
    }

    /// The drop reason and guest time, from the counters' change.
    fn finish(&self, before: &Snapshot, outcome: &mut Outcome, drops: fn(&Snapshot) -> &[u64; DropReason::ALL.len()]) {
        let after = self.core.shared.stats.snapshot();
        outcome.dropped = DropReason::ALL
            .into_iter()
            .zip(drops(before).iter().zip(drops(&after)))
            .find(|(_, (b, a))| a > b)
            .map(|(reason, _)| reason);
        outcome.guest_time = Duration::from_nanos(after.guest_time_sum_ns - before.guest_time_sum_ns);
    }

    /// The counters so far.
    pub fn stats(&self) -> Snapshot {
        self.core.shared.stats.snapshot()
    }
}
