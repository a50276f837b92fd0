//! Client handles, for shared pools: the opaque number a guest keeps beside
//! what it forwarded for a client, and gives back in `on_reply` to say which
//! client an answer is for. A handle names one client of one worker, for a
//! bounded time, and only for answers from the endpoints that client's
//! datagrams went to; a slot reused for another client gets a new generation,
//! so an old handle never names the new client.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::verdict::ClaimError;

/// The endpoints a handle remembers its client's datagrams went to (the most
/// recent ones): answers from others are refused.
pub const ENDPOINTS_PER_CLIENT: usize = 4;

/// Entries of the table's order one eviction looks at, at most.
const EVICTION_SCAN: usize = 64;

/// An endpoint of a pool, by the pool's place in the worker's list.
pub(super) type Target = (usize, SocketAddr);

struct Slot {
    client: SocketAddr,
    /// Bumped each time the slot is given to a client (31 bits, so that a
    /// handle is a positive `i64`).
    generation: u32,
    live: bool,
    last_active: Instant,
    /// How long the client keeps its handle after its last datagram.
    timeout: Duration,
    /// The last endpoints its datagrams went to, newest at `next - 1`.
    targets: [Option<Target>; ENDPOINTS_PER_CLIENT],
    next: usize,
}

/// One worker's client handles.
pub(super) struct Handles {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_client: HashMap<SocketAddr, u32>,
    /// Slots in the order they were given, for making room: entries of slots
    /// since freed or given again are skipped when met.
    order: VecDeque<(u32, u32)>,
}

impl Handles {
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_client.len()
    }

    /// `client`'s handle, if it has one.
    pub(super) fn of(&self, client: SocketAddr) -> Option<u64> {
        let &i = self.by_client.get(&client)?;
        Some(handle(i, self.slots[i as usize].generation))
    }

    /// `client`'s handle, kept alive for `timeout` more from `now`, and
    /// whether it is new. `None` when it has none and the table holds `max`.
    pub(super) fn open(
        &mut self,
        client: SocketAddr,
        now: Instant,
        timeout: Duration,
        max: usize,
    ) -> Option<(u64, bool)> {
        if let Some(&i) = self.by_client.get(&client) {
            let slot = &mut self.slots[i as usize];
            slot.last_active = now;
            slot.timeout = slot.timeout.max(timeout);
            return Some((handle(i, slot.generation), false));
        }
        if self.by_client.len() >= max {
            return None;
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    client,
                    generation: 0,
                    live: false,
                    last_active: now,
                    timeout,
                    targets: [None; ENDPOINTS_PER_CLIENT],
                    next: 0,
                });
                i
            }
        };
        let slot = &mut self.slots[i as usize];
        slot.generation = (slot.generation + 1) & 0x7fff_ffff;
        slot.client = client;
        slot.live = true;
        slot.last_active = now;
        slot.timeout = timeout;
        slot.targets = [None; ENDPOINTS_PER_CLIENT];
        slot.next = 0;
        self.by_client.insert(client, i);
        self.order.push_back((i, slot.generation));
        Some((handle(i, slot.generation), true))
    }

    /// Notes that a datagram of the client of `handle` went to `target`.
    pub(super) fn went_to(&mut self, handle: u64, target: Target) {
        let Some(slot) = self.live_slot(handle) else { return };
        if slot.targets.contains(&Some(target)) {
            return;
        }
        slot.targets[slot.next] = Some(target);
        slot.next = (slot.next + 1) % ENDPOINTS_PER_CLIENT;
    }

    /// The client `handle` names, for an answer from `from`.
    pub(super) fn claim(&mut self, handle: u64, from: Target) -> Result<SocketAddr, ClaimError> {
        let slot = self.live_slot(handle).ok_or(ClaimError::Stale)?;
        if !slot.targets.contains(&Some(from)) {
            return Err(ClaimError::WrongEndpoint);
        }
        Ok(slot.client)
    }

    fn live_slot(&mut self, handle: u64) -> Option<&mut Slot> {
        let (i, generation) = ((handle & 0xffff_ffff) as usize, (handle >> 32) as u32);
        self.slots.get_mut(i).filter(|s| s.live && s.generation == generation)
    }

    /// Frees the oldest handle of a client for which `unproven` holds; its
    /// client. At most [`EVICTION_SCAN`] entries are looked at, each proven one
    /// moved to the back: a table full of proven clients costs a flood of new
    /// ones a bounded look each, not a walk of the whole table.
    pub(super) fn evict_oldest(&mut self, unproven: impl Fn(SocketAddr) -> bool) -> Option<SocketAddr> {
        for _ in 0..EVICTION_SCAN.min(self.order.len()) {
            let (i, generation) = self.order.pop_front()?;
            let s = &self.slots[i as usize];
            if !(s.live && s.generation == generation) {
                continue; // freed since, or given again (a later entry stands for it)
            }
            if unproven(s.client) {
                return Some(self.free_slot(i));
            }
            self.order.push_back((i, generation));
        }
        None
    }

    /// Frees the handles whose client has been quiet for longer than its
    /// timeout (`timeout` may shorten it: a client that never proved its
    /// address); passes each client to `gone`.
    pub(super) fn expire(
        &mut self,
        now: Instant,
        shorter: impl Fn(SocketAddr, Duration) -> Duration,
        mut gone: impl FnMut(SocketAddr),
    ) {
        let quiet: Vec<u32> = self
            .by_client
            .values()
            .copied()
            .filter(|&i| {
                let s = &self.slots[i as usize];
                now.saturating_duration_since(s.last_active) >= shorter(s.client, s.timeout)
            })
            .collect();
        for i in quiet {
            gone(self.free_slot(i));
        }
        // Entries of freed slots are dropped once they outnumber the live ones.
        if self.order.len() > 2 * self.by_client.len() + 64 {
            let slots = &self.slots;
            self.order
                .retain(|&(i, g)| slots.get(i as usize).is_some_and(|s| s.live && s.generation == g));
        }
    }

    fn free_slot(&mut self, i: u32) -> SocketAddr {
        let slot = &mut self.slots[i as usize];
        slot.live = false;
        self.by_client.remove(&slot.client);
        self.free.push(i);
        slot.client
    }
}

