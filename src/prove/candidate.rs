//! A candidate module and its record (`--candidate`): the samples the
//! workers hand the shadow thread, the share of clients a canary serves, and
//! the rules that promote it or roll it back. Data and rules only: the shadow
//! thread that runs the samples is `shadow.rs`.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::guest::Program;
use crate::upstream::Pools;
use crate::verdict::DropReason;

/// Shadow samples waiting for the candidate; past this they are skipped.
pub(crate) const QUEUE: usize = 1024;

/// Bytes of shadow samples waiting (datagrams, replies, forwards); past this
/// they are skipped too, so a flood of large datagrams cannot make the queue
/// hold 1,024 × 64 KiB.
const QUEUE_BYTES: usize = 8 << 20;

/// The datagrams over which trap and timeout rates are compared.
const WINDOW: usize = 1000;

/// What one shadowed datagram showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowResult {
    /// The candidate did what the active did: same verdict, replies and forwards.
    Match,
    Mismatch,
    /// The candidate trapped (and the active did not).
    CandidateTrap,
    /// The candidate ran out of time (and the active did not).
    CandidateTimeout,
}

impl ShadowResult {
    pub const ALL: [Self; 4] = [Self::Match, Self::Mismatch, Self::CandidateTrap, Self::CandidateTimeout];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Mismatch => "mismatch",
            Self::CandidateTrap => "candidate_trap",
            Self::CandidateTimeout => "candidate_timeout",
        }
    }
}

/// The shadow counters of a listener: a count per [`ShadowResult`], and the
/// samples skipped because the candidate was behind.
#[derive(Default)]
pub(crate) struct ShadowCounters {
    results: [AtomicU64; ShadowResult::ALL.len()],
    skipped: AtomicU64,
    /// Bytes of the samples queued now.
    queued: AtomicUsize,
}

impl ShadowCounters {
    pub(crate) fn count(&self, result: ShadowResult) {
        self.results[result as usize].fetch_add(1, Relaxed);
    }

    /// Reserves room for a sample of `bytes`; false (counted as skipped) when the queue is full.
    pub(crate) fn reserve(&self, bytes: usize) -> bool {
        if self.queued.fetch_add(bytes, Relaxed) + bytes > QUEUE_BYTES {
            self.release(bytes);
            self.skipped();
            return false;
        }
        true
    }

    /// Gives back a sample's room.
    pub(crate) fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Relaxed);
    }

    pub(crate) fn skipped(&self) {
        self.skipped.fetch_add(1, Relaxed);
    }

    pub(crate) fn read(&self) -> ([u64; ShadowResult::ALL.len()], u64) {
        (
            self.results.each_ref().map(|c| c.load(Relaxed)),
            self.skipped.load(Relaxed),
        )
    }
}

/// A loaded candidate and its record since it was loaded.
pub(crate) struct Candidate {
    pub(crate) program: Arc<Program>,
    /// Its own pools (same settings as the active's): its stubbed sessions
    /// never touch the active's endpoint counters.
    pub(crate) pools: Option<Arc<Pools>>,
    /// Traps and timeouts of the active module while this candidate is loaded,
    /// and of the candidate, over their last [`WINDOW`] datagrams each.
    active: Window,
    candidate: Window,
    judge: Mutex<Judge>,
    /// When it was loaded, for `--promote-min-time`.
    loaded: Instant,
}

/// What a candidate's record says to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    Promote,
    /// Unload it, for this reason.
    Rollback(String),
}

impl Candidate {
    pub(crate) fn new(program: Arc<Program>, pools: Option<Arc<Pools>>) -> Self {
        Self {
            program,
            pools,
            active: Window::default(),
            candidate: Window::default(),
            judge: Mutex::new(Judge::default()),
            loaded: Instant::now(),
        }
    }

    /// The active module served a datagram (and trapped or timed out, or not).
    /// On every active datagram while a candidate is loaded: a success costs
    /// one atomic add, no lock.
    pub(crate) fn active_ran(&self, failed: bool) {
        self.active.push(failed);
    }

    /// The candidate ran a datagram, shadowed or for real: whether it failed
    /// (trap or timeout) and whether it was clean (no failure, no mismatch).
    /// Says what to do, once.
    pub(crate) fn candidate_ran(&self, failed: bool, clean: bool, client: IpAddr, rules: &Rules) -> Option<Action> {
        self.candidate.push(failed);
        self.judge(failed, clean, client, rules)
    }

