//! A wasmgate handler written with the Rust SDK: a DNS filtering proxy.
//!
//! - Queries for `blocked.test` and every name under it are answered here, with
//!   NXDOMAIN; the resolvers never see them.
//! - Every other query goes to the pool `resolvers` (`Context::forward`) under
//!   an ID of the instance's own, and is remembered: the client's handle
//!   (`Context::client`), its ID and the question.
//! - Every answer comes back through `on_reply`, which passes it on only if it
//!   answers a query this instance forwarded (same ID, same question, not
//!   answered yet), to that query's client (`Context::reply_to`, which the host
//!   refuses if the answer came from an endpoint the client's query did not go
//!   to), with the client's ID. Anything else, such as a forged answer racing
//!   the real one, is dropped (anti-spoofing), and counted by the host.
//! - So it serves a pool with `sessions = "shared"` (examples/dns-proxy.toml):
//!   every client's queries go to a resolver on a few sockets per worker, as
//!   dnsdist does, rather than a socket per client; a per-client pool works too.
//! - When the pool cannot take the query (every resolver ejected, too many
//!   sessions), the client gets SERVFAIL at once instead of a timeout.
//! - Datagrams that are not a well-formed one-question query are dropped.
//! - It writes its pool's health probes (with `probe = "guest"` in the pool's
//!   `health` table, as examples/dns-health.toml has it): each resolver is asked
//!   for `example.org` (type A), and is healthy when it answers that query with
//!   NOERROR or NXDOMAIN; SERVFAIL, REFUSED, a truncated or foreign answer, or
//!   none at all fail the probe.
//!
//! Pending queries live in a fixed table per instance (`dns_wire::Outstanding`,
//! shared with examples/dns-limit and examples/dns-cache): one entry per
//! 16-bit ID (896 KiB). The 65,536th query after one takes its ID, and that
//! query's answer, when it comes, is dropped, as a query lost on the network
//! would be. The table lives in the instance (answers come back to the worker
//! that forwarded), so run it with `--isolation reuse` (the default).
//!
//! Build: `scripts/build-guests.sh` (wasm32-unknown-unknown, from the guest workspace).
//! Run: `wasmgate --config examples/dns-proxy.toml`.

#![no_std]

use dns_wire::{HEADER, NOERROR, NXDOMAIN, QR, Question, SERVFAIL, answer_here, outstanding_table};
use wasmgate_sdk::{ClientHandle, Context, Reply};

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
    forward(datagram, &q, ctx)
}

/// Forwards the query under an ID of the instance's own, remembered with its
/// client; SERVFAIL at once when the pool cannot take it.
fn forward<'a>(datagram: &'a mut [u8], q: &Question, ctx: &mut Context) -> Reply<'a> {
    let Ok(client) = ctx.client() else {
        return Reply::Send(answer_here(datagram, q.end, SERVFAIL));
    };
    if !outstanding_table().forward(client.to_bits(), datagram, q, |m| ctx.forward(POOL, m).is_ok()) {
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
    // Not a query we forwarded, answered already, or from the wrong endpoint.
    let Some(client) = outstanding_table().take(datagram, &q) else {
        return Reply::Nothing;
    };
    if ctx.reply_to(ClientHandle::from_bits(client)).is_err() {
        return Reply::Nothing;
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
