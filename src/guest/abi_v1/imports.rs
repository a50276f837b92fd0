//! ABI v1's imports: each reads its arguments from guest memory through
//! bounds-checked accessors (a region outside memory traps, with a message
//! saying why) and calls the host call of `guest::host` it adapts. Besides the
//! `wasmgate` module, `env.abort`, which AssemblyScript imports by default.

use wasmtime::{Caller, Engine, Extern, Linker, Memory};

use crate::guest::abi::HOST_MODULE;
use crate::guest::host::{Calls, peer_text};
use crate::verdict::StateError;

/// A linker with these host functions defined (the runtime adds the state
/// calls with [`define`]); filled once per engine.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<Calls>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(HOST_MODULE, "log", log)?;
    linker.func_wrap(HOST_MODULE, "peer", peer)?;
    linker.func_wrap(HOST_MODULE, "forward", forward)?;
    linker.func_wrap(HOST_MODULE, "forward_key", forward_key)?;
    linker.func_wrap(HOST_MODULE, "send", send)?;
    linker.func_wrap(HOST_MODULE, "upstream", upstream)?;
    linker.func_wrap(HOST_MODULE, "note", note)?;
    linker.func_wrap(HOST_MODULE, "client", |mut caller: Caller<'_, Calls>| -> i64 {
        match caller.data_mut().client() {
            Ok(handle) => handle as i64,
            Err(error) => i64::from(error.code()),
        }
    })?;
    linker.func_wrap(
        HOST_MODULE,
        "reply_to",
        |mut caller: Caller<'_, Calls>, handle: i64| -> i32 {
            // A negative handle was never given: stale, like any unknown one.
            match caller.data_mut().reply_to(handle as u64) {
                Ok(()) => 0,
                Err(error) => error.code(),
            }
        },
    )?;
    linker.func_wrap("env", "abort", abort)?;
    Ok(linker)
}

pub(super) fn memory(caller: &mut Caller<'_, Calls>, function: &str) -> wasmtime::Result<Memory> {
    if let Some(memory) = caller.data().memory {
        return Ok(memory);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("wasmgate.{function}: the guest exports no `memory`"),
    }
}

/// `log(level: i32, ptr: i32, len: i32)`: logs `len` bytes of UTF-8 text at `ptr`
/// (invalid UTF-8 is replaced, long messages are cut to 1 KiB) at `level`:
/// 0 error, 1 warn, 2 info, 3 debug, 4 or more trace. Lines are rate-limited.
fn log(mut caller: Caller<'_, Calls>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let mem = memory(&mut caller, "log")?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        wasmtime::bail!("wasmgate.log: message at {start}..+{len} lies outside guest memory");
    };
    caller.data().log(level, bytes);
    Ok(())
}

/// `peer(ptr: i32, cap: i32) -> i32`: writes the client's address as UTF-8 text
/// `ip:port` (IPv6 as `[ip]:port`) to `ptr` if it fits in `cap` bytes, and returns
/// its length either way, so a guest can retry with a larger buffer. Outside a
/// datagram (in the start function) there is no client: it returns 0.
fn peer(mut caller: Caller<'_, Calls>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let Some(addr) = caller.data().peer else {
        return Ok(0);
    };
    let mut buf = [0u8; 64];
    let len = peer_text(&addr, &mut buf)?;
    if len <= cap as u32 as usize {
        let mem = memory(&mut caller, "peer")?;
        if mem.write(&mut caller, ptr as u32 as usize, &buf[..len]).is_err() {
            wasmtime::bail!(
                "wasmgate.peer: buffer at {}..+{len} lies outside guest memory",
                ptr as u32
            );
        }
    }
    Ok(len as i32)
}

/// The bytes at `ptr..ptr+len` of guest memory, or a trap naming the call and region.
pub(super) fn region<'m>(
    memory: &'m [u8],
    ptr: i32,
    len: i32,
    function: &str,
    what: &str,
) -> wasmtime::Result<&'m [u8]> {
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    match start.checked_add(len).and_then(|end| memory.get(start..end)) {
        Some(bytes) => Ok(bytes),
        None => wasmtime::bail!("wasmgate.{function}: {what} at {start}..+{len} lies outside guest memory"),
    }
}

