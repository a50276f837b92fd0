//! The cluster scope: several gateways share their `limit` buckets, their
//! `state_incr` counters and their penalties through Redis, with no network
//! round trip on the datagram path.
//!
//! Each gateway keeps deciding alone, exactly, on its own copies. A flusher
//! thread per listener, every few milliseconds, sends in one pipeline what
//! each bucket spent and each counter added here since the last flush
//! (`INCRBY` on a cluster-wide total) and gets the totals back: what the
//! other gateways spent is debited from the local bucket, as if those tokens
//! had been taken here, and a counter takes the cluster's sum. A heartbeat in
//! a sorted set counts the gateways, and a bucket new to a gateway starts with
//! its share of the burst (`burst / gateways`), so that gateways that have not
//! heard of each other's spending cannot together pass the burst. Penalties
//! go out on a Redis stream that every gateway reads from where it left off.
//! The error is bounded: between two flushes, the other gateways may spend
//! what their buckets refill in that time (see docs/ABI.md).
//!
//! Redis down: fail open (each gateway limits alone, with the whole burst) or
//! closed (`limit` denies), as configured; logged once when it goes and once
//! when it is back, counted, and retried every second. What was spent, added
//! and penalized meanwhile is kept and sent when it is back.
//!
//! This file is the merge, with no I/O: what a flush takes from the store,
//! what it puts back when it fails, and how Redis's totals are applied. The
//! flusher thread that talks to Redis is `redis.rs`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::entry::{Bucket, NEVER, NS_PER_MS, Space, UNSEEN, interval};
use super::scope::{ClusterStats, unix_ms};
use super::shard::lock;
use super::store::{COUNTER_MIN, State, check_key};

/// Where and how a listener shares its limits, counters and penalties.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `redis://HOST:PORT[/DB]`, `redis://USER:PASSWORD@…`, `rediss://…` (TLS)
    /// or `redis+unix:///PATH`.
    pub url: String,
    /// For `rediss://`: the CA certificates (PEM) to trust instead of the system's.
    pub ca: Option<std::path::PathBuf>,
    /// With Redis unreachable, deny every `limit` call instead of limiting alone.
    pub fail_closed: bool,
    /// How often each gateway flushes what it spent and learns what the others did.
    pub flush: Duration,
    /// The name its keys are kept under in Redis (`wasmgate:NAMESPACE:…`);
    /// `None`: the listener's name.
    pub namespace: Option<String>,
}

/// Shown with the URL's password redacted.
impl std::fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("url", &crate::text::redacted(&self.url))
            .field("fail_closed", &self.fail_closed)
            .field("flush", &self.flush)
            .field("namespace", &self.namespace)
            .field("ca", &self.ca)
            .finish()
    }
}

/// How long the penalty stream lives after its last entry, and so the longest
/// a penalty learned from Redis lasts here.
pub(super) const PENALTY_STREAM_TTL_MS: u64 = 86_400_000;

/// One bucket's or counter's news for one flush.
pub(super) struct Flush {
    pub(super) space: Space,
    pub(super) hash: u64,
    pub(super) key: Box<[u8]>,
    /// Tokens a bucket spent, or what a counter added, here since the last flush.
    pub(super) sent: i64,
    /// How long the cluster-wide total must last: a bucket's refill time, a
    /// counter's time left (`None`: no TTL).
    pub(super) ttl_ms: Option<u64>,
}

/// What Redis said of one flushed key: its cluster-wide total and, for a
/// counter, its time left in milliseconds (negative: none). `None` when the
/// key's reply was an error (a counter past the 64-bit range, a key of the
/// wrong type): that key is skipped, the others go on.
pub(super) type Total = Option<(i64, i64)>;

impl State {
    /// The cluster scope's figures, if it has one.
    pub fn cluster_stats(&self) -> Option<ClusterStats> {
        self.cluster.get().map(|c| ClusterStats {
            up: c.up.load(Relaxed),
            gateways: c.gateways(),
            errors: c.errors.load(Relaxed),
            flushes: c.flushes.load(Relaxed),
        })
    }