    /// Counts a candidate datagram in its failure window only, to be judged
    /// later ([`Candidate::judge`]).
    pub(crate) fn counted(&self, failed: bool) {
        self.candidate.push(failed);
    }

    /// Judges a candidate datagram already counted in its failure window (a
    /// canaried one, once the active module ran it too).
    pub(crate) fn judge(&self, failed: bool, clean: bool, client: IpAddr, rules: &Rules) -> Option<Action> {
        let mut judge = self.judge.lock().unwrap_or_else(PoisonError::into_inner);
        if judge.decided {
            return None;
        }
        judge.judged += 1;
        if clean && judge.networks.len() < rules.min_clients {
            let network = network(client);
            if !judge.networks.contains(&network) {
                judge.networks.push(network);
            }
        }
        if !clean && !judge.blemished {
            judge.blemished = true;
            if rules.promote_after.is_some() {
                tracing::info!(
                    candidate = self.program.short_sha256(),
                    "the candidate differed from the active, trapped or timed out: it will not be promoted \
                     automatically (SIGUSR1 promotes it by hand)"
                );
            }
        }
        // Only a failure can lift the candidate's rate above the active's.
        if rules.rollback && failed {
            let ((candidate, n), (active, _)) = (self.candidate.rate(), self.active.rate());
            if candidate > active {
                judge.decided = true;
                return Some(Action::Rollback(format!(
                    "its trap and timeout rate over its last {n} datagrams is {:.2}%, the active's is {:.2}%",
                    candidate * 100.0,
                    active * 100.0
                )));
            }
        }
        // Many clean datagrams from one client (or a few), or in a short
        // burst, do not speak for every client: one address whose hash fell
        // in the canary once forced a promotion with 20,480 datagrams in 0.5 s.
        if let Some(n) = rules.promote_after
            && !judge.blemished
            && judge.judged >= n
            && judge.networks.len() >= rules.min_clients
            && self.loaded.elapsed() >= rules.min_time
        {
            judge.decided = true;
            return Some(Action::Promote);
        }
        None
    }
}

/// What decides a candidate's fate (from `--promote-after` and `--no-rollback`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    pub(crate) promote_after: Option<u64>,
    /// Client networks the clean datagrams must come from (`--promote-min-clients`).
    pub(crate) min_clients: usize,
    /// The least time between loading and promotion (`--promote-min-time`).
    pub(crate) min_time: Duration,
    pub(crate) rollback: bool,
}

impl Rules {
    pub(crate) fn of(spec: &crate::config::ListenerSpec) -> Self {
        let c = spec.candidate.as_ref();
        Self {
            promote_after: c.and_then(|c| c.promote_after),
            min_clients: c.map_or(crate::config::DEFAULT_PROMOTE_MIN_CLIENTS, |c| c.promote_min_clients),
            min_time: c.map_or(crate::config::DEFAULT_PROMOTE_MIN_TIME, |c| c.promote_min_time),
            rollback: c.is_none_or(|c| c.rollback),
        }
    }
}

/// A client's network: the first 24 bits of an IPv4 address, 48 of an IPv6 one.
fn network(client: IpAddr) -> [u8; 6] {
    let mut bytes = [0; 6];
    match client.to_canonical() {
        IpAddr::V4(v4) => bytes[..3].copy_from_slice(&v4.octets()[..3]),
        IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()[..6]),
    }
    bytes
}

/// A candidate's record.
#[derive(Default)]
struct Judge {
    /// Candidate datagrams judged since it was loaded.
    judged: u64,
    /// Whether any of them mismatched, trapped or timed out.
    blemished: bool,
    /// The client networks of its clean datagrams, up to the number the rules ask for.
    networks: Vec<[u8; 6]>,
    /// Promoted or rolled back already.
    decided: bool,
}

/// Failures over the last [`WINDOW`] datagrams, pushed from every worker: a
/// success is one relaxed atomic add; only a failure (and reading the rate)
/// takes the lock.
#[derive(Default)]
struct Window {
    /// Datagrams so far.
    seen: AtomicU64,
    /// The sequence numbers of the failures among the last [`WINDOW`], oldest first.
    failures: Mutex<VecDeque<u64>>,
}