/// `forward(pool_ptr, pool_len, data_ptr, data_len) -> i32`: queues `data` for an
/// endpoint of the named pool, on behalf of the current client; 0 when queued,
/// else a negative [`CallError::code`] the session table decided.
fn forward(
    caller: Caller<'_, Calls>,
    pool_ptr: i32,
    pool_len: i32,
    data_ptr: i32,
    data_len: i32,
) -> wasmtime::Result<i32> {
    forward_any(caller, "forward", (pool_ptr, pool_len), None, (data_ptr, data_len))
}

/// `forward_key(pool_ptr, pool_len, key_ptr, key_len, data_ptr, data_len) -> i32`:
/// as `forward`, but the endpoint is chosen by hashing `key`.
fn forward_key(
    caller: Caller<'_, Calls>,
    pool_ptr: i32,
    pool_len: i32,
    key_ptr: i32,
    key_len: i32,
    data_ptr: i32,
    data_len: i32,
) -> wasmtime::Result<i32> {
    forward_any(
        caller,
        "forward_key",
        (pool_ptr, pool_len),
        Some((key_ptr, key_len)),
        (data_ptr, data_len),
    )
}

fn forward_any(
    mut caller: Caller<'_, Calls>,
    function: &str,
    pool: (i32, i32),
    key: Option<(i32, i32)>,
    data: (i32, i32),
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, function)?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let pool = region(memory, pool.0, pool.1, function, "the pool name")?;
    let key = match key {
        Some((ptr, len)) => Some(region(memory, ptr, len, function, "the key")?),
        None => None,
    };
    let data = region(memory, data.0, data.1, function, "the data")?;
    Ok(match state.forward(pool, key, data) {
        Ok(()) => 0,
        Err(error) => error.code(),
    })
}

/// `send(ptr, len) -> i32`: one more datagram to the client. Everything sent in
/// answer to one datagram shares one amplification budget; 0 when queued.
fn send(mut caller: Caller<'_, Calls>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "send")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let data = region(memory, ptr, len, "send", "the data")?;
    Ok(match state.send(data) {
        Ok(()) => 0,
        Err(error) => error.code(),
    })
}

/// `note(ptr, len) -> i32`: a text about this datagram for the access log,
/// cut to 256 bytes (a later note replaces it); 0, or `too_many_calls`.
fn note(mut caller: Caller<'_, Calls>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "note")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let text = region(memory, ptr, len, "note", "the text")?;
    Ok(match state.note(text) {
        Ok(()) => 0,
        Err(error) => error.code(),
    })
}

/// `upstream(ptr: i32, cap: i32) -> i32`: inside `on_reply`, the endpoint that
/// sent the datagram as `POOL/ip:port`, written if it fits in `cap` bytes; its
/// length either way. Elsewhere 0.
fn upstream(mut caller: Caller<'_, Calls>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let len = caller.data().upstream.len();
    if len > 0 && len <= cap as u32 as usize {
        let mem = memory(&mut caller, "upstream")?;
        let (memory, state) = mem.data_and_store_mut(&mut caller);
        let start = ptr as u32 as usize;
        match start.checked_add(len).and_then(|end| memory.get_mut(start..end)) {
            Some(dst) => dst.copy_from_slice(state.upstream.as_bytes()),
            None => wasmtime::bail!("wasmgate.upstream: buffer at {start}..+{len} lies outside guest memory"),
        }
    }
    Ok(len as i32)
}

/// The longest AssemblyScript string read for an abort message, in UTF-16 units.
const MAX_ABORT_UNITS: usize = 256;

/// `env.abort(message: i32, file: i32, line: i32, column: i32)`: AssemblyScript's
/// failed assertion or runtime error. Traps with the message and where it came
/// from; the datagram is then counted as a trap, and the gateway's rate-limited
/// drop warning carries this text, so it is not logged here a second time.
fn abort(mut caller: Caller<'_, Calls>, message: i32, file: i32, line: i32, column: i32) -> wasmtime::Result<()> {
    let mem = memory(&mut caller, "abort")?;
    let data = mem.data(&caller);
    wasmtime::bail!(
        "env.abort: {} at {}:{}:{}",
        assemblyscript_string(data, message).unwrap_or_else(|| "abort".into()),
        assemblyscript_string(data, file).unwrap_or_else(|| "?".into()),
        line as u32,
        column as u32
    )
}

