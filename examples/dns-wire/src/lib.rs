//! The little of the DNS wire format (RFC 1035) that the wasmgate DNS examples
//! need: a message's header and its one question, a response made in place,
//! the key a question is cached and matched under, and the smallest TTL of an
//! answer. `no_std`, no allocator; every read is bounds-checked, so a hostile
//! datagram gives `None`, never a panic.

#![no_std]

pub const HEADER: usize = 12;
/// The header's QR bit (byte 2): a response.
pub const QR: u8 = 0x80;
/// The header's TC bit (byte 2): truncated.
pub const TC: u8 = 0x02;
/// The header's RA bit (byte 3).
pub const RA: u8 = 0x80;

pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// The longest question key: a name of 255 bytes, then type and class.
pub const MAX_KEY: usize = 255 + 4;

/// The header and the one question of a DNS message.
pub struct Question {
    pub id: u16,
    pub response: bool,
    pub truncated: bool,
    pub rcode: u8,
    pub answers: u16,
    /// Where the question section ends.
    pub end: usize,
}

impl Question {
    /// `None` unless the message has a header and exactly one well-formed,
    /// uncompressed question.
    pub fn parse(m: &[u8]) -> Option<Self> {
        let header = m.get(..HEADER)?;
        if u16::from_be_bytes([header[4], header[5]]) != 1 {
            return None;
        }
        let mut at = HEADER;
        loop {
            let len = *m.get(at)? as usize;
            if len > 63 {
                return None; // compression pointers and reserved label types
            }
            at += 1 + len;
            if len == 0 {
                break;
            }
        }
        if at - HEADER > 255 || m.len() < at + 4 {
            return None;
        }
        Some(Self {
            id: u16::from_be_bytes([header[0], header[1]]),
            response: header[2] & QR != 0,
            truncated: header[2] & TC != 0,
            rcode: header[3] & 0x0f,
            answers: u16::from_be_bytes([header[6], header[7]]),
            end: at + 4,
        })
    }

    /// The question as a key: the name in wire form, lowercased, then type
    /// and class. Two queries that differ only in the name's case share it.
    pub fn key<'k>(&self, m: &[u8], out: &'k mut [u8; MAX_KEY]) -> &'k [u8] {
        let question = &m[HEADER..self.end];
        let key = &mut out[..question.len()];
        key.copy_from_slice(question);
        key.make_ascii_lowercase(); // length bytes are below 64: never changed
        key
    }
}

/// Turns the query into a response with `rcode` and no records, in place.
pub fn answer_here(datagram: &mut [u8], question_end: usize, rcode: u8) -> &[u8] {
    datagram[2] |= QR; // keep the opcode and RD
    datagram[3] = RA | rcode;
    datagram[6..HEADER].fill(0); // ANCOUNT, NSCOUNT, ARCOUNT
    &datagram[..question_end]
}

/// The smallest TTL of the answer section's records, in seconds; `None` when
/// there is none or the message is malformed.
pub fn min_answer_ttl(m: &[u8], q: &Question) -> Option<u32> {
    let mut at = q.end;
    let mut min: Option<u32> = None;
    for _ in 0..q.answers {
        at = skip_name(m, at)?;
        let fixed = m.get(at..at + 10)?; // type, class, TTL, RDLENGTH
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlength = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        at += 10 + rdlength;
        if at > m.len() {
            return None;
        }
        min = Some(min.map_or(ttl, |m| m.min(ttl)));
    }
    min
}

/// Takes `secs` off the TTL of every record of a response (answer, authority
/// and additional sections; not the OPT pseudo-record, whose TTL field holds
/// flags), down to 0: a cached answer served as it ages. `None` when a record
/// runs past the message (those before it are aged).
pub fn age_ttls(m: &mut [u8], q: &Question, secs: u32) -> Option<()> {
    let header = m.get(..HEADER)?;
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]) as usize;
    let records = count(6) + count(8) + count(10);
    let mut at = q.end;
    for _ in 0..records {
        at = skip_name(m, at)?;
        let fixed = m.get_mut(at..at + 10)?; // type, class, TTL, RDLENGTH
        if u16::from_be_bytes([fixed[0], fixed[1]]) != OPT {
            let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
            fixed[4..8].copy_from_slice(&ttl.saturating_sub(secs).to_be_bytes());
        }
        let rdlength = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        at += 10 + rdlength;
        if at > m.len() {
            return None;
        }
    }
    Some(())
}

/// The OPT pseudo-record's type (EDNS, RFC 6891).
const OPT: u16 = 41;

