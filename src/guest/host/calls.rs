//! The store's [`Calls`] and its [`Outbox`], the forwarding verbs, `log` and
//! `peer`; the view a kind's store data gives them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use wasmtime::Memory;

use crate::guest::instance_limits::InstanceLimits;
use crate::metrics::RateLimit;
use crate::metrics::guest::{GuestMetrics, MetricsWriter};
use crate::state::State;
use crate::upstream::Lent;
use crate::verdict::{
    Allowance, CallError, ClaimError, DropReason, MAX_CALLS_PER_DATAGRAM, MAX_DATAGRAM, MAX_NOTE, OUTPUT_CAP,
};

/// What a kind's store data gives the host calls: the one [`Calls`] in it.
pub(crate) trait CallsView {
    fn calls(&self) -> &Calls;
    fn calls_mut(&mut self) -> &mut Calls;
}

impl CallsView for Calls {
    fn calls(&self) -> &Calls {
        self
    }

    fn calls_mut(&mut self) -> &mut Calls {
        self
    }
}

/// A store's way to the guest metrics.
#[derive(Debug)]
pub(crate) struct MetricsLink {
    pub(crate) registry: Arc<GuestMetrics>,
    /// The program's serial: a newer program's definition wins a conflict.
    pub(crate) serial: u64,
    /// The worker's writer, lent for the length of one call.
    pub(crate) writer: Option<Box<MetricsWriter>>,
}

/// Per-store host state: what the host functions need to answer a guest.
pub(crate) struct Calls {
    pub(crate) limits: InstanceLimits,
    /// The client whose datagram is being handled; `None` while the start function runs.
    pub(crate) peer: Option<SocketAddr>,
    /// Shared by every instance, so a chatty guest cannot flood the log.
    pub(crate) log_limit: Arc<RateLimit>,
    /// The worker's sessions, lent to the store for the length of one call.
    pub(crate) sessions: Lent,
    /// What the guest asked for during the call in progress.
    pub(crate) out: Outbox,
    /// Inside `on_reply`: the endpoint that sent the datagram, as `POOL/ip:port`.
    pub(crate) upstream: String,
    /// The listener's shared state (`state_*`, `limit`, `penalize`).
    pub(crate) state: Arc<State>,
    /// An ABI v1 instance's `memory`, kept once it is instantiated: looking
    /// the export up by name on every host call costs more than the call.
    pub(crate) memory: Option<Memory>,
    /// The state's clock, read at the datagram's first state call and kept
    /// for the rest: it ticks in milliseconds, and a call costs less than a
    /// clock read.
    pub(crate) now: Option<u64>,
    /// The listener's guest metrics (the module's role), and the worker's writer.
    pub(crate) metrics: MetricsLink,
}

impl Calls {
    /// Readies the state for one call about `peer`'s datagram: lends it the
    /// worker's sessions, empties the outbox with `budget` bytes for the client,
    /// and (inside `on_reply`) names the endpoint. [`Calls::take_back`] ends it.
    /// With no `peer` (a shared pool's answer), the guest names the client
    /// with [`Calls::reply_to`].
    pub(crate) fn lend(
        &mut self,
        peer: Option<SocketAddr>,
        sessions: &mut Lent,
        writer: &mut Option<Box<MetricsWriter>>,
        allowance: Allowance,
        upstream: &str,
    ) {
        self.peer = peer;
        self.sessions = sessions.take();
        self.metrics.writer = writer.take();
        self.out.reset(allowance);
        self.now = None;
        self.upstream.push_str(upstream);
    }

    /// Gives the sessions and the writer back after a call, whatever its outcome.
    pub(crate) fn take_back(&mut self, sessions: &mut Lent, writer: &mut Option<Box<MetricsWriter>>) {
        *sessions = self.sessions.take();
        *writer = self.metrics.writer.take();
        self.upstream.clear();
    }

