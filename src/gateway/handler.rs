//! What turns a datagram into an answer, as the core sees it: a [`Handler`].
//! The guest is one; the canary (`prove::canary`) is one that wraps two, and
//! the benchmarks' native baseline is one written in Rust.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::guest::{Answer, Guest, Program, Rejection};
use crate::upstream::Lent;
use crate::verdict::{Allowance, CallError, DropReason};

/// Which module a handler routed a datagram to: the active one, or the
/// candidate (a canary client's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Active,
    Candidate,
}

/// Runs on datagrams for one worker; what it need not do (`on_reply`, host
/// calls) has defaults that do nothing. The core calls [`Handler::route`] first
/// for each client or upstream datagram, then the calls it needs, then
/// [`Handler::judged`] with what became of a client datagram.
pub trait Handler: Send {
    /// Chooses who answers `client`'s datagram in hand, after adopting
    /// `program` if it is not the active module any more.
    fn route(&mut self, client: SocketAddr, program: &Arc<Program>) -> Route {
        let _ = client;
        self.refresh(program);
        Route::Active
    }

    /// Chooses who answers an upstream datagram whose client is not known
    /// until the handler names it (a shared pool's answer): the active module.
    fn route_active(&mut self, program: &Arc<Program>) {
        self.refresh(program);
    }

    /// Adopts `program` as the active module (freeing a replaced one now).
    fn refresh(&mut self, program: &Arc<Program>) {
        let _ = program;
    }

    /// Runs on `client`'s datagram, with the worker's sessions to forward on.
    fn handle(&mut self, datagram: &[u8], client: SocketAddr, sessions: &mut Lent) -> Result<Answer<'_>, Rejection>;

    /// Whether upstream datagrams go through [`Handler::on_reply`]; without
    /// it they go to the client unchanged.
    fn has_on_reply(&self) -> bool {
        false
    }

    /// Runs on a datagram `upstream` (`POOL/ip:port`) sent back for `client`,
    /// within `allowance`; for no client (a shared pool's answer), the handler
    /// names it ([`Answer::claimed`]) and draws on its allowance.
    fn on_reply(
        &mut self,
        datagram: &[u8],
        client: Option<SocketAddr>,
        upstream: &str,
        sessions: &mut Lent,
        allowance: Allowance,
    ) -> Result<Answer<'_>, Rejection> {
        // Only called when `has_on_reply` says so.
        let _ = (datagram, client, upstream, sessions, allowance);
        Err(DropReason::NoReply.into())
    }

    /// Passes on the host calls refused since this was last asked, by reason.
    fn take_refused(&mut self, each: &mut dyn FnMut(CallError, u32)) {
        let _ = each;
    }

    /// The host calls the last call made, refused ones included.
    fn last_calls(&mut self) -> u32 {
        0
    }

    /// How long the last call took: the handler measures it, so that the
    /// core reads no clock.
    fn last_time(&self) -> Duration {
        Duration::ZERO
    }

    /// What became of the client datagram just handled (`reply`, `forward`
    /// or a drop reason).
    fn judged(&mut self, client: SocketAddr, verdict: &'static str) {
        let _ = (client, verdict);
    }
}

impl Handler for Guest {
    fn refresh(&mut self, program: &Arc<Program>) {
        self.set_program(program);
    }

    fn handle(&mut self, datagram: &[u8], client: SocketAddr, sessions: &mut Lent) -> Result<Answer<'_>, Rejection> {
        self.handle_with(datagram, client, sessions)
    }

    fn has_on_reply(&self) -> bool {
        Self::has_on_reply(self)
    }

    fn on_reply(
        &mut self,
        datagram: &[u8],
        client: Option<SocketAddr>,
        upstream: &str,
        sessions: &mut Lent,
        allowance: Allowance,
    ) -> Result<Answer<'_>, Rejection> {
        Self::on_reply(self, datagram, client, upstream, sessions, allowance)
    }

    fn take_refused(&mut self, each: &mut dyn FnMut(CallError, u32)) {
        for (error, n) in Self::take_refused(self) {
            each(error, n);
        }
    }

    fn last_calls(&mut self) -> u32 {
        Self::last_calls(self)
    }

    fn last_time(&self) -> Duration {
        Self::last_time(self)
    }
}
