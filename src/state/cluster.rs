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

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::Value;

use super::entry::{Bucket, NEVER, NS_PER_MS, Space, UNSEEN, interval};
use super::link::{Link, Target};
use super::scope::{Cluster, ClusterStats, unix_ms};
use super::store::{COUNTER_MIN, State, check_key, lock};

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
const PENALTY_STREAM_TTL_MS: u64 = 86_400_000;

/// The longest a Redis call may take before the connection is dropped.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a lost connection is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// A gateway that has not flushed for this long no longer counts.
const HEARTBEAT: Duration = Duration::from_secs(3);
/// Penalties kept on the stream (roughly: Redis trims it lazily), and the
/// most a gateway reads in one flush.
const PENALTY_LOG: usize = 10_000;
pub(super) const PENALTY_READ: usize = 1_000;

/// One bucket's or counter's news for one flush.
struct Flush {
    space: Space,
    hash: u64,
    key: Box<[u8]>,
    /// Tokens a bucket spent, or what a counter added, here since the last flush.
    sent: i64,
    /// How long the cluster-wide total must last: a bucket's refill time, a
    /// counter's time left (`None`: no TTL).
    ttl_ms: Option<u64>,
}

/// What Redis said of one flushed key: its cluster-wide total and, for a
/// counter, its time left in milliseconds (negative: none). `None` when the
/// key's reply was an error (a counter past the 64-bit range, a key of the
/// wrong type): that key is skipped, the others go on.
type Total = Option<(i64, i64)>;

