//! What every guest kind provides, so that loading decides the kind once and
//! the datagram path never asks: a linked program makes instances ([`Kind`]),
//! an instance runs calls ([`Instance`]). The kinds are `abi_v1/`,
//! `wasi_command/` and `component/`.

use std::net::SocketAddr;

use super::env::Env;
use super::outcome::Rejection;
use crate::guest::abi::GuestKind;
use crate::guest::host::Calls;
use crate::verdict::Allowance;

/// A program linked for its kind, ready to make instances. Shared by every
/// worker.
pub(super) trait Kind: Send + Sync {
    fn kind(&self) -> GuestKind;

    /// Whether every call makes an instance of its own, whatever the
    /// listener's isolation.
    fn instance_per_call(&self) -> bool {
        false
    }

    /// A new instance with its start function run.
    fn instantiate(&self, env: &Env) -> wasmtime::Result<Box<dyn Instance>>;

    /// Instantiates once at load, so that a module that cannot serve is
    /// refused then, not on the datagram path.
    fn try_out(&self, env: &Env) -> wasmtime::Result<()> {
        self.instantiate(env).map(drop)
    }
}

/// A live instance of some kind, run call after call by one worker.
pub(super) trait Instance: Send {
    /// Runs `call` (its sessions already lent to [`Instance::calls_mut`]);
    /// whether it left a reply ([`Instance::reply`]).
    fn call(&mut self, call: &Call<'_>, env: &Env) -> Result<bool, Rejection>;

    /// The last call's reply (empty when it left none).
    fn reply(&self) -> &[u8];

    /// What the host calls of the last call did.
    /// The store's host calls (`None` for a kind that has none), which the
    /// runner lends the sessions to around a call, and reads afterwards.
    fn calls(&self) -> Option<&Calls>;

    fn calls_mut(&mut self) -> Option<&mut Calls>;
}

/// Which export a call enters.
#[derive(Clone, Copy)]
pub(super) enum Entry {
    Handle,
    OnReply,
    /// `probe` and `probe_reply` (ABI v1) or `probe-reply` (components);
    /// WASI commands never get them.
    Probe,
    ProbeReply,
}

/// What one call is about: the datagram, the client, and (for `on_reply`) the
/// endpoint that sent it.
pub(super) struct Call<'a> {
    pub(super) entry: Entry,
    pub(super) datagram: &'a [u8],
    pub(super) peer: SocketAddr,
    /// A shared pool's answer: no client until the guest names one
    /// (`reply_to`); `peer` is the unspecified address meanwhile.
    pub(super) claimable: bool,
    pub(super) upstream: &'a str,
    /// What the call may do; `None`: what a request of this size earns.
    pub(super) allowance: Option<Allowance>,
    /// The reply ratio (0: no cap).
    pub(super) max_ratio: f64,
}

impl Call<'_> {
    /// What the call may do: its own allowance, else what its datagram earns
    /// at the reply ratio.
    pub(super) fn allowance(&self) -> Allowance {
        self.allowance
            .unwrap_or_else(|| Allowance::for_request(self.datagram.len(), self.max_ratio))
    }
}
