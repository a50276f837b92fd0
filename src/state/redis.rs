//! The flusher: a thread per listener that, every few milliseconds, sends
//! Redis what this gateway spent, added and penalized and brings back what
//! the others did (merged by `cluster.rs`), over the link of `link.rs`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::Value;

use super::cluster::{ClusterSpec, Flush, PENALTY_STREAM_TTL_MS, Total};
use super::entry::Space;
use super::link::{Link, Target};
use super::scope::{Cluster, unix_ms};
use super::store::State;

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
    use super::*;

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
}
