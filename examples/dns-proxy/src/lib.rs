//! A wasmgate handler written with the Rust SDK: a DNS filtering proxy.
//!
//! - Queries for `blocked.test` and every name under it are answered here, with
//!   NXDOMAIN; the resolvers never see them.
//! - Every other query goes to the pool `resolvers` (`Context::forward`), and is
//!   remembered: the client, the query ID and the question.
//! - Every answer comes back through `on_reply`, which passes it to the client
//!   only if it is a response to a query this instance forwarded for that client
//!   (same ID, same question, not answered yet). Anything else, such as a forged
//!   answer racing the real one, is dropped (anti-spoofing).
//! - When the pool cannot take the query (every resolver ejected, too many
//!   sessions), the client gets SERVFAIL at once instead of a timeout.
//! - Datagrams that are not a well-formed one-question query are dropped.
//!
//! Pending queries live in a fixed table per instance (`dns_wire::Pending`,
//! shared with examples/dns-limit and examples/dns-cache): 65,536 entries in
//! sets of four (512 KiB). When all four of a set are waiting, the oldest gives
//! way and its answer, when it comes, is dropped, as a query lost on the
//! network would be. The table lives in the instance, so run it with
//! `--isolation reuse` (the default).
//!
//! Build: `scripts/build-guests.sh` (wasm32-unknown-unknown, from the guest workspace).
//! Run: `wasmgate --config examples/dns-proxy.toml`.

#![no_std]

use dns_wire::{HEADER, MATCH_KEY, NXDOMAIN, Question, SERVFAIL, answer_here, match_key, pending_table};
use wasmgate_sdk::{Context, Reply};

/// The pool every allowed query goes to.
const POOL: &str = "resolvers";
/// The blocked zone, as lowercase labels.
const BLOCKED: [&[u8]; 2] = [b"blocked", b"test"];

fn query<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if q.response {
        return Reply::Nothing; // answering a response could start a loop
    }
    if blocked(datagram) {
        return Reply::Send(answer_here(datagram, q.end, NXDOMAIN));
    }
    let mut key = [0u8; MATCH_KEY];
    let key = pending_key(ctx, datagram, &q, &mut key);
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
    if !q.response {
        return Reply::Nothing;
    }
    let mut key = [0u8; MATCH_KEY];
    let key = pending_key(ctx, datagram, &q, &mut key);
    if !pending_table().forget(key) {
        return Reply::Nothing; // not a query we forwarded for this client, or answered already
    }
    Reply::Send(datagram)
}

wasmgate_sdk::handler!(query, on_reply = reply);

/// Whether the question's name is `blocked.test` or under it (any case). The
/// message has been parsed: its one question is well-formed.
fn blocked(m: &[u8]) -> bool {
    // The last two labels.
    let mut last = [0..0, 0..0];
    let mut at = HEADER;
    while let Some(&len) = m.get(at) {
        let len = len as usize;
        if len == 0 {
            break;
        }
        last = [last[1].clone(), at + 1..at + 1 + len];
        at += 1 + len;
    }
    !last[0].is_empty()
        && BLOCKED
            .iter()
            .zip(&last)
            .all(|(zone, range)| m.get(range.clone()).is_some_and(|label| label.eq_ignore_ascii_case(zone)))
}

/// The pending-table key of a query or its answer for the current client.
fn pending_key<'k>(ctx: &Context, m: &[u8], q: &Question, out: &'k mut [u8; MATCH_KEY]) -> &'k [u8] {
    let mut peer = [0u8; 64];
    let client = ctx.peer_text(&mut peer).unwrap_or("");
    match_key(client.as_bytes(), m, q, out)
}
