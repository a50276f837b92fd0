//! The state verbs (`state_get`, `state_set`, `state_delete`, `state_incr`,
//! `state_cas`, `limit`, `penalize`, `penalized`): one method each on
//! [`Calls`] for every kind of guest, which counts the call against the
//! datagram's call limit and reads the state's clock once per datagram.

use super::calls::Calls;
use crate::verdict::StateError;

impl Calls {
    /// Counts one state call against the datagram's allowance (shared with
    /// `forward` and `send`).
    pub(crate) fn state_call(&mut self) -> Result<u64, StateError> {
        self.out.count_call().map_err(|error| {
            self.out.refuse(error);
            StateError::TooManyCalls
        })?;
        Ok(self.clock())
    }

    /// The state's clock in nanoseconds, read at the datagram's first state
    /// call (or `now_ms`) and the same for the rest of it.
    pub(crate) fn clock(&mut self) -> u64 {
        *self.now.get_or_insert_with(|| self.state.now())
    }

    /// `state_get`: calls `f` with the value of `key`.
    pub(crate) fn state_get<R>(&mut self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<R, StateError> {
        let now = self.state_call()?;
        self.state.get(key, now, f)
    }

    pub(crate) fn state_set(&mut self, key: &[u8], value: &[u8], ttl_ms: i64) -> Result<(), StateError> {
        let now = self.state_call()?;
        self.state.set(key, value, ttl_ms, now)
    }

    pub(crate) fn state_delete(&mut self, key: &[u8]) -> Result<bool, StateError> {
        let now = self.state_call()?;
        self.state.delete(key, now)
    }

    pub(crate) fn state_incr(&mut self, key: &[u8], delta: i64, ttl_ms: i64) -> Result<i64, StateError> {
        let now = self.state_call()?;
        self.state.incr(key, delta, ttl_ms, now)
    }

    pub(crate) fn state_cas(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: i64,
    ) -> Result<(), StateError> {
        let now = self.state_call()?;
        self.state.cas(key, expected, value, ttl_ms, now)
    }

    pub(crate) fn limit(&mut self, key: &[u8], rate_per_s: u32, burst: u32) -> Result<bool, StateError> {
        let now = self.state_call()?;
        self.state.limit(key, rate_per_s, burst, now)
    }

    pub(crate) fn penalize(&mut self, key: &[u8], ttl_ms: i64) -> Result<(), StateError> {
        let now = self.state_call()?;
        self.state.penalize(key, ttl_ms, now)
    }

    pub(crate) fn penalized(&mut self, key: &[u8]) -> Result<bool, StateError> {
        let now = self.state_call()?;
        self.state.penalized(key, now)
    }
}
