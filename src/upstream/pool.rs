//! Upstream pools, the I/O-free part: which endpoint of a pool a new session or
//! a keyed datagram goes to (by policy), and which endpoints are ejected for a
//! while after a passive health failure. The forwarding data path (issue 11) is
//! built on it; nothing here touches a socket or reads the clock (`now` is passed).
//!
//! `hash`, the default, is rendezvous (highest random weight) hashing with xxh3,
//! a hash whose output is specified: two gateway processes with the same endpoint
//! list pick the same endpoint for a key, in whatever order the list was given;
//! removing one of N endpoints moves only the keys it had, and adding one moves
//! about 1/(N+1) of them, all to the new one.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// How a pool chooses an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Rendezvous hashing of the key (the client's address, or the guest's key).
    #[default]
    Hash,
    /// Each healthy endpoint in turn.
    RoundRobin,
    /// A healthy endpoint at random.
    Random,
    /// The healthy endpoint with the fewest sessions.
    LeastSessions,
}

impl Policy {
    /// Every policy, by the name it is given in flags and config files.
    pub const ALL: [(&'static str, Self); 4] = [
        ("hash", Self::Hash),
        ("round-robin", Self::RoundRobin),
        ("random", Self::Random),
        ("least-sessions", Self::LeastSessions),
    ];
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, policy)| policy)
            .ok_or_else(|| {
                format!(
                    "`{}` is not a policy: give hash, round-robin, random or least-sessions",
                    crate::text::quote(s)
                )
            })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::ALL.iter().find(|(_, p)| p == self).map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// One endpoint of a pool and what the pool knows of it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Its rendezvous seed: the hash of its address as text, so that it depends
    /// on the endpoint alone, not on its place in the list.
    seed: u64,
    /// Sessions open to it (for `least-sessions`).
    pub sessions: u32,
    /// Shared by every clone of the pool (one per worker), so that an endpoint
    /// one worker found down is avoided by all.
    health: Arc<Health>,
}

/// Whether an endpoint is ejected, readable and writable from any worker.
#[derive(Debug, Default)]
struct Health {
    /// Ejected until this many nanoseconds past [`epoch`] (plus one); 0: never ejected.
    until: AtomicU64,
    /// An ejection was reported and its end not yet.
    reported: AtomicBool,
    /// Refusals (ICMP port unreachable) since the endpoint last answered.
    refusals: AtomicU32,
    /// Out after failing its active health checks, until it passes them.
    probe_down: AtomicBool,
    /// A passive signal (a refusal) asks for a probe now.
    probe_now: AtomicBool,
    /// When it last passed its checks again, as [`since_epoch`] (0: never),
    /// for the pool's slow start.
    back_at: AtomicU64,
}

/// What one refusal by an endpoint led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Counted; fewer than the pool's `eject_after` in a row so far.
    Counted,
    /// Ejected; `news` when it was not already reported ejected.
    Ejected { news: bool },
    /// Enough refusals, but it is the last healthy endpoint of the pool, which is
    /// never ejected (a pool with none would refuse every forward).
    Spared,
}

/// The instant every ejection deadline counts from, so that it fits an atomic.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// A named pool of endpoints with its policy.
#[derive(Clone, Debug)]
pub struct Pool {
    name: String,
    policy: Policy,
    endpoints: Vec<Endpoint>,
    /// Where `round-robin` goes next.
    cursor: usize,
    /// xorshift state for `random`: not for secrets, only for spreading load.
    rng: u64,
    /// Active health checks decide ejections: a refusal asks for a probe.
    active_checks: bool,
    /// How long an endpoint that passed its checks again takes to get its full
    /// share of new clients (zero: at once).
    slow_start: Duration,
}

/// Salts the slow start's draw, so that it is not the rendezvous score.
const SLOW_START_SALT: u64 = 0x5157_5354_4152_5421;

