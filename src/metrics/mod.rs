//! Counters for everything that happens to a datagram, the metrics guests
//! define (`guest`), and rate-limited warnings.
//!
//! Each worker owns one [`Counters`] and is its only writer, so counting never
//! contends; readers sum all workers into a [`Snapshot`].

pub mod guest;
mod rate_limit;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::net::proxy_v2::HeaderError;
use crate::state::{ClusterStats, StateStats};
use crate::verdict::{CallError, DropReason};
pub use rate_limit::RateLimit;

/// Upper bounds of the guest execution time histogram's buckets, in nanoseconds
/// (a last, unbounded bucket follows).
pub const GUEST_TIME_BUCKETS_NS: [u64; 12] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 2_500_000, 10_000_000, 50_000_000,
];

/// One worker's counters. Aligned to a cache line so workers never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Counters {
    received: AtomicU64,
    replied: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Failed receive calls (ICMP errors, ENOBUFS, …); the loop goes on.
    recv_errors: AtomicU64,
    /// Datagrams the kernel dropped because the socket's queue was full.
    queue_overflows: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// How long the guest took per datagram: counts per bucket (not cumulative).
    guest_time: [AtomicU64; GUEST_TIME_BUCKETS_NS.len() + 1],
    guest_time_sum_ns: AtomicU64,
    /// Datagrams the guest forwarded upstream without answering the client itself.
    forwarded: AtomicU64,
    /// `forward`/`send` calls refused, by reason.
    refused: [AtomicU64; CallError::ALL.len()],
    /// Datagrams that came back from upstreams, and their bytes.
    upstream_received: AtomicU64,
    upstream_bytes_in: AtomicU64,
    /// Upstream datagrams that did not reach the client, by reason
    /// (`no_reply`: `on_reply` returned -1).
    upstream_dropped: [AtomicU64; DropReason::ALL.len()],
    sessions_created: AtomicU64,
    /// Sessions closed after `idle_timeout` without traffic.
    sessions_expired: AtomicU64,
    /// Sessions open now (a gauge written by this worker only).
    sessions_active: AtomicU64,
    /// Datagrams a trusted proxy relayed with a valid PROXY v2 header.
    proxied: AtomicU64,
    /// Malformed PROXY v2 headers, by [`HeaderError`], from trusted proxies
    /// and from pools that speak the protocol.
    proxy_header_errors: [AtomicU64; HeaderError::ALL.len()],
    /// Datagrams naming a new client past the proxied clients a worker keeps.
    proxied_full: AtomicU64,
    /// Client handles (shared pools) freed to make room for a new client.
    handles_evicted: AtomicU64,
    /// Client handles held now (a gauge written by this worker only).
    handles_active: AtomicU64,
}

impl Counters {
    pub(crate) fn forwarded(&self) {
        self.forwarded.fetch_add(1, Relaxed);
    }

    pub(crate) fn refused(&self, error: CallError, n: u64) {
        self.refused[error.index()].fetch_add(n, Relaxed);
    }

