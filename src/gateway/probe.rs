//! The guest side of health probes: the module serving now writes each probe
//! and judges each answer, in an instance of its own on the prober's thread,
//! under the same limits as any call.

use std::sync::Arc;

use super::shared::Shared;
use crate::config::Isolation;
use crate::guest::{Env, Guest};
use crate::upstream::health::ProbeWriter;

/// A [`ProbeWriter`] running the listener's active program.
pub(super) struct GuestProbes {
    guest: Guest,
    shared: Arc<Shared>,
}

impl GuestProbes {
    pub(super) fn new(env: &Env, shared: Arc<Shared>) -> Self {
        let guest = Guest::new(env.clone(), shared.program.load_full(), Isolation::Reuse, 0.0);
        Self { guest, shared }
    }

    /// Follows reloads: the next probe runs the module serving now.
    fn current(&mut self) {
        self.guest.set_program(&self.shared.program.load());
    }
}

impl ProbeWriter for GuestProbes {
    fn writes_probes(&mut self) -> bool {
        self.current();
        self.guest.writes_probes()
    }

    fn probe(&mut self, endpoint: &str) -> Option<Vec<u8>> {
        self.current();
        match self.guest.probe(endpoint) {
            Ok(probe) => probe,
            Err(rejection) => {
                tracing::debug!(endpoint, %rejection, "the guest wrote no probe: the probe fails");
                None
            }
        }
    }

    fn healthy(&mut self, endpoint: &str, answer: &[u8]) -> bool {
        self.current();
        self.guest.probe_reply(endpoint, answer).unwrap_or_else(|rejection| {
            tracing::debug!(endpoint, %rejection, "the guest's probe_reply failed: the probe fails");
            false
        })
    }
}