impl Pool {
    /// A pool of `addrs` (duplicates are kept once).
    pub fn new(name: impl Into<String>, policy: Policy, addrs: &[SocketAddr]) -> Self {
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if endpoints.iter().all(|e| e.addr != addr) {
                endpoints.push(Endpoint {
                    addr,
                    seed: xxh3_64(addr.to_string().as_bytes()),
                    sessions: 0,
                    health: Arc::default(),
                });
            }
        }
        Self {
            name: name.into(),
            policy,
            endpoints,
            cursor: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            active_checks: false,
            slow_start: Duration::ZERO,
        }
    }

    /// The same pool, its ejections decided by active health checks (`on`):
    /// ICMP refusals, which anyone on the path can forge, only ask for a probe.
    pub fn with_active_checks(mut self, on: bool) -> Self {
        self.active_checks = on;
        self
    }

    /// The same pool, an endpoint that passes its active checks again taking a
    /// share of the new clients that grows from none to all over `slow_start`.
    pub fn with_slow_start(mut self, slow_start: Duration) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// The same pool with a new policy and endpoint list: endpoints it already
    /// had keep their health (an ejected one stays ejected), so a reload changes
    /// nothing for them.
    pub fn rebuilt(&self, policy: Policy, addrs: &[SocketAddr]) -> Self {
        let mut pool = Self::new(self.name.clone(), policy, addrs)
            .with_active_checks(self.active_checks)
            .with_slow_start(self.slow_start);
        for e in &mut pool.endpoints {
            if let Some(old) = self.endpoints.iter().find(|o| o.addr == e.addr) {
                e.health = Arc::clone(&old.health);
            }
        }
        pool
    }

    /// The position of the endpoint at `addr`, if the pool has it.
    pub fn position(&self, addr: SocketAddr) -> Option<usize> {
        self.endpoints.iter().position(|e| e.addr == addr)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Whether endpoint `i` may take new sessions at `now`.
    pub fn is_healthy(&self, i: usize, now: Instant) -> bool {
        self.endpoints.get(i).is_some_and(|e| {
            let until = e.health.until.load(Relaxed);
            (until == 0 || since_epoch(now) >= until) && !e.health.probe_down.load(Relaxed)
        })
    }

    /// Whether endpoint `i` failed its active health checks.
    pub fn probe_down(&self, i: usize) -> bool {
        self.endpoints.get(i).is_some_and(|e| e.health.probe_down.load(Relaxed))
    }

    /// Takes endpoint `i` out of (or puts it back into) every choice, in every
    /// clone of this pool, by what its active health checks found at `now`.
    pub fn set_probe_down(&self, i: usize, down: bool, now: Instant) {
        if let Some(e) = self.endpoints.get(i)
            && e.health.probe_down.swap(down, Relaxed)
            && !down
        {
            e.health.back_at.store(since_epoch(now), Relaxed);
        }
    }

    /// The share of new clients endpoint `i` takes at `now`, 0 to 1: below 1
    /// only within the pool's slow start of passing its checks again.
    pub fn share(&self, i: usize, now: Instant) -> f64 {
        let back = self.endpoints.get(i).map_or(0, |e| e.health.back_at.load(Relaxed));
        if self.slow_start.is_zero() || back == 0 {
            return 1.0;
        }
        let elapsed = Duration::from_nanos(since_epoch(now).saturating_sub(back));
        (elapsed.as_secs_f64() / self.slow_start.as_secs_f64()).min(1.0)
    }

    /// Whether endpoint `i` takes a new client of `key` at `now` for its slow
    /// start: the keys whose draw is below its share, so that a key it took it
    /// keeps as the share grows.
    fn admits(&self, key: &[u8], i: usize, now: Instant) -> bool {
        let share = self.share(i, now);
        share >= 1.0
            || (xxh3_64_with_seed(key, self.endpoints[i].seed ^ SLOW_START_SALT) as f64 / u64::MAX as f64) < share
    }

    /// Which endpoints may take a new client of `key` at `now`: the healthy
    /// ones, less those in their slow start that do not take it yet, unless
    /// none would (all came back at once).
    fn open<'a>(&'a self, key: &'a [u8], now: Instant) -> impl Fn(usize) -> bool + 'a {
        let gated = !self.slow_start.is_zero() && self.healthy(now).any(|i| self.admits(key, i, now));
        move |i| self.is_healthy(i, now) && (!gated || self.admits(key, i, now))
    }

    /// Whether endpoint `i` is healthy and some other endpoint is too: the
    /// last healthy endpoint is never taken out.
    pub fn others_healthy(&self, i: usize, now: Instant) -> bool {
        self.healthy(now).any(|j| j != i)
    }

    /// True once after a passive signal asked for a probe of endpoint `i`.
    pub fn take_probe_request(&self, i: usize) -> bool {
        self.endpoints
            .get(i)
            .is_some_and(|e| e.health.probe_now.swap(false, Relaxed))
    }

    /// Takes endpoint `i` out of every choice, in every clone of this pool, until
    /// `until` (a passive health failure, such as ICMP port unreachable). True
    /// when this is news: the endpoint was not already reported ejected.
    pub fn eject(&self, i: usize, until: Instant) -> bool {
        match self.endpoints.get(i) {
            Some(e) => {
                e.health.until.store(since_epoch(until), Relaxed);
                !e.health.reported.swap(true, Relaxed)
            }
            None => false,
        }
    }

    /// Counts a refusal by endpoint `i` and ejects it until `until` once it has
    /// refused `eject_after` times with no answer in between, unless it is the
    /// last endpoint healthy at `now`. One forged ICMP message ejects nothing.
    pub fn refused(&self, i: usize, eject_after: u32, now: Instant, until: Instant) -> Refusal {
        let Some(e) = self.endpoints.get(i) else {
            return Refusal::Counted;
        };
        if self.active_checks {
            e.health.probe_now.store(true, Relaxed);
            return Refusal::Counted;
        }
        let streak = e.health.refusals.fetch_add(1, Relaxed).saturating_add(1);
        if streak < eject_after {
            return Refusal::Counted;
        }
        if !self.healthy(now).any(|j| j != i) {
            return Refusal::Spared;
        }
        e.health.refusals.store(0, Relaxed);
        Refusal::Ejected {
            news: self.eject(i, until),
        }
    }

    /// Endpoint `i` answered: its refusals no longer count toward ejecting it.
    pub fn answered(&self, i: usize) {
        if let Some(e) = self.endpoints.get(i)
            && e.health.refusals.load(Relaxed) != 0
        {
            e.health.refusals.store(0, Relaxed);
        }
    }

    /// True once, for the first caller to see that endpoint `i`'s ejection has
    /// ended at `now`: whoever gets true reports that it came back.
    pub fn came_back(&self, i: usize, now: Instant) -> bool {
        self.is_healthy(i, now)
            && self.endpoints[i]
                .health
                .reported
                .compare_exchange(true, false, Relaxed, Relaxed)
                .is_ok()
    }

    /// Counts a session opened to endpoint `i`.
    pub fn session_opened(&mut self, i: usize) {
        if let Some(e) = self.endpoints.get_mut(i) {
            e.sessions += 1;
        }
    }

    /// Counts a session to endpoint `i` closed; `unanswered`: it went idle
    /// while waiting for an answer, which (with active checks) asks for a
    /// probe of the endpoint now.
    pub fn session_closed(&mut self, i: usize, unanswered: bool) {
        if let Some(e) = self.endpoints.get_mut(i) {
            e.sessions = e.sessions.saturating_sub(1);
            if unanswered && self.active_checks {
                e.health.probe_now.store(true, Relaxed);
            }
        }
    }

    /// The endpoint for `key` by the pool's policy, among those healthy at
    /// `now`; `None` when every endpoint is ejected (or the pool is empty).
    pub fn pick(&mut self, key: &[u8], now: Instant) -> Option<usize> {
        let n = self.endpoints.len();
        match self.policy {
            Policy::Hash => self.by_hash(key, now),
            Policy::RoundRobin => {
                let i = {
                    let open = self.open(key, now);
                    (0..n).map(|step| (self.cursor + step) % n).find(|&i| open(i))?
                };
                self.cursor = (i + 1) % n;
                Some(i)
            }
            Policy::Random => {
                let open_now = {
                    let open = self.open(key, now);
                    (0..n).filter(|&i| open(i)).count()
                };
                if open_now == 0 {
                    return None;
                }
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let open = self.open(key, now);
                (0..n).filter(|&i| open(i)).nth((self.rng % open_now as u64) as usize)
            }
            // Ties (equally loaded endpoints) go by rendezvous score, so that they
            // spread by key rather than all to the first endpoint.
            Policy::LeastSessions => {
                let open = self.open(key, now);
                (0..n)
                    .filter(|&i| open(i))
                    .min_by_key(|&i| (self.endpoints[i].sessions, std::cmp::Reverse(self.score(key, i))))
            }
        }
    }

    /// Endpoint `i`'s rendezvous score for `key` (higher wins), ties to the lower address.
    fn score(&self, key: &[u8], i: usize) -> (u64, std::cmp::Reverse<SocketAddr>) {
        let e = &self.endpoints[i];
        (xxh3_64_with_seed(key, e.seed), std::cmp::Reverse(e.addr))
    }

    /// Rendezvous hashing: the healthy endpoint whose seed gives `key` the highest
    /// score (ties, vanishingly rare, go to the lower address).
    pub fn by_hash(&self, key: &[u8], now: Instant) -> Option<usize> {
        let open = self.open(key, now);
        (0..self.endpoints.len())
            .filter(|&i| open(i))
            .max_by_key(|&i| self.score(key, i))
    }

    fn healthy(&self, now: Instant) -> impl Iterator<Item = usize> + '_ {
        (0..self.endpoints.len()).filter(move |&i| self.is_healthy(i, now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i as u8], 53))).collect()
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..10_000u32).map(|k| format!("client-{k}").into_bytes())
    }

    /// The owners of "alpha" … "zeta" among 10.0.0.1–4:53. Python's `xxhash`
    /// package, an independent implementation of xxh3, gives the same.
    const GOLDEN: [&str; 6] = [
        "10.0.0.3:53",
        "10.0.0.3:53",
        "10.0.0.2:53",
        "10.0.0.1:53",
        "10.0.0.2:53",
        "10.0.0.3:53",
    ];

    fn owner(pool: &Pool, key: &[u8], now: Instant) -> SocketAddr {
        pool.endpoints[pool.by_hash(key, now).unwrap()].addr
    }

    #[test]
    fn two_pools_with_the_same_endpoints_in_any_order_agree_on_every_key() {
        let now = Instant::now();
        let list = addrs(5);
        let mut reversed = list.clone();
        reversed.reverse();
        let (a, b) = (
            Pool::new("a", Policy::Hash, &list),
            Pool::new("b", Policy::Hash, &reversed),
        );
        for key in keys().take(1000) {
            assert_eq!(owner(&a, &key, now), owner(&b, &key, now));
        }
        // The spread is even enough: every endpoint owns 15–25% of the keys.
        for e in &a.endpoints {
            let owned = keys().filter(|k| owner(&a, k, now) == e.addr).count();
            assert!((1500..=2500).contains(&owned), "{} owns {owned} of 10,000", e.addr);
        }
    }

    #[test]
    fn the_owner_of_a_key_is_fixed_by_the_hash_function_itself() {
        // xxh3 is specified and each seed is the hash of the address text, so these
        // owners hold in any process, on any machine, in any version: replicas
        // behind ECMP agree. A change of hash or seed scheme fails here.
        let pool = Pool::new("p", Policy::Hash, &addrs(4));
        let now = Instant::now();
        let owners: Vec<String> = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
            .iter()
            .map(|k| owner(&pool, k.as_bytes(), now).to_string())
            .collect();
        assert_eq!(owners, GOLDEN);
    }

    #[test]
    fn removing_one_of_four_endpoints_moves_only_its_keys() {
        let now = Instant::now();
        let four = Pool::new("p", Policy::Hash, &addrs(4));
        let removed = four.endpoints[2].addr;
        let three: Vec<SocketAddr> = addrs(4).into_iter().filter(|&a| a != removed).collect();
        let three = Pool::new("p", Policy::Hash, &three);
        let mut moved = 0;
        for key in keys() {
            let (before, after) = (owner(&four, &key, now), owner(&three, &key, now));
            if before == removed {
                moved += 1;
            } else {
                assert_eq!(before, after, "a key not on the removed endpoint moved");
            }
        }
        let fraction = f64::from(moved) / 10_000.0;
        assert!(
            (0.20..=0.30).contains(&fraction),
            "{fraction} of keys were on the removed endpoint"
        );
    }

    #[test]
    fn adding_a_fifth_endpoint_moves_about_a_fifth_of_the_keys_all_to_it() {
        let now = Instant::now();
        let four = Pool::new("p", Policy::Hash, &addrs(4));
        let five = Pool::new("p", Policy::Hash, &addrs(5));
        let added = addrs(5)[4];
        let mut moved = 0;
        for key in keys() {
            let (before, after) = (owner(&four, &key, now), owner(&five, &key, now));
            if before != after {
                assert_eq!(after, added, "a key moved between old endpoints");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / 10_000.0;
        assert!(
            (0.15..=0.25).contains(&fraction),
            "{fraction} of keys moved (1/5 expected)"
        );
    }

    #[test]
    fn an_ejected_endpoint_takes_nothing_until_it_comes_back() {
        let now = Instant::now();
        for policy in Policy::ALL.map(|(_, p)| p) {
            let mut pool = Pool::new("p", policy, &addrs(3));
            pool.eject(1, now + Duration::from_secs(10));
            for key in keys().take(300) {
                assert_ne!(pool.pick(&key, now), Some(1), "{policy}");
            }
            // Its keys go elsewhere meanwhile, and come back with it.
            let later = now + Duration::from_secs(10);
            assert!(pool.is_healthy(1, later));
            assert!(keys().take(300).any(|k| pool.pick(&k, later) == Some(1)), "{policy}");
            pool.eject(0, later + Duration::from_secs(1));
            pool.eject(1, later + Duration::from_secs(1));
            pool.eject(2, later + Duration::from_secs(1));
            assert_eq!(pool.pick(b"k", later), None, "{policy}: every endpoint ejected");
        }
    }

    #[test]
    fn refusals_eject_only_in_a_row_and_never_the_last_healthy_endpoint() {
        let now = Instant::now();
        let until = now + Duration::from_secs(10);
        let pool = Pool::new("p", Policy::Hash, &addrs(2));
        // Two refusals, an answer, two more: never three in a row.
        for _ in 0..2 {
            assert_eq!(pool.refused(0, 3, now, until), Refusal::Counted);
            assert_eq!(pool.refused(0, 3, now, until), Refusal::Counted);
            pool.answered(0);
        }
        assert!(pool.is_healthy(0, now));
        assert_eq!(pool.refused(0, 3, now, until), Refusal::Counted);
        assert_eq!(pool.refused(0, 3, now, until), Refusal::Counted);
        assert_eq!(pool.refused(0, 3, now, until), Refusal::Ejected { news: true });
        assert!(!pool.is_healthy(0, now));
        // The other is now the last healthy one: spared, however often it refuses.
        for _ in 0..10 {
            let r = pool.refused(1, 3, now, until);
            assert!(matches!(r, Refusal::Counted | Refusal::Spared), "{r:?}");
        }
        assert!(pool.is_healthy(1, now));
        assert_eq!(pool.refused(1, 3, now, until), Refusal::Spared);
        // Once the first is back, the second can go.
        assert_eq!(
            pool.refused(1, 3, until, until + Duration::from_secs(1)),
            Refusal::Ejected { news: true }
        );
    }

    #[test]
    fn round_robin_random_and_least_sessions_choose_as_named() {
        let now = Instant::now();
        let mut rr = Pool::new("p", Policy::RoundRobin, &addrs(3));
        rr.eject(1, now + Duration::from_secs(1));
        let picks: Vec<Option<usize>> = (0..4).map(|_| rr.pick(b"", now)).collect();
        assert_eq!(picks, [Some(0), Some(2), Some(0), Some(2)]);

        let mut random = Pool::new("p", Policy::Random, &addrs(4));
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            seen[random.pick(b"", now).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| (800..=1200).contains(&n)), "{seen:?}");

        let mut least = Pool::new("p", Policy::LeastSessions, &addrs(3));
        for (i, n) in [(0, 5), (1, 2), (2, 7)] {
            (0..n).for_each(|_| least.session_opened(i));
        }
        assert_eq!(least.pick(b"", now), Some(1));
        (0..4).for_each(|_| least.session_opened(1));
        least.session_closed(0, false);
        assert_eq!(least.pick(b"", now), Some(0));
    }

    #[test]
    fn ejection_is_shared_by_clones_and_kept_by_a_rebuild_and_its_end_is_reported_once() {
        let now = Instant::now();
        let pool = Pool::new("p", Policy::Hash, &addrs(3));
        let worker = pool.clone();
        assert!(worker.eject(1, now + Duration::from_secs(5)), "news the first time");
        assert!(!pool.eject(1, now + Duration::from_secs(5)), "already reported");
        assert!(!pool.is_healthy(1, now), "a clone's ejection is seen by all");
        let rebuilt = pool.rebuilt(Policy::RoundRobin, &[addrs(3)[1], addrs(5)[4]]);
        assert_eq!(rebuilt.position(addrs(3)[1]), Some(0));
        assert!(!rebuilt.is_healthy(0, now), "kept endpoints keep their health");
        assert!(rebuilt.is_healthy(1, now), "a new endpoint starts healthy");
        let later = now + Duration::from_secs(5);
        assert!(!pool.came_back(1, now));
        assert!(worker.came_back(1, later), "reported by the first to see it");
        assert!(
            !pool.came_back(1, later) && !rebuilt.came_back(0, later),
            "and only once"
        );
    }

    #[test]
    fn an_endpoint_back_from_its_checks_takes_a_growing_share_of_new_clients_and_keeps_those_it_took() {
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let pool = Pool::new("p", Policy::Hash, &addrs(2))
            .with_active_checks(true)
            .with_slow_start(Duration::from_secs(10));
        // The keys endpoint 1 owns when nothing ramps (the same seeds).
        let plain = Pool::new("p", Policy::Hash, &addrs(2));
        let theirs: Vec<Vec<u8>> = keys().filter(|k| plain.by_hash(k, t0) == Some(1)).collect();
        let others: Vec<Vec<u8>> = keys().filter(|k| plain.by_hash(k, t0) == Some(0)).collect();
        let taken = |t: Instant| -> Vec<&Vec<u8>> { theirs.iter().filter(|k| pool.by_hash(k, t) == Some(1)).collect() };
        assert_eq!(pool.share(1, t0), 1.0, "never down: no slow start");
        pool.set_probe_down(1, true, t0);
        assert!(taken(t0).is_empty(), "down");
        pool.set_probe_down(1, false, at(1.0));
        assert!(taken(at(1.0)).is_empty(), "back, with a share of none yet");
        let quarter = taken(at(3.5));
        let half = taken(at(6.0));
        let n = theirs.len() as f64;
        assert!(
            (0.2..0.3).contains(&(quarter.len() as f64 / n)),
            "{} of {n}",
            quarter.len()
        );
        assert!((0.45..0.55).contains(&(half.len() as f64 / n)), "{} of {n}", half.len());
        assert!(quarter.iter().all(|k| half.contains(k)), "a key it took it keeps");
        assert_eq!(taken(at(11.0)).len(), theirs.len(), "all of them after slow_start");
        assert!(
            others.iter().all(|k| pool.by_hash(k, at(6.0)) == Some(0)),
            "no key of another endpoint moves to it"
        );
        // Without a hash: round-robin passes it over while its share is none.
        let mut rr = Pool::new("p", Policy::RoundRobin, &addrs(2)).with_slow_start(Duration::from_secs(10));
        rr.set_probe_down(1, true, t0);
        rr.set_probe_down(1, false, t0);
        assert!((0..100).all(|k| rr.pick(&[k], t0) == Some(0)));
        assert!((0..100).any(|k| rr.pick(&[k], at(5.0)) == Some(1)));
        // A pool without slow start takes it back whole at once.
        let whole = Pool::new("p", Policy::Hash, &addrs(2));
        whole.set_probe_down(1, true, t0);
        whole.set_probe_down(1, false, t0);
        assert_eq!(whole.share(1, t0), 1.0);
    }

    #[test]
    fn policies_are_named_as_in_the_config_and_duplicates_are_kept_once() {
        for (name, policy) in Policy::ALL {
            assert_eq!(name.parse::<Policy>(), Ok(policy));
            assert_eq!(policy.to_string(), name);
        }
        let e = "round_robin".parse::<Policy>().unwrap_err();
        assert!(e.contains("round-robin"), "{e}");
        let a = addrs(2);
        assert_eq!(Pool::new("p", Policy::Hash, &[a[0], a[1], a[0]]).endpoints().len(), 2);
        assert_eq!(Pool::new("p", Policy::Hash, &[]).pick(b"k", Instant::now()), None);
    }
}