    /// Takes every dirty bucket's tokens spent, and every dirty counter's
    /// increments, since the last flush.
    pub(super) fn take_dirty(&self, now: u64) -> Vec<Flush> {
        let mut flushes = Vec::new();
        for shard in &self.shards {
            let mut inner = lock(shard);
            let dirty = std::mem::take(&mut inner.dirty);
            for (space, hash, key) in dirty {
                let Some(entry) = inner.find(hash, space, &key, now) else {
                    continue;
                };
                entry.dirty = false;
                let (sent, ttl_ms) = match space {
                    Space::Bucket => {
                        let mut b = Bucket::read(&entry.value);
                        // How long an empty bucket takes to fill: the total must last that long.
                        let refill = interval(b.rate).saturating_mul(u128::from(b.burst)) / u128::from(NS_PER_MS);
                        let sent = b.pending;
                        b.pending = 0;
                        entry.value.copy_from_slice(&b.bytes());
                        (i64::from(sent), Some(u64::try_from(refill).unwrap_or(u64::MAX)))
                    }
                    Space::Value => {
                        let sent = std::mem::take(&mut entry.pending);
                        let left = (entry.until != NEVER).then(|| (entry.until - now).div_ceil(NS_PER_MS));
                        (sent, left)
                    }
                    Space::Penalty => continue,
                };
                flushes.push(Flush {
                    space,
                    hash,
                    key,
                    sent,
                    ttl_ms,
                });
            }
        }
        flushes
    }

    /// Puts back what a failed flush took, to be sent with the next one.
    pub(super) fn give_back(&self, flushes: Vec<Flush>, now: u64) {
        for f in flushes {
            let mut inner = lock(&self.shards[self.shard_index(f.hash)]);
            let Some(entry) = inner.find(f.hash, f.space, &f.key, now) else {
                continue;
            };
            match f.space {
                Space::Bucket => {
                    let mut b = Bucket::read(&entry.value);
                    b.pending = b.pending.saturating_add(u32::try_from(f.sent).unwrap_or(0));
                    entry.value.copy_from_slice(&b.bytes());
                }
                Space::Value => entry.pending = entry.pending.saturating_add(f.sent),
                Space::Penalty => continue,
            }
            if !std::mem::replace(&mut entry.dirty, true) {
                inner.mark_dirty(f.space, f.hash, &f.key);
            }
        }
    }

    /// Brings each flushed key up to the cluster: a bucket is debited with
    /// what the other gateways spent, a counter takes the cluster's sum (and
    /// the cluster's expiry, so that every gateway counts the same window).
    pub(super) fn apply(&self, flushes: &[Flush], totals: &[Total], now: u64) {
        let now128 = u128::from(now);
        for (f, total) in flushes.iter().zip(totals) {
            let Some((total, left_ms)) = *total else { continue };
            let mut inner = lock(&self.shards[self.shard_index(f.hash)]);
            let Some(entry) = inner.find(f.hash, f.space, &f.key, now) else {
                continue;
            };
            if f.space == Space::Value {
                // Added here since the flush was taken, on top of the cluster's sum.
                let sum = total.saturating_add(entry.pending).max(COUNTER_MIN);
                if let Ok(bytes) = <&mut [u8; 8]>::try_from(&mut *entry.value) {
                    *bytes = sum.to_le_bytes();
                }
                if left_ms > 0 {
                    entry.until = now.saturating_add((left_ms as u64).saturating_mul(NS_PER_MS));
                }
                continue;
            }
            let total = u64::try_from(total).unwrap_or(0);
            let mut b = Bucket::read(&entry.value);
            let step = interval(b.rate);
            let tolerance = step.saturating_mul(u128::from(b.burst));
            let empty = now128.saturating_add(tolerance);
            let sent = u64::try_from(f.sent).unwrap_or(0);
            // The others' spending may put the bucket in debt (they spent
            // tokens it counted as refilled), by one burst at most: tokens
            // spent long ago (say, while Redis was down) have come back since.
            let mut most = empty.saturating_add(tolerance);
            let first = b.seen == UNSEEN;
            let mut foreign = if first {
                // Before the first flush, spending is history: empty at most.
                most = empty;
                // Everything the others spent before this first flush.
                total.saturating_sub(sent)
            } else {
                // A total below what was seen: the Redis key expired or was reset.
                total.saturating_sub(b.seen.saturating_add(sent))
            };
            // The share this gateway held back for the others (its bucket
            // started that much emptier) pays for their spending first.
            let covered = foreign.min(u64::from(b.held));
            foreign -= covered;
            b.held -= u32::try_from(covered).unwrap_or(b.held);
            if b.tat < most {
                b.tat = b.tat.saturating_add(u128::from(foreign).saturating_mul(step)).min(most);
            }
            // What of it they did not spend is given back a flush after the
            // first, not at it: what they spent just before this gateway's
            // first flush may reach Redis only with their next one (given back
            // at the first, a share was spent twice: a quota of 40 on two
            // gateways allowed up to 80).
            if !first && b.held > 0 {
                b.tat = b
                    .tat
                    .saturating_sub(u128::from(b.held).saturating_mul(step))
                    .max(now128.min(b.tat));
                b.held = 0;
            }
            b.seen = total;
            entry.value.copy_from_slice(&b.bytes());
        }
    }

