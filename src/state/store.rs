//! The store itself: shards of entries under one seeded hash, and every
//! call on them (values, counters, limits, penalties), with the time passed in.

use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex, MutexGuard};

use super::entry::{Bucket, ENTRY_OVERHEAD, Entry, Key, NEVER, NS_PER_MS, Space, UNSEEN, interval};
use super::scope::Cluster;
use super::shard::{Inner, Shard, lock};
use crate::verdict::StateError;

use hashbrown::hash_table::Entry as Slot;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The longest key, in bytes (a DNS question, name and type, fits).
pub const MAX_KEY: usize = 512;
/// The longest value, in bytes: one datagram.
pub const MAX_VALUE: usize = crate::verdict::MAX_DATAGRAM;
/// The smallest count `incr` gives: the 64 numbers below it are the ABI's
/// error codes (`i64::MIN - code`).
pub const COUNTER_MIN: i64 = i64::MIN + 64;

/// How big a listener's state may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLimits {
    /// Keys, values and [`ENTRY_OVERHEAD`] per entry, summed.
    pub max_bytes: usize,
    pub max_entries: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_entries: 1_000_000,
        }
    }
}

/// What a store holds and has done, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateStats {
    pub entries: u64,
    pub bytes: u64,
    /// Live entries removed to make room (expired ones are not counted).
    pub evictions: u64,
    /// `limit` calls that were allowed and denied.
    pub allowed: u64,
    pub denied: u64,
}

/// A listener's shared state. Cheap to share (`Arc`); every method takes `&self`.
pub struct State {
    pub(super) shards: Box<[Shard]>,
    /// log2 of the shard count.
    bits: u32,
    /// Each shard's share of the bounds.
    shard_bytes: usize,
    shard_entries: usize,
    limits: StateLimits,
    /// Seeds the key hash: keys often come from clients, who must not be able
    /// to choose keys that collide.
    pub(super) seed: u64,
    /// [`coarse_now`] when the store was made.
    origin: u64,
    /// A time set by hand ([`State::set_clock`]), for `replay` and the shadow,
    /// which run on a capture's clock; [`NO_CLOCK`] while the real one serves.
    clock: std::sync::atomic::AtomicU64,
    /// Set when the listener shares its limits, counters and penalties through Redis.
    pub(super) cluster: std::sync::OnceLock<Arc<Cluster>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("shards", &self.shards.len())
            .field("limits", &self.limits)
            .finish()
    }
}