impl Window {
    fn push(&self, failed: bool) {
        let n = self.seen.fetch_add(1, Relaxed);
        if failed {
            let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            // Workers race between the add and the lock: keep the order.
            let at = failures.iter().rposition(|&f| f < n).map_or(0, |i| i + 1);
            failures.insert(at, n);
            forget(&mut failures, n + 1);
        }
    }

    /// The failure rate over the last [`WINDOW`] datagrams, and how many that is.
    fn rate(&self) -> (f64, u64) {
        let seen = self.seen.load(Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        forget(&mut failures, seen);
        let n = seen.min(WINDOW as u64);
        let rate = if n == 0 { 0.0 } else { failures.len() as f64 / n as f64 };
        (rate, n)
    }
}

/// Drops the failures older than the last [`WINDOW`] of `seen` datagrams.
fn forget(failures: &mut VecDeque<u64>, seen: u64) {
    let oldest = seen.saturating_sub(WINDOW as u64);
    while failures.front().is_some_and(|&f| f < oldest) {
        failures.pop_front();
    }
}

/// Whether `client` is one of the `percent` of clients the candidate serves:
/// by a hash of its IP address, so a client keeps its side while the share
/// is unchanged whatever port it sends from.
///
/// The hash is keyed by a secret of this process (the same across its
/// reloads, so a client keeps its side): no one can pick addresses that fall
/// in the canary.
pub(crate) fn canary(client: IpAddr, percent: f64) -> bool {
    static SECRET: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), "canary")
    });
    canary_with(*SECRET, client, percent)
}

fn canary_with(secret: u64, client: IpAddr, percent: f64) -> bool {
    let bytes = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, secret);
    ((h % 10_000) as f64) < percent * 100.0
}

/// Whether a datagram's verdict is a trap or a timeout.
pub(crate) fn failed(verdict: &str) -> bool {
    verdict == DropReason::Trap.as_str() || verdict == DropReason::Timeout.as_str()
}

impl Job {
    /// The bytes it holds, for the queue's byte budget.
    pub(crate) fn bytes(&self) -> usize {
        let total = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>();
        match self {
            Self::Client {
                datagram,
                replies,
                forwards,
                ..
            } => datagram.len() + total(replies) + total(forwards),
            Self::Upstream { datagram, replies, .. } => datagram.len() + total(replies),
        }
    }
}

