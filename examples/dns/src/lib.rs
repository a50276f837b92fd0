//! A wasmgate handler written with the Rust SDK: an authoritative DNS responder
//! for the zone `wasmgate.test`.
//!
//! - `A` (or `ANY`) queries for the zone or any name under it are answered with
//!   127.0.0.1, TTL 60.
//! - Other types for those names get an empty answer (NODATA) with the zone's SOA
//!   in the authority section, so resolvers can cache the absence.
//! - Names outside the zone get NXDOMAIN.
//! - Queries that cannot be parsed get FORMERR, opcodes other than QUERY get
//!   NOTIMP, classes other than IN get REFUSED; a datagram too short for a DNS
//!   header, or one that is itself a response, gets no reply.
//!
//! The answer names the question by a compression pointer. A query with an EDNS
//! OPT record gets one back (version 0, no options, a 1,232-byte UDP payload size),
//! as RFC 6891 asks of a responder that speaks EDNS; options in it are ignored.
//!
//! Build: `scripts/build-guests.sh` (wasm32-unknown-unknown, from the guest workspace).

#![no_std]

use wasmgate_sdk::{Context, Reply};

/// The zone served, as lowercase labels.
const ZONE: [&[u8]; 2] = [b"wasmgate", b"test"];
const ADDRESS: [u8; 4] = [127, 0, 0, 1];
const TTL: u32 = 60;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
/// The UDP payload size offered in an OPT record: the DNS Flag Day 2020 value.
const EDNS_PAYLOAD: u16 = 1232;

const NOERROR: u8 = 0;
const FORMERR: u8 = 1;
const NXDOMAIN: u8 = 3;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;

fn respond<'a>(query: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let out = ctx.reply_buffer();
    match answer(query, out) {
        Some(len) => Reply::Send(&out[..len]),
        None => Reply::Nothing,
    }
}

wasmgate_sdk::handler!(respond);

/// Writes the response to `query` into `out` and returns its length, or `None`
/// when the datagram deserves no reply.
fn answer(query: &[u8], out: &mut [u8]) -> Option<usize> {
    let header = query.get(..HEADER)?;
    if header[2] & 0x80 != 0 {
        return None; // A response: answering it could start a loop between servers.
    }
    let opcode = (header[2] >> 3) & 0x0f;
    let recursion_desired = header[2] & 0x01;
    let mut w = Writer {
        out,
        len: 0,
        edns: false,
    };
    w.put(&header[..2]); // ID
    // QR, the query's opcode and RD; AA and RCODE are set below.
    w.put(&[0x80 | (opcode << 3) | recursion_desired, 0]);
    w.put(&[0; 8]); // QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
    if opcode != 0 {
        return Some(w.finish(NOTIMP, false, 0, 0, 0));
    }
    if u16::from_be_bytes([header[4], header[5]]) != 1 {
        return Some(w.finish(FORMERR, false, 0, 0, 0));
    }
    let Some(question) = Question::parse(query) else {
        return Some(w.finish(FORMERR, false, 0, 0, 0));
    };
    w.put(&query[HEADER..question.end]);
    w.edns = has_opt_record(query, question.end);
    if question.class != CLASS_IN {
        return Some(w.finish(REFUSED, false, 1, 0, 0));
    }
    let Some(apex) = question.apex else {
        return Some(w.finish(NXDOMAIN, false, 1, 0, 0));
    };
    // Names in the response point back into the question (RFC 1035 §4.1.4).
    let name = pointer(HEADER);
    if question.kind == TYPE_A || question.kind == TYPE_ANY {
        w.record(name, TYPE_A, &ADDRESS);
        return Some(w.finish(NOERROR, true, 1, 1, 0));
    }
    let apex = pointer(apex);
    w.put(&apex);
    w.put(&TYPE_SOA.to_be_bytes());
    w.put(&CLASS_IN.to_be_bytes());
    w.put(&TTL.to_be_bytes());
    let rdata_len = (3 + 2) + (11 + 2) + 5 * 4;
    w.put(&(rdata_len as u16).to_be_bytes());
    w.put(b"\x02ns");
    w.put(&apex); // MNAME ns.wasmgate.test
    w.put(b"\x0ahostmaster");
    w.put(&apex); // RNAME hostmaster.wasmgate.test
    for value in [1, 3600, 600, 86_400, TTL] {
        w.put(&u32::to_be_bytes(value)); // SERIAL REFRESH RETRY EXPIRE MINIMUM
    }
    Some(w.finish(NOERROR, true, 1, 0, 1))
}

