//! A wasmgate handler with the Rust SDK and the shared state: a caching DNS
//! proxy.
//!
//! - A query whose question (name, any case; type; class) has a cached answer
//!   is answered from the cache, with the query's ID and the query's spelling
//!   of the name; it never reaches the resolvers.
//! - Other queries go to the pool `resolvers` under an ID of the instance's
//!   own, remembered with the client's handle, its ID and the question
//!   (`dns_wire::Outstanding`, as examples/dns-proxy does); `on_reply` passes
//!   an answer only if it matches a remembered query, once, to that query's
//!   client (`Context::reply_to`), with its ID (anti-spoofing). The pool is
//!   shared (`sessions = "shared"`): a few sockets per worker carry every client.
//! - A NOERROR answer with records, not truncated, is cached for the smallest
//!   TTL of its answer records (`Context::state_set` with that TTL), capped at
//!   [`MAX_TTL_S`]. The cache is the listener's shared state: every worker
//!   fills and reads one cache, which survives module reloads; when the state
//!   is full, the answers closest to expiry go first.
//! - A cached answer is served with its TTLs less the seconds it has been in
//!   the cache (`Context::now_ms`; the time it was stored is kept after the
//!   answer), so no client holds a record past the moment its TTL allows.
//!   Answers over [`MAX_CACHED`] bytes (rare over UDP) are passed on uncached.
//!
//! - It counts its hits and misses (docs/ABI.md, "Metrics"): `/metrics` shows
//!   `wasmgate_guest_dns_cache_lookups_total{result="hit"|"miss"}` and
//!   `wasmgate_guest_dns_cache_stored_total`; with `--access-log`, each
//!   query's line notes `cache hit` or `cache miss`.
//!
//! Build: `scripts/build-guests.sh`. Run: `wasmgate --config examples/dns-cache.toml`.

#![no_std]

use dns_wire::{outstanding_table, HEADER, MAX_KEY, NOERROR, Question, SERVFAIL, age_ttls, answer_here, min_answer_ttl};
use wasmgate_sdk::{ClientHandle, Context, Metric, Reply};

/// Queries looked up in the cache, by whether they were answered from it.
static LOOKUPS: Metric = Metric::counter("dns_cache_lookups", &["result"]);
/// Answers stored in the cache.
static STORED: Metric = Metric::counter("dns_cache_stored", &[]);

/// The longest an answer is cached, in seconds, whatever its TTL.
pub const MAX_TTL_S: u32 = 3600;
/// The largest answer cached, in bytes.
pub const MAX_CACHED: usize = 4096;
/// After the answer, the cache keeps when it was stored (`now_ms`, 8 bytes LE).
const STAMP: usize = 8;
const POOL: &str = "resolvers";
/// Cache keys start with this byte, pending queries with a client address.
const CACHED: u8 = b'#';

fn query<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if q.response {
        return Reply::Nothing; // answering a response could start a loop
    }
    let mut key = [0u8; 1 + MAX_KEY];
    let key = cache_key(datagram, &q, &mut key);
    let now = ctx.now_ms();
    let hit = ctx.state_get_reply(key).ok().flatten().map(|value| value.len());
    if let Some(len) = hit.filter(|&len| len >= q.end + STAMP).map(|len| len - STAMP) {
        // Best effort: a refused metric call (or note) changes no answer.
        let _ = LOOKUPS.add(&["hit"], 1.0);
        let _ = ctx.note("cache hit");
        let buffer = ctx.reply_buffer();
        let mut stored = [0u8; STAMP];
        stored.copy_from_slice(&buffer[len..len + STAMP]);
        let age_s = now.saturating_sub(u64::from_le_bytes(stored)) / 1000;
        let answer = &mut buffer[..len];
        // Aged by whole seconds, as resolvers do; a record that cannot be
        // walked is served as it is (it was passed on as it is when stored).
        let _ = age_ttls(answer, &q, u32::try_from(age_s).unwrap_or(u32::MAX));
        // The query's ID, and its question as the client spelled it (a cached
        // answer has the same question, but perhaps in another case).
        answer[..2].copy_from_slice(&datagram[..2]);
        answer[HEADER..q.end].copy_from_slice(&datagram[HEADER..q.end]);
        return Reply::Send(answer);
    }
    let _ = LOOKUPS.add(&["miss"], 1.0);
    let _ = ctx.note("cache miss");
    let Ok(client) = ctx.client() else {
        return Reply::Send(answer_here(datagram, q.end, SERVFAIL));
    };
    if !outstanding_table().forward(client.to_bits(), datagram, &q, |m| ctx.forward(POOL, m).is_ok()) {
        return Reply::Send(answer_here(datagram, q.end, SERVFAIL));
    }
    Reply::Nothing
}

fn reply<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if !q.response {
        return Reply::Nothing;
    }
    let Some(client) = outstanding_table().take(datagram, &q) else {
        return Reply::Nothing;
    };
    if ctx.reply_to(ClientHandle::from_bits(client)).is_err() {
        return Reply::Nothing;
    }
    if q.rcode == NOERROR && !q.truncated {
        if let Some(ttl) = min_answer_ttl(datagram, &q).filter(|&t| t > 0) {
            if datagram.len() <= MAX_CACHED {
                let mut key = [0u8; 1 + MAX_KEY];
                let key = cache_key(datagram, &q, &mut key);
                let mut value = [0u8; MAX_CACHED + STAMP];
                let len = datagram.len();
                value[..len].copy_from_slice(datagram);
                value[len..len + STAMP].copy_from_slice(&ctx.now_ms().to_le_bytes());
                // A full cache only means this answer is not kept.
                if ctx.state_set(key, &value[..len + STAMP], i64::from(ttl.min(MAX_TTL_S)) * 1000).is_ok() {
                    let _ = STORED.add(&[], 1.0);
                }
            }
        }
    }
    Reply::Send(datagram)
}

wasmgate_sdk::handler!(query, on_reply = reply);

fn cache_key<'k>(m: &[u8], q: &Question, out: &'k mut [u8; 1 + MAX_KEY]) -> &'k [u8] {
    let mut question = [0u8; MAX_KEY];
    let question = q.key(m, &mut question);
    out[0] = CACHED;
    out[1..1 + question.len()].copy_from_slice(question);
    &out[..1 + question.len()]
}
