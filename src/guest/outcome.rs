//! What running a guest on a datagram gives: an [`Answer`] (the reply and what
//! the host calls did) or a [`Rejection`] (why it is dropped).

use std::fmt;

use wasmtime::Trap;

use crate::guest::host::Outbox;
use std::net::SocketAddr;

use crate::verdict::{CallError, ClaimError, DropReason};

/// What a guest made of one datagram: the reply it returned, and what it did
/// through host calls on the way (datagrams `send`, forwards, refusals).
pub struct Answer<'a> {
    /// What `handle` (or `on_reply`) returned; `None` for -1.
    pub reply: Option<&'a [u8]>,
    out: &'a Outbox,
    /// Forwards made by native code, which has no outbox.
    forwarded: u32,
    refused: Option<CallError>,
}

impl<'a> Answer<'a> {
    pub(super) fn new(reply: Option<&'a [u8]>, out: &'a Outbox) -> Self {
        Self {
            reply,
            out,
            forwarded: 0,
            refused: None,
        }
    }

    /// What native code in a guest's place (the benchmarks' baseline) made of
    /// a datagram: `reply`, after `forwarded` forwards, or the refusal of the
    /// forward it tried.
    pub fn native(reply: Option<&'a [u8]>, forwarded: u32, refused: Option<CallError>) -> Self {
        Self {
            reply,
            out: &NO_CALLS,
            forwarded,
            refused,
        }
    }
}

/// What a handler that made no host call shows it did.
pub(super) static NO_CALLS: Outbox = Outbox::EMPTY;

impl Answer<'_> {
    /// The datagrams `send` queued, in order; they go out before the reply.
    pub fn sends(&self) -> impl Iterator<Item = &[u8]> {
        self.out.sends()
    }

    /// Passes every datagram for the client to `emit`: the `send`s, then the
    /// reply. Whether there was any.
    pub fn each_datagram(&self, mut emit: impl FnMut(&[u8])) -> bool {
        let mut any = false;
        for d in self.sends().chain(self.reply) {
            emit(d);
            any = true;
        }
        any
    }

    /// The `forward`/`send` calls made, refused ones included.
    pub fn calls(&self) -> u32 {
        self.out.calls()
    }

    /// How many `forward`/`forward_key` calls handed the datagram to an upstream.
    pub fn forwarded(&self) -> u32 {
        self.out.forwarded + self.forwarded
    }

    /// Inside `on_reply` on a shared pool's answer: the client `reply_to`
    /// named (as received), or why it named none.
    pub fn claimed(&self) -> Result<SocketAddr, DropReason> {
        self.out.claimed.ok_or_else(|| {
            self.out
                .claim_error
                .map_or(DropReason::Unclaimed, ClaimError::drop_reason)
        })
    }

    /// The first refused call: why a datagram that went nowhere was dropped.
    pub fn first_refusal(&self) -> Option<CallError> {
        self.out.first_refusal.or(self.refused)
    }

    /// What the guest noted for the access log (`note`), if anything.
    pub fn note(&self) -> Option<&[u8]> {
        self.out.note.as_deref().filter(|n| !n.is_empty())
    }
}

/// Why a datagram got no reply from the guest, with the error behind it if any.
#[derive(Debug)]
pub struct Rejection {
    pub reason: DropReason,
    pub error: Option<wasmtime::Error>,
}

impl std::error::Error for Rejection {}

impl From<DropReason> for Rejection {
    fn from(reason: DropReason) -> Self {
        Self { reason, error: None }
    }
}

impl From<wasmtime::Error> for Rejection {
    fn from(error: wasmtime::Error) -> Self {
        let reason = match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => DropReason::Timeout,
            _ => DropReason::Trap,
        };
        Self {
            reason,
            error: Some(error),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            DropReason::Timeout => f.write_str("the guest ran past its time budget"),
            DropReason::Trap => match &self.error {
                Some(e) => write!(f, "the guest trapped: {e:#}"),
                None => f.write_str("the guest trapped"),
            },
            DropReason::BadAlloc => f.write_str("`alloc` returned a region outside the guest's memory"),
            DropReason::BadReply => f.write_str("`handle` returned a reply region outside the guest's memory"),
            DropReason::Amplification => f.write_str("the reply is larger than the reply ratio allows for the request"),
            DropReason::Oversize => f.write_str("the request or reply is larger than 65,507 bytes"),
            DropReason::SendError => f.write_str("the reply could not be sent"),
            DropReason::NoReply => f.write_str("the guest sent no reply"),
            DropReason::UnknownPool => f.write_str("the guest forwarded to a pool that does not exist"),
            DropReason::NoHealthyEndpoint => f.write_str("every endpoint of the pool is ejected"),
            DropReason::SessionOverflow => f.write_str("the pool's session limit (max_sessions) is reached"),
            DropReason::UpstreamError => f.write_str("the datagram could not be sent upstream"),
            DropReason::DeniedSource => f.write_str("the source may not be answered"),
            DropReason::Loop => f.write_str("the source sent back what it was sent: a loop"),
            DropReason::ProxyHeader => f.write_str("no valid PROXY v2 header where one must be"),
            DropReason::Unclaimed => f.write_str("`on_reply` named no client for an answer from a shared pool"),
            DropReason::StaleHandle => f.write_str("`on_reply` named a client handle that no client has now"),
            DropReason::WrongEndpoint => {
                f.write_str("`on_reply` named a client whose datagrams did not go to the endpoint that answered")
            }
        }
    }
}