impl State {
    /// An empty store held to `limits`. Small stores get one shard, so that
    /// their bounds are exact; large ones up to 1,024, each with room for at
    /// least 1,024 entries and 4 of the largest. Many shards keep workers apart:
    /// two workers on different keys then rarely touch one shard's cache line.
    pub fn new(limits: StateLimits) -> Self {
        let largest = MAX_KEY + MAX_VALUE + ENTRY_OVERHEAD;
        let wanted = (limits.max_entries / 1024)
            .min(limits.max_bytes / (4 * largest))
            .clamp(1, 1024);
        // The largest power of two not above `wanted`.
        let bits = usize::BITS - 1 - wanted.leading_zeros();
        let shards = 1usize << bits;
        Self {
            shards: (0..shards)
                .map(|_| Shard {
                    inner: Mutex::new(Inner::default()),
                })
                .collect(),
            bits,
            shard_bytes: limits.max_bytes / shards,
            shard_entries: limits.max_entries / shards,
            limits,
            seed: std::hash::RandomState::new().hash_one(0x5741_534d_4741_5445_u64),
            origin: coarse_now(),
            clock: std::sync::atomic::AtomicU64::new(NO_CLOCK),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// The bounds it was made with.
    pub fn limits(&self) -> StateLimits {
        self.limits
    }

    /// Now, in nanoseconds on this store's clock: what the other methods take.
    /// The kernel's coarse monotonic clock (a tick, 1 to 4 ms, of resolution)
    /// costs a few nanoseconds where the precise one costs tens, once per call:
    /// TTLs in milliseconds and refills of a few tokens at a time need no more.
    pub fn now(&self) -> u64 {
        match self.clock.load(std::sync::atomic::Ordering::Relaxed) {
            NO_CLOCK => coarse_now().saturating_sub(self.origin),
            set => set,
        }
    }

    /// Calls `f` with the value of `key` (a counter is its 8 bytes, little-endian).
    pub fn get<R>(&self, key: &[u8], now: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R, StateError> {
        check_key(key)?;
        let (hash, mut shard) = self.shard(Space::Value, key);
        match shard.find(hash, Space::Value, key, now) {
            Some(entry) => Ok(f(&entry.value)),
            None => Err(StateError::NotFound),
        }
    }

    /// Sets `key` to `value`, expiring after `ttl_ms` (0 or less: never).
    pub fn set(&self, key: &[u8], value: &[u8], ttl_ms: i64, now: u64) -> Result<(), StateError> {
        check_key(key)?;
        check_value(value)?;
        let (hash, mut shard) = self.shard(Space::Value, key);
        let expires = expiry(now, ttl_ms);
        self.put(&mut shard, hash, Space::Value, key, value, expires, now)?;
        Ok(())
    }

    /// Removes `key`; whether it was there (and live).
    pub fn delete(&self, key: &[u8], now: u64) -> Result<bool, StateError> {
        check_key(key)?;
        let (hash, mut shard) = self.shard(Space::Value, key);
        Ok(shard.remove(hash, Space::Value, key).is_some_and(|e| e.live(now)))
    }

    /// Adds `delta` to the counter at `key` (saturating) and returns the sum.
    /// A missing key starts at 0 and expires after `ttl_ms` (0 or less: never);
    /// an existing one keeps its expiry, so a counter with a TTL counts a window.
    ///
    /// With a cluster scope, the increments are also added up across the
    /// gateways: the sum includes what the others had added at the last flush.
    pub fn incr(&self, key: &[u8], delta: i64, ttl_ms: i64, now: u64) -> Result<i64, StateError> {
        check_key(key)?;
        let shared = self.cluster.get().is_some();
        let (hash, mut shard) = self.shard(Space::Value, key);
        let (sum, newly_dirty) = match shard.find(hash, Space::Value, key, now) {
            Some(entry) => {
                let bytes: &mut [u8; 8] = (&mut *entry.value).try_into().map_err(|_| StateError::NotACounter)?;
                let sum = i64::from_le_bytes(*bytes).saturating_add(delta).max(COUNTER_MIN);
                *bytes = sum.to_le_bytes();
                if !shared {
                    return Ok(sum);
                }
                entry.pending = entry.pending.saturating_add(delta);
                (sum, !std::mem::replace(&mut entry.dirty, true))
            }
            None => {
                let delta = delta.max(COUNTER_MIN);
                let bytes = delta.to_le_bytes();
                let entry = self.put(&mut shard, hash, Space::Value, key, &bytes, expiry(now, ttl_ms), now)?;
                if !shared {
                    return Ok(delta);
                }
                // A counter made in a cluster has its first flush to come.
                entry.pending = delta;
                entry.dirty = true;
                (delta, true)
            }
        };
        if newly_dirty {
            shard.mark_dirty(Space::Value, hash, key);
        }
        Ok(sum)
    }

    /// Sets `key` to `value` only if it holds `expected` now (`None`: only if
    /// it is absent); [`StateError::Mismatch`] otherwise.
    pub fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: i64,
        now: u64,
    ) -> Result<(), StateError> {
        check_key(key)?;
        check_value(value)?;
        let (hash, mut shard) = self.shard(Space::Value, key);
        let current = shard.find(hash, Space::Value, key, now).map(|e| &*e.value);
        if current != expected {
            return Err(StateError::Mismatch);
        }
        self.put(&mut shard, hash, Space::Value, key, value, expiry(now, ttl_ms), now)?;
        Ok(())
    }

    /// A token bucket per key holding up to `burst` tokens and refilled at
    /// `rate_per_s` a second (0: never refilled, a quota): takes one token
    /// and says whether there was one. Exact: with several workers calling at
    /// once, exactly as many calls are allowed as tokens there were.
    ///
    /// Kept as a GCRA theoretical arrival time, so a bucket is one number, and
    /// a full bucket needs no entry: its entry expires when it would be full again.
    pub fn limit(&self, key: &[u8], rate_per_s: u32, burst: u32, now: u64) -> Result<bool, StateError> {
        check_key(key)?;
        let cluster = self.cluster.get();
        let (hash, mut shard) = self.shard(Space::Bucket, key);
        if cluster.is_some_and(|c| c.refuses()) {
            shard.denied += 1;
            return Ok(false);
        }
        let interval = interval(rate_per_s);
        let now128 = u128::from(now);
        let tolerance = interval * u128::from(burst);
        // One lookup: a live bucket is updated in place; a missing one (or one
        // full again, whose entry expired) starts full, or with a cluster,
        // with this gateway's share of the burst.
        let (allowed, newly_dirty) = match shard.find(hash, Space::Bucket, key, now) {
            Some(entry) => {
                // The hot path: only the arrival time (and, in a cluster, the
                // spent count) is read and written, in place.
                let next = Bucket::tat_of(&entry.value).max(now128).saturating_add(interval);
                let allowed = next - now128 <= tolerance;
                if allowed {
                    entry.value[..16].copy_from_slice(&next.to_le_bytes());
                }
                let newly_dirty = match cluster {
                    None => false,
                    Some(_) => {
                        let mut b = Bucket::read(&entry.value);
                        b.pending = b.pending.saturating_add(u32::from(allowed));
                        (b.rate, b.burst) = (rate_per_s, burst);
                        entry.value.copy_from_slice(&b.bytes());
                        !std::mem::replace(&mut entry.dirty, true)
                    }
                };
                (allowed, newly_dirty)
            }
            None => {
                // Alone (no cluster, or Redis down and failing open), the whole burst.
                let held = cluster.map_or(0, |c| burst - burst.div_ceil(c.sharing()));
                let start = now128 + u128::from(held) * interval;
                let next = start + interval;
                let allowed = next - now128 <= tolerance;
                let b = Bucket {
                    tat: if allowed { next } else { start },
                    pending: u32::from(allowed),
                    rate: rate_per_s,
                    burst,
                    seen: UNSEEN,
                    held,
                };
                // A full bucket needs no entry; one with a token taken or
                // a share held back does.
                let kept = allowed || held > 0;
                if kept {
                    match self.put(&mut shard, hash, Space::Bucket, key, &b.bytes(), b.expires(), now) {
                        // A bucket made in a cluster has its first flush to come.
                        Ok(entry) => entry.dirty = cluster.is_some(),
                        Err(_) => {
                            // No room to remember the token taken: deny it, so a
                            // full store can never turn into an open limit. A
                            // denial, not an error code: a guest that tests for
                            // 0 (or `Ok(false)`) must not let the request through.
                            shard.denied += 1;
                            return Ok(false);
                        }
                    }
                }
                (allowed, cluster.is_some() && kept)
            }
        };
        if newly_dirty {
            shard.mark_dirty(Space::Bucket, hash, key);
        }
        if allowed {
            shard.allowed += 1;
        } else {
            shard.denied += 1;
        }
        Ok(allowed)
    }

    /// Marks `key` penalized for `ttl_ms` (0 or less lifts the penalty). A
    /// penalty already running longer is kept. With a cluster scope, the
    /// other gateways learn it at their next flush.
    pub fn penalize(&self, key: &[u8], ttl_ms: i64, now: u64) -> Result<(), StateError> {
        check_key(key)?;
        self.penalize_here(key, ttl_ms, now)?;
        if let Some(cluster) = self.cluster.get() {
            cluster.publish_penalty(key, ttl_ms);
        }
        Ok(())
    }

    /// [`State::penalize`] on this gateway only.
    pub(super) fn penalize_here(&self, key: &[u8], ttl_ms: i64, now: u64) -> Result<(), StateError> {
        let (hash, mut shard) = self.shard(Space::Penalty, key);
        if ttl_ms <= 0 {
            shard.remove(hash, Space::Penalty, key);
            return Ok(());
        }
        let expires = expiry(now, ttl_ms);
        if let Some(entry) = shard.find(hash, Space::Penalty, key, now) {
            entry.until = entry.until.max(expires);
            return Ok(());
        }
        self.put(&mut shard, hash, Space::Penalty, key, &[], expires, now)?;
        Ok(())
    }

    /// Whether `key` is penalized now.
    pub fn penalized(&self, key: &[u8], now: u64) -> Result<bool, StateError> {
        check_key(key)?;
        let (hash, mut shard) = self.shard(Space::Penalty, key);
        Ok(shard.find(hash, Space::Penalty, key, now).is_some())
    }

    /// What the store holds and has done, summed over its shards.
    pub fn stats(&self) -> StateStats {
        let mut s = StateStats::default();
        for shard in &self.shards {
            let inner = lock(shard);
            s.entries += inner.table.len() as u64;
            s.bytes += inner.bytes as u64;
            s.evictions += inner.evictions;
            s.allowed += inner.allowed;
            s.denied += inner.denied;
        }
        s
    }

    fn shard(&self, space: Space, key: &[u8]) -> (u64, MutexGuard<'_, Inner>) {
        let hash = self.hash(space, key);
        (hash, lock(&self.shards[self.shard_index(hash)]))
    }

    /// The top bits of a key's hash pick its shard; the table uses the low ones.
    pub(super) fn shard_index(&self, hash: u64) -> usize {
        if self.bits == 0 {
            0
        } else {
            (hash >> (64 - self.bits)) as usize
        }
    }

    fn hash(&self, space: Space, key: &[u8]) -> u64 {
        // One seed per space, so the spaces' keys spread independently.
        xxh3_64_with_seed(key, self.seed.wrapping_add(space as u64))
    }

    /// Inserts or replaces an entry, making room within the shard's bounds first.
    #[allow(clippy::too_many_arguments)]
    fn put<'s>(
        &self,
        shard: &'s mut Inner,
        hash: u64,
        space: Space,
        key: &[u8],
        value: &[u8],
        expires: u64,
        now: u64,
    ) -> Result<&'s mut Entry, StateError> {
        let size = key.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.shard_bytes || self.shard_entries == 0 {
            return Err(StateError::Full);
        }
        // What the entry replaces does not count against the room it needs.
        let replaced = shard.table.find(hash, |e| e.is(hash, space, key)).map(Entry::size);
        let (entries_after, bytes_after) = match replaced {
            Some(old) => (shard.table.len(), shard.bytes - old + size),
            None => (shard.table.len() + 1, shard.bytes + size),
        };
        if entries_after > self.shard_entries || bytes_after > self.shard_bytes {
            let protect = replaced.map(|_| (space, key));
            let room_entries = self.shard_entries.saturating_sub(usize::from(replaced.is_none()));
            let room_bytes = self.shard_bytes - size + replaced.unwrap_or(0).min(size);
            if !shard.make_room(room_entries, room_bytes, now, protect, space) {
                return Err(StateError::Full);
            }
        }
        let entry = match shard.table.entry(hash, |e| e.is(hash, space, key), |e| e.hash) {
            Slot::Occupied(o) => {
                let entry = o.into_mut();
                let old = entry.size();
                if entry.value.len() == value.len() {
                    entry.value.copy_from_slice(value);
                } else {
                    entry.value = value.into();
                }
                entry.until = expires;
                shard.bytes = shard.bytes - old + size;
                entry
            }
            Slot::Vacant(v) => {
                shard.bytes += size;
                v.insert(Entry {
                    hash,
                    space,
                    key: Key::new(key),
                    value: value.into(),
                    until: expires,
                    dirty: false,
                    pending: 0,
                })
                .into_mut()
            }
        };
        Ok(entry)
    }
}

