//! One worker's sockets of shared pools (`sessions = "shared"`): a few per
//! endpoint that carry every client's datagrams, opened as traffic needs
//! them, used in turn, and each replaced by one on a new random port every
//! `reroll_every` (staggered, so that they do not all change at once). A
//! replaced socket lingers to take the answers still on their way.
//!
//! Like the session table it opens nothing itself: it names sockets by
//! [`SessionId`] and the table queues the commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::commands::SessionId;
use super::handles::Target;
use super::pools::EndpointCounters;
use crate::config::SharedSpec;

/// A shared socket: whose it is and how it stands.
pub(super) struct Socket {
    pub(super) target: Target,
    /// `POOL/ip:port`, as `upstream` tells the guest.
    pub(super) label: String,
    pub(super) counters: Arc<EndpointCounters>,
    opened: Instant,
    /// When it stopped taking new datagrams (rerolled, or its endpoint gone).
    retired: Option<Instant>,
    /// Datagrams sent and not yet answered (an estimate, for the shutdown drain).
    pub(super) awaiting: u32,
}

/// The sockets of one endpoint in use, and which one goes next.
struct Set {
    live: Vec<SessionId>,
    next: usize,
    /// Sockets this endpoint has had (for staggering rerolls).
    made: u64,
}

#[derive(Default)]
pub(super) struct SharedSockets {
    sets: HashMap<Target, Set>,
    sockets: HashMap<SessionId, Socket>,
}

/// What [`SharedSockets::socket_for`] gives: the socket to send on, and
/// whether it is new (to open first).
pub(super) struct Pick {
    pub(super) id: SessionId,
    pub(super) new: bool,
}

impl SharedSockets {
    pub(super) fn get(&self, id: SessionId) -> Option<&Socket> {
        self.sockets.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: SessionId) -> Option<&mut Socket> {
        self.sockets.get_mut(&id)
    }

    pub(super) fn len(&self) -> usize {
        self.sockets.len()
    }

    /// The socket for the next datagram to `target`: a new one while the
    /// endpoint has fewer than `spec.sockets` (its id from `next_id`), else
    /// the next in turn.
    pub(super) fn socket_for(
        &mut self,
        target: Target,
        spec: &SharedSpec,
        now: Instant,
        next_id: &mut u64,
        label: impl FnOnce() -> String,
        counters: &Arc<EndpointCounters>,
    ) -> Pick {
        let set = self.sets.entry(target).or_insert(Set {
            live: Vec::new(),
            next: 0,
            made: 0,
        });
        if set.live.len() < spec.sockets {
            let id = SessionId::from_raw(*next_id);
            *next_id += 1;
            // Staggered: the k-th socket of an endpoint is first replaced
            // after (k mod n + 1) / n of `reroll_every`.
            // (Replacements are staggered already.)
            let n = spec.sockets as u64;
            let early = if set.made < n {
                spec.reroll_every.mul_f64((n - 1 - set.made) as f64 / n as f64)
            } else {
                Duration::ZERO
            };
            set.made += 1;
            set.live.push(id);
            self.sockets.insert(
                id,
                Socket {
                    target,
                    label: label(),
                    counters: Arc::clone(counters),
                    opened: now.checked_sub(early).unwrap_or(now),
                    retired: None,
                    awaiting: 0,
                },
            );
            return Pick { id, new: true };
        }
        let id = set.live[set.next % set.live.len()];
        set.next = (set.next + 1) % set.live.len();
        Pick { id, new: false }
    }

    /// Socket `id` could not be opened, or is to close now: forgotten.
    pub(super) fn remove(&mut self, id: SessionId) -> Option<Socket> {
        let socket = self.sockets.remove(&id)?;
        if let Some(set) = self.sets.get_mut(&socket.target) {
            set.live.retain(|&s| s != id);
            if set.live.is_empty() {
                self.sets.remove(&socket.target);
            }
        }
        Some(socket)
    }

    /// Retires the sockets due for a new port, and those of endpoints for
    /// which `kept` no longer holds (a reload removed them); returns the
    /// sockets retired for longer than `linger`, to close.
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        spec_of: impl Fn(usize) -> Option<SharedSpec>,
        kept: impl Fn(Target) -> bool,
        linger: impl Fn(usize) -> Duration,
    ) -> Vec<SessionId> {
        let mut close = Vec::new();
        for (&id, s) in &mut self.sockets {
            match s.retired {
                Some(at) => {
                    if now.saturating_duration_since(at) >= linger(s.target.0) {
                        close.push(id);
                    }
                }
                None => {
                    let due = spec_of(s.target.0)
                        .is_none_or(|spec| now.saturating_duration_since(s.opened) >= spec.reroll_every);
                    if due || !kept(s.target) {
                        s.retired = Some(now);
                        if let Some(set) = self.sets.get_mut(&s.target) {
                            set.live.retain(|&x| x != id);
                        }
                    }
                }
            }
        }
        self.sets.retain(|_, set| !set.live.is_empty());
        for id in &close {
            self.sockets.remove(id);
        }
        close
    }

    /// Whether a datagram sent on a shared socket still waits for its answer.
    pub(super) fn awaiting(&self) -> bool {
        self.sockets.values().any(|s| s.awaiting > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        (0, "192.0.2.53:53".parse().unwrap())
    }

    #[test]
    fn sockets_open_as_needed_are_used_in_turn_and_replaced_staggered() {
        let spec = SharedSpec {
            sockets: 2,
            reroll_every: Duration::from_secs(60),
        };
        let (mut s, t0, mut next) = (SharedSockets::default(), Instant::now(), 0);
        let counters = Arc::new(EndpointCounters::default());
        let mut pick = |s: &mut SharedSockets, now| {
            let p = s.socket_for(target(), &spec, now, &mut next, || "p/x".into(), &counters);
            (p.id.raw(), p.new)
        };
        assert_eq!(pick(&mut s, t0), (0, true));
        assert_eq!(pick(&mut s, t0), (1, true));
        assert_eq!(
            [pick(&mut s, t0), pick(&mut s, t0), pick(&mut s, t0)],
            [(0, false), (1, false), (0, false)]
        );
        let linger = |_| Duration::from_secs(5);
        // The first socket counts as opened half a period early: replaced at 30 s.
        let sweep =
            |s: &mut SharedSockets, at: u64| s.sweep(t0 + Duration::from_secs(at), |_| Some(spec), |_| true, linger);
        assert!(sweep(&mut s, 29).is_empty());
        assert_eq!(pick(&mut s, t0), (1, false));
        sweep(&mut s, 30);
        // Only socket 1 is in use, a new one opens beside it.
        assert_eq!(pick(&mut s, t0 + Duration::from_secs(30)), (2, true));
        assert_eq!(sweep(&mut s, 35), [SessionId::from_raw(0)], "closed after lingering");
        assert!(s.get(SessionId::from_raw(0)).is_none());
        // Socket 1 goes at 60 s; socket 2, a replacement, only at 90 s.
        sweep(&mut s, 60);
        assert_eq!(pick(&mut s, t0 + Duration::from_secs(60)), (3, true));
        assert_eq!(pick(&mut s, t0 + Duration::from_secs(60)), (2, false));
        // A reload that removes the endpoint retires every socket.
        let closing = s.sweep(t0 + Duration::from_secs(61), |_| Some(spec), |_| false, linger);
        assert!(closing.is_empty(), "socket 1 lingers until 65 s");
        assert_eq!(
            pick(&mut s, t0 + Duration::from_secs(61)),
            (4, true),
            "nothing left in use"
        );
    }
}
