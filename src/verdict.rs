//! What can happen to a datagram and to a guest's call, as values: drop
//! reasons and call errors with their codes and metric labels. Pure: no
//! wasmtime, no sockets, so every layer can name an outcome.

use std::fmt;

/// The largest UDP payload over IPv4 (65,535 − 8 − 20), and so the largest
/// datagram handed to a guest and the largest reply sent.
pub const MAX_DATAGRAM: usize = 65_507;

/// Why a datagram got no reply. Every datagram received is either replied to or
/// counted under exactly one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The guest ran past its time budget (`--timeout-ms`) and was interrupted.
    Timeout,
    /// The guest trapped: `unreachable`, out-of-bounds access, stack overflow,
    /// the memory cap, a failing host call, or a start function that failed.
    Trap,
    /// `alloc` returned a region that does not lie inside the guest's memory.
    BadAlloc,
    /// `handle` returned a reply region that does not lie inside the guest's memory.
    BadReply,
    /// The reply was larger than `--max-reply-ratio` times the request.
    Amplification,
    /// The request or the reply was larger than one UDP datagram may be (65,507 bytes).
    Oversize,
    /// The reply could not be sent (`sendto` failed).
    SendError,
    /// The guest chose not to reply (`handle` returned -1) and forwarded nothing.
    NoReply,
    /// The guest forwarded only to pools that do not exist, and sent nothing.
    UnknownPool,
    /// The guest forwarded only to pools with every endpoint ejected, and sent nothing.
    NoHealthyEndpoint,
    /// The guest's forwards needed new sessions past `max_sessions`, and it sent nothing.
    SessionOverflow,
    /// The guest's forwards failed at the upstream socket, and it sent nothing.
    UpstreamError,
    /// The source may not be answered (a denied port, the gateway's own socket, an
    /// upstream endpoint): answering could start a loop. The guest never saw it.
    DeniedSource,
    /// The source sent back what this gateway last sent it, many times in a
    /// row: a loop with another gateway (another process or host). The guest
    /// never saw it.
    Loop,
    /// From a trusted proxy (`proxy_protocol_from`) without a valid PROXY v2
    /// header, or naming a client past the proxied clients a worker keeps; from
    /// a pool that speaks the PROXY protocol, an answer with a malformed header.
    /// The guest never saw it.
    ProxyHeader,
    /// An answer on a shared pool's socket that `on_reply` named no client for
    /// (an unknown ID, a duplicate, or no `on_reply` at all).
    Unclaimed,
    /// An answer on a shared pool's socket for which `on_reply` gave a handle
    /// no client has now (expired, or never given).
    StaleHandle,
    /// An answer on a shared pool's socket for a client whose datagrams did not
    /// go to the endpoint that sent it.
    WrongEndpoint,
}

impl DropReason {
    /// Every reason, in the order of [`DropReason::index`].
    pub const ALL: [Self; 18] = [
        Self::Timeout,
        Self::Trap,
        Self::BadAlloc,
        Self::BadReply,
        Self::Amplification,
        Self::Oversize,
        Self::SendError,
        Self::NoReply,
        Self::UnknownPool,
        Self::NoHealthyEndpoint,
        Self::SessionOverflow,
        Self::UpstreamError,
        Self::DeniedSource,
        Self::Loop,
        Self::ProxyHeader,
        Self::Unclaimed,
        Self::StaleHandle,
        Self::WrongEndpoint,
    ];

    /// A stable position in [`DropReason::ALL`], used to index counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The label used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Trap => "trap",
            Self::BadAlloc => "bad_alloc",
            Self::BadReply => "bad_reply",
            Self::Amplification => "amplification",
            Self::Oversize => "oversize",
            Self::SendError => "send_error",
            Self::NoReply => "no_reply",
            Self::UnknownPool => "unknown_pool",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::SessionOverflow => "session_overflow",
            Self::UpstreamError => "upstream_error",
            Self::DeniedSource => "denied_source",
            Self::Loop => "loop",
            Self::ProxyHeader => "proxy_header",
            Self::Unclaimed => "unclaimed",
            Self::StaleHandle => "stale_handle",
            Self::WrongEndpoint => "wrong_endpoint",
        }
    }

    /// Whether the guest misbehaved, so that its instance can no longer be trusted
    /// and must be replaced before the next datagram.
    pub const fn poisons_instance(self) -> bool {
        matches!(self, Self::Timeout | Self::Trap | Self::BadAlloc | Self::BadReply)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most a guest's text (a `log` call, a WASI command's stderr, a
/// component's stdout and stderr) gives the log per datagram, in bytes; the
/// rest is cut off, never a reason to fail the handler.
pub const OUTPUT_CAP: usize = 1024;

/// How many `forward`, `forward_key` and `send` calls one datagram (or one
/// upstream reply) may make; later calls are refused with [`CallError::TooMany`].
pub const MAX_CALLS_PER_DATAGRAM: u32 = 64;

/// Bytes of a guest's `note` (for the access log) that are kept.
pub const MAX_NOTE: usize = 256;

/// What one call may do: bytes to the client (`send` and the reply together)
/// and `forward`/`send` calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    pub bytes: usize,
    pub calls: u32,
}

