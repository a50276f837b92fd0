//! Ending loops between gateways that no local check can see (another
//! process, another host): one spoofed datagram from gateway A's address to
//! gateway B makes B answer A, A answer B, and so on for ever. Both sides of
//! such a loop receive, from the other, exactly the datagram they last sent
//! it. So a worker remembers a hash of the last datagram it sent each source
//! (in a small table, no allocation), and a source that sends it back
//! [`LOOP_AFTER`] times in a row is not answered: the datagram is dropped as
//! `loop`, which ends a loop of one datagram there.
//!
//! A real client that sends back exactly the reply it got, many times in a
//! row, is rare (an echo guest with a client that repeats itself); it loses one
//! datagram in [`LOOP_AFTER`], and its streak starts again. A guest whose
//! replies change on every pass (a counter, a growing datagram) is not caught
//! here; a growing one ends at the datagram size cap.

use std::net::SocketAddr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Echoes in a row after which a source's datagram is dropped as a loop.
pub const LOOP_AFTER: u16 = 16;

/// Slots of the table: sources that hash to the same slot share it, and the
/// later one wins; a loop touches two slots only, and stays in them.
const SLOTS: usize = 1024;

#[derive(Clone, Copy, Default)]
struct Slot {
    source: Option<SocketAddr>,
    /// The hash of the last datagram sent to `source`.
    sent: u64,
    /// Datagrams in a row from `source` equal to what it was last sent.
    streak: u16,
}

/// One worker's memory of what it last sent each source.
pub(crate) struct LoopGuard {
    slots: Box<[Slot; SLOTS]>,
    seed: u64,
}

impl LoopGuard {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            slots: Box::new([Slot::default(); SLOTS]),
            seed,
        }
    }

    fn slot(&mut self, source: SocketAddr) -> &mut Slot {
        let mut key = [0u8; 18];
        let n = match source.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => {
                key[..4].copy_from_slice(&v4.octets());
                4
            }
            std::net::IpAddr::V6(v6) => {
                key[..16].copy_from_slice(&v6.octets());
                16
            }
        };
        key[n..n + 2].copy_from_slice(&source.port().to_be_bytes());
        let i = xxh3_64_with_seed(&key[..n + 2], self.seed) as usize % SLOTS;
        &mut self.slots[i]
    }

    /// `datagram` came from `source`: whether it is the loop's next pass (the
    /// [`LOOP_AFTER`]th echo in a row of what `source` was last sent), so that
    /// it must not be answered. The streak starts again after a drop.
    pub(crate) fn is_loop(&mut self, source: SocketAddr, datagram: &[u8]) -> bool {
        let seed = self.seed;
        let slot = self.slot(source);
        if slot.source != Some(source) {
            return false;
        }
        if slot.sent != xxh3_64_with_seed(datagram, seed) {
            slot.streak = 0;
            return false;
        }
        slot.streak += 1;
        if slot.streak >= LOOP_AFTER {
            slot.streak = 0;
            return true;
        }
        false
    }

    /// `datagram` was sent to `to`.
    #[cfg(test)]
    fn sent(&mut self, to: SocketAddr, datagram: &[u8]) {
        let hash = self.hasher()(datagram);
        self.sent_hash(to, hash);
    }

    /// What [`LoopGuard::sent_hash`] takes for a datagram, apart from the
    /// guard (so that it can be used while the guard's owner is borrowed).
    pub(crate) fn hasher(&self) -> impl Fn(&[u8]) -> u64 + use<> {
        let seed = self.seed;
        move |datagram| xxh3_64_with_seed(datagram, seed)
    }

    /// A datagram of hash `hash` ([`LoopGuard::hash`]) was sent to `to`.
    pub(crate) fn sent_hash(&mut self, to: SocketAddr, hash: u64) {
        let slot = self.slot(to);
        if slot.source != Some(to) {
            *slot = Slot {
                source: Some(to),
                sent: hash,
                streak: 0,
            };
        } else {
            slot.sent = hash;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_echoing_gateways_stop_at_the_loop_after_th_pass() {
        let (a, b) = (addr("192.0.2.1:9000"), addr("192.0.2.2:9000"));
        let (mut at_a, mut at_b) = (LoopGuard::new(1), LoopGuard::new(2));
        // B got one spoofed datagram "from A" and answered it.
        at_b.sent(a, b"X");
        let mut passes = 0;
        loop {
            passes += 1;
            // A gets B's answer and answers it, unless it is a loop.
            if at_a.is_loop(b, b"X") {
                break;
            }
            at_a.sent(b, b"X");
            if at_b.is_loop(a, b"X") {
                break;
            }
            at_b.sent(a, b"X");
            assert!(passes < 100, "the loop never ended");
        }
        assert_eq!(passes, usize::from(LOOP_AFTER));
    }

    #[test]
    fn a_client_whose_datagrams_differ_from_its_replies_is_never_stopped() {
        let c = addr("198.51.100.7:5353");
        let mut g = LoopGuard::new(3);
        for _ in 0..1000 {
            assert!(!g.is_loop(c, b"hello"));
            g.sent(c, b"HELLO");
        }
    }

    #[test]
    fn a_client_that_echoes_back_loses_one_datagram_in_loop_after() {
        let c = addr("[2001:db8::1]:4000");
        let mut g = LoopGuard::new(4);
        let mut lost = 0;
        for _ in 0..usize::from(LOOP_AFTER) * 10 {
            if g.is_loop(c, b"") {
                lost += 1;
            } else {
                g.sent(c, b"");
            }
        }
        // The first datagram finds nothing sent yet; then every LOOP_AFTERth is lost.
        assert_eq!(lost, 9);
    }

    #[test]
    fn a_different_datagram_breaks_the_streak() {
        let c = addr("203.0.113.9:1234");
        let mut g = LoopGuard::new(5);
        g.sent(c, b"same");
        for _ in 0..LOOP_AFTER - 1 {
            assert!(!g.is_loop(c, b"same"));
        }
        assert!(!g.is_loop(c, b"other"));
        for _ in 0..LOOP_AFTER - 1 {
            assert!(!g.is_loop(c, b"same"));
        }
        assert!(g.is_loop(c, b"same"));
    }
}
