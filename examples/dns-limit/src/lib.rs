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
//! - Other queries go to the pool `resolvers`, and are remembered in the
//!   instance (client, ID and question: `dns_wire::Pending`, as
//!   examples/dns-proxy does); `on_reply` passes an answer only if it matches
//!   a remembered query, once (anti-spoofing). Answers come back to the
//!   worker that forwarded, so the instance's own table is enough, and cheaper
//!   than the shared state.
//!
//! Build: `scripts/build-guests.sh`. Run: `wasmgate --config examples/dns-limit.toml`.

#![no_std]

use dns_wire::{pending_table, MATCH_KEY, Question, REFUSED, SERVFAIL, answer_here, match_key};
use wasmgate_sdk::{Context, Reply};

/// Queries a second each client IP may send, on average (5; a build with
/// `DNS_LIMIT_RATE` set takes that instead, as `examples/limit_bench` does).
pub const RATE: u32 = number(option_env!("DNS_LIMIT_RATE"), 5);
/// Queries a client may send at once, after a quiet spell (10, or `DNS_LIMIT_BURST`).
pub const BURST: u32 = number(option_env!("DNS_LIMIT_BURST"), 10);
/// How long a client that went past its bucket is refused.
pub const PENALTY_MS: i64 = 10_000;
/// How long a forwarded query waits for its answer.
const POOL: &str = "resolvers";

fn query<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if q.response {
        return Reply::Nothing; // answering a response could start a loop
    }
    // The client's address, asked once: its IP keys the bucket, the whole of
    // it the pending query.
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
        if !penalized {
            let _ = ctx.penalize(ip, PENALTY_MS);
        }
        return Reply::Send(answer_here(datagram, q.end, REFUSED));
    }
    let mut key = [0u8; MATCH_KEY];
    let key = match_key(client.as_bytes(), datagram, &q, &mut key);
    match ctx.forward(POOL, datagram) {
        Ok(()) => {
            pending_table().remember(key);
            Reply::Nothing
        }
        Err(_) => Reply::Send(answer_here(datagram, q.end, SERVFAIL)),
    }
}

fn reply<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    let mut key = [0u8; MATCH_KEY];
    let key = pending_key(ctx, datagram, &q, &mut key);
    // Only an answer to a query forwarded for this client, and only once.
    if !q.response || !pending_table().forget(key) {
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

/// The shared-state key of a query or its answer for the current client.
fn pending_key<'k>(ctx: &Context, m: &[u8], q: &Question, out: &'k mut [u8; MATCH_KEY]) -> &'k [u8] {
    let mut peer = [0u8; 64];
    let client = ctx.peer_text(&mut peer).unwrap_or("");
    match_key(client.as_bytes(), m, q, out)
}
