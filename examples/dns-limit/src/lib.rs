//! A wasmgate handler with the Rust SDK and the shared state: a DNS proxy that
//! limits each client IP address.
//!
//! - Each client IP gets a token bucket of [`BURST`] queries refilled at
//!   [`RATE`] a second (`Context::limit`), shared by every worker of the
//!   listener, so a client spread over workers by its source ports gets no
//!   more than one bucket.
//! - A query past the bucket is answered REFUSED, and its client is penalized
//!   for [`PENALTY_MS`] (`Context::penalize`): every query of a penalized
//!   client is REFUSED at once, whatever its bucket holds, until the penalty
//!   ends. Its queries never reach the resolvers.
//! - Other queries go to the pool `resolvers` under an ID of the instance's
//!   own, remembered with the client's handle, its ID and the question
//!   (`dns_wire::Outstanding`, as examples/dns-proxy does); `on_reply` passes
//!   an answer only if it matches a remembered query, once, to that query's
//!   client (`Context::reply_to`), with its ID (anti-spoofing). Answers come
//!   back to the worker that forwarded, so the instance's own table is
//!   enough, and cheaper than the shared state. The pool is shared
//!   (`sessions = "shared"`): a few sockets per worker carry every client.
//!
//! - It counts what it decides (docs/ABI.md, "Metrics"): `/metrics` shows
//!   `wasmgate_guest_dns_limit_refused_total{reason="rate"|"penalized"}`,
//!   `wasmgate_guest_dns_limit_penalties_total` and
//!   `wasmgate_guest_dns_limit_forwarded_total`.
//!
//! Build: `scripts/build-guests.sh`. Run: `wasmgate --config examples/dns-limit.toml`.

#![no_std]

use dns_wire::{outstanding_table, Question, REFUSED as REFUSED_RCODE, SERVFAIL, answer_here};
use wasmgate_sdk::{ClientHandle, Context, Metric, Reply};

/// Queries answered REFUSED, by why: past the bucket (`rate`), or from a
/// client penalized already (`penalized`).
static REFUSED: Metric = Metric::counter("dns_limit_refused", &["reason"]);
/// Clients penalized.
static PENALTIES: Metric = Metric::counter("dns_limit_penalties", &[]);
/// Queries forwarded to the resolvers.
static FORWARDED: Metric = Metric::counter("dns_limit_forwarded", &[]);

/// Queries a second each client IP may send, on average (5; a build with
/// `DNS_LIMIT_RATE` set takes that instead, as `examples/limit_bench` does).
pub const RATE: u32 = number(option_env!("DNS_LIMIT_RATE"), 5);
/// Queries a client may send at once, after a quiet spell (10, or `DNS_LIMIT_BURST`).
pub const BURST: u32 = number(option_env!("DNS_LIMIT_BURST"), 10);
/// How long a client that went past its bucket is refused.
pub const PENALTY_MS: i64 = 10_000;
/// The pool every allowed query goes to.
const POOL: &str = "resolvers";

fn query<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if q.response {
        return Reply::Nothing; // answering a response could start a loop
    }
    // The client's address: its IP keys the bucket.
    let mut peer = [0u8; 64];
    let Some(client) = ctx.peer_text(&mut peer) else {
        return Reply::Nothing;
    };
    let Some(ip) = client_ip(client) else {
        return Reply::Nothing;
    };
    let ip = ip.as_bytes();
    // A full state refuses: a limit that cannot count must not let a flood through.
    let penalized = ctx.penalized(ip).unwrap_or(true);
    if penalized || !ctx.limit(ip, RATE, BURST).unwrap_or(false) {
        // Counting is best effort: a refused metric call changes no answer.
        if penalized {
            let _ = REFUSED.add(&["penalized"], 1.0);
        } else {
            let _ = ctx.penalize(ip, PENALTY_MS);
            let _ = REFUSED.add(&["rate"], 1.0);
            let _ = PENALTIES.add(&[], 1.0);
        }
        return Reply::Send(answer_here(datagram, q.end, REFUSED_RCODE));
    }
    let Ok(handle) = ctx.client() else {
        return Reply::Send(answer_here(datagram, q.end, SERVFAIL));
    };
    if !outstanding_table().forward(handle.to_bits(), datagram, &q, |m| ctx.forward(POOL, m).is_ok()) {
        return Reply::Send(answer_here(datagram, q.end, SERVFAIL));
    }
    let _ = FORWARDED.add(&[], 1.0);
    Reply::Nothing
}

fn reply<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    // Only an answer to a query forwarded, only once, and only to its client.
    if !q.response {
        return Reply::Nothing;
    }
    let Some(client) = outstanding_table().take(datagram, &q) else {
        return Reply::Nothing;
    };
    if ctx.reply_to(ClientHandle::from_bits(client)).is_err() {
        return Reply::Nothing;
    }
    Reply::Send(datagram)
}

wasmgate_sdk::handler!(query, on_reply = reply);

/// A decimal number from the build's environment, or `default`.
const fn number(text: Option<&str>, default: u32) -> u32 {
    let Some(text) = text else { return default };
    let digits = text.as_bytes();
    let (mut n, mut i) = (0u32, 0);
    while i < digits.len() {
        assert!(digits[i].is_ascii_digit(), "DNS_LIMIT_RATE and DNS_LIMIT_BURST are decimal numbers");
        n = n * 10 + (digits[i] - b'0') as u32;
        i += 1;
    }
    n
}

/// `ip` of `ip:port` (IPv6 `[ip]:port`).
fn client_ip(peer: &str) -> Option<&str> {
    let (ip, _port) = peer.rsplit_once(':')?;
    Some(ip.trim_start_matches('[').trim_end_matches(']'))
}
