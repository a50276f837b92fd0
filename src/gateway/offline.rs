//! A worker's core with no socket at all, for `wasmgate replay`: datagrams and
//! the time they arrived go in, and what the gateway would have sent comes out.
//! Forwards are reported, never sent; a recorded upstream answer can be fed
//! back in, through `on_reply` as when serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::core::Core;
use super::{Handler, Shared, WARNINGS_PER_SECOND};
use crate::config::ListenerSpec;
use crate::metrics::{RateLimit, Snapshot, Stats};
use crate::sandbox::{Guest, Program, Sandbox};
use crate::source_filter::{PortCounts, SourceFilter};
use crate::upstream::{Applied, Command, Pools, SessionId, Upstreams};
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

/// A listener's core driven by hand with a virtual clock.
pub struct Offline {
    core: Core,
    /// The virtual clock: the first datagram's time is `start`.
    start: Instant,
    first: Option<Duration>,
    /// Open sessions by client and endpoint, to feed recorded answers to.
    sessions: HashMap<(SocketAddr, SocketAddr), SessionId>,
}

impl Offline {
    /// A core running `program` as `spec`'s listener at `local` would (its
    /// pools, isolation, reply ratio and denied ports).
    pub fn new(sandbox: &Sandbox, program: Program, spec: &ListenerSpec, local: SocketAddr) -> anyhow::Result<Self> {
        let start = Instant::now();
        let pools = if spec.pools.is_empty() {
            None
        } else {
            Some(ArcSwap::from_pointee(Pools::new(&spec.pools, 1)?))
        };
        let shared = Arc::new(Shared {
            program: ArcSwap::from_pointee(program),
            stats: Stats::with_workers(1),
            stop: false.into(),
            warnings: std::array::from_fn(|_| RateLimit::new(WARNINGS_PER_SECOND)),
            pools,
            session_ports: Arc::new(PortCounts::default()),
            recorder: None,
            local,
        });
        let counters = shared.stats.worker(0);
        let guest = Guest::new(
            sandbox.clone(),
            shared.program.load_full(),
            spec.isolation,
            spec.max_reply_ratio,
        );
        let net = shared.pools.as_ref().map(|p| {
            Box::new(Upstreams::new(
                p.load_full(),
                0,
                Arc::clone(&counters),
                spec.max_reply_ratio,
                start,
            ))
        });
        let filter = SourceFilter::new(spec.deny_source_ports.clone(), local);
        let core = Core::new(Handler::Guest(Box::new(guest)), shared, counters, filter, net, 0);
        Ok(Self {
            core,
            start,
            first: None,
            sessions: HashMap::new(),
        })
    }

    /// The virtual time of a datagram captured at `at`; sessions due to
    /// expire by then expire first.
    fn now(&mut self, at: Duration) -> Instant {
        let first = *self.first.get_or_insert(at);
        let now = self.start + at.saturating_sub(first);
        if now >= self.core.poll_timeout() {
            self.core.on_timeout(now);
            self.sessions
                .retain(|_, id| self.core.net.as_ref().is_some_and(|n| n.session(*id).is_some()));
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
        let before = self.core.shared.stats.snapshot();
        let mut outcome = Outcome::default();
        self.core.on_upstream(now, id, std::iter::once(datagram), &mut |d, _| {
            outcome.replies.push(d.to_vec())
        });
        self.apply_commands(&mut outcome);
        self.finish(&before, &mut outcome, |s| &s.upstream_dropped);
        Some(outcome)
    }

    /// The session commands as if every socket did as told: opens noted,
    /// sends reported as forwards.
    fn apply_commands(&mut self, outcome: &mut Outcome) {
        let mut opened = Vec::new();
        let mut sent = Vec::new();
        self.core.poll_commands(|command| {
            match command {
                Command::Open { id, to } => opened.push((id, to)),
                Command::Send { id, datagram } => sent.push((id, datagram.to_vec())),
                Command::Close { .. } => {}
            }
            Applied::Done
        });
        let Some(net) = self.core.net.as_ref() else { return };
        for (id, to) in opened {
            if let Some((client, _)) = net.session(id) {
                self.sessions.insert((super::core::unmapped(client), to), id);
            }
        }
        for (id, datagram) in sent {
            if let Some((_, endpoint)) = net.session(id) {
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
