//! What the session table hands the worker to do, as values: [`Command`]s
//! (open, send, close) in the order they must be done, told back by
//! [`Applied`], and the queue that holds them with their bytes until the
//! worker polls (`Sessions::poll_commands`).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use super::pools::EndpointCounters;

/// A session, named for as long as the table lives: ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl SessionId {
    /// The id as a number (the worker's poller token is derived from it).
    pub const fn raw(self) -> u64 {
        self.0
    }

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// Socket work for the worker, in the order it must be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Open a socket connected to `to` for session `id`.
    Open { id: SessionId, to: SocketAddr },
    /// Send `datagram` on session `id`'s socket.
    Send { id: SessionId, datagram: &'a [u8] },
    /// Close session `id`'s socket (if it has one).
    Close { id: SessionId },
}

/// What applying a [`Command`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// ICMP port unreachable: nothing listens at the endpoint.
    Refused,
    /// Any other failure (no socket, no descriptor, no buffer).
    Failed,
}

/// A command as queued; datagram and key bytes live in the table's arena.
pub(super) enum Queued {
    Open {
        id: SessionId,
        to: SocketAddr,
    },
    Send {
        id: SessionId,
        bytes: Range<usize>,
        /// The endpoint's counters, for a session closed before its send is applied.
        counters: Arc<EndpointCounters>,
        /// How the guest asked for it, to forward it once more if it is refused.
        retry: Option<Retry>,
    },
    Close {
        id: SessionId,
    },
}

/// How the guest asked for a send, to forward it once more if it is refused.
pub(super) struct Retry {
    pub(super) client: SocketAddr,
    pub(super) pool: usize,
    pub(super) key: Option<Range<usize>>,
}

/// The commands queued since the last poll, their datagram and key bytes
/// in one arena; both allocations are kept from poll to poll.
#[derive(Default)]
pub(super) struct Queue {
    items: Vec<Queued>,
    arena: Vec<u8>,
}

impl Queue {
    /// Keeps `bytes` until the commands are applied; where they are.
    pub(super) fn stash(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.arena.len();
        self.arena.extend_from_slice(bytes);
        start..self.arena.len()
    }

    /// As [`Queue::stash`], behind what `prefix` appends (a header).
    pub(super) fn stash_with(&mut self, bytes: &[u8], prefix: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
        let start = self.arena.len();
        prefix(&mut self.arena);
        self.arena.extend_from_slice(bytes);
        start..self.arena.len()
    }

    pub(super) fn push(&mut self, queued: Queued) {
        self.items.push(queued);
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The datagrams of the sends queued after `mark`, in order.
    pub(super) fn sends_since(&self, mark: usize) -> impl Iterator<Item = &[u8]> {
        self.items
            .get(mark..)
            .unwrap_or_default()
            .iter()
            .filter_map(|q| match q {
                Queued::Send { bytes, .. } => self.arena.get(bytes.clone()),
                _ => None,
            })
    }

    /// Everything queued, to apply while new commands queue behind it; give
    /// the allocations back with [`Queue::recycle`].
    pub(super) fn take(&mut self) -> (Vec<Queued>, Vec<u8>) {
        (std::mem::take(&mut self.items), std::mem::take(&mut self.arena))
    }

    /// Keeps the larger allocations for the next round, unless more was
    /// queued meanwhile.
    pub(super) fn recycle(&mut self, items: Vec<Queued>, mut arena: Vec<u8>) {
        if self.items.is_empty() {
            self.items = items;
        }
        if self.arena.is_empty() {
            arena.clear();
            self.arena = arena;
        }
    }
}
