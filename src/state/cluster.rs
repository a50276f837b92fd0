//! The cluster scope: several gateways share their `limit` buckets through
//! Redis, with no network round trip on the datagram path.
//!
//! Each gateway keeps deciding alone, exactly, on its own buckets. A flusher
//! thread per listener, every few milliseconds, sends what each bucket spent
//! here since the last flush (`INCRBY` on a cluster-wide total, in one
//! pipeline) and gets the totals back; what the other gateways spent is then
//! debited from the local bucket, as if those tokens had been taken here. A
//! heartbeat in a sorted set counts the gateways, and a bucket new to a
//! gateway starts with its share of the burst (`burst / gateways`), so that
//! gateways that have not heard of each other's spending cannot together pass
//! the burst. The error is bounded: between two flushes, the other gateways
//! may spend what their buckets refill in that time (see docs/ABI.md).
//!
//! Redis down: fail open (each gateway limits alone) or closed (`limit`
//! denies), as configured; logged once when it goes and once when it is back,
//! counted, and retried every second.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use super::{Bucket, Space, State, UNSEEN, interval, lock};

/// Where and how a listener shares its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `redis://HOST:PORT[/DB]` (also `redis://:PASSWORD@…`, `rediss://` is not built in).
    pub url: String,
    /// With Redis unreachable, deny every `limit` call instead of limiting alone.
    pub fail_closed: bool,
    /// How often each gateway flushes what it spent and learns what the others did.
    pub flush: Duration,
}

/// The longest a Redis call may take before the connection is dropped.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a lost connection is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// A gateway that has not flushed for this long no longer counts.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// What the flusher shares with the datagram path.
#[derive(Debug)]
pub(crate) struct Cluster {
    gateways: AtomicU32,
    up: AtomicBool,
    fail_closed: bool,
    errors: AtomicU64,
    flushes: AtomicU64,
}

/// The cluster scope's figures, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Redis answered the last flush.
    pub up: bool,
    /// Gateways that flushed in the last 3 s, this one included.
    pub gateways: u32,
    /// Flushes that failed (connection refused, timeout, an error reply).
    pub errors: u64,
    pub flushes: u64,
}

impl Cluster {
    /// Gateways sharing the limits (at least this one).
    pub(super) fn gateways(&self) -> u32 {
        self.gateways.load(Relaxed).max(1)
    }

    /// Whether `limit` denies everything now (Redis down and fail-closed).
    pub(super) fn refuses(&self) -> bool {
        self.fail_closed && !self.up.load(Relaxed)
    }
}

/// A bucket's news for one flush.
struct Flush {
    hash: u64,
    key: Box<[u8]>,
    sent: u32,
    refill_ms: u64,
}

