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
//! Pending queries live in a fixed table per instance: 65,536 entries in sets of
//! four (512 KiB). When all four of a set are waiting, the oldest gives way and
//! its answer, when it comes, is dropped, as a query lost on the network would
//! be. The table lives in the instance, so run it with `--isolation reuse` (the
//! default).
//!
//! Build: `scripts/build-guests.sh` (wasm32-unknown-unknown, from the guest workspace).
//! Run: `wasmgate --config examples/dns-proxy.toml`.

#![no_std]

use wasmgate_sdk::{Context, Reply};

/// The pool every allowed query goes to.
const POOL: &str = "resolvers";
/// The blocked zone, as lowercase labels.
const BLOCKED: [&[u8]; 2] = [b"blocked", b"test"];

const HEADER: usize = 12;
const QR: u8 = 0x80;
const RA: u8 = 0x80;
const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;

/// Sets of the pending table, and entries per set.
const SETS: usize = 16_384;
const WAYS: usize = 4;

/// Queries forwarded and not yet answered: in each entry, a hash of the
/// client's address and the query's ID and question (0: free), and when it was
/// stored (a count of forwarded queries), so that a full set evicts its oldest.
#[derive(Clone, Copy)]
struct Set {
    keys: [u64; WAYS],
    stamps: [u32; WAYS],
}

static mut PENDING: [Set; SETS] = [Set {
    keys: [0; WAYS],
    stamps: [0; WAYS],
}; SETS];
static mut CLOCK: u32 = 0;

fn query<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let Some(q) = Question::parse(datagram) else {
        return Reply::Nothing;
    };
    if q.response {
        return Reply::Nothing; // answering a response could start a loop
    }
    if q.blocked {
        return Reply::Send(answer_here(datagram, q.end, NXDOMAIN));
    }
    let key = pending_key(ctx, &q);
    match ctx.forward(POOL, datagram) {
        Ok(()) => {
            remember(key);
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
    let key = pending_key(ctx, &q);
    if !forget(key) {
        return Reply::Nothing; // not a query we forwarded for this client, or answered already
    }
    Reply::Send(datagram)
}

wasmgate_sdk::handler!(query, on_reply = reply);

/// Turns the query into a response with `rcode` and no records, in place.
fn answer_here(datagram: &mut [u8], question_end: usize, rcode: u8) -> &[u8] {
    datagram[2] |= QR; // keep the opcode and RD
    datagram[3] = RA | rcode;
    datagram[6..HEADER].fill(0); // ANCOUNT, NSCOUNT, ARCOUNT
    &datagram[..question_end]
}

/// The pending-table key of a query or its answer for the current client.
fn pending_key(ctx: &Context, q: &Question) -> u64 {
    let mut buf = [0u8; 64];
    let client = ctx.peer_text(&mut buf).unwrap_or("").as_bytes();
    let mut h = Fnv::new();
    h.write(client);
    h.write(&[0xff]);
    h.write(&q.id.to_be_bytes());
    h.write_u64(q.hash);
    h.finish().max(1)
}

fn set(key: u64) -> &'static mut Set {
    // SAFETY: the host calls `handle` and `on_reply` one at a time, and the
    // reference does not outlive the call that takes it.
    #[allow(clippy::deref_addrof)]
    unsafe {
        &mut (*(&raw mut PENDING))[(key % SETS as u64) as usize]
    }
}

/// Stores `key` in its set: in a free entry, or in place of the oldest.
fn remember(key: u64) {
    // SAFETY: as for `set`: one call at a time.
    let now = unsafe {
        CLOCK = CLOCK.wrapping_add(1);
        CLOCK
    };
    let set = set(key);
    let way = (0..WAYS)
        .find(|&w| set.keys[w] == 0 || set.keys[w] == key)
        .unwrap_or_else(|| (0..WAYS).max_by_key(|&w| now.wrapping_sub(set.stamps[w])).unwrap_or(0));
    set.keys[way] = key;
    set.stamps[way] = now;
}

/// Removes `key` from its set; false when it was not there.
fn forget(key: u64) -> bool {
    let set = set(key);
    match set.keys.iter().position(|&k| k == key) {
        Some(way) => {
            set.keys[way] = 0;
            true
        }
        None => false,
    }
}

/// The header and the one question of a DNS message.
struct Question {
    id: u16,
    response: bool,
    /// Where the question section ends.
    end: usize,
    /// A hash of the name (lowercased), type and class.
    hash: u64,
    /// The name is `blocked.test` or under it.
    blocked: bool,
}

impl Question {
    /// `None` unless the message has a header and exactly one well-formed,
    /// uncompressed question.
    fn parse(m: &[u8]) -> Option<Self> {
        let header = m.get(..HEADER)?;
        if u16::from_be_bytes([header[4], header[5]]) != 1 {
            return None;
        }
        let mut h = Fnv::new();
        // The last two labels, to compare with the blocked zone.
        let mut last = [0..0, 0..0];
        let mut at = HEADER;
        loop {
            let len = *m.get(at)? as usize;
            if len > 63 {
                return None; // compression pointers and reserved label types
            }
            h.write(&[len as u8]);
            if len == 0 {
                break;
            }
            let label = m.get(at + 1..at + 1 + len)?;
            for &b in label {
                h.write(&[b.to_ascii_lowercase()]);
            }
            last = [last[1].clone(), at + 1..at + 1 + len];
            at += 1 + len;
        }
        if at + 1 - HEADER > 255 {
            return None;
        }
        h.write(m.get(at + 1..at + 5)?); // type and class
        let blocked = !last[0].is_empty()
            && BLOCKED
                .iter()
                .zip(&last)
                .all(|(zone, range)| m[range.clone()].eq_ignore_ascii_case(zone));
        Some(Self {
            id: u16::from_be_bytes([header[0], header[1]]),
            response: header[2] & QR != 0,
            end: at + 5,
            hash: h.finish(),
            blocked,
        })
    }
}

/// FNV-1a, 64 bits: small and enough to key a table.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_le_bytes());
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
