//! Passive health: what an ICMP port unreachable does. A session's refusal
//! closes it; a shared socket's leaves it (other clients use it); either way
//! it counts against the endpoint, which is ejected after `eject_after` in a
//! row (never the pool's last healthy one), with a rate-limited line.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use super::commands::SessionId;
use super::pools::EndpointCounters;
use super::sessions::Sessions;
use crate::upstream::pool::Refusal;

impl Sessions {
    /// Session `s` was refused (ICMP port unreachable, on a send or on its
    /// socket): counted against its endpoint, which is ejected after
    /// `eject_after` in a row (never the last healthy one), and closed; the
    /// client's next datagram opens another.
    pub fn refused(&mut self, s: SessionId) {
        let Some(session) = self.sessions.get(&s) else {
            self.shared_refused(s);
            return;
        };
        self.count_refusal(session.pool, session.endpoint, &session.counters);
        self.close(s, false);
    }

    /// A refusal from `endpoint` of pool `p`, counted against it: ejected
    /// after `eject_after` in a row (never the pool's last healthy one).
    pub(super) fn count_refusal(&self, p: usize, endpoint: SocketAddr, counters: &EndpointCounters) {
        counters.refusals.fetch_add(1, Relaxed);
        let wp = &self.pools[p];
        let Some(i) = wp.pool.position(endpoint).filter(|_| !wp.retired) else {
            return;
        };
        match wp.pool.refused(i, wp.eject_after, self.now, self.now + wp.eject_for) {
            Refusal::Ejected { news } => {
                counters.ejections.fetch_add(1, Relaxed);
                if news && let Some(suppressed) = self.shared.health_lines.allow() {
                    tracing::warn!(
                        pool = wp.name,
                        %endpoint,
                        eject_for = ?wp.eject_for,
                        refusals = wp.eject_after,
                        suppressed,
                        "endpoint ejected: it answered with ICMP port unreachable"
                    );
                }
            }
            Refusal::Spared => {
                if let Some(suppressed) = self.shared.health_lines.allow() {
                    tracing::warn!(
                        pool = wp.name,
                        %endpoint,
                        suppressed,
                        "endpoint refuses datagrams but is the pool's last healthy one: kept in use"
                    );
                }
            }
            Refusal::Counted => {}
        }
    }

    /// A shared socket reported ICMP port unreachable: counted against its
    /// endpoint; the socket stays (other clients' datagrams use it).
    pub(super) fn shared_refused(&mut self, id: SessionId) {
        if let Some(socket) = self.carriers.get(id) {
            let (p, addr) = socket.target;
            self.count_refusal(p, addr, &socket.counters);
        }
    }
}
