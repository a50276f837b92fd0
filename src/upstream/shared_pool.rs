//! The session table's shared pools (`sessions = "shared"`): a client's
//! datagram goes out on one of a few sockets its endpoint shares with every
//! client, the client gets a handle for the guest to keep, and an answer
//! reaches a client only when `on_reply` names it by a handle that is live and
//! whose datagrams went to the endpoint that answered. The client is still
//! held to the reply ratio and the call allowance (its ledger lives while it
//! has a handle), and the table of handles is bounded like the sessions are.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::commands::{Queued, SessionId};
use super::sessions::{Received, Sessions};
use crate::config::{DEFAULT_UNANSWERED_TIMEOUT, SharedSpec};
use crate::verdict::{Allowance, CallError, ClaimError};

impl Sessions {
    /// The shared socket for `client`'s datagram to shared pool `p` (opened
    /// if the endpoint needs one more), the endpoint noted on its handle.
    pub(super) fn shared_route(
        &mut self,
        client: SocketAddr,
        p: usize,
        spec: SharedSpec,
        key: Option<&[u8]>,
    ) -> Result<SessionId, CallError> {
        let now = self.now;
        let wp = &mut self.pools[p];
        let endpoint = match key {
            Some(key) => wp.pool.by_hash(key, now),
            None => wp.pool.pick(&self.client_key[..self.client_key_len], now),
        }
        .ok_or(CallError::NoHealthyEndpoint)?;
        let addr = wp.pool.endpoints()[endpoint].addr;
        let handle = self.handle_for(client, Some(p))?;
        self.handles.went_to(handle, (p, addr));
        let wp = &self.pools[p];
        let pick = self.carriers.socket_for(
            (p, addr),
            &spec,
            now,
            &mut self.next_id,
            || format!("{}/{addr}", wp.name),
            &wp.counters[endpoint],
        );
        if pick.new {
            self.queue.push(Queued::Open { id: pick.id, to: addr });
            wp.counters[endpoint].sessions_created.fetch_add(1, Relaxed);
        }
        Ok(pick.id)
    }

    /// The current client's handle (`client` for the guest), kept for as long
    /// as it goes on talking.
    pub fn client_handle(&mut self) -> Result<u64, CallError> {
        let client = self.client.ok_or(CallError::NoClient)?;
        self.handle_for(client, None)
    }

    /// `client`'s handle, opened if it has none: making room by freeing the
    /// oldest handle of a client that never proved its address, else refused
    /// (`session_overflow`). Its first one starts the client's ledger.
    fn handle_for(&mut self, client: SocketAddr, pool: Option<usize>) -> Result<u64, CallError> {
        let timeout = match pool {
            Some(p) => self.pools[p].idle_timeout,
            None => self
                .pools
                .iter()
                .map(|wp| wp.idle_timeout)
                .max()
                .unwrap_or(DEFAULT_UNANSWERED_TIMEOUT),
        };
        let max = self.handle_cap();
        for _ in 0..2 {
            if let Some((handle, new)) = self.handles.open(client, self.now, timeout, max) {
                if new {
                    self.ledgers.opened(client);
                    self.counters.handles(self.handles.len());
                }
                return Ok(handle);
            }
            let ledgers = &self.ledgers;
            let Some(evicted) = self.handles.evict_oldest(|c| !ledgers.validated(c)) else {
                break;
            };
            self.ledgers.closed(evicted);
            self.counters.handle_evicted();
        }
        Err(CallError::SessionOverflow)
    }

    /// The handles a worker keeps: its share of the largest `max_sessions`
    /// among the shared pools (of any pool, without one).
    fn handle_cap(&self) -> usize {
        let live = || self.pools.iter().filter(|wp| !wp.retired);
        live()
            .filter(|wp| wp.shared.is_some())
            .map(|wp| wp.max)
            .max()
            .or_else(|| live().map(|wp| wp.max).max())
            .unwrap_or(0)
            .max(1)
    }

    /// Inside `on_reply`, the guest says the answer is for the client of
    /// `handle`: that client, and what its answers may still bring it, if
    /// the handle is live and its client's datagrams went to the endpoint
    /// that answered. On a session's answer, only the session's client's
    /// own handle is accepted.
    pub fn claim(&mut self, handle: u64) -> Result<(SocketAddr, Allowance), ClaimError> {
        let client = match (self.answering, self.client) {
            (Some(from), _) => self.handles.claim(handle, from)?,
            (None, Some(client)) if self.handles.of(client) == Some(handle) => client,
            _ => return Err(ClaimError::Stale),
        };
        self.begin(client);
        Ok((client, self.ledgers.allowance(client)))
    }

    /// The next answer of the shared socket being read is for no client until
    /// the guest names one (the last one's client is forgotten).
    pub fn unclaimed(&mut self) {
        self.client = None;
    }

    /// Datagrams read from shared socket `id`: counted, and which client
    /// each is for left to `on_reply` ([`Sessions::claim`]).
    pub(super) fn shared_received(
        &mut self,
        id: SessionId,
        sizes: impl IntoIterator<Item = usize>,
    ) -> Option<Received<'_>> {
        let socket = self.carriers.get_mut(id)?;
        let n = socket.counters.answers(&self.counters, sizes);
        socket.awaiting = socket.awaiting.saturating_sub(n);
        let (p, addr) = socket.target;
        let wp = &self.pools[p];
        if n > 0
            && let Some(i) = wp.pool.position(addr)
        {
            wp.pool.answered(i);
        }
        self.answering = Some(socket.target);
        self.client = None;
        Some(Received {
            client: None,
            label: &socket.label,
            proxy_protocol: wp.proxy_protocol,
        })
    }

    /// Frees quiet handles, replaces sockets due for a new port and those of
    /// endpoints a reload removed, and closes the ones that lingered.
    pub(super) fn expire_shared(&mut self, now: Instant) {
        let unanswered = self
            .pools
            .iter()
            .map(|wp| wp.unanswered_timeout)
            .min()
            .unwrap_or(DEFAULT_UNANSWERED_TIMEOUT);
        let (ledgers, handles) = (&mut self.ledgers, &mut self.handles);
        let mut gone = Vec::new();
        handles.expire(
            now,
            |client, t| {
                if ledgers.validated(client) {
                    t
                } else {
                    t.min(unanswered)
                }
            },
            |client| gone.push(client),
        );
        for client in gone {
            ledgers.closed(client);
        }
        self.counters.handles(self.handles.len());
        if self.carriers.len() == 0 {
            return;
        }
        let pools = &self.pools;
        let close = self.carriers.sweep(
            now,
            |p| pools.get(p).and_then(|wp| wp.shared),
            |(p, addr)| {
                pools
                    .get(p)
                    .is_some_and(|wp| !wp.retired && wp.shared.is_some() && wp.pool.position(addr).is_some())
            },
            |p| pools.get(p).map_or(unanswered, |wp| wp.unanswered_timeout),
        );
        for id in close {
            self.queue.push(Queued::Close { id });
        }
    }
}
