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
//! - It writes its pool's health probes (with `probe = "guest"` in the pool's
//!   `health` table, as examples/dns-health.toml has it): each resolver is asked
//!   for `example.org` (type A), and is healthy when it answers that query with
//!   NOERROR or NXDOMAIN; SERVFAIL, REFUSED, a truncated or foreign answer, or
//!   none at all fail the probe.
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

use dns_wire::{HEADER, MATCH_KEY, NOERROR, NXDOMAIN, QR, Question, SERVFAIL, answer_here, match_key, pending_table};
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

/// The name the health probe asks every resolver for, as labels.
const PROBE_NAME: [&[u8]; 2] = [b"example", b"org"];
/// The probe's query ID ("pr").
const PROBE_ID: [u8; 2] = *b"pr";

/// The health probe: a recursive query for [`PROBE_NAME`], type A.
fn health_probe<'a>(buf: &'a mut [u8], _ctx: &'a mut Context) -> Reply<'a> {
    let header = [PROBE_ID[0], PROBE_ID[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    buf[..HEADER].copy_from_slice(&header);
    let mut at = HEADER;
    for label in PROBE_NAME {
        buf[at] = label.len() as u8;
        buf[at + 1..at + 1 + label.len()].copy_from_slice(label);
        at += 1 + label.len();
    }
    // The root label, type A, class IN.
    buf[at..at + 5].copy_from_slice(&[0, 0, 1, 0, 1]);
    Reply::Send(&buf[..at + 5])
}

/// Healthy: the answer to the probe's query, with NOERROR or NXDOMAIN.
fn healthy(answer: &mut [u8], _ctx: &mut Context) -> bool {
    let Some(q) = Question::parse(answer) else {
        return false;
    };
    q.response
        && answer[..2] == PROBE_ID
        && answer[2] & QR != 0
        && matches!(answer[3] & 0x0f, NOERROR | NXDOMAIN)
}

wasmgate_sdk::handler!(query, on_reply = reply, probe = health_probe, probe_reply = healthy);

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