    /// A penalty (or its lifting) another gateway published.
    pub(super) fn learn_penalty(&self, key: &[u8], until_unix_ms: u64, now: u64) {
        let ttl_ms = match until_unix_ms {
            0 => 0,
            until => match until.checked_sub(unix_ms()) {
                // What Redis says is not trusted past the stream's own life: a
                // penalty "until the year 5138" is one of a day.
                Some(left) if left > 0 => i64::try_from(left.min(PENALTY_STREAM_TTL_MS)).unwrap_or(i64::MAX),
                _ => return, // over already
            },
        };
        if check_key(key).is_ok() {
            // Full: the penalty is not kept here, as a local one would not be.
            let _ = self.penalize_here(key, ttl_ms, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::state::StateLimits;
    use crate::state::scope::Cluster;
    use crate::state::scope::PENALTY_BACKLOG;

    const MS: u64 = 1_000_000;

    /// A store in a cluster of `gateways`, with no flusher: the test flushes.
    fn member(gateways: u32) -> State {
        let state = State::new(StateLimits::default());
        let cluster = Arc::new(Cluster::new(false, gateways));
        state.cluster.set(cluster).unwrap();
        state
    }

    #[test]
    fn while_redis_is_down_new_keys_past_the_bounds_do_not_grow_memory() {
        // Before: each new bucket left a note to flush; nothing took the notes
        // while Redis was down, and evicted entries' notes stayed: 1.4 million
        // new keys took RSS from 12 to 120 MiB under a 1 MiB store.
        let state = State::new(StateLimits {
            max_bytes: 1 << 20,
            max_entries: 1_000,
        });
        state.cluster.set(Arc::new(Cluster::new(false, 1))).unwrap();
        for i in 0..50_000u32 {
            let _ = state.limit(&i.to_le_bytes(), 1, 10, u64::from(i) * MS);
        }
        let notes: usize = state.shards.iter().map(|s| lock(s).dirty.len()).sum();
        let entries = state.stats().entries as usize;
        assert!(entries <= 1_000);
        assert!(
            notes <= 2 * entries + 64 * state.shards.len(),
            "{notes} notes for {entries} entries"
        );
        // What is still there is still flushed (but for an entry or two that
        // eviction replaced as it was noted).
        let flushes = state.take_dirty(49_999 * MS);
        assert!(
            flushes.len() + 2 >= entries,
            "{} flushes for {entries} entries",
            flushes.len()
        );
    }

    #[test]
    fn a_penalty_from_redis_lasts_at_most_the_streams_day() {
        let state = member(2);
        let millennia = unix_ms() + 3_000 * 365 * 86_400_000;
        state.learn_penalty(b"bad", millennia, 0);
        assert_eq!(state.penalized(b"bad", 0), Ok(true));
        let day = 86_400 * 1_000 * MS;
        assert_eq!(state.penalized(b"bad", day - MS), Ok(true));
        assert_eq!(state.penalized(b"bad", day + 1_000 * MS), Ok(false));
    }

    /// One flush of every store, in turn, through a map standing for Redis.
    fn flush_all(stores: &[State], redis: &mut HashMap<Vec<u8>, i64>, now: u64) {
        for s in stores {
            let flushes = s.take_dirty(now);
            let totals: Vec<Total> = flushes
                .iter()
                .map(|f| {
                    let total = redis.entry(f.key.to_vec()).or_default();
                    *total += f.sent;
                    Some((*total, -1))
                })
                .collect();
            s.apply(&flushes, &totals, now);
        }
    }

    /// Both gateways asked once a millisecond for `ms`, flushing every 5 ms;
    /// the tokens allowed in all.
    fn run(stores: &[State], rate: u32, burst: u32, ms: u64) -> u64 {
        let mut redis = HashMap::new();
        let mut allowed = 0;
        for t in 0..ms {
            for s in stores {
                allowed += u64::from(s.limit(b"k", rate, burst, t * MS) == Ok(true));
            }
            if t % 5 == 4 {
                flush_all(stores, &mut redis, t * MS);
            }
        }
        allowed
    }

    #[test]
    fn counters_add_up_across_gateways_and_take_the_clusters_window() {
        let stores = [member(2), member(2)];
        let mut redis = HashMap::new();
        assert_eq!(stores[0].incr(b"hits", 3, 10_000, 0), Ok(3));
        assert_eq!(stores[1].incr(b"hits", 4, 10_000, 0), Ok(4));
        flush_all(&stores, &mut redis, MS);
        // The first to flush knew only its own; the second already the sum.
        assert_eq!(stores[1].incr(b"hits", 1, 10_000, 2 * MS), Ok(8));
        // A gateway is brought up to the sum at the flush after it touched
        // the counter (an increment of 0 reads it and asks).
        assert_eq!(stores[0].incr(b"hits", 0, 10_000, 2 * MS), Ok(3));
        flush_all(&stores, &mut redis, 3 * MS);
        // It flushed before the other's +1 reached Redis.
        assert_eq!(stores[0].incr(b"hits", 0, 10_000, 3 * MS), Ok(7));
        flush_all(&stores, &mut redis, 4 * MS);
        assert_eq!(stores[0].incr(b"hits", 0, 10_000, 4 * MS), Ok(8));
        assert_eq!(redis[&b"hits"[..]], 8);
        // Incremented between a flush's take and its answer: kept on top.
        let flushes = stores[0].take_dirty(5 * MS);
        assert_eq!(stores[0].incr(b"hits", 2, 10_000, 5 * MS), Ok(10));
        stores[0].apply(&flushes, &[Some((8, 9_000))], 6 * MS);
        assert_eq!(stores[0].incr(b"hits", 0, 10_000, 6 * MS), Ok(10));
        // The cluster's window: 9 s left at 6 ms, so gone at 9.006 s, not 10 s.
        assert_eq!(stores[0].incr(b"hits", 0, 10_000, 9_007 * MS), Ok(0));
    }

    #[test]
    fn what_a_failed_flush_took_is_sent_with_the_next() {
        let stores = [member(2), member(2)];
        let mut redis = HashMap::new();
        for _ in 0..5 {
            stores[0].incr(b"n", 1, 0, 0).unwrap();
            stores[0].limit(b"k", 0, 100, 0).unwrap();
        }
        let lost = stores[0].take_dirty(MS);
        assert_eq!(lost.len(), 2);
        stores[0].give_back(lost, MS);
        stores[0].incr(b"n", 1, 0, MS).unwrap();
        flush_all(&stores, &mut redis, 2 * MS);
        assert_eq!(redis[&b"n"[..]], 6);
        assert_eq!(redis[&b"k"[..]], 5);
        assert_eq!(stores[1].incr(b"n", 0, 0, 3 * MS), Ok(0), "not flushed to it yet");
        flush_all(&stores, &mut redis, 3 * MS);
        assert_eq!(stores[1].incr(b"n", 0, 0, 4 * MS), Ok(6));
    }

    #[test]
    fn the_others_spending_puts_a_bucket_one_burst_in_debt_at_most() {
        let stores = [member(2), member(2)];
        let mut redis = HashMap::new();
        stores[0].limit(b"k", 10, 10, 0).unwrap();
        flush_all(&stores, &mut redis, MS);
        // Another gateway spent 1,000 tokens while this one was cut off.
        redis.insert(b"k".to_vec(), 1_001);
        stores[0].limit(b"k", 10, 10, 2 * MS).unwrap();
        flush_all(&stores[..1], &mut redis, 3 * MS);
        // One burst in debt: empty for a second, full a second later (and
        // forgotten: it starts again with its share, 5), not 100 s later.
        assert_eq!(stores[0].limit(b"k", 10, 10, 1_000 * MS), Ok(false));
        let refilled: u64 = (0..20)
            .map(|_| u64::from(stores[0].limit(b"k", 10, 10, 2_100 * MS) == Ok(true)))
            .sum();
        assert_eq!(refilled, 5);
    }

    #[test]
    fn penalties_waiting_for_redis_keep_their_order_and_the_newest_past_the_bound() {
        let cluster = Cluster::new(false, 2);
        for i in 0..PENALTY_BACKLOG + 5 {
            cluster.publish_penalty(i.to_string().as_bytes(), 1000);
        }
        let sent = cluster.take_penalties();
        assert_eq!(sent.len(), PENALTY_BACKLOG);
        assert_eq!(&*sent[0].0, b"5", "the 5 oldest dropped");
        // A failed flush puts them back before one set meanwhile, and the
        // oldest go again past the bound.
        cluster.publish_penalty(b"new", 0);
        cluster.give_back_penalties(sent);
        let queue = cluster.take_penalties();
        assert_eq!(queue.len(), PENALTY_BACKLOG);
        assert_eq!(&*queue[0].0, b"6");
        assert_eq!(queue.back().map(|(k, until)| (&**k, *until)), Some((&b"new"[..], 0)));
    }

    #[test]
    fn two_gateways_flushing_every_5_ms_allow_one_bucket() {
        let stores = [member(2), member(2)];
        // 100 a second, burst 20, for 2 s: one bucket allows 20 + 200.
        let allowed = run(&stores, 100, 20, 2000);
        assert!((219..=222).contains(&allowed), "{allowed}");
        let alone = run(&[member(1)], 100, 20, 2000);
        assert!((219..=221).contains(&alone), "one gateway: {alone}");
    }

    #[test]
    fn a_quota_is_shared_and_its_first_interval_is_bounded() {
        let stores = [member(2), member(2)];
        let allowed = run(&stores, 0, 50, 500);
        // The documented bound for a key new to both: burst × (N−1)/N extra at most.
        assert!((50..=75).contains(&allowed), "{allowed}");
        let stores = [member(3), member(3), member(3)];
        let allowed = run(&stores, 0, 60, 500);
        assert!((60..=100).contains(&allowed), "{allowed}");
    }

    #[test]
    fn a_share_is_given_back_only_once_the_others_spending_has_had_a_flush_to_arrive() {
        // A took itself for alone and spent a quota of 40 at once; B, knowing
        // of two, took its share (20) and flushed before A's spending reached
        // Redis.
        let (a, b) = (member(1), member(2));
        let spend =
            |s: &State, at: u64| -> u64 { (0..50).map(|_| u64::from(s.limit(b"k", 0, 40, at) == Ok(true))).sum() };
        assert_eq!(spend(&a, 0), 40);
        let mut redis = HashMap::new();
        let mut b_allowed = spend(&b, 0);
        assert_eq!(b_allowed, 20, "its share");
        flush_all(std::slice::from_ref(&b), &mut redis, MS);
        b_allowed += spend(&b, 2 * MS);
        flush_all(std::slice::from_ref(&a), &mut redis, 5 * MS);
        flush_all(std::slice::from_ref(&b), &mut redis, 6 * MS);
        b_allowed += spend(&b, 7 * MS);
        // The quota is spent: B had its share, no more (before: 40).
        assert_eq!(b_allowed, 20);
    }

    #[test]
    fn a_gateway_alone_in_the_cluster_gets_the_whole_burst_after_its_first_flush() {
        let stores = [member(2)];
        // Asked 30 times at once: its share (5 of 10) now, the rest after a flush.
        let first: u64 = (0..30)
            .map(|_| u64::from(stores[0].limit(b"k", 0, 10, 0) == Ok(true)))
            .sum();
        assert_eq!(first, 5);
        // Given back one flush after the first, once the others' spending
        // before it has had a flush to arrive.
        let mut redis = HashMap::new();
        flush_all(&stores, &mut redis, MS);
        assert_eq!(stores[0].limit(b"k", 0, 10, MS), Ok(false), "not at the first flush");
        flush_all(&stores, &mut redis, 2 * MS);
        let then: u64 = (0..30)
            .map(|_| u64::from(stores[0].limit(b"k", 0, 10, 2 * MS) == Ok(true)))
            .sum();
        assert_eq!(then, 5, "the held share came back");
    }
}