/// A shadow sample, from a worker to the shadow thread.
pub(crate) enum Job {
    /// A client datagram and what the module that served it did about it:
    /// the active module (the candidate runs it, stubbed, to compare), or the
    /// candidate for a canary client (then the active runs it).
    Client {
        at: Instant,
        client: SocketAddr,
        datagram: Vec<u8>,
        verdict: &'static str,
        replies: Vec<Vec<u8>>,
        forwards: Vec<Vec<u8>>,
        /// Served by the candidate (a canary client).
        canaried: bool,
    },
    /// An upstream datagram for `client` and what the active's `on_reply` sent on.
    Upstream {
        at: Instant,
        client: SocketAddr,
        datagram: Vec<u8>,
        replies: Vec<Vec<u8>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLBACK: Rules = Rules {
        promote_after: None,
        min_clients: 1,
        min_time: Duration::ZERO,
        rollback: true,
    };
    const PROMOTE_3: Rules = Rules {
        promote_after: Some(3),
        ..ROLLBACK
    };
    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    /// The embedded guest as a candidate, with a fresh record.
    fn candidate() -> Candidate {
        let env = crate::guest::Env::new(Default::default()).unwrap();
        Candidate::new(Arc::new(env.load_file(None).unwrap()), None)
    }

    #[test]
    fn a_candidate_that_traps_more_than_the_active_is_rolled_back() {
        let c = candidate();
        for _ in 0..10 {
            c.active_ran(false);
            assert_eq!(c.candidate_ran(false, true, CLIENT, &ROLLBACK), None);
        }
        let action = c.candidate_ran(true, false, CLIENT, &ROLLBACK);
        assert!(matches!(action, Some(Action::Rollback(_))), "{action:?}");
        assert_eq!(c.candidate_ran(true, false, CLIENT, &ROLLBACK), None, "decided once");
        let kept = candidate();
        let no_rollback = Rules {
            rollback: false,
            ..ROLLBACK
        };
        assert_eq!(
            kept.candidate_ran(true, false, CLIENT, &no_rollback),
            None,
            "--no-rollback"
        );
    }

    #[test]
    fn a_candidate_that_fails_no_more_than_the_active_stays() {
        let c = candidate();
        for _ in 0..10 {
            c.active_ran(true);
        }
        assert_eq!(c.candidate_ran(true, false, CLIENT, &PROMOTE_3), None);
        // Blemished: never promoted automatically.
        for _ in 0..10 {
            assert_eq!(c.candidate_ran(false, true, CLIENT, &PROMOTE_3), None);
        }
    }

    #[test]
    fn promotion_comes_after_n_clean_datagrams() {
        let c = candidate();
        assert_eq!(c.candidate_ran(false, true, CLIENT, &PROMOTE_3), None);
        assert_eq!(c.candidate_ran(false, true, CLIENT, &PROMOTE_3), None);
        assert_eq!(c.candidate_ran(false, true, CLIENT, &PROMOTE_3), Some(Action::Promote));
    }

    #[test]
    fn one_client_network_or_a_short_time_cannot_force_a_promotion() {
        let rules = Rules {
            promote_after: Some(3),
            min_clients: 3,
            ..ROLLBACK
        };
        let c = candidate();
        // A thousand clean datagrams from one /24, hosts varied.
        for i in 0..1000u32 {
            let one_net = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, (i % 250) as u8));
            assert_eq!(c.candidate_ran(false, true, one_net, &rules), None);
        }
        let other = |n: u8| IpAddr::V4(std::net::Ipv4Addr::new(203, 0, n, 7));
        assert_eq!(c.candidate_ran(false, true, other(1), &rules), None);
        assert_eq!(c.candidate_ran(false, true, other(2), &rules), Some(Action::Promote));
        // And not before the least time since loading.
        let waiting = Rules {
            min_time: Duration::from_secs(3600),
            ..PROMOTE_3
        };
        let c = candidate();
        for _ in 0..10 {
            assert_eq!(c.candidate_ran(false, true, CLIENT, &waiting), None);
        }
    }

    #[test]
    fn the_canary_hash_is_keyed() {
        // The same addresses fall on different sides under different secrets.
        let addrs: Vec<IpAddr> = (0..1000u32).map(|i| IpAddr::V4(i.to_be_bytes().into())).collect();
        let side = |secret| addrs.iter().map(|&a| canary_with(secret, a, 50.0)).collect::<Vec<_>>();
        assert_ne!(side(1), side(2));
        // About the share asked for.
        let share = side(3).iter().filter(|&&c| c).count();
        assert!((400..600).contains(&share), "{share}");
        // Stable within a process.
        assert_eq!(canary(addrs[0], 50.0), canary(addrs[0], 50.0));
    }

    #[test]
    fn the_shadow_queue_holds_at_most_its_byte_budget() {
        let c = ShadowCounters::default();
        assert!(c.reserve(QUEUE_BYTES - 10));
        assert!(!c.reserve(65_000), "a large datagram past the budget is skipped");
        assert!(c.reserve(10));
        c.release(QUEUE_BYTES);
        assert!(c.reserve(65_000));
        assert_eq!(c.read().1, 1);
    }

    #[test]
    fn the_window_forgets_past_a_thousand() {
        let w = Window::default();
        w.push(true);
        assert_eq!(w.rate(), (1.0, 1));
        for _ in 0..WINDOW - 1 {
            w.push(false);
        }
        assert_eq!(w.rate(), (1.0 / WINDOW as f64, WINDOW as u64), "still inside");
        w.push(false);
        assert_eq!(w.rate(), (0.0, WINDOW as u64));
    }

    #[test]
    fn canary_share_is_near_its_percentage_and_only_grows_with_it() {
        let ips = (0..10_000u32).map(|i| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]));
        let chosen = ips.clone().filter(|ip| canary(*ip, 10.0)).count();
        assert!((900..1_100).contains(&chosen), "{chosen} of 10,000 at 10%");
        // Raising the share only adds clients: none served by the candidate flips back.
        assert!(ips.clone().filter(|ip| canary(*ip, 10.0)).all(|ip| canary(ip, 20.0)));
        assert!(!ips.clone().any(|ip| canary(ip, 0.0)));
        assert!(ips.clone().all(|ip| canary(ip, 100.0)));
    }
}