/// Whether the records after the question include an OPT record in the additional
/// section. A record that cannot be parsed ends the search: EDNS is then not used.
fn has_opt_record(query: &[u8], mut at: usize) -> bool {
    let count = |i: usize| u16::from_be_bytes([query[i], query[i + 1]]) as usize;
    let (answers, authority, additional) = (count(6), count(8), count(10));
    for index in 0..answers + authority + additional {
        // The owner name: labels, ending in a root label or a compression pointer.
        loop {
            let Some(&len) = query.get(at) else { return false };
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + len as usize;
            if len == 0 {
                break;
            }
        }
        let Some(fixed) = query.get(at..at + 10) else {
            return false;
        };
        if index >= answers + authority && u16::from_be_bytes([fixed[0], fixed[1]]) == TYPE_OPT {
            return true;
        }
        at += 10 + u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
    }
    false
}

/// A compression pointer to `offset` in the message.
fn pointer(offset: usize) -> [u8; 2] {
    (0xc000 | offset as u16).to_be_bytes()
}

struct Question {
    /// Where the question section ends in the query.
    end: usize,
    kind: u16,
    class: u16,
    /// Where the zone's name starts inside the question, if the name is in the zone.
    apex: Option<usize>,
}

impl Question {
    /// Parses the one question after the header: uncompressed labels, then type
    /// and class. `None` if it is malformed.
    fn parse(query: &[u8]) -> Option<Self> {
        let mut labels = [0usize; 128];
        let mut count = 0;
        let mut at = HEADER;
        loop {
            let len = *query.get(at)? as usize;
            if len == 0 {
                break;
            }
            if len > 63 || count == labels.len() {
                return None; // Compression pointers and reserved label types have no place here.
            }
            query.get(at + 1..at + 1 + len)?;
            labels[count] = at;
            count += 1;
            at += 1 + len;
        }
        if at + 1 - HEADER > 255 {
            return None;
        }
        let fixed = query.get(at + 1..at + 5)?;
        let in_zone = count >= ZONE.len()
            && ZONE
                .iter()
                .zip(&labels[count - ZONE.len()..count])
                .all(|(zone, &start)| {
                    let label = &query[start + 1..start + 1 + query[start] as usize];
                    label.eq_ignore_ascii_case(zone)
                });
        Some(Self {
            end: at + 5,
            kind: u16::from_be_bytes([fixed[0], fixed[1]]),
            class: u16::from_be_bytes([fixed[2], fixed[3]]),
            apex: in_zone.then(|| labels[count - ZONE.len()]),
        })
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
    /// Answer with an OPT record: the query had one.
    edns: bool,
}

impl Writer<'_> {
    /// Appends `bytes`; the reply buffer holds a whole datagram and a response is
    /// at most the question plus two hundred bytes, so this always fits.
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn record(&mut self, name: [u8; 2], kind: u16, data: &[u8]) {
        self.put(&name);
        self.put(&kind.to_be_bytes());
        self.put(&CLASS_IN.to_be_bytes());
        self.put(&TTL.to_be_bytes());
        self.put(&(data.len() as u16).to_be_bytes());
        self.put(data);
    }

    /// Adds the OPT record if the query had one, and sets the response code, the AA
    /// flag and the section counts.
    fn finish(mut self, rcode: u8, authoritative: bool, questions: u16, answers: u16, authority: u16) -> usize {
        let additional = u16::from(self.edns);
        if self.edns {
            // Root owner name, type OPT, class = payload size, TTL = extended RCODE 0,
            // version 0, no flags; no options.
            self.put(&[0]);
            self.put(&TYPE_OPT.to_be_bytes());
            self.put(&EDNS_PAYLOAD.to_be_bytes());
            self.put(&[0; 6]);
        }
        if authoritative {
            self.out[2] |= 0x04;
        }
        self.out[3] = rcode;
        self.out[4..6].copy_from_slice(&questions.to_be_bytes());
        self.out[6..8].copy_from_slice(&answers.to_be_bytes());
        self.out[8..10].copy_from_slice(&authority.to_be_bytes());
        self.out[10..12].copy_from_slice(&additional.to_be_bytes());
        self.len
    }
}
