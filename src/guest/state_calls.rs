//! The state host calls (`state_get`, `state_set`, `state_delete`,
//! `state_incr`, `state_cas`, `limit`, `penalize`, `penalized`): one method
//! each on [`HostState`] for every kind of guest, which counts the call
//! against the datagram's call limit, and the ABI v1 wrappers that read keys
//! and values from guest memory (a region outside it traps).

use wasmtime::{Caller, Linker};

use crate::guest::abi::HOST_MODULE;
use crate::guest::hostcalls::{HostState, memory, region};
use crate::verdict::StateError;

impl HostState {
    /// Counts one state call against the datagram's allowance (shared with
    /// `forward` and `send`).
    fn state_call(&mut self) -> Result<u64, StateError> {
        self.out.count_call().map_err(|error| {
            self.out.refuse(error);
            StateError::TooManyCalls
        })?;
        Ok(self.clock())
    }

    /// The state's clock in nanoseconds, read at the datagram's first state
    /// call (or `now_ms`) and the same for the rest of it.
    fn clock(&mut self) -> u64 {
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

/// Defines the state calls in `linker`.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(HOST_MODULE, "state_get", state_get)?;
    linker.func_wrap(HOST_MODULE, "state_set", state_set)?;
    linker.func_wrap(HOST_MODULE, "state_delete", state_delete)?;
    linker.func_wrap(HOST_MODULE, "state_incr", state_incr)?;
    linker.func_wrap(HOST_MODULE, "state_cas", state_cas)?;
    linker.func_wrap(HOST_MODULE, "limit", limit)?;
    linker.func_wrap(HOST_MODULE, "penalize", penalize)?;
    linker.func_wrap(HOST_MODULE, "penalized", penalized)?;
    linker.func_wrap(HOST_MODULE, "now_ms", now_ms)?;
    Ok(())
}

/// 0, 1 or a negative code.
fn code<T: Into<i32>>(result: Result<T, StateError>) -> i32 {
    result.map_or_else(StateError::code, Into::into)
}

/// `state_get(key_ptr, key_len, buf_ptr, buf_cap) -> i32`: the value's length,
/// the value written to `buf` if it fits in `buf_cap` (as `peer` does), or a
/// negative code (`not_found`, `key_too_long`, `too_many_calls`).
fn state_get(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    buf_ptr: i32,
    buf_cap: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "state_get")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    // The key is copied out first: the value may be written over it.
    let mut key = [0u8; crate::state::MAX_KEY];
    let key = match region(memory, key_ptr, key_len, "state_get", "the key")? {
        k if k.len() <= key.len() => {
            key[..k.len()].copy_from_slice(k);
            &key[..k.len()]
        }
        // Refused, but counted against the allowance like every other call.
        _ => return Ok(code(state.state_call().and(Err::<i32, _>(StateError::KeyTooLong)))),
    };
    let start = buf_ptr as u32 as usize;
    let cap = buf_cap as u32 as usize;
    let written = state.state_get(key, |value| {
        if value.len() > cap {
            return Ok(value.len());
        }
        match start
            .checked_add(value.len())
            .and_then(|end| memory.get_mut(start..end))
        {
            Some(dst) => {
                dst.copy_from_slice(value);
                Ok(value.len())
            }
            None => Err(start),
        }
    });
    match written {
        Ok(Ok(len)) => Ok(len as i32),
        Ok(Err(start)) => wasmtime::bail!("wasmgate.state_get: buffer at {start}..+{cap} lies outside guest memory"),
        Err(error) => Ok(error.code()),
    }
}

/// `state_set(key_ptr, key_len, value_ptr, value_len, ttl_ms: i64) -> i32`.
fn state_set(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
    ttl_ms: i64,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "state_set")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "state_set", "the key")?;
    let value = region(memory, value_ptr, value_len, "state_set", "the value")?;
    Ok(code(state.state_set(key, value, ttl_ms).map(|()| 0)))
}

/// `state_delete(key_ptr, key_len) -> i32`: 1 if it was there, else 0.
fn state_delete(mut caller: Caller<'_, HostState>, key_ptr: i32, key_len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "state_delete")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "state_delete", "the key")?;
    Ok(code(state.state_delete(key)))
}

/// `state_incr(key_ptr, key_len, delta: i64, ttl_ms: i64) -> i64`: the new
/// count, which saturates at [`COUNTER_MIN`](crate::state::COUNTER_MIN) and `i64::MAX`; below
/// `COUNTER_MIN` it is an error: `i64::MIN - code` (`i64::MIN + 14` is `not_a_counter`).
fn state_incr(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    delta: i64,
    ttl_ms: i64,
) -> wasmtime::Result<i64> {
    let mem = memory(&mut caller, "state_incr")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "state_incr", "the key")?;
    Ok(match state.state_incr(key, delta, ttl_ms) {
        Ok(n) => n,
        Err(error) => i64::MIN - i64::from(error.code()),
    })
}

/// `state_cas(key_ptr, key_len, expected_ptr, expected_len, value_ptr,
/// value_len, ttl_ms: i64) -> i32`: 0 when set, `mismatch` when the value was
/// not the expected one. `expected_len` -1: only if the key is absent.
#[allow(clippy::too_many_arguments)]
fn state_cas(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    expected_ptr: i32,
    expected_len: i32,
    value_ptr: i32,
    value_len: i32,
    ttl_ms: i64,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "state_cas")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "state_cas", "the key")?;
    let expected = match expected_len {
        -1 => None,
        len => Some(region(memory, expected_ptr, len, "state_cas", "the expected value")?),
    };
    let value = region(memory, value_ptr, value_len, "state_cas", "the value")?;
    Ok(code(state.state_cas(key, expected, value, ttl_ms).map(|()| 0)))
}

/// `limit(key_ptr, key_len, rate_per_s, burst) -> i32`: 1 allowed, 0 denied
/// (both unsigned; rate 0 never refills).
fn limit(
    mut caller: Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    rate: i32,
    burst: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "limit")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "limit", "the key")?;
    Ok(code(state.limit(key, rate as u32, burst as u32)))
}

/// `penalize(key_ptr, key_len, ttl_ms: i64) -> i32`: 0, or a negative code.
fn penalize(mut caller: Caller<'_, HostState>, key_ptr: i32, key_len: i32, ttl_ms: i64) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "penalize")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "penalize", "the key")?;
    Ok(code(state.penalize(key, ttl_ms).map(|()| 0)))
}

/// `penalized(key_ptr, key_len) -> i32`: 1 or 0.
fn penalized(mut caller: Caller<'_, HostState>, key_ptr: i32, key_len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "penalized")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "penalized", "the key")?;
    Ok(code(state.penalized(key)))
}

/// `now_ms() -> i64`: milliseconds on the state's clock, the one TTLs run
/// on (monotonic and coarse; read once per datagram). Not a state call: not
/// counted against the allowance.
fn now_ms(mut caller: Caller<'_, HostState>) -> i64 {
    (caller.data_mut().clock() / 1_000_000) as i64
}