/// Where the name at `at` ends: after its zero label, or after the two bytes
/// of a compression pointer.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            1..=63 => at += 1 + len,
            0xc0..=0xff => return Some(at + 2).filter(|&end| end <= m.len()),
            _ => return None,
        }
    }
}

/// Queries forwarded and not yet answered, under the ID each went out with:
/// the client's handle (`Context::client`), the ID the client gave, and a
/// hash of the question. The instance gives every query it forwards an ID of
/// its own, so that clients whose queries share one upstream socket (a shared
/// pool) never share an ID; an answer is matched on its ID and question, once,
/// and goes out with the client's ID again. 65,536 entries (896 KiB): the
/// 65,536th query after one takes its ID, and that query's answer, when it
/// comes, is dropped as a query lost on the network would be.
///
/// IDs are a fixed permutation of a counter: not secret. What a blind spoofer
/// must guess is the ID and the question together with the source port of the
/// upstream socket (random, and re-rolled by a shared pool), and its answer
/// must come from the resolver's address (the host's sockets are connected).
pub struct Outstanding {
    clients: [u64; IDS],
    questions: [u32; IDS],
    ids: [u16; IDS],
    next: u16,
}

const IDS: usize = 1 << 16;

impl Default for Outstanding {
    fn default() -> Self {
        Self::new()
    }
}

impl Outstanding {
    pub const fn new() -> Self {
        Self {
            clients: [0; IDS],
            questions: [0; IDS],
            ids: [0; IDS],
            next: 0,
        }
    }

    /// Gives the query `m` (parsed as `q`) from `client` (a handle's bits,
    /// never 0) an ID of its own, written into `m`.
    pub fn send_as(&mut self, client: u64, m: &mut [u8], q: &Question) {
        self.next = self.next.wrapping_add(1);
        // Odd multiplier: a bijection of u16, so no two of the last 65,536 queries share an ID.
        let id = self.next.wrapping_mul(0x9e37) ^ 0x5bd1;
        let i = usize::from(id);
        self.clients[i] = client;
        self.questions[i] = question_hash(m, q);
        self.ids[i] = q.id;
        m[..2].copy_from_slice(&id.to_be_bytes());
    }

    /// Sends the query `m` (parsed as `q`) from `client` with `send` under an
    /// ID of its own ([`Outstanding::send_as`]); when `send` fails, `m` gets
    /// its client's ID back and nothing is remembered. Whether it went.
    pub fn forward(&mut self, client: u64, m: &mut [u8], q: &Question, send: impl FnOnce(&[u8]) -> bool) -> bool {
        self.send_as(client, m, q);
        let sent = send(m);
        if !sent {
            self.cancel(m);
        }
        sent
    }

    /// Gives `m` (a query [`Outstanding::send_as`] rewrote) its client's ID
    /// back, and forgets it: it was not forwarded after all.
    pub fn cancel(&mut self, m: &mut [u8]) {
        let Some(id) = m.get(..2) else { return };
        let i = usize::from(u16::from_be_bytes([id[0], id[1]]));
        self.clients[i] = 0;
        m[..2].copy_from_slice(&self.ids[i].to_be_bytes());
    }

    /// For the answer `m` (parsed as `q`): the client it is for, with the
    /// client's own ID written back into `m`; `None` when no query went out
    /// under its ID with its question (never sent, answered already, or
    /// given way).
    pub fn take(&mut self, m: &mut [u8], q: &Question) -> Option<u64> {
        let i = usize::from(q.id);
        let client = self.clients[i];
        if client == 0 || self.questions[i] != question_hash(m, q) {
            return None;
        }
        self.clients[i] = 0;
        m[..2].copy_from_slice(&self.ids[i].to_be_bytes());
        Some(client)
    }
}

/// The question's hash, any case.
fn question_hash(m: &[u8], q: &Question) -> u32 {
    let mut key = [0u8; MAX_KEY];
    (hash(q.key(m, &mut key)) >> 32) as u32
}

/// The instance's one [`Outstanding`] table.
static mut OUTSTANDING: Outstanding = Outstanding::new();

/// The instance's forwarded queries. Only from `handle` and `on_reply`, which
/// the host calls one at a time; the reference must not outlive the call.
#[allow(clippy::deref_addrof)]
pub fn outstanding_table() -> &'static mut Outstanding {
    // SAFETY: one call at a time (above), so no other reference is live.
    unsafe { &mut *(&raw mut OUTSTANDING) }
}

/// FNV-1a, 64 bits, never 0 (0 marks a free entry): small and enough to key a table.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}