fn handle(slot: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_handle_names_its_client_for_answers_from_where_it_forwarded_until_it_expires() {
        let (mut h, t0) = (Handles::new(), Instant::now());
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.2:2000"));
        let (ep1, ep2) = ((0, addr("10.0.0.1:53")), (0, addr("10.0.0.2:53")));
        let (ha, new) = h.open(a, t0, T, 10).unwrap();
        assert!(new);
        assert_eq!(h.open(a, t0, T, 10).unwrap(), (ha, false), "one handle per client");
        h.went_to(ha, ep1);
        assert_eq!(h.claim(ha, ep1), Ok(a));
        assert_eq!(h.claim(ha, ep2), Err(ClaimError::WrongEndpoint));
        assert_eq!(
            h.claim(ha ^ (1 << 40), ep1),
            Err(ClaimError::Stale),
            "a made-up generation"
        );
        assert_eq!(h.claim(ha + 1, ep1), Err(ClaimError::Stale), "a slot no client has");
        // Quiet for its timeout: gone, and its slot, given to b, is not a's.
        let mut gone = Vec::new();
        h.expire(t0 + T, |_, t| t, |c| gone.push(c));
        assert_eq!(gone, [a]);
        let (hb, _) = h.open(b, t0 + T, T, 10).unwrap();
        h.went_to(hb, ep1);
        assert_ne!(hb, ha);
        assert_eq!(h.claim(ha, ep1), Err(ClaimError::Stale));
        assert_eq!(h.claim(hb, ep1), Ok(b));
    }

    #[test]
    fn a_full_table_refuses_until_room_is_made_from_the_oldest_unproven() {
        let (mut h, t0) = (Handles::new(), Instant::now());
        let clients: Vec<SocketAddr> = (1..=3).map(|i| addr(&format!("192.0.2.{i}:53"))).collect();
        for c in &clients {
            h.open(*c, t0, T, 3).unwrap();
        }
        let late = addr("198.51.100.1:1");
        assert!(h.open(late, t0, T, 3).is_none());
        // The first client proved its address: the second one makes room.
        assert_eq!(h.evict_oldest(|c| c != clients[0]), Some(clients[1]));
        assert!(h.open(late, t0, T, 3).is_some());
        assert_eq!(h.len(), 3);
        assert_eq!(h.evict_oldest(|_| false), None, "a proven client is never evicted");
    }

    #[test]
    fn making_room_looks_at_a_bounded_number_of_entries_and_still_finds_the_unproven() {
        let (mut h, t0) = (Handles::new(), Instant::now());
        let max = 10 * EVICTION_SCAN;
        let clients: Vec<SocketAddr> = (0..max)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 1)))
            .collect();
        for c in &clients {
            h.open(*c, t0, T, max).unwrap();
        }
        // Only the last client is unproven: each look passes EVICTION_SCAN
        // proven ones on to the back, so it is found within ten looks.
        let unproven = *clients.last().unwrap();
        let looked = std::cell::Cell::new(0);
        let mut found = None;
        for _ in 0..10 {
            found = h.evict_oldest(|c| {
                looked.set(looked.get() + 1);
                c == unproven
            });
            if found.is_some() {
                break;
            }
        }
        assert_eq!(found, Some(unproven));
        assert!(looked.get() <= 10 * EVICTION_SCAN, "{} looks", looked.get());
        assert_eq!(h.len(), max - 1);
    }

    #[test]
    fn a_client_remembers_only_its_last_few_endpoints() {
        let (mut h, t0) = (Handles::new(), Instant::now());
        let (ha, _) = h.open(addr("192.0.2.1:1"), t0, T, 1).unwrap();
        let target = |i: u8| (0, SocketAddr::from(([10, 0, 0, i], 53)));
        for i in 0..=ENDPOINTS_PER_CLIENT as u8 {
            h.went_to(ha, target(i));
        }
        assert_eq!(h.claim(ha, target(0)), Err(ClaimError::WrongEndpoint));
        assert!(h.claim(ha, target(ENDPOINTS_PER_CLIENT as u8)).is_ok());
    }
}
