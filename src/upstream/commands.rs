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

/// Who applies the commands: the worker's sockets, or a stand-in (the offline
/// driver, tests), for which a closure applying one command at a time does.
pub trait Apply {
    fn apply(&mut self, command: Command<'_>) -> Applied;

    /// Sends each of `sends` (a session and its datagram), in order, pushing
    /// what became of each onto `fates`: one at a time, unless the sockets can
    /// send many in one system call.
    fn send_all<'b>(
        &mut self,
        sends: impl ExactSizeIterator<Item = (SessionId, &'b [u8])> + Clone,
        fates: &mut Vec<Applied>,
    ) {
        for (id, datagram) in sends {
            fates.push(self.apply(Command::Send { id, datagram }));
        }
    }
}

impl<F: FnMut(Command<'_>) -> Applied> Apply for F {
    fn apply(&mut self, command: Command<'_>) -> Applied {
        self(command)
    }
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
    Open { id: SessionId, to: SocketAddr },
    Send(QueuedSend),
    Close { id: SessionId },
}

/// A send as queued.
pub(super) struct QueuedSend {
    pub(super) id: SessionId,
    pub(super) bytes: Range<usize>,
    /// The endpoint's counters, for a session closed before its send is applied.
    pub(super) counters: Arc<EndpointCounters>,
    /// How the guest asked for it, to forward it once more if it is refused.
    pub(super) retry: Option<Retry>,
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
    /// The sends of a poll gathered to go out together, and their fates.
    sends: Vec<QueuedSend>,
    fates: Vec<Applied>,
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
                Queued::Send(send) => self.arena.get(send.bytes.clone()),
                _ => None,
            })
    }

    /// The session of the first send queued after `mark`.
    pub(super) fn first_send_since(&self, mark: usize) -> Option<SessionId> {
        self.items.get(mark..)?.iter().find_map(|q| match q {
            Queued::Send(send) => Some(send.id),
            _ => None,
        })
    }

    /// Everything queued, to apply while new commands queue behind it; give
    /// the allocations back with [`Queue::recycle`].
    pub(super) fn take(&mut self) -> (Vec<Queued>, Vec<u8>) {
        (std::mem::take(&mut self.items), std::mem::take(&mut self.arena))
    }

    /// The vectors a poll gathers its sends and their fates in (empty); give
    /// them back with [`Queue::give_scratch`].
    pub(super) fn take_scratch(&mut self) -> (Vec<QueuedSend>, Vec<Applied>) {
        (std::mem::take(&mut self.sends), std::mem::take(&mut self.fates))
    }

    pub(super) fn give_scratch(&mut self, sends: Vec<QueuedSend>, fates: Vec<Applied>) {
        (self.sends, self.fates) = (sends, fates);
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
