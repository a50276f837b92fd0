//! The canary as a [`Handler`] that wraps two guests: a share of clients
//! (`--canary-percent`, by address) is served by the candidate, the rest by
//! the active module, and every outcome is told to the candidate's judge,
//! which promotes it or rolls it back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway::handler::{Handler, Route};
use crate::gateway::shared::Shared;
use crate::guest::{Answer, Guest, Program, Rejection};
use crate::prove::candidate::{self, Candidate};
use crate::upstream::Lent;
use crate::verdict::{Allowance, CallError};

/// One worker's active guest, and the candidate's for canary clients.
pub(crate) struct Canary {
    active: Guest,
    shared: Arc<Shared>,
    /// The candidate this worker serves canary clients with, and its guest.
    candidate: Option<(Arc<Candidate>, Guest)>,
    /// The candidate loaded when the datagram in hand was routed, judged by
    /// how that datagram went.
    loaded: Option<Arc<Candidate>>,
    route: Route,
    /// Whether canaried datagrams that did not fail are judged by the shadow
    /// thread, once the active module has run them too.
    shadowed: bool,
}

impl Canary {
    pub(crate) fn new(active: Guest, shared: Arc<Shared>, shadowed: bool) -> Self {
        Self {
            active,
            shared,
            candidate: None,
            loaded: None,
            route: Route::Active,
            shadowed,
        }
    }

    /// The guest the datagram in hand was routed to.
    fn guest(&mut self) -> &mut Guest {
        match (self.route, self.candidate.as_mut()) {
            (Route::Candidate, Some((_, guest))) => guest,
            _ => &mut self.active,
        }
    }

    fn guest_ref(&self) -> &Guest {
        match (self.route, self.candidate.as_ref()) {
            (Route::Candidate, Some((_, guest))) => guest,
            _ => &self.active,
        }
    }
}

impl Handler for Canary {
    /// A canary client goes to the candidate (whose guest is made here when
    /// the candidate is new), everyone else to the active module.
    fn route(&mut self, client: SocketAddr, program: &Arc<Program>) -> Route {
        self.active.set_program(program);
        self.route = Route::Active;
        self.loaded = None;
        let Some(spec) = &self.shared.spec.candidate else {
            return Route::Active;
        };
        let loaded = self.shared.candidate.load();
        let Some(candidate) = loaded.as_ref() else {
            self.candidate = None;
            return Route::Active;
        };
        if spec.canary_percent > 0.0 && candidate::canary(client.ip(), spec.canary_percent) {
            if !self.candidate.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, candidate)) {
                let guest = Guest::new(
                    self.shared.env.as_candidate(),
                    Arc::clone(&candidate.program),
                    self.shared.spec.isolation,
                    self.shared.spec.max_reply_ratio,
                );
                self.candidate = Some((Arc::clone(candidate), guest));
            }
            self.route = Route::Candidate;
        }
        self.loaded = Some(Arc::clone(candidate));
        self.route
    }

    fn refresh(&mut self, program: &Arc<Program>) {
        self.active.set_program(program);
    }

    fn route_active(&mut self, program: &Arc<Program>) {
        self.active.set_program(program);
        self.route = Route::Active;
        self.loaded = None;
    }

    fn handle(&mut self, datagram: &[u8], client: SocketAddr, sessions: &mut Lent) -> Result<Answer<'_>, Rejection> {
        self.guest().handle_with(datagram, client, sessions)
    }

    fn has_on_reply(&self) -> bool {
        self.guest_ref().has_on_reply()
    }

    fn on_reply(
        &mut self,
        datagram: &[u8],
        client: Option<SocketAddr>,
        upstream: &str,
        sessions: &mut Lent,
        allowance: Allowance,
    ) -> Result<Answer<'_>, Rejection> {
        self.guest().on_reply(datagram, client, upstream, sessions, allowance)
    }

    fn take_refused(&mut self, each: &mut dyn FnMut(CallError, u32)) {
        for (error, n) in self.guest().take_refused() {
            each(error, n);
        }
    }

    fn last_calls(&mut self) -> u32 {
        self.guest().last_calls()
    }

    fn last_time(&self) -> Duration {
        self.guest_ref().last_time()
    }

    /// Tells the candidate's judge how a datagram went, and acts on its ruling.
    fn judged(&mut self, client: SocketAddr, verdict: &'static str) {
        let Some(candidate) = self.loaded.take() else { return };
        let failed = candidate::failed(verdict);
        match self.route {
            Route::Active => candidate.active_ran(failed),
            Route::Candidate => {
                if !failed && self.shadowed {
                    // Judged once the active module ran it too, in the shadow
                    // thread: served is not the same as right.
                    candidate.counted(false);
                } else {
                    let rules = candidate::Rules::of(&self.shared.spec);
                    if let Some(action) = candidate.candidate_ran(failed, false, client.ip(), &rules) {
                        self.shared.settle(&candidate, action);
                    }
                }
            }
        }
    }
}