impl State {
    /// Shares this store's limits, counters and penalties through Redis under
    /// `listener`'s name, from now on: starts the flusher thread, which ends
    /// with the store. Fails only on a URL that cannot be Redis; an
    /// unreachable server is logged and retried.
    pub fn join_cluster(self: &Arc<Self>, listener: &str, spec: &ClusterSpec) -> anyhow::Result<()> {
        let shown = crate::text::redacted(&spec.url);
        let target = Target::parse(&spec.url, spec.ca.as_deref()).with_context(|| format!("state redis {shown:?}"))?;
        let cluster = Arc::new(Cluster::new(spec.fail_closed, 1));
        let namespace = spec.namespace.as_deref().unwrap_or(listener);
        if self.cluster.set(Arc::clone(&cluster)).is_err() {
            anyhow::bail!("the listener `{listener}` already shares its state");
        }
        let mut flusher = Flusher {
            state: Arc::downgrade(self),
            cluster,
            target,
            // Only ever shown: the password stays in `target`.
            url: shown,
            prefix: format!("wasmgate:{namespace}:"),
            id: format!("{}-{}", std::process::id(), self.seed),
            flush: spec.flush,
            listener: listener.to_string(),
            // From the stream's start: a gateway joining learns the penalties running.
            penalty_cursor: "0-0".to_string(),
        };
        // Before the listener serves: the gateway count decides a new bucket's share.
        let connection = flusher.first_contact();
        std::thread::Builder::new()
            .name(format!("redis-{listener}"))
            .spawn(move || flusher.run(connection))
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

    /// Takes every dirty bucket's tokens spent, and every dirty counter's
    /// increments, since the last flush.
    fn take_dirty(&self, now: u64) -> Vec<Flush> {
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
    fn give_back(&self, flushes: Vec<Flush>, now: u64) {
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
    fn apply(&self, flushes: &[Flush], totals: &[Total], now: u64) {
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
    fn learn_penalty(&self, key: &[u8], until_unix_ms: u64, now: u64) {
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

struct Flusher {
    state: Weak<State>,
    cluster: Arc<Cluster>,
    target: Target,
    url: String,
    prefix: String,
    id: String,
    flush: Duration,
    listener: String,
    /// The last penalty read from the stream.
    penalty_cursor: String,
}

/// What one exchange brought back.
struct Exchanged {
    totals: Vec<Total>,
    penalties: Vec<(Box<[u8]>, u64)>,
    gateways: u32,
}

impl Flusher {
    /// One exchange with nothing to flush, to count the gateways (and learn
    /// the penalties running) before this one takes its first share of a
    /// bucket. The listener waits for it ([`State::join_cluster`]): a gateway
    /// that took itself for alone gave a new bucket's whole burst where its
    /// share was due (a quota of 40 on two gateways allowed up to 79).
    fn first_contact(&mut self) -> Option<Link> {
        let state = self.state.upgrade()?;
        let mut c = match self.connect() {
            Ok(c) => c,
            Err(e) => {
                self.down(&e);
                return None;
            }
        };
        match self.exchange(&mut c, &[], &VecDeque::new()) {
            Ok(back) => {
                let now = state.now();
                for (key, until) in &back.penalties {
                    state.learn_penalty(key, *until, now);
                }
                self.cluster.gateways.store(back.gateways, Relaxed);
                Some(c)
            }
            Err(e) => {
                self.down(&e);
                None
            }
        }
    }

    fn run(mut self, connection: Option<Link>) {
        let mut connection = connection;
        let mut next_try = Instant::now();
        loop {
            std::thread::sleep(self.flush);
            let Some(state) = self.state.upgrade() else {
                return; // the listener is gone
            };
            if connection.is_none() && Instant::now() >= next_try {
                match self.connect() {
                    Ok(c) => connection = Some(c),
                    Err(e) => {
                        next_try = Instant::now() + RETRY;
                        self.down(&e);
                    }
                }
            }
            // Unreachable: what is spent here stays pending (each gateway
            // limits alone or denies meanwhile) and goes with the next flush.
            let Some(c) = connection.as_mut() else { continue };
            let now = state.now();
            let flushes = state.take_dirty(now);
            let penalties = self.cluster.take_penalties();
            match self.exchange(c, &flushes, &penalties) {
                Ok(back) => {
                    let now = state.now();
                    state.apply(&flushes, &back.totals, now);
                    for (key, until) in &back.penalties {
                        state.learn_penalty(key, *until, now);
                    }
                    self.cluster.gateways.store(back.gateways, Relaxed);
                    self.cluster.flushes.fetch_add(1, Relaxed);
                    if !self.cluster.up.swap(true, Relaxed) {
                        tracing::info!(
                            listener = self.listener,
                            redis = self.url,
                            gateways = back.gateways,
                            "state: Redis is back; limits, counters and penalties are shared again"
                        );
                    }
                }
                Err(e) => {
                    state.give_back(flushes, state.now());
                    self.cluster.give_back_penalties(penalties);
                    connection = None;
                    next_try = Instant::now() + RETRY;
                    self.down(&e);
                }
            }
        }
    }

    fn connect(&self) -> redis::RedisResult<Link> {
        self.target.connect(REDIS_TIMEOUT)
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

    /// Counts a key whose flush Redis refused (what it carried is dropped),
    /// and says so once.
    fn refused(&self, key: &[u8]) {
        self.cluster.errors.fetch_add(1, Relaxed);
        if !self.cluster.refused_once.swap(true, Relaxed) {
            tracing::warn!(
                listener = self.listener,
                redis = self.url,
                key = %String::from_utf8_lossy(key),
                "state: Redis refused a key's flush (not a number there, or past the 64-bit range); \
                 that key is not shared, the others are (said once)"
            );
        }
    }

    fn key(&self, kind: &str, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + kind.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(kind.as_bytes());
        k.extend_from_slice(key);
        k
    }

    /// One pipeline: each bucket's spending and each counter's increments
    /// added to their totals (which come back), the penalties set here
    /// published and the others' read, and this gateway's heartbeat, which
    /// gives the gateway count.
    fn exchange(
        &mut self,
        c: &mut Link,
        flushes: &[Flush],
        penalties: &VecDeque<(Box<[u8]>, u64)>,
    ) -> redis::RedisResult<Exchanged> {
        let mut pipe = redis::pipe();
        // The commands whose replies are read and dropped (their errors too).
        let mut ignored = Vec::new();
        for f in flushes {
            match f.space {
                Space::Bucket => {
                    let key = self.key("limit:", &f.key);
                    pipe.cmd("INCRBY").arg(&key).arg(f.sent);
                    // The total outlives every gateway's bucket for the key: a
                    // bucket lasts until it is full again.
                    let ttl_ms = f.ttl_ms.unwrap_or(0).saturating_add(60_000).min(86_400_000);
                    pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms);
                    ignored.push(pipe.len() - 1);
                }
                _ => {
                    // The first gateway to flush a counter starts its window.
                    let key = self.key("count:", &f.key);
                    let set = pipe.cmd("SET").arg(&key).arg(0).arg("NX");
                    if let Some(ttl_ms) = f.ttl_ms {
                        set.arg("PX").arg(ttl_ms.max(1));
                    }
                    ignored.push(pipe.len() - 1);
                    pipe.cmd("INCRBY").arg(&key).arg(f.sent);
                    pipe.cmd("PTTL").arg(&key);
                }
            }
        }
        let stream = format!("{}penalties", self.prefix);
        for (key, until) in penalties {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(PENALTY_LOG)
                .arg("*")
                .arg("k")
                .arg(&**key)
                .arg("u")
                .arg(*until);
            ignored.push(pipe.len() - 1);
        }
        if !penalties.is_empty() {
            pipe.cmd("PEXPIRE").arg(&stream).arg(PENALTY_STREAM_TTL_MS);
            ignored.push(pipe.len() - 1);
        }
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(PENALTY_READ)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&self.penalty_cursor);
        let members = format!("{}gateways", self.prefix);
        let now_ms = unix_ms();
        pipe.cmd("ZADD").arg(&members).arg(now_ms).arg(&self.id);
        ignored.push(pipe.len() - 1);
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&members)
            .arg(0)
            .arg(now_ms.saturating_sub(HEARTBEAT.as_millis() as u64));
        ignored.push(pipe.len() - 1);
        pipe.cmd("PEXPIRE").arg(&members).arg(HEARTBEAT.as_millis() as u64 * 2);
        ignored.push(pipe.len() - 1);
        pipe.cmd("ZCARD").arg(&members);

        // A key's error reply (a counter past the 64-bit range, a key of the
        // wrong type) must not fail the others' flush: it comes back in its place.
        let replies = c.round_trip(&pipe, &ignored, REDIS_TIMEOUT)?;
        let mut replies = replies.into_iter();
        let mut totals = Vec::with_capacity(flushes.len());
        for f in flushes {
            let total = int(replies.next());
            let total = match f.space {
                Space::Bucket => total.map(|t| (t, -1)),
                _ => total.zip(int(replies.next())),
            };
            if total.is_none() {
                self.refused(&f.key);
            }
            totals.push(total);
        }
        let read = replies.next();
        let gateways = int(replies.next()).unwrap_or(1);
        let mut learned = Vec::new();
        if let Some(last) = stream_entries(read, &mut learned) {
            self.penalty_cursor = last;
        }
        Ok(Exchanged {
            totals,
            penalties: learned,
            gateways: u32::try_from(gateways.max(1)).unwrap_or(u32::MAX),
        })
    }
}

/// An integer reply; `None` for an error or anything else.
fn int(value: Option<Value>) -> Option<i64> {
    match value? {
        Value::Int(n) => Some(n),
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The penalties in an `XREAD` reply (`[[stream, [[id, [k, KEY, u, UNTIL]], …]]]`,
/// or nil when there is nothing new), pushed onto `out`; the last entry's ID.
/// An entry that is not ours (a field missing, a bad number) is skipped.
fn stream_entries(reply: Option<Value>, out: &mut Vec<(Box<[u8]>, u64)>) -> Option<String> {
    let Some(Value::Array(streams)) = reply else {
        return None;
    };
    let mut last = None;
    for stream in streams {
        let Value::Array(mut pair) = stream else { continue };
        let Some(Value::Array(entries)) = pair.pop() else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let [id, Value::Array(fields)] = parts.as_slice() else {
                continue;
            };
            let Some(id) = text(id).and_then(|id| std::str::from_utf8(id).ok()) else {
                continue;
            };
            last = Some(id.to_string());
            let (mut key, mut until) = (None, None);
            for field in fields.chunks_exact(2) {
                match text(&field[0]) {
                    Some(b"k") => key = text(&field[1]),
                    Some(b"u") => {
                        until = text(&field[1])
                            .and_then(|u| std::str::from_utf8(u).ok())
                            .and_then(|u| u.parse::<u64>().ok())
                    }
                    _ => {}
                }
            }
            if let (Some(key), Some(until)) = (key, until) {
                out.push((key.into(), until));
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::state::StateLimits;
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
    fn a_penalty_stream_reply_of_any_shape_gives_only_well_formed_entries() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, fields: Vec<Value>| Value::Array(vec![bulk(id), Value::Array(fields)]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("wasmgate:default:penalties"),
            Value::Array(vec![
                entry("1-0", vec![bulk("k"), bulk("10.0.0.1"), bulk("u"), bulk("123")]),
                entry("2-0", vec![bulk("k"), bulk("no until")]),
                entry("3-0", vec![bulk("u"), bulk("not a number"), bulk("k"), bulk("x")]),
                entry("4-0", vec![bulk("k"), bulk("odd"), bulk("u")]),
                Value::Int(7),
                Value::Array(vec![bulk("5-0")]),
                entry(
                    "6-0",
                    vec![
                        bulk("u"),
                        bulk("0"),
                        bulk("k"),
                        bulk("10.0.0.2"),
                        bulk("extra"),
                        bulk("x"),
                    ],
                ),
            ]),
        ])]);
        let mut out = Vec::new();
        assert_eq!(stream_entries(Some(reply), &mut out).as_deref(), Some("6-0"));
        let got: Vec<(&[u8], u64)> = out.iter().map(|(k, u)| (&**k, *u)).collect();
        assert_eq!(got, [(&b"10.0.0.1"[..], 123), (&b"10.0.0.2"[..], 0)]);
        // Nothing new, an error, or not an array at all: no entries, cursor kept.
        for reply in [
            None,
            Some(Value::Nil),
            Some(Value::Int(1)),
            Some(Value::Array(vec![Value::Nil])),
        ] {
            let mut out = Vec::new();
            assert_eq!(stream_entries(reply, &mut out), None);
            assert!(out.is_empty());
        }
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