impl Allowance {
    /// A client datagram of `len` bytes: `max_ratio` × `len` (no cap when the
    /// ratio is 0) and [`MAX_CALLS_PER_DATAGRAM`] calls.
    pub fn for_request(len: usize, max_ratio: f64) -> Self {
        Self {
            bytes: if max_ratio > 0.0 {
                (max_ratio * len as f64).floor() as usize
            } else {
                usize::MAX
            },
            calls: MAX_CALLS_PER_DATAGRAM,
        }
    }
}

/// Why a `forward`, `forward_key` or `send` call was refused. The guest gets
/// [`CallError::code`]; the gateway counts each refusal under [`CallError::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No pool has that name.
    UnknownPool,
    /// Every endpoint of the pool is ejected.
    NoHealthyEndpoint,
    /// The pool's session limit is reached and the client has no session yet.
    SessionOverflow,
    /// The data is larger than one datagram (65,507 bytes).
    Oversize,
    /// Called where there is no client: in the start function.
    NoClient,
    /// The upstream socket could not be opened or refused the datagram.
    UpstreamError,
    /// `send`: the datagram would take the answers to this datagram past
    /// `--max-reply-ratio` × its size.
    Amplification,
    /// More than [`MAX_CALLS_PER_DATAGRAM`] calls for one datagram.
    TooMany,
}

impl CallError {
    /// Every refusal, in the order of their counters.
    pub const ALL: [Self; 8] = [
        Self::UnknownPool,
        Self::NoHealthyEndpoint,
        Self::SessionOverflow,
        Self::Oversize,
        Self::NoClient,
        Self::UpstreamError,
        Self::Amplification,
        Self::TooMany,
    ];

    /// What the guest gets back: -1 to -8, in the order of [`CallError::ALL`].
    pub const fn code(self) -> i32 {
        -(self as i32) - 1
    }

    /// A stable position in [`CallError::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The label used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownPool => "unknown_pool",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::SessionOverflow => "session_overflow",
            Self::Oversize => "oversize",
            Self::NoClient => "no_client",
            Self::UpstreamError => "upstream_error",
            Self::Amplification => "amplification",
            Self::TooMany => "too_many_calls",
        }
    }

    /// The drop reason of a datagram whose every forward was refused like this
    /// and that got no reply.
    pub const fn drop_reason(self) -> DropReason {
        match self {
            Self::UnknownPool => DropReason::UnknownPool,
            Self::NoHealthyEndpoint => DropReason::NoHealthyEndpoint,
            Self::SessionOverflow => DropReason::SessionOverflow,
            Self::Oversize => DropReason::Oversize,
            Self::Amplification => DropReason::Amplification,
            Self::NoClient | Self::UpstreamError | Self::TooMany => DropReason::UpstreamError,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `reply_to` named no client for an answer from a shared pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimError {
    /// No client has that handle now: never given, expired, or its slot reused.
    Stale,
    /// The client's datagrams did not go to the endpoint that answered.
    WrongEndpoint,
}

impl ClaimError {
    /// What the guest gets back: -15 or -16 (after the state codes).
    pub const fn code(self) -> i32 {
        match self {
            Self::Stale => -15,
            Self::WrongEndpoint => -16,
        }
    }

    pub const fn drop_reason(self) -> DropReason {
        match self {
            Self::Stale => DropReason::StaleHandle,
            Self::WrongEndpoint => DropReason::WrongEndpoint,
        }
    }
}

/// Why a metric call did nothing. The guest gets [`MetricError::code`]; the
/// gateway counts each under [`MetricError::as_str`]. A call past the
/// datagram's limit is refused as `too_many_calls` (-8) instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricError {
    /// A name, label or label value breaks the rules (docs/ABI.md, "Metrics"),
    /// the label values do not match the definition, the value does not fit
    /// the metric (a counter going down, NaN), or the call does not fit its kind.
    Invalid,
    /// The name is defined with another kind, labels or buckets.
    Conflict,
    /// No metric has that id.
    Unknown,
    /// The listener's metric definitions (or cells) are all taken.
    Cap,
    /// More calls for one datagram than allowed (ABI v1: -8, as for every verb).
    TooManyCalls,
}

impl MetricError {
    /// The refusals counted by the metrics (`too_many_calls` is counted
    /// with the other verbs').
    pub const ALL: [Self; 4] = [Self::Invalid, Self::Conflict, Self::Unknown, Self::Cap];

    /// What the guest gets back: -17 to -20 (after the client-handle codes), -8.
    pub const fn code(self) -> i32 {
        match self {
            Self::TooManyCalls => CallError::TooMany.code(),
            _ => -(self as i32) - 17,
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::Unknown => "unknown_metric",
            Self::Cap => "cap",
            Self::TooManyCalls => "too_many_calls",
        }
    }
}

/// Why a state call did nothing. Each has a negative code in the guest ABI
/// (docs/ABI.md), after the forwarding codes; -8 (`too_many_calls`) is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// More state, forwarding and send calls for one datagram than allowed.
    TooManyCalls,
    /// No such key, or it expired.
    NotFound,
    /// No room: the store is at its bounds and nothing with a TTL is left to evict.
    Full,
    /// The key is longer than [`crate::state::MAX_KEY`].
    KeyTooLong,
    /// The value is longer than [`crate::state::MAX_VALUE`].
    ValueTooLong,
    /// `cas`: the value was not the one expected.
    Mismatch,
    /// `incr`: the value is not an 8-byte counter.
    NotACounter,
}