    /// Logs a guest's message at its level (0 error .. 4 or more trace), cut to
    /// 1 KiB, rate-limited, with the client it is about: `log` for every kind of guest.
    pub(crate) fn log(&self, level: i32, bytes: &[u8]) {
        let level = match level {
            i32::MIN..=0 => tracing::Level::ERROR,
            1 => tracing::Level::WARN,
            2 => tracing::Level::INFO,
            3 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        };
        let enabled = match level {
            tracing::Level::ERROR => tracing::enabled!(target: "wasmgate::guest", tracing::Level::ERROR),
            tracing::Level::WARN => tracing::enabled!(target: "wasmgate::guest", tracing::Level::WARN),
            tracing::Level::INFO => tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO),
            tracing::Level::DEBUG => tracing::enabled!(target: "wasmgate::guest", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "wasmgate::guest", tracing::Level::TRACE),
        };
        if !enabled {
            return;
        }
        let Some(suppressed) = self.log_limit.allow() else {
            return;
        };
        // Control characters are escaped by the log formatter (text) or by JSON.
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_CAP)]);
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "wasmgate::guest", $lvl, %peer, suppressed, "{text}")
            };
        }
        match level {
            tracing::Level::ERROR => emit!(tracing::Level::ERROR),
            tracing::Level::WARN => emit!(tracing::Level::WARN),
            tracing::Level::INFO => emit!(tracing::Level::INFO),
            tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
            _ => emit!(tracing::Level::TRACE),
        }
    }

    /// `forward`/`forward_key` for every kind of guest: hands `data` to an
    /// endpoint of `pool` for the current client, or says why not (and counts
    /// the refusal).
    pub(crate) fn forward(&mut self, pool: &[u8], key: Option<&[u8]>, data: &[u8]) -> Result<(), CallError> {
        let result = self.out.count_call().and_then(|()| {
            if self.peer.is_none() {
                return Err(CallError::NoClient);
            }
            if data.len() > MAX_DATAGRAM {
                return Err(CallError::Oversize);
            }
            match self.sessions.as_mut() {
                Some(sessions) => sessions.forward(pool, key, data),
                None => Err(CallError::UnknownPool),
            }
        });
        match result {
            Ok(()) => self.out.forwarded += 1,
            Err(error) => self.out.refuse(error),
        }
        result
    }

    /// `client` for every kind of guest: the current client's handle, which
    /// `on_reply` gives [`Calls::reply_to`] to answer it from a shared pool.
    pub(crate) fn client(&mut self) -> Result<u64, CallError> {
        let result = self.out.count_call().and_then(|()| {
            if self.peer.is_none() {
                return Err(CallError::NoClient);
            }
            match self.sessions.as_mut() {
                Some(sessions) => sessions.client_handle(),
                None => Err(CallError::UnknownPool),
            }
        });
        if let Err(error) = result {
            self.out.refuse(error);
        }
        result
    }

    /// `reply_to` for every kind of guest: inside `on_reply`, the answer is
    /// for the client of `handle`, whose allowance the reply and `send`s then
    /// draw from. Once per call (a second is refused as `too_many_calls`,
    /// unless it names the same client).
    pub(crate) fn reply_to(&mut self, handle: u64) -> Result<(), ReplyToError> {
        let counted = self
            .out
            .count_call()
            .and_then(|()| self.sessions.as_mut().ok_or(CallError::UnknownPool));
        let sessions = match counted {
            Ok(sessions) => sessions,
            Err(error) => {
                self.out.refuse(error);
                return Err(error.into());
            }
        };
        match sessions.claim(handle) {
            Ok((client, allowance)) => {
                if self.out.claimed.is_some_and(|c| c != client) {
                    self.out.refuse(CallError::TooMany);
                    return Err(CallError::TooMany.into());
                }
                if self.out.claimed.is_none() {
                    self.out.claim(client, allowance);
                }
                self.peer = Some(crate::net::unmapped(client));
                Ok(())
            }
            Err(error) => {
                self.out.claim_error.get_or_insert(error);
                Err(ReplyToError::Claim(error))
            }
        }
    }

    /// `note` for every kind of guest: a short text about this datagram for the
    /// access log (`--access-log`), cut to [`MAX_NOTE`] bytes; a later note
    /// replaces it. Counted against the datagram's calls.
    pub(crate) fn note(&mut self, text: &[u8]) -> Result<(), CallError> {
        if let Err(error) = self.out.count_call() {
            self.out.refuse(error);
            return Err(error);
        }
        // The buffer is kept from datagram to datagram: no allocation after the first.
        let note = self.out.note.get_or_insert_with(|| Vec::with_capacity(MAX_NOTE));
        note.clear();
        note.extend_from_slice(&text[..text.len().min(MAX_NOTE)]);
        Ok(())
    }

    /// `send` for every kind of guest: queues one more datagram for the client
    /// within the amplification budget, or says why not (and counts the refusal).
    pub(crate) fn send(&mut self, data: &[u8]) -> Result<(), CallError> {
        let out = &mut self.out;
        let result = out.count_call().and_then(|()| {
            if self.peer.is_none() {
                Err(CallError::NoClient)
            } else if data.len() > MAX_DATAGRAM {
                Err(CallError::Oversize)
            } else if data.len() > out.budget {
                Err(CallError::Amplification)
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                out.budget -= data.len();
                out.data.extend_from_slice(data);
                out.ends.push(out.data.len());
            }
            Err(error) => out.refuse(error),
        }
        result
    }
}