/// [`State::clock`] when no time was set by hand.
const NO_CLOCK: u64 = u64::MAX;

impl State {
    /// From now on, the store's time is `since_start` after its start, as set
    /// here, not the real clock's: `replay` and the shadow run a capture (or
    /// the workers' samples) on its own clock, so that limits refill and TTLs
    /// run out as they did when it was captured.
    pub fn set_clock(&self, since_start: std::time::Duration) {
        let ns = u64::try_from(since_start.as_nanos())
            .unwrap_or(NO_CLOCK - 1)
            .min(NO_CLOCK - 1);
        self.clock.store(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds.
fn coarse_now() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write; the clock id is
    // Linux's, which every kernel since 2.6.32 has.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

pub(super) fn check_key(key: &[u8]) -> Result<(), StateError> {
    if key.len() > MAX_KEY {
        return Err(StateError::KeyTooLong);
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), StateError> {
    if value.len() > MAX_VALUE {
        return Err(StateError::ValueTooLong);
    }
    Ok(())
}

/// When an entry made `now` with `ttl_ms` expires.
fn expiry(now: u64, ttl_ms: i64) -> u64 {
    if ttl_ms <= 0 {
        return NEVER;
    }
    now.saturating_add((ttl_ms as u64).saturating_mul(NS_PER_MS))
        .min(NEVER - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::entry::SHORT_KEY;

    const MS: u64 = NS_PER_MS;
    const S: u64 = 1000 * MS;

    fn small(max_entries: usize, max_bytes: usize) -> State {
        State::new(StateLimits { max_bytes, max_entries })
    }

    fn value(state: &State, key: &[u8], now: u64) -> Option<Vec<u8>> {
        state.get(key, now, <[u8]>::to_vec).ok()
    }

    #[test]
    fn values_are_set_read_replaced_and_deleted() {
        let s = State::new(StateLimits::default());
        assert_eq!(s.get(b"k", 0, |_| ()), Err(StateError::NotFound));
        s.set(b"k", b"one", 0, 0).unwrap();
        assert_eq!(value(&s, b"k", 0).as_deref(), Some(&b"one"[..]));
        s.set(b"k", b"three", 0, 0).unwrap();
        assert_eq!(value(&s, b"k", 0).as_deref(), Some(&b"three"[..]));
        assert_eq!(s.stats().entries, 1);
        assert_eq!(s.stats().bytes, (1 + 5 + ENTRY_OVERHEAD) as u64);
        assert_eq!(s.delete(b"k", 0), Ok(true));
        assert_eq!(s.delete(b"k", 0), Ok(false));
        assert_eq!(s.stats(), StateStats::default());
        s.set(b"", b"", 0, 0).unwrap();
        assert_eq!(
            value(&s, b"", 0).as_deref(),
            Some(&b""[..]),
            "empty key and value are legal"
        );
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let s = State::new(StateLimits::default());
        s.set(b"k", b"v", 100, 0).unwrap();
        assert!(value(&s, b"k", 99 * MS).is_some());
        assert!(value(&s, b"k", 100 * MS).is_none());
        assert_eq!(s.stats().entries, 0, "read past its expiry, it is gone");
        assert_eq!(s.incr(b"n", 1, 50, 0), Ok(1));
        assert_eq!(s.incr(b"n", 1, 50, 49 * MS), Ok(2), "incr keeps the window's expiry");
        assert_eq!(s.incr(b"n", 1, 50, 50 * MS), Ok(1), "a new window");
    }

    #[test]
    fn counters_add_saturate_and_refuse_other_values() {
        let s = State::new(StateLimits::default());
        assert_eq!(s.incr(b"n", 5, 0, 0), Ok(5));
        assert_eq!(s.incr(b"n", -7, 0, 0), Ok(-2));
        assert_eq!(value(&s, b"n", 0), Some((-2i64).to_le_bytes().to_vec()));
        assert_eq!(s.incr(b"n", i64::MIN, 0, 0), Ok(COUNTER_MIN));
        assert_eq!(
            s.incr(b"n", -1, 0, 0),
            Ok(COUNTER_MIN),
            "saturates above the error codes"
        );
        assert_eq!(s.incr(b"m", i64::MIN, 0, 0), Ok(COUNTER_MIN));
        s.set(b"text", b"hello", 0, 0).unwrap();
        assert_eq!(s.incr(b"text", 1, 0, 0), Err(StateError::NotACounter));
    }

    #[test]
    fn cas_sets_only_over_the_expected_value() {
        let s = State::new(StateLimits::default());
        assert_eq!(s.cas(b"k", Some(b"x"), b"a", 0, 0), Err(StateError::Mismatch));
        assert_eq!(s.cas(b"k", None, b"a", 0, 0), Ok(()), "None: only if absent");
        assert_eq!(s.cas(b"k", None, b"b", 0, 0), Err(StateError::Mismatch));
        assert_eq!(s.cas(b"k", Some(b"a"), b"b", 0, 0), Ok(()));
        assert_eq!(value(&s, b"k", 0).as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn keys_and_values_over_the_limits_are_refused() {
        let s = State::new(StateLimits::default());
        let long_key = vec![b'k'; MAX_KEY + 1];
        let long_value = vec![0; MAX_VALUE + 1];
        assert_eq!(s.set(&long_key, b"v", 0, 0), Err(StateError::KeyTooLong));
        assert_eq!(s.set(b"k", &long_value, 0, 0), Err(StateError::ValueTooLong));
        assert_eq!(s.limit(&long_key, 1, 1, 0), Err(StateError::KeyTooLong));
        assert_eq!(s.penalized(&long_key, 0), Err(StateError::KeyTooLong));
        assert!(
            s.set(&long_key[..MAX_KEY], &long_value[..MAX_VALUE], 0, 0).is_ok(),
            "at the limits"
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let s = State::new(StateLimits::default());
        let allowed = |now| (0..100).filter(|_| s.limit(b"ip", 10, 5, now) == Ok(true)).count();
        assert_eq!(allowed(0), 5, "the burst");
        assert_eq!(allowed(99 * MS), 0, "a token takes 100 ms");
        assert_eq!(allowed(100 * MS), 1);
        assert_eq!(allowed(100 * MS + 10 * S), 5, "refilled to the burst, no more");
        let stats = s.stats();
        assert_eq!((stats.allowed, stats.denied), (11, 389));
        assert_eq!(
            (0..10).filter(|_| s.limit(b"quota", 0, 3, 0) == Ok(true)).count(),
            3,
            "rate 0: a quota"
        );
        assert_eq!(s.limit(b"quota", 0, 3, u64::MAX / 2), Ok(false), "never refilled");
        assert_eq!(s.limit(b"none", 1000, 0, 0), Ok(false), "burst 0 allows nothing");
    }

    #[test]
    fn a_full_bucket_leaves_no_entry_behind() {
        // A store of one entry: whether a write must evict the bucket tells
        // whether the bucket's entry was still live.
        let s = small(1, 1 << 20);
        assert_eq!(s.limit(b"ip", 1000, 10, 0), Ok(true));
        assert_eq!(s.stats().entries, 1);
        // One token back after 1 ms: the bucket is full and its entry expired,
        // so the write takes its room without evicting anything live.
        s.set(b"other", b"", 0, S).unwrap();
        assert_eq!((s.stats().entries, s.stats().evictions), (1, 0));
        // Not yet full again (a token a second): live, and evicted for the write.
        let s = small(1, 1 << 20);
        assert_eq!(s.limit(b"ip", 1, 10, 0), Ok(true));
        s.set(b"other", b"", 0, 500 * MS).unwrap();
        assert_eq!((s.stats().entries, s.stats().evictions), (1, 1));
    }

    #[test]
    fn penalties_last_their_ttl_and_keep_the_longer_one() {
        let s = State::new(StateLimits::default());
        assert_eq!(s.penalized(b"ip", 0), Ok(false));
        s.penalize(b"ip", 1000, 0).unwrap();
        s.penalize(b"ip", 10, 0).unwrap();
        assert_eq!(s.penalized(b"ip", 999 * MS), Ok(true), "the longer penalty stays");
        assert_eq!(s.penalized(b"ip", S), Ok(false));
        s.penalize(b"ip", 1000, S).unwrap();
        s.penalize(b"ip", 0, S).unwrap();
        assert_eq!(s.penalized(b"ip", S), Ok(false), "0 lifts it");
        s.set(b"ip", b"a value", 0, 0).unwrap();
        assert_eq!(s.limit(b"ip", 1, 1, 0), Ok(true), "spaces do not clash");
        assert_eq!(value(&s, b"ip", 0).as_deref(), Some(&b"a value"[..]));
    }

    #[test]
    fn others_writes_never_lift_a_penalty_and_values_go_before_buckets() {
        // Before: a 64 KiB store filled by 600 clients' buckets and penalties
        // evicted by shortest TTL, and a client penalized for 10 s was let
        // back in 0.3 s later.
        let s = small(8, 1 << 20);
        for i in 0..4u8 {
            s.penalize(&[b'p', i], 10_000, 0).unwrap();
        }
        for i in 0..2u8 {
            assert_eq!(s.limit(&[b'b', i], 1, 10, 0), Ok(true));
        }
        for i in 0..2u8 {
            s.set(&[b'v', i], b"x", 60_000 + i64::from(i), 0).unwrap();
        }
        // Full: a new bucket takes a value's room, though the value would
        // outlive every bucket.
        assert_eq!(s.limit(b"new", 1, 10, MS), Ok(true));
        let values = (0..2u8).filter(|&i| value(&s, &[b'v', i], MS).is_some()).count();
        assert_eq!(values, 1, "a value went first");
        // A flood of other clients' buckets and values: every penalty holds.
        for i in 0..1_000u32 {
            let _ = s.limit(&i.to_le_bytes(), 1, 10, 2 * MS);
            let _ = s.set(&i.to_be_bytes(), b"x", 60_000, 2 * MS);
        }
        for i in 0..4u8 {
            assert_eq!(s.penalized(&[b'p', i], 9 * S), Ok(true), "penalty {i} was lifted");
        }
        // Only a penalty makes room among penalties.
        s.penalize(b"p new", 10_000, 3 * MS).unwrap();
        assert!(s.penalized(b"p new", 4 * MS).unwrap());
    }

    #[test]
    fn when_full_expired_entries_go_first_then_the_shortest_ttl() {
        let s = small(10, 1 << 20);
        for i in 0..4u8 {
            s.set(&[b'e', i], b"", 10, 0).unwrap(); // expired by 1 s
        }
        for i in 0..3u8 {
            s.set(&[b'f', i], b"", 0, 0).unwrap(); // no TTL: never evicted
        }
        s.set(b"long", b"", 60_000, 0).unwrap();
        s.set(b"short", b"", 5_000, 0).unwrap();
        s.set(b"mid", b"", 30_000, 0).unwrap();
        assert_eq!(s.stats().entries, 10);
        s.set(b"new", b"", 0, S).unwrap();
        assert_eq!(s.stats().entries, 7, "the four expired ones made room");
        assert_eq!(s.stats().evictions, 0, "expired entries are not evictions");
        for i in 3..6u8 {
            s.set(&[b'g', i], b"", 0, S).unwrap();
        }
        assert_eq!(s.stats().entries, 10);
        s.set(b"one more", b"", 0, S).unwrap();
        // Down to 7/8 of 10 (8 entries, then the new one): the two shortest TTLs went.
        assert!(value(&s, b"short", S).is_none() && value(&s, b"mid", S).is_none());
        assert!(value(&s, b"long", S).is_some());
        assert_eq!(s.stats().evictions, 2);
        s.set(b"last", b"", 0, S).unwrap();
        s.set(b"evicts long", b"", 0, S).unwrap();
        assert!(value(&s, b"long", S).is_none());
        assert_eq!(
            s.set(b"too many", b"", 0, S),
            Err(StateError::Full),
            "only entries without a TTL are left"
        );
        // A limit that cannot store its bucket denies, as a denial (not -10).
        assert_eq!(s.limit(b"new client", 100, 10, S), Ok(false));
        assert_eq!(s.stats().entries, 10);
        s.set(b"last", b"replacing needs no room", 0, S).unwrap();
    }

    #[test]
    fn the_byte_bound_counts_keys_values_and_overhead() {
        let per = ENTRY_OVERHEAD + 1 + 100;
        let s = small(1000, per * 4);
        for i in 0..4u8 {
            s.set(&[i], &[0; 100], 1000, 0).unwrap();
        }
        assert_eq!(s.stats().bytes as usize, per * 4);
        s.set(&[9], &[0; 100], 1000, MS).unwrap();
        assert!(s.stats().bytes as usize <= per * 4);
        assert!(value(&s, &[0], MS).is_none(), "the earliest to expire went");
        assert_eq!(s.set(&[10], &vec![0; per * 5], 1000, MS), Err(StateError::Full));
    }

    #[test]
    fn two_threads_share_one_bucket_exactly() {
        let s = std::sync::Arc::new(State::new(StateLimits::default()));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let s = std::sync::Arc::clone(&s);
                std::thread::spawn(move || {
                    (0..10_000)
                        .filter(|_| s.limit(b"shared", 0, 1234, 0) == Ok(true))
                        .count()
                })
            })
            .collect();
        let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(allowed, 1234);
    }

    #[test]
    fn what_limit_writes_shares_the_locks_cache_line() {
        let shard = Shard {
            inner: Mutex::new(Inner::default()),
        };
        let base = &shard as *const Shard as usize;
        let inner = &*lock(&shard) as *const Inner as usize - base;
        // std's mutex keeps its lock word before the data.
        assert!((1..=8).contains(&inner), "the data starts at byte {inner}");
        let end = inner + std::mem::offset_of!(Inner, denied) + 8;
        assert!(end <= 64, "the counts end at byte {end} of the shard");
    }

    #[test]
    fn the_overhead_counted_covers_the_slot_and_the_values_allocation() {
        let slot = std::mem::size_of::<Entry>() * 8 / 7 + 1;
        assert!(ENTRY_OVERHEAD >= slot + 32, "{slot}-byte slots");
    }

    #[test]
    fn short_and_long_keys_are_told_apart() {
        let state = State::new(StateLimits::default());
        let long = [b'k'; SHORT_KEY + 1];
        let keys: [&[u8]; 6] = [b"", b"a", b"a\0", &long[..SHORT_KEY], &long, &[b'k'; 512]];
        for (i, key) in keys.iter().enumerate() {
            state.set(key, &[i as u8], 0, 0).unwrap();
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(value(&state, key, 0), Some(vec![i as u8]), "key {i}");
        }
        assert!(state.delete(&long, 0).unwrap());
        assert_eq!(value(&state, &long[..SHORT_KEY], 0), Some(vec![3]));
    }

    #[test]
    fn large_stores_are_sharded_and_small_ones_are_not() {
        assert_eq!(State::new(StateLimits::default()).shards.len(), 128);
        assert_eq!(small(100, 1 << 20).shards.len(), 1);
        assert_eq!(small(2047, 64 << 20).shards.len(), 1);
        assert_eq!(small(4096, 64 << 20).shards.len(), 4, "by entries");
        assert_eq!(
            small(1 << 20, 1 << 20).shards.len(),
            2,
            "by bytes: each holds 4 of the largest entries"
        );
        let s = small(1 << 20, 1 << 20);
        assert_eq!(
            s.set(b"k", &vec![0; MAX_VALUE], 0, 0),
            Ok(()),
            "the largest value fits a shard"
        );
    }
}