impl StateError {
    pub const ALL: [Self; 7] = [
        Self::TooManyCalls,
        Self::NotFound,
        Self::Full,
        Self::KeyTooLong,
        Self::ValueTooLong,
        Self::Mismatch,
        Self::NotACounter,
    ];

    /// The ABI v1 return code.
    pub const fn code(self) -> i32 {
        match self {
            // The forwarding calls' own: one allowance counts them all.
            Self::TooManyCalls => CallError::TooMany.code(),
            Self::NotFound => -9,
            Self::Full => -10,
            Self::KeyTooLong => -11,
            Self::ValueTooLong => -12,
            Self::Mismatch => -13,
            Self::NotACounter => -14,
        }
    }

    /// The label used in logs, and the WIT enum's case.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TooManyCalls => "too_many_calls",
            Self::NotFound => "not_found",
            Self::Full => "full",
            Self::KeyTooLong => "key_too_long",
            Self::ValueTooLong => "value_too_long",
            Self::Mismatch => "mismatch",
            Self::NotACounter => "not_a_counter",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cases of the WIT enum `name`, in order, as our labels spell them.
    fn wit_enum(name: &str) -> Vec<String> {
        let wit = include_str!("../wit/handler.wit");
        let start = wit.find(&format!("enum {name} {{")).expect("the WIT has the enum");
        let body = &wit[start..start + wit[start..].find('}').expect("the enum ends")];
        body.lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .map(|l| l.trim_end_matches(',').replace('-', "_"))
            .collect()
    }

    /// The guest sees a call error as a code (ABI v1, the Rust SDK) or as a case
    /// of the WIT enum (components): all three must list them in one order.
    #[test]
    fn call_errors_are_in_the_order_of_the_wit_enum_and_the_sdk_codes() {
        let ours: Vec<&str> = CallError::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(wit_enum("call-error"), ours);

        let sdk = include_str!("../guest/sdk/src/lib.rs");
        for e in CallError::ALL {
            let arm = format!("{} => Self::{e:?},", e.code());
            assert!(sdk.contains(&arm), "the SDK has no `{arm}`");
        }
        let codes: Vec<i32> = CallError::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [-1, -2, -3, -4, -5, -6, -7, -8]);
    }

    /// The same for the state calls' errors: the WIT `state-error` enum in
    /// order, the SDK's codes, and -8 shared with the forwarding calls.
    #[test]
    fn state_errors_are_in_the_order_of_the_wit_enum_and_the_sdk_codes() {
        let ours: Vec<&str> = StateError::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(wit_enum("state-error"), ours);
        let codes: Vec<i32> = StateError::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [-8, -9, -10, -11, -12, -13, -14]);
        assert_eq!(StateError::TooManyCalls.code(), CallError::TooMany.code());
        let sdk = include_str!("../guest/sdk/src/lib.rs");
        for code in [-8, -10, -11, -12, -14] {
            assert!(
                sdk.contains(&format!("{code} => Self::")),
                "the SDK does not map {code}"
            );
        }
    }

    #[test]
    fn every_reason_has_its_own_index_and_label() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::ALL.len());
    }
}