impl State {
    /// Shares this store's limits through Redis under `listener`'s name,
    /// from now on: starts the flusher thread, which ends with the store.
    /// Fails only on a URL that cannot be Redis; an unreachable server is
    /// logged and retried.
    pub fn join_cluster(self: &Arc<Self>, listener: &str, spec: &ClusterSpec) -> anyhow::Result<()> {
        let client = redis::Client::open(spec.url.as_str()).with_context(|| format!("state redis {:?}", spec.url))?;
        let cluster = Arc::new(Cluster {
            gateways: AtomicU32::new(1),
            // Until the first flush says otherwise, as if Redis were there:
            // a gateway starting with Redis down fails closed only once it knows.
            up: AtomicBool::new(true),
            fail_closed: spec.fail_closed,
            errors: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        if self.cluster.set(Arc::clone(&cluster)).is_err() {
            anyhow::bail!("the listener `{listener}` already shares its state");
        }
        let flusher = Flusher {
            state: Arc::downgrade(self),
            cluster,
            client,
            url: spec.url.clone(),
            prefix: format!("wasmgate:{listener}:"),
            id: format!("{}-{}", std::process::id(), self.seed),
            flush: spec.flush,
            listener: listener.to_string(),
        };
        std::thread::Builder::new()
            .name(format!("redis-{listener}"))
            .spawn(move || flusher.run())
            .context("cannot start the state flusher thread")?;
        Ok(())
    }

    /// The cluster scope's figures, if it has one.
    pub fn cluster_stats(&self) -> Option<ClusterStats> {
        self.cluster.get().map(|c| ClusterStats {
            up: c.up.load(Relaxed),
            gateways: c.gateways(),
            errors: c.errors.load(Relaxed),
            flushes: c.flushes.load(Relaxed),
        })
    }

    /// Takes every dirty bucket's tokens spent since the last flush.
    fn take_dirty(&self, now: u64) -> Vec<Flush> {
        let mut flushes = Vec::new();
        for shard in &self.shards {
            let mut inner = lock(shard);
            let dirty = std::mem::take(&mut inner.dirty);
            for (hash, key) in dirty {
                let Some(entry) = inner.find(hash, Space::Bucket, &key, now) else {
                    continue;
                };
                let mut b = Bucket::read(&entry.value);
                // How long an empty bucket takes to fill: the total must last that long.
                let refill = interval(b.rate).saturating_mul(u128::from(b.burst)) / 1_000_000;
                flushes.push(Flush {
                    hash,
                    key,
                    sent: b.pending,
                    refill_ms: u64::try_from(refill).unwrap_or(u64::MAX),
                });
                b.pending = 0;
                entry.value.copy_from_slice(&b.bytes());
                entry.dirty = false;
            }
        }
        flushes
    }

    /// Debits each flushed bucket with what the other gateways spent, given
    /// the cluster-wide totals Redis returned.
    fn apply(&self, flushes: &[Flush], totals: &[u64], now: u64) {
        let now128 = u128::from(now);
        for (f, &total) in flushes.iter().zip(totals) {
            let mut inner = lock(&self.shards[self.shard_index(f.hash)]);
            let Some(entry) = inner.find(f.hash, Space::Bucket, &f.key, now) else {
                continue;
            };
            let mut b = Bucket::read(&entry.value);
            let step = interval(b.rate);
            if b.seen == UNSEEN {
                // The share held back for the others is given back, and
                // everything they spent before this first flush taken: at most
                // it empties the bucket (tokens spent long ago have come back).
                b.tat = b
                    .tat
                    .saturating_sub(u128::from(b.held).saturating_mul(step))
                    .max(now128.min(b.tat));
                b.held = 0;
                let foreign = u128::from(total.saturating_sub(u64::from(f.sent)));
                let empty = now128.saturating_add(step.saturating_mul(u128::from(b.burst)));
                if b.tat < empty {
                    b.tat = b.tat.saturating_add(foreign.saturating_mul(step)).min(empty);
                }
            } else {
                // A total below what was seen: the Redis key expired or was reset.
                let foreign = total.saturating_sub(b.seen.saturating_add(u64::from(f.sent)));
                b.tat = b.tat.saturating_add(u128::from(foreign).saturating_mul(step));
            }
            b.seen = total;
            entry.expires = b.expires();
            entry.value.copy_from_slice(&b.bytes());
        }
    }
}

struct Flusher {
    state: Weak<State>,
    cluster: Arc<Cluster>,
    client: redis::Client,
    url: String,
    prefix: String,
    id: String,
    flush: Duration,
    listener: String,
}

impl Flusher {
    fn run(self) {
        let mut connection: Option<redis::Connection> = None;
        let mut next_try = Instant::now();
        loop {
            std::thread::sleep(self.flush);
            let Some(state) = self.state.upgrade() else {
                return; // the listener is gone
            };
            let now = state.now();
            let flushes = state.take_dirty(now);
            if connection.is_none() && Instant::now() >= next_try {
                match self.connect() {
                    Ok(c) => connection = Some(c),
                    Err(e) => {
                        next_try = Instant::now() + RETRY;
                        self.down(&e);
                    }
                }
            }
            // Unreachable: what was spent here is not told (the others
            // under-count it), and each gateway limits alone or denies.
            let Some(c) = connection.as_mut() else { continue };
            match self.exchange(c, &flushes) {
                Ok((totals, gateways)) => {
                    state.apply(&flushes, &totals, state.now());
                    self.cluster.gateways.store(gateways, Relaxed);
                    self.cluster.flushes.fetch_add(1, Relaxed);
                    if !self.cluster.up.swap(true, Relaxed) {
                        tracing::info!(
                            listener = self.listener,
                            redis = self.url,
                            gateways,
                            "state: Redis is back; limits are shared again"
                        );
                    }
                }
                Err(e) => {
                    connection = None;
                    next_try = Instant::now() + RETRY;
                    self.down(&e);
                }
            }
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let c = self.client.get_connection_with_timeout(REDIS_TIMEOUT)?;
        c.set_read_timeout(Some(REDIS_TIMEOUT))?;
        c.set_write_timeout(Some(REDIS_TIMEOUT))?;
        Ok(c)
    }

    /// Counts a failure, and logs it when Redis was up until now.
    fn down(&self, error: &redis::RedisError) {
        self.cluster.errors.fetch_add(1, Relaxed);
        if self.cluster.up.swap(false, Relaxed) {
            let mode = if self.cluster.fail_closed {
                "failing closed: every limit denies until it is back"
            } else {
                "failing open: each gateway limits alone until it is back"
            };
            tracing::warn!(
                listener = self.listener,
                redis = self.url,
                "state: Redis is unreachable ({error}); {mode}"
            );
        }
    }

    /// One pipeline: each bucket's spending added to its total (which comes
    /// back), and this gateway's heartbeat, which gives the gateway count.
    fn exchange(&self, c: &mut redis::Connection, flushes: &[Flush]) -> redis::RedisResult<(Vec<u64>, u32)> {
        let mut pipe = redis::pipe();
        for f in flushes {
            let mut key = Vec::with_capacity(self.prefix.len() + 6 + f.key.len());
            key.extend_from_slice(self.prefix.as_bytes());
            key.extend_from_slice(b"limit:");
            key.extend_from_slice(&f.key);
            pipe.cmd("INCRBY").arg(&key).arg(f.sent);
            // The total outlives every gateway's bucket for the key: a bucket
            // lasts until it is full again.
            let ttl_ms = f.refill_ms.saturating_add(60_000).min(86_400_000);
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
        }
        let members = format!("{}gateways", self.prefix);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        pipe.cmd("ZADD").arg(&members).arg(now_ms).arg(&self.id).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&members)
            .arg(0)
            .arg(now_ms.saturating_sub(HEARTBEAT.as_millis() as u64))
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&members)
            .arg(HEARTBEAT.as_millis() as u64 * 2)
            .ignore();
        pipe.cmd("ZCARD").arg(&members);
        let mut replies: Vec<u64> = pipe.query(c)?;
        let gateways = replies.pop().unwrap_or(1);
        Ok((replies, u32::try_from(gateways).unwrap_or(u32::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::state::StateLimits;

    const MS: u64 = 1_000_000;

    /// A store in a cluster of `gateways`, with no flusher: the test flushes.
    fn member(gateways: u32) -> State {
        let state = State::new(StateLimits::default());
        let cluster = Arc::new(Cluster {
            gateways: AtomicU32::new(gateways),
            up: AtomicBool::new(true),
            fail_closed: false,
            errors: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        state.cluster.set(cluster).unwrap();
        state
    }

    /// One flush of every store, in turn, through a map standing for Redis.
    fn flush_all(stores: &[State], redis: &mut HashMap<Vec<u8>, u64>, now: u64) {
        for s in stores {
            let flushes = s.take_dirty(now);
            let totals: Vec<u64> = flushes
                .iter()
                .map(|f| {
                    let total = redis.entry(f.key.to_vec()).or_default();
                    *total += u64::from(f.sent);
                    *total
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
    fn a_gateway_alone_in_the_cluster_gets_the_whole_burst_after_its_first_flush() {
        let stores = [member(2)];
        // Asked 30 times at once: its share (5 of 10) now, the rest after a flush.
        let first: u64 = (0..30)
            .map(|_| u64::from(stores[0].limit(b"k", 0, 10, 0) == Ok(true)))
            .sum();
        assert_eq!(first, 5);
        flush_all(&stores, &mut HashMap::new(), MS);
        let then: u64 = (0..30)
            .map(|_| u64::from(stores[0].limit(b"k", 0, 10, 2 * MS) == Ok(true)))
            .sum();
        assert_eq!(then, 5, "the held share came back");
    }
}
