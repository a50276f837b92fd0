//! Forwarding: a listener's pools, resolved, with what every worker shares
//! (endpoint health, per-worker counters), and ([`Sessions`]) one worker's
//! session table: a session per client, pool and endpoint, its idle expiry, and
//! passive health (an endpoint whose session reports ICMP port unreachable is
//! ejected for a while, in every worker), and active health checks ([`health`]:
//! which probes are due, and what their results do). A shared pool has no
//! session per client: a few sockets per endpoint carry every client, and
//! client handles name each answer's client (`shared.rs`, `handles.rs`).
//! Nothing here touches a socket: the worker applies the table's
//! [`Command`]s to its sockets.
//!
//! The kernel sends each client to one worker, so a worker owns its clients'
//! sessions outright: nothing here is shared between workers or locked, except
//! each endpoint's health flag (an atomic) and its counters (one set per worker).

use anyhow::Context as _;

mod commands;
mod handles;
pub mod health;
mod ledger;
pub mod pool;
mod pools;
mod refusals;
mod session;
mod sessions;
mod shared;
mod shared_pool;

pub use commands::{Applied, Apply, Command, SessionId};
pub use handles::ENDPOINTS_PER_CLIENT;
pub use ledger::VALIDATED_AFTER;
pub use pools::{EndpointCounters, EndpointTotals, EndpointView, Pools};
pub use sessions::{Lent, Received, Sessions};

/// Raises the soft limit on open files to the hard limit, for sessions' sockets,
/// and returns it.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    crate::net::batch::raise_nofile_limit().context("cannot raise the open-file limit")
}