/// Reads an AssemblyScript string: UTF-16LE at `ptr`, its length in bytes in the
/// 4 bytes before it. `None` for a null pointer or a string outside memory; a long
/// string is cut short.
fn assemblyscript_string(data: &[u8], ptr: i32) -> Option<String> {
    let ptr = ptr as u32 as usize;
    if ptr < 4 {
        return None;
    }
    let size: [u8; 4] = data.get(ptr - 4..ptr)?.try_into().ok()?;
    let len = (u32::from_le_bytes(size) as usize / 2).min(MAX_ABORT_UNITS);
    let bytes = data.get(ptr..ptr.checked_add(len * 2)?)?;
    let units = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    Some(
        char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
    )
}

/// Defines the state calls in `linker`.
pub(crate) fn define(linker: &mut Linker<Calls>) -> wasmtime::Result<()> {
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
    mut caller: Caller<'_, Calls>,
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
    mut caller: Caller<'_, Calls>,
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
fn state_delete(mut caller: Caller<'_, Calls>, key_ptr: i32, key_len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "state_delete")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "state_delete", "the key")?;
    Ok(code(state.state_delete(key)))
}

/// `state_incr(key_ptr, key_len, delta: i64, ttl_ms: i64) -> i64`: the new
/// count, which saturates at [`COUNTER_MIN`](crate::state::COUNTER_MIN) and `i64::MAX`; below
/// `COUNTER_MIN` it is an error: `i64::MIN - code` (`i64::MIN + 14` is `not_a_counter`).
fn state_incr(
    mut caller: Caller<'_, Calls>,
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
    mut caller: Caller<'_, Calls>,
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
fn limit(mut caller: Caller<'_, Calls>, key_ptr: i32, key_len: i32, rate: i32, burst: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "limit")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "limit", "the key")?;
    Ok(code(state.limit(key, rate as u32, burst as u32)))
}

/// `penalize(key_ptr, key_len, ttl_ms: i64) -> i32`: 0, or a negative code.
fn penalize(mut caller: Caller<'_, Calls>, key_ptr: i32, key_len: i32, ttl_ms: i64) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "penalize")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "penalize", "the key")?;
    Ok(code(state.penalize(key, ttl_ms).map(|()| 0)))
}

/// `penalized(key_ptr, key_len) -> i32`: 1 or 0.
fn penalized(mut caller: Caller<'_, Calls>, key_ptr: i32, key_len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "penalized")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let key = region(memory, key_ptr, key_len, "penalized", "the key")?;
    Ok(code(state.penalized(key)))
}

/// `now_ms() -> i64`: milliseconds on the state's clock, the one TTLs run
/// on (monotonic and coarse; read once per datagram). Not a state call: not
/// counted against the allowance.
fn now_ms(mut caller: Caller<'_, Calls>) -> i64 {
    (caller.data_mut().clock() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16_object(at: usize, text: &str) -> Vec<u8> {
        let mut mem = vec![0u8; at];
        let units: Vec<u16> = text.encode_utf16().collect();
        mem[at - 4..at].copy_from_slice(&((units.len() * 2) as u32).to_le_bytes());
        for u in units {
            mem.extend_from_slice(&u.to_le_bytes());
        }
        mem
    }

    #[test]
    fn assemblyscript_strings_are_read_from_their_header() {
        let mem = utf16_object(16, "héllo ✓");
        assert_eq!(assemblyscript_string(&mem, 16).as_deref(), Some("héllo ✓"));
        assert_eq!(assemblyscript_string(&mem, 0), None, "null");
        assert_eq!(assemblyscript_string(&mem, 2), None, "no room for a header");
        assert_eq!(
            assemblyscript_string(&mem, mem.len() as i32 + 8),
            None,
            "outside memory"
        );
        let mut bad = utf16_object(8, "x");
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(assemblyscript_string(&bad, 8), None, "a length past memory");
        let long = utf16_object(8, &"a".repeat(1000));
        assert_eq!(assemblyscript_string(&long, 8).map(|s| s.len()), Some(MAX_ABORT_UNITS));
    }
}