/// Why `reply_to` named no client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplyToError {
    Call(CallError),
    Claim(ClaimError),
}

impl From<CallError> for ReplyToError {
    fn from(error: CallError) -> Self {
        Self::Call(error)
    }
}

impl ReplyToError {
    pub(crate) const fn code(self) -> i32 {
        match self {
            Self::Call(e) => e.code(),
            Self::Claim(e) => e.code(),
        }
    }
}

/// What one call of `handle` or `on_reply` did besides its return value: the
/// datagrams it `send`s (kept here until the call ends), what it forwarded, and
/// what was refused. Its buffers are reused from call to call.
#[derive(Debug)]
pub(crate) struct Outbox {
    data: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes the guest may still send the client for this datagram.
    pub(crate) budget: usize,
    calls: u32,
    /// Calls this call may make (fewer inside a long `on_reply` chain).
    call_limit: u32,
    pub(crate) forwarded: u32,
    /// Refusals by reason, until the worker takes them ([`Outbox::take_refused`]).
    refused: [u32; CallError::ALL.len()],
    /// The first refusal: the reason a datagram that got nowhere is dropped for.
    pub(crate) first_refusal: Option<CallError>,
    /// Inside `on_reply` on a shared pool's answer: the client `reply_to`
    /// named (as received), or why the first `reply_to` named none.
    pub(crate) claimed: Option<SocketAddr>,
    pub(crate) claim_error: Option<ClaimError>,
    /// What `note` said last, cut to [`MAX_NOTE`] bytes, for the access log.
    pub(crate) note: Option<Vec<u8>>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl Outbox {
    /// What a call that made no host call leaves (and a kind without host
    /// calls shows).
    pub(crate) const EMPTY: Self = Self {
        data: Vec::new(),
        ends: Vec::new(),
        budget: 0,
        calls: 0,
        call_limit: MAX_CALLS_PER_DATAGRAM,
        forwarded: 0,
        refused: [0; CallError::ALL.len()],
        first_refusal: None,
        claimed: None,
        claim_error: None,
        note: None,
    };

    /// Empties the outbox for a call with `allowance`.
    pub(crate) fn reset(&mut self, allowance: Allowance) {
        self.data.clear();
        self.ends.clear();
        self.budget = allowance.bytes;
        self.call_limit = allowance.calls.min(MAX_CALLS_PER_DATAGRAM);
        self.calls = 0;
        self.forwarded = 0;
        self.refused = [0; CallError::ALL.len()];
        self.first_refusal = None;
        self.claimed = None;
        self.claim_error = None;
        if let Some(note) = self.note.as_mut() {
            note.clear();
        }
    }

    /// The answer is for `client`: from here on the call draws on its
    /// allowance (the calls already made count against it too).
    fn claim(&mut self, client: SocketAddr, allowance: Allowance) {
        self.claimed = Some(client);
        self.budget = allowance.bytes;
        self.call_limit = allowance
            .calls
            .saturating_add(self.calls)
            .min(self.call_limit)
            .max(self.calls);
    }

    /// The datagrams `send` queued, in order.
    pub(crate) fn sends(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let d = &self.data[start..end];
            start = end;
            d
        })
    }

    /// The refusals counted since they were last taken, by reason; taking them
    /// leaves none, so that each is counted once whatever the call's outcome.
    pub(crate) fn take_refused(&mut self) -> impl Iterator<Item = (CallError, u32)> + use<> {
        let refused = std::mem::take(&mut self.refused);
        CallError::ALL.into_iter().zip(refused).filter(|&(_, n)| n > 0)
    }

    /// Whether a returned reply of `len` bytes fits what is left of the budget
    /// `send` shares. When it does not but sends went out, the reply is refused
    /// like a send (`Ok(false)`) and the sends still go; with no sends the
    /// datagram is dropped for amplification.
    pub(crate) fn admit_reply(&mut self, len: usize) -> Result<bool, DropReason> {
        if len <= self.budget {
            return Ok(true);
        }
        if self.ends.is_empty() {
            return Err(DropReason::Amplification);
        }
        self.refuse(CallError::Amplification);
        Ok(false)
    }

    /// Counts a refused call under its reason.
    pub(crate) fn refuse(&mut self, error: CallError) {
        self.refused[error.index()] += 1;
        self.first_refusal.get_or_insert(error);
    }

    /// The `forward`/`send` calls made, refused ones included.
    pub(crate) fn calls(&self) -> u32 {
        self.calls
    }

    /// Counts a call, refusing it past the call's limit.
    pub(super) fn count_call(&mut self) -> Result<(), CallError> {
        if self.calls >= self.call_limit {
            return Err(CallError::TooMany);
        }
        self.calls += 1;
        Ok(())
    }
}