    pub(crate) fn upstream_received(&self, bytes: usize) {
        self.upstream_received.fetch_add(1, Relaxed);
        self.upstream_bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn upstream_dropped(&self, reason: DropReason) {
        self.upstream_dropped[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn session_created(&self, active: usize) {
        self.sessions_created.fetch_add(1, Relaxed);
        self.sessions_active.store(active as u64, Relaxed);
    }

    pub(crate) fn handle_evicted(&self) {
        self.handles_evicted.fetch_add(1, Relaxed);
    }

    pub(crate) fn handles(&self, active: usize) {
        self.handles_active.store(active as u64, Relaxed);
    }

    pub(crate) fn session_closed(&self, active: usize, expired: bool) {
        if expired {
            self.sessions_expired.fetch_add(1, Relaxed);
        }
        self.sessions_active.store(active as u64, Relaxed);
    }

    pub(crate) fn guest_time(&self, elapsed: std::time::Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = GUEST_TIME_BUCKETS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(GUEST_TIME_BUCKETS_NS.len());
        self.guest_time[bucket].fetch_add(1, Relaxed);
        self.guest_time_sum_ns.fetch_add(ns, Relaxed);
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.received.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn replied(&self, bytes: usize) {
        self.replied.fetch_add(1, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn recv_error(&self) {
        self.recv_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn queue_overflows(&self, n: u64) {
        self.queue_overflows.fetch_add(n, Relaxed);
    }

    pub(crate) fn proxied(&self) {
        self.proxied.fetch_add(1, Relaxed);
    }

    pub(crate) fn proxy_header_error(&self, error: HeaderError) {
        self.proxy_header_errors[error as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn proxied_full(&self) {
        self.proxied_full.fetch_add(1, Relaxed);
    }
}

/// The counters of one gateway: its workers' and its reloads'.
#[derive(Debug, Default)]
pub struct Stats {
    workers: Vec<Arc<Counters>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl Stats {
    /// Counters for `n` workers, handed out by [`Stats::worker`].
    pub(crate) fn with_workers(n: usize) -> Self {
        Self {
            workers: (0..n).map(|_| Arc::default()).collect(),
            ..Self::default()
        }
    }

    /// Worker `i`'s counters.
    pub(crate) fn worker(&self, i: usize) -> Arc<Counters> {
        Arc::clone(&self.workers[i])
    }

    pub(crate) fn reloaded(&self) {
        self.reloads.fetch_add(1, Relaxed);
    }

    pub(crate) fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Relaxed);
    }

    /// Sums every worker's counters. Each value is exact; taken while traffic flows
    /// they may be from slightly different instants.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            reloads: self.reloads.load(Relaxed),
            reload_failures: self.reload_failures.load(Relaxed),
            ..Snapshot::default()
        };
        for w in &self.workers {
            s.received += w.received.load(Relaxed);
            s.replied += w.replied.load(Relaxed);
            s.bytes_in += w.bytes_in.load(Relaxed);
            s.bytes_out += w.bytes_out.load(Relaxed);
            s.recv_errors += w.recv_errors.load(Relaxed);
            s.queue_overflows += w.queue_overflows.load(Relaxed);
            for (total, d) in s.dropped.iter_mut().zip(&w.dropped) {
                *total += d.load(Relaxed);
            }
            for (total, b) in s.guest_time.iter_mut().zip(&w.guest_time) {
                *total += b.load(Relaxed);
            }
            s.guest_time_sum_ns += w.guest_time_sum_ns.load(Relaxed);
            s.forwarded += w.forwarded.load(Relaxed);
            for (total, r) in s.refused.iter_mut().zip(&w.refused) {
                *total += r.load(Relaxed);
            }
            s.upstream_received += w.upstream_received.load(Relaxed);
            s.upstream_bytes_in += w.upstream_bytes_in.load(Relaxed);
            for (total, d) in s.upstream_dropped.iter_mut().zip(&w.upstream_dropped) {
                *total += d.load(Relaxed);
            }
            s.sessions_created += w.sessions_created.load(Relaxed);
            s.sessions_expired += w.sessions_expired.load(Relaxed);
            s.sessions_active += w.sessions_active.load(Relaxed);
            s.proxied += w.proxied.load(Relaxed);
            for (total, e) in s.proxy_header_errors.iter_mut().zip(&w.proxy_header_errors) {
                *total += e.load(Relaxed);
            }
            s.proxied_full += w.proxied_full.load(Relaxed);
            s.handles_evicted += w.handles_evicted.load(Relaxed);
            s.handles_active += w.handles_active.load(Relaxed);
        }
        s
    }
}

/// Totals at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub replied: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub recv_errors: u64,
    /// Datagrams the kernel dropped before the gateway saw them, because a socket's
    /// receive queue was full: how overload is shed. Counted with batched receive.
    pub queue_overflows: u64,
    pub dropped: [u64; DropReason::ALL.len()],
    /// Modules published by a reload.
    pub reloads: u64,
    /// Reloads refused: unreadable file, or a module that failed its checks.
    pub reload_failures: u64,
    /// Guest runs per bucket of [`GUEST_TIME_BUCKETS_NS`] (not cumulative; the last
    /// bucket is everything slower).
    pub guest_time: [u64; GUEST_TIME_BUCKETS_NS.len() + 1],
    pub guest_time_sum_ns: u64,
    /// Datagrams forwarded upstream without a reply from the guest itself.
    pub forwarded: u64,
    /// `forward`, `forward_key` and `send` calls refused, by [`CallError`].
    pub refused: [u64; CallError::ALL.len()],
    /// Datagrams from upstreams, and their bytes.
    pub upstream_received: u64,
    pub upstream_bytes_in: u64,
    /// Upstream datagrams not passed on to the client, by reason.
    pub upstream_dropped: [u64; DropReason::ALL.len()],
    pub sessions_created: u64,
    pub sessions_expired: u64,
    pub sessions_active: u64,
    /// Datagrams a trusted proxy relayed with a valid PROXY v2 header.
    pub proxied: u64,
    /// Malformed PROXY v2 headers, by [`HeaderError`] (as `HeaderError::ALL`).
    pub proxy_header_errors: [u64; HeaderError::ALL.len()],
    /// Datagrams naming a new client past the proxied clients a worker keeps.
    pub proxied_full: u64,
    /// Client handles of shared pools freed to make room, and held now.
    pub handles_evicted: u64,
    pub handles_active: u64,
    /// Datagrams `--record` did not record because its queue was full.
    pub record_dropped: u64,
    /// Access log lines dropped because its queue was full, and written.
    pub access_log_dropped: u64,
    pub access_log_lines: u64,
    /// Shadowed datagrams by result (match, mismatch, candidate trap, candidate
    /// timeout, as `ShadowResult::ALL`), and samples
    /// skipped because the candidate was behind.
    pub shadow: [u64; 4],
    pub shadow_skipped: u64,
    /// The shared state: what it holds, evictions, and `limit` results.
    pub state: StateStats,
    /// Its cluster scope through Redis, if it has one.
    pub cluster: Option<ClusterStats>,
}

impl Snapshot {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Guest calls refused for `error`.
    pub fn refused(&self, error: CallError) -> u64 {
        self.refused[error.index()]
    }

    /// Upstream datagrams not passed on for `reason`.
    pub fn upstream_dropped(&self, reason: DropReason) -> u64 {
        self.upstream_dropped[reason.index()]
    }

    /// Datagrams dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} replied={} bytes_in={} bytes_out={} recv_errors={} queue_overflows={}",
            self.received, self.replied, self.bytes_in, self.bytes_out, self.recv_errors, self.queue_overflows
        )?;
        for reason in DropReason::ALL {
            write!(f, " dropped_{}={}", reason, self.dropped(reason))?;
        }
        write!(f, " reloads={} reload_failures={}", self.reloads, self.reload_failures)?;
        if self.sessions_created > 0 || self.refused.iter().any(|&n| n > 0) {
            write!(
                f,
                " forwarded={} upstream_received={} sessions_created={} sessions_expired={}",
                self.forwarded, self.upstream_received, self.sessions_created, self.sessions_expired
            )?;
            for error in CallError::ALL {
                write!(f, " refused_{}={}", error, self.refused(error))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_indices_match_their_position() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason}");
        }
    }

    #[test]
    fn snapshot_sums_all_workers() {
        let stats = Stats::with_workers(2);
        let (a, b) = (stats.worker(0), stats.worker(1));
        a.received(10);
        b.received(5);
        a.replied(10);
        b.dropped(DropReason::Timeout);
        b.dropped(DropReason::Timeout);
        a.recv_error();
        stats.reloaded();
        stats.reload_failed();
        stats.reload_failed();
        let s = stats.snapshot();
        assert_eq!((s.reloads, s.reload_failures), (1, 2));
        assert_eq!((s.received, s.bytes_in, s.replied, s.bytes_out), (2, 15, 1, 10));
        assert_eq!(s.dropped(DropReason::Timeout), 2);
        assert_eq!(s.dropped_total(), 2);
        assert_eq!(s.recv_errors, 1);
    }

    #[test]
    fn guest_time_lands_in_the_first_bucket_that_holds_it() {
        let stats = Stats::with_workers(1);
        let w = stats.worker(0);
        w.guest_time(std::time::Duration::from_nanos(800));
        w.guest_time(std::time::Duration::from_nanos(1_000));
        w.guest_time(std::time::Duration::from_micros(30));
        w.guest_time(std::time::Duration::from_secs(1));
        let s = stats.snapshot();
        assert_eq!(s.guest_time[0], 2);
        assert_eq!(s.guest_time[5], 1, "30 µs is in the 50 µs bucket");
        assert_eq!(s.guest_time[GUEST_TIME_BUCKETS_NS.len()], 1);
        assert_eq!(s.guest_time_sum_ns, 800 + 1_000 + 30_000 + 1_000_000_000);
    }
}
