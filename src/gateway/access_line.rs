//! The access log's line of a client datagram, as the core saw it: the
//! exchange, the module that handled it, where it was forwarded, the note.

use std::net::SocketAddr;
use std::time::SystemTime;

use super::access_log::Entry;
use super::core::Core;
use super::handler::{Handler, Route};
use super::tap::Tap;

impl<H: Handler, T: Tap> Core<H, T> {
    /// Hands the access log the line of one client datagram: the client, the
    /// bytes in and out, what became of it, and the guest's `note` (the
    /// forwards queued past `mark` name its upstream; none past `usize::MAX`).
    pub(super) fn log_access(
        &self,
        (client, bytes_in, bytes_out, verdict): (SocketAddr, usize, usize, &'static str),
        note: Option<Box<str>>,
        mark: usize,
        route: Route,
    ) {
        let Some(log) = &self.shared.access_log else { return };
        let candidate = self.shared.candidate.load();
        let (module, role) = match (route, candidate.as_ref()) {
            (Route::Candidate, Some(c)) => (c.program.sha256(), "candidate"),
            _ => (self.shared.program.load().sha256(), "active"),
        };
        log.log(Entry {
            at: SystemTime::now(),
            client,
            bytes_in,
            bytes_out,
            verdict,
            guest_ns: u64::try_from(self.handler.last_time().as_nanos()).unwrap_or(u64::MAX),
            upstream: (self.sessions.as_ref())
                .and_then(|n| n.forwarded_to_since(mark))
                .map(Into::into),
            module,
            role,
            note,
        });
    }
}