/// Writes `addr` as `SocketAddr`'s `Display` does, into `buf`; its length.
/// IPv4, by far the most common, with `itoa` and no formatting machinery,
/// which costs more than the rest of the call; guests ask on every datagram.
pub(crate) fn peer_text(addr: &SocketAddr, buf: &mut [u8; 64]) -> std::io::Result<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            // At most "255.255.255.255:65535", 21 bytes.
            let mut digits = itoa::Buffer::new();
            let mut at = 0;
            let mut put = |text: &str| {
                buf[at..at + text.len()].copy_from_slice(text.as_bytes());
                at += text.len();
            };
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    put(".");
                }
                put(digits.format(octet));
            }
            put(":");
            put(digits.format(v4.port()));
            Ok(at)
        }
        SocketAddr::V6(_) => {
            // "[" + 45-char IPv6 + "%" + 10-digit scope + "]:" + 5-digit port fits in 64 bytes.
            let mut cursor = &mut buf[..];
            write!(cursor, "{addr}")?;
            Ok(64 - cursor.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_what_display_writes() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:53",
            "10.20.30.40:8080",
            "255.255.255.255:65535",
            "1.2.3.4:5",
            "[::1]:53",
            "[fe80::1%4294967295]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:1",
        ];
        for text in addrs {
            let addr: SocketAddr = text.parse().unwrap();
            let mut buf = [0u8; 64];
            let len = peer_text(&addr, &mut buf).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), addr.to_string());
        }
        // Every digit count of an octet and of a port.
        for octet in [0u8, 9, 10, 99, 100, 255] {
            for port in [0u16, 9, 10, 99, 100, 999, 1000, 9999, 10000, 65535] {
                let addr = SocketAddr::from(([octet, 255 - octet, octet / 2, 1], port));
                let mut buf = [0u8; 64];
                let len = peer_text(&addr, &mut buf).unwrap();
                assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), addr.to_string());
            }
        }
    }
}
