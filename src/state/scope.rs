//! What the Redis flusher shares with the datagram path: whether Redis is
//! up, how many gateways share the limits, and the penalties waiting to be
//! published.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// Penalties waiting for Redis; past this, the oldest are dropped (said once).
pub(super) const PENALTY_BACKLOG: usize = 100_000;

/// What the flusher shares with the datagram path.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(super) gateways: AtomicU32,
    pub(super) up: AtomicBool,
    pub(super) fail_closed: bool,
    pub(super) errors: AtomicU64,
    pub(super) flushes: AtomicU64,
    /// Penalties set here, to publish: the key and when it ends (Unix
    /// milliseconds; 0 lifts it).
    penalties: Mutex<VecDeque<(Box<[u8]>, u64)>>,
    /// Penalties were dropped from a full backlog: said once.
    dropped_once: AtomicBool,
    /// A key's flush was refused: said once.
    pub(super) refused_once: AtomicBool,
}

/// The cluster scope's figures, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Redis answered the last flush.
    pub up: bool,
    /// Gateways that flushed in the last 3 s, this one included.
    pub gateways: u32,
    /// Flushes that failed (connection refused, timeout), and keys whose flush Redis refused.
    pub errors: u64,
    pub flushes: u64,
}

impl Cluster {
    pub(super) fn new(fail_closed: bool, gateways: u32) -> Self {
        Self {
            gateways: AtomicU32::new(gateways),
            // Until the first flush says otherwise, as if Redis were there:
            // a gateway starting with Redis down fails closed only once it knows.
            up: AtomicBool::new(true),
            fail_closed,
            errors: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            penalties: Mutex::new(VecDeque::new()),
            dropped_once: AtomicBool::new(false),
            refused_once: AtomicBool::new(false),
        }
    }

    /// Gateways sharing the limits (at least this one).
    pub(super) fn gateways(&self) -> u32 {
        self.gateways.load(Relaxed).max(1)
    }

    /// Gateways a new bucket's burst is split between: 1 while Redis is
    /// down, when each gateway limits alone.
    pub(super) fn sharing(&self) -> u32 {
        if self.up.load(Relaxed) { self.gateways() } else { 1 }
    }

    /// Whether `limit` denies everything now (Redis down and fail-closed).
    pub(super) fn refuses(&self) -> bool {
        self.fail_closed && !self.up.load(Relaxed)
    }

    /// Queues a penalty (or its lifting, `ttl_ms` ≤ 0) for the other gateways.
    pub(super) fn publish_penalty(&self, key: &[u8], ttl_ms: i64) {
        let until = if ttl_ms <= 0 {
            0
        } else {
            unix_ms().saturating_add(ttl_ms as u64)
        };
        let mut queue = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        queue.push_back((key.into(), until));
        self.bound(&mut queue);
    }

    pub(super) fn take_penalties(&self) -> VecDeque<(Box<[u8]>, u64)> {
        std::mem::take(&mut *self.penalties.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back penalties a failed flush did not publish, before newer ones.
    pub(super) fn give_back_penalties(&self, mut sent: VecDeque<(Box<[u8]>, u64)>) {
        let mut queue = self.penalties.lock().unwrap_or_else(|p| p.into_inner());
        sent.append(&mut queue);
        *queue = sent;
        self.bound(&mut queue);
    }

    /// Drops the oldest penalties past the backlog's bound, and says so once.
    fn bound(&self, queue: &mut VecDeque<(Box<[u8]>, u64)>) {
        let excess = queue.len().saturating_sub(PENALTY_BACKLOG);
        if excess > 0 {
            queue.drain(..excess);
            if !self.dropped_once.swap(true, Relaxed) {
                tracing::warn!(
                    "state: over {PENALTY_BACKLOG} penalties wait for Redis; the oldest are dropped unpublished (said once)"
                );
            }
        }
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
