//! What a listener's workers share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::access_log::AccessLog;
use crate::config::ListenerSpec;
use crate::guest::{Env, Program};
use crate::metrics::{RateLimit, Snapshot, Stats};
use crate::net::source_filter::PortCounts;
use crate::prove::candidate::{Action, Candidate, ShadowCounters};
use crate::prove::capture::{MismatchLog, Recorder};
use crate::upstream::Pools;
use crate::verdict::DropReason;

/// How long a worker waits for a datagram before it looks for shutdown or a new program.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Larger than any UDP payload (65,527 bytes over IPv6), so nothing is truncated:
/// oversize datagrams are seen whole and dropped by count.
pub(crate) const RECV_BUFFER: usize = 65_536;

/// Log lines per second for each kind of problem; the rest are only counted.
const WARNINGS_PER_SECOND: u64 = 5;

/// What the workers share.
pub(crate) struct Shared {
    pub(crate) program: ArcSwap<Program>,
    pub(crate) stats: Stats,
    pub(crate) stop: AtomicBool,
    /// One limit per drop reason, plus one for receive errors.
    pub(crate) warnings: [RateLimit; DropReason::ALL.len() + 1],
    /// The upstream pools, when the guest may forward; replaced by a reload.
    pub(crate) pools: Option<ArcSwap<Pools>>,
    /// The local ports of this gateway's session sockets, which it never answers.
    pub(crate) session_ports: Arc<PortCounts>,
    /// `--record`: where sampled datagrams go.
    pub(crate) recorder: Option<Recorder>,
    /// The listener's address, as recordings show it.
    pub(crate) local: SocketAddr,
    /// What the listener was started with, for the candidate's instances.
    pub(crate) env: Env,
    pub(crate) spec: ListenerSpec,
    /// `--candidate`, while one is loaded.
    pub(crate) candidate: ArcSwapOption<Candidate>,
    pub(crate) shadow: ShadowCounters,
    /// `--shadow-mismatches`.
    pub(crate) mismatches: Option<MismatchLog>,
    /// `--access-log`.
    pub(crate) access_log: Option<AccessLog>,
}

impl Shared {
    pub(crate) fn new(
        env: Env,
        spec: ListenerSpec,
        program: Arc<Program>,
        workers: usize,
        pools: Option<ArcSwap<Pools>>,
        recorder: Option<Recorder>,
        local: SocketAddr,
    ) -> Self {
        Self {
            program: ArcSwap::new(program),
            stats: Stats::with_workers(workers),
            stop: AtomicBool::new(false),
            warnings: std::array::from_fn(|_| RateLimit::new(WARNINGS_PER_SECOND)),
            pools,
            session_ports: Arc::new(PortCounts::default()),
            recorder,
            local,
            env,
            spec,
            candidate: ArcSwapOption::empty(),
            shadow: ShadowCounters::default(),
            mismatches: None,
            access_log: None,
        }
    }

    /// The workers' counters, the recorder's and the shadow's.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut s = self.stats.snapshot();
        s.record_dropped = self.recorder.as_ref().map_or(0, Recorder::dropped);
        if let Some(log) = &self.access_log {
            (s.access_log_dropped, s.access_log_lines) = (log.dropped(), log.written());
        }
        (s.shadow, s.shadow_skipped) = self.shadow.read();
        s.state = self.env.state().stats();
        s.cluster = self.env.state().cluster_stats();
        s
    }

    /// Promotes or unloads `candidate`, unless it is no longer the one loaded
    /// (another worker, the shadow thread or an edit got there first).
    pub(crate) fn settle(&self, candidate: &Arc<Candidate>, action: Action) {
        let expected = Some(Arc::clone(candidate));
        let previous = self.candidate.compare_and_swap(&expected, None);
        if !previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, candidate)) {
            return;
        }
        self.env.metrics().new_candidate();
        let active = self.program.load().short_sha256();
        let sha256 = candidate.program.short_sha256();
        match action {
            Action::Promote => {
                self.stats.reloaded();
                self.program.store(Arc::clone(&candidate.program));
                tracing::info!(
                    listener = self.spec.name,
                    candidate = candidate.program.origin(),
                    sha256,
                    previous = active,
                    "candidate promoted: it is the active module now (the module file is unchanged; \
                     copy the candidate over it to keep it across restarts)"
                );
            }
            Action::Rollback(why) => {
                tracing::warn!(
                    listener = self.spec.name,
                    candidate = candidate.program.origin(),
                    sha256,
                    active,
                    "candidate rolled back (unloaded): {why}; an edit of its file or SIGHUP loads it again"
                );
            }
        }
    }
}
