//! What one client with sessions has earned and spent, and when it has
//! proven its address: the amplification rule and the call allowance of
//! `on_reply`, per client.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::verdict::{Allowance, MAX_CALLS_PER_DATAGRAM};

/// Client datagrams sent after the first answer that make a client count as
/// having proven its address: a spoofer does not see the answers it causes, a
/// real client goes on talking. Until then its answers are held to the reply
/// ratio, and its sessions are cheap: they end after `unanswered_timeout` and
/// are the first closed to make room. An upstream's answer proves nothing about
/// the client (a resolver answers spoofed queries too); only the client's own
/// datagrams after it do.
pub const VALIDATED_AFTER: u32 = 2;

/// What one client with sessions has earned and spent: the upstream answers it
/// may be sent, and the `forward`/`send` calls `on_reply` may still make for
/// it. Kept while the client has a session.
#[derive(Debug)]
pub(super) struct Ledger {
    /// Bytes the client sent (its datagrams that reached the guest).
    pub(super) received: u64,
    /// Bytes of upstream answers (through `on_reply` or straight) sent to it.
    pub(super) sent: u64,
    /// Whether any answer was sent to it.
    pub(super) answered: bool,
    /// Its datagrams after the first answer.
    pub(super) after_answer: u32,
    /// Calls `on_reply` may still make until the client's next datagram.
    pub(super) calls_left: u32,
    pub(super) sessions: u32,
}

impl Ledger {
    pub(super) fn new(received: usize) -> Self {
        Self {
            received: received as u64,
            sent: 0,
            answered: false,
            after_answer: 0,
            calls_left: MAX_CALLS_PER_DATAGRAM,
            sessions: 0,
        }
    }

    /// Whether the client proved its address ([`VALIDATED_AFTER`]).
    pub(super) fn validated(&self) -> bool {
        self.after_answer >= VALIDATED_AFTER
    }

    pub(super) fn on_datagram(&mut self, len: usize) {
        self.received = self.received.saturating_add(len as u64);
        if self.answered {
            self.after_answer = self.after_answer.saturating_add(1);
        }
        self.calls_left = MAX_CALLS_PER_DATAGRAM;
    }

    /// Bytes the client may still be sent: `ratio` × what it sent, less what it
    /// was sent; no cap once it is validated or with a ratio of 0.
    pub(super) fn bytes_left(&self, ratio: f64) -> usize {
        if ratio <= 0.0 || self.validated() {
            return usize::MAX;
        }
        let earned = (ratio * self.received as f64).floor() as u64;
        usize::try_from(earned.saturating_sub(self.sent)).unwrap_or(usize::MAX)
    }

    pub(super) fn charge(&mut self, bytes: usize, calls: u32) {
        if bytes > 0 {
            self.sent = self.sent.saturating_add(bytes as u64);
            self.answered = true;
        }
        self.calls_left = self.calls_left.saturating_sub(calls);
    }
}

/// The ledgers of a worker's clients with sessions.
#[derive(Debug)]
pub(super) struct Ledgers {
    by_client: HashMap<SocketAddr, Ledger>,
    /// The size of the client datagram being handled, for a new ledger.
    client_len: usize,
    /// The listener's `max_reply_ratio`, which holds for upstream answers too.
    max_ratio: f64,
}

impl Ledgers {
    pub(super) fn new(max_ratio: f64) -> Self {
        Self {
            by_client: HashMap::new(),
            client_len: 0,
            max_ratio,
        }
    }

    /// A datagram of `len` bytes from `client` is about to reach the guest.
    pub(super) fn on_datagram(&mut self, client: SocketAddr, len: usize) {
        self.client_len = len;
        if let Some(ledger) = self.by_client.get_mut(&client) {
            ledger.on_datagram(len);
        }
    }

    /// What an upstream answer to `client` may still bring it.
    pub(super) fn allowance(&self, client: SocketAddr) -> Allowance {
        self.by_client
            .get(&client)
            .map_or(Allowance { bytes: 0, calls: 0 }, |l| Allowance {
                bytes: l.bytes_left(self.max_ratio),
                calls: l.calls_left,
            })
    }

    pub(super) fn charge(&mut self, client: SocketAddr, bytes: usize, calls: u32) {
        if let Some(ledger) = self.by_client.get_mut(&client) {
            ledger.charge(bytes, calls);
        }
    }

    /// A session of `client` opened: its ledger starts with the datagram
    /// being handled, if it had none.
    pub(super) fn opened(&mut self, client: SocketAddr) {
        let len = self.client_len;
        self.by_client
            .entry(client)
            .or_insert_with(|| Ledger::new(len))
            .sessions += 1;
    }

    /// A session of `client` closed: its ledger goes with its last session.
    pub(super) fn closed(&mut self, client: SocketAddr) {
        if let Some(ledger) = self.by_client.get_mut(&client) {
            ledger.sessions -= 1;
            if ledger.sessions == 0 {
                self.by_client.remove(&client);
            }
        }
    }

    /// Whether `client` proved its address.
    pub(super) fn validated(&self, client: SocketAddr) -> bool {
        self.by_client.get(&client).is_some_and(Ledger::validated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_held_to_the_ratio_until_it_talks_on_after_an_answer() {
        let mut l = Ledger::new(20);
        assert_eq!(l.bytes_left(3.0), 60);
        l.charge(50, 0);
        assert_eq!(l.bytes_left(3.0), 10);
        // Its own datagrams earn more, and count toward proving its address.
        l.on_datagram(10);
        assert_eq!(l.bytes_left(3.0), 40);
        l.on_datagram(10);
        assert_eq!(l.after_answer, VALIDATED_AFTER);
        assert_eq!(l.bytes_left(3.0), usize::MAX);
        // No ratio: no cap from the start.
        assert_eq!(Ledger::new(1).bytes_left(0.0), usize::MAX);
        // Datagrams before any answer prove nothing.
        let mut spoofed = Ledger::new(10);
        for _ in 0..10 {
            spoofed.on_datagram(10);
        }
        assert_eq!(spoofed.bytes_left(3.0), 330);
    }

    #[test]
    fn on_reply_calls_come_from_one_allowance_that_the_clients_datagram_renews() {
        let mut l = Ledger::new(5);
        l.charge(0, 40);
        l.charge(0, 40);
        assert_eq!(l.calls_left, 0);
        l.on_datagram(5);
        assert_eq!(l.calls_left, MAX_CALLS_PER_DATAGRAM);
    }
}
