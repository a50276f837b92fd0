//! The functions the host offers ABI v1 guests: `wasmgate.log`, `wasmgate.peer`,
//! the forwarding verbs (`forward`, `forward_key`, `send`, `upstream`), and
//! `env.abort`, which AssemblyScript imports by default. The state calls are
//! in `state_calls.rs`.
//!
//! Each reads or writes guest memory only through bounds-checked accessors and
//! traps, with a message saying why, when a guest passes a region outside its memory.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use wasmtime::{Caller, Engine, Extern, Linker, Memory};

use crate::guest::instance_limits::InstanceLimits;

use crate::guest::abi::HOST_MODULE;
use crate::metrics::RateLimit;
use crate::state::State;
use crate::upstream::Lent;
use crate::verdict::{Allowance, CallError, DropReason, MAX_CALLS_PER_DATAGRAM, MAX_DATAGRAM, OUTPUT_CAP};

/// Per-store host state: what the host functions need to answer a guest.
pub(crate) struct HostState {
    pub(crate) limits: InstanceLimits,
    /// The client whose datagram is being handled; `None` while the start function runs.
    pub(crate) peer: Option<SocketAddr>,
    /// Shared by every instance, so a chatty guest cannot flood the log.
    pub(crate) log_limit: Arc<RateLimit>,
    /// The worker's sessions, lent to the store for the length of one call.
    pub(crate) sessions: Lent,
    /// What the guest asked for during the call in progress.
    pub(crate) out: Outbox,
    /// Inside `on_reply`: the endpoint that sent the datagram, as `POOL/ip:port`.
    pub(crate) upstream: String,
    /// The listener's shared state (`state_*`, `limit`, `penalize`).
    pub(crate) state: Arc<State>,
    /// An ABI v1 instance's `memory`, kept once it is instantiated: looking
    /// the export up by name on every host call costs more than the call.
    pub(crate) memory: Option<Memory>,
    /// The state's clock, read at the datagram's first state call and kept
    /// for the rest: it ticks in milliseconds, and a call costs less than a
    /// clock read.
    pub(crate) now: Option<u64>,
}

impl HostState {
    /// Readies the state for one call about `peer`'s datagram: lends it the
    /// worker's sessions, empties the outbox with `budget` bytes for the client,
    /// and (inside `on_reply`) names the endpoint. [`HostState::take_back`] ends it.
    pub(crate) fn lend(&mut self, peer: SocketAddr, sessions: &mut Lent, allowance: Allowance, upstream: &str) {
        self.peer = Some(peer);
        self.sessions = sessions.take();
        self.out.reset(allowance);
        self.now = None;
        self.upstream.push_str(upstream);
    }

    /// Gives the sessions back after a call, whatever its outcome.
    pub(crate) fn take_back(&mut self, sessions: &mut Lent) {
        *sessions = self.sessions.take();
        self.upstream.clear();
    }

    /// `forward`/`forward_key` for every kind of guest: hands `data` to an
    /// endpoint of `pool` for the current client, or says why not (and counts
    /// the refusal).
    pub(crate) fn forward(&mut self, pool: &[u8], key: Option<&[u8]>, data: &[u8]) -> Result<(), CallError> {
        let result = self.out.count_call().and_then(|()| {
            if self.peer.is_none() {
                return Err(CallError::NoClient);
            }
            if data.len() > MAX_DATAGRAM {
                return Err(CallError::Oversize);
            }
            match self.sessions.as_mut() {
                Some(sessions) => sessions.forward(pool, key, data),
                None => Err(CallError::UnknownPool),
            }
        });
        match result {
            Ok(()) => self.out.forwarded += 1,
            Err(error) => self.out.refuse(error),
        }
        result
    }

    /// `send` for every kind of guest: queues one more datagram for the client
    /// within the amplification budget, or says why not (and counts the refusal).
    pub(crate) fn send(&mut self, data: &[u8]) -> Result<(), CallError> {
        let out = &mut self.out;
        let result = out.count_call().and_then(|()| {
            if self.peer.is_none() {
                Err(CallError::NoClient)
            } else if data.len() > MAX_DATAGRAM {
                Err(CallError::Oversize)
            } else if data.len() > out.budget {
                Err(CallError::Amplification)
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                out.budget -= data.len();
                out.data.extend_from_slice(data);
                out.ends.push(out.data.len());
            }
            Err(error) => out.refuse(error),
        }
        result
    }
}

/// What one call of `handle` or `on_reply` did besides its return value: the
/// datagrams it `send`s (kept here until the call ends), what it forwarded, and
/// what was refused. Its buffers are reused from call to call.
#[derive(Debug)]
pub(crate) struct Outbox {
    data: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes the guest may still send the client for this datagram.
    pub(crate) budget: usize,
    calls: u32,
    /// Calls this call may make (fewer inside a long `on_reply` chain).
    call_limit: u32,
    pub(crate) forwarded: u32,
    /// Refusals by reason, until the worker takes them ([`Outbox::take_refused`]).
    refused: [u32; CallError::ALL.len()],
    /// The first refusal: the reason a datagram that got nowhere is dropped for.
    pub(crate) first_refusal: Option<CallError>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            data: Vec::new(),
            ends: Vec::new(),
            budget: 0,
            calls: 0,
            call_limit: MAX_CALLS_PER_DATAGRAM,
            forwarded: 0,
            refused: [0; CallError::ALL.len()],
            first_refusal: None,
        }
    }
}

impl Outbox {
    /// Empties the outbox for a call with `allowance`.
    pub(crate) fn reset(&mut self, allowance: Allowance) {
        self.data.clear();
        self.ends.clear();
        self.budget = allowance.bytes;
        self.call_limit = allowance.calls.min(MAX_CALLS_PER_DATAGRAM);
        self.calls = 0;
        self.forwarded = 0;
        self.refused = [0; CallError::ALL.len()];
        self.first_refusal = None;
    }

    /// The datagrams `send` queued, in order.
    pub(crate) fn sends(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let d = &self.data[start..end];
            start = end;
            d
        })
    }

    /// The refusals counted since they were last taken, by reason; taking them
    /// leaves none, so that each is counted once whatever the call's outcome.
    pub(crate) fn take_refused(&mut self) -> impl Iterator<Item = (CallError, u32)> + use<> {
        let refused = std::mem::take(&mut self.refused);
        CallError::ALL.into_iter().zip(refused).filter(|&(_, n)| n > 0)
    }

    /// Whether a returned reply of `len` bytes fits what is left of the budget
    /// `send` shares. When it does not but sends went out, the reply is refused
    /// like a send (`Ok(false)`) and the sends still go; with no sends the
    /// datagram is dropped for amplification.
    pub(crate) fn admit_reply(&mut self, len: usize) -> Result<bool, DropReason> {
        if len <= self.budget {
            return Ok(true);
        }
        if self.ends.is_empty() {
            return Err(DropReason::Amplification);
        }
        self.refuse(CallError::Amplification);
        Ok(false)
    }

    /// Counts a refused call under its reason.
    pub(crate) fn refuse(&mut self, error: CallError) {
        self.refused[error.index()] += 1;
        self.first_refusal.get_or_insert(error);
    }

    /// The `forward`/`send` calls made, refused ones included.
    pub(crate) fn calls(&self) -> u32 {
        self.calls
    }

    /// Counts a call, refusing it past the call's limit.
    pub(super) fn count_call(&mut self) -> Result<(), CallError> {
        if self.calls >= self.call_limit {
            return Err(CallError::TooMany);
        }
        self.calls += 1;
        Ok(())
    }
}

/// A linker with these host functions defined (the runtime adds the state
/// calls); filled once per engine.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(HOST_MODULE, "log", log)?;
    linker.func_wrap(HOST_MODULE, "peer", peer)?;
    linker.func_wrap(HOST_MODULE, "forward", forward)?;
    linker.func_wrap(HOST_MODULE, "forward_key", forward_key)?;
    linker.func_wrap(HOST_MODULE, "send", send)?;
    linker.func_wrap(HOST_MODULE, "upstream", upstream)?;
    linker.func_wrap("env", "abort", abort)?;
    Ok(linker)
}

pub(super) fn memory(caller: &mut Caller<'_, HostState>, function: &str) -> wasmtime::Result<Memory> {
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
fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let mem = memory(&mut caller, "log")?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        wasmtime::bail!("wasmgate.log: message at {start}..+{len} lies outside guest memory");
    };
    log_text(caller.data(), level, bytes);
    Ok(())
}

/// Logs a guest's message at its level (0 error .. 4 or more trace), cut to
/// 1 KiB, rate-limited, with the client it is about: `log` for every kind of guest.
pub(crate) fn log_text(state: &HostState, level: i32, bytes: &[u8]) {
    let level = match level {
        i32::MIN..=0 => tracing::Level::ERROR,
        1 => tracing::Level::WARN,
        2 => tracing::Level::INFO,
        3 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let enabled = match level {
        tracing::Level::ERROR => tracing::enabled!(target: "wasmgate::guest", tracing::Level::ERROR),
        tracing::Level::WARN => tracing::enabled!(target: "wasmgate::guest", tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO),
        tracing::Level::DEBUG => tracing::enabled!(target: "wasmgate::guest", tracing::Level::DEBUG),
        _ => tracing::enabled!(target: "wasmgate::guest", tracing::Level::TRACE),
    };
    if !enabled {
        return;
    }
    let Some(suppressed) = state.log_limit.allow() else {
        return;
    };
    // Control characters are escaped by the log formatter (text) or by JSON.
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_CAP)]);
    let peer = state.peer.map(|p| p.to_string()).unwrap_or_default();
    macro_rules! emit {
        ($lvl:expr) => {
            tracing::event!(target: "wasmgate::guest", $lvl, %peer, suppressed, "{text}")
        };
    }
    match level {
        tracing::Level::ERROR => emit!(tracing::Level::ERROR),
        tracing::Level::WARN => emit!(tracing::Level::WARN),
        tracing::Level::INFO => emit!(tracing::Level::INFO),
        tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
        _ => emit!(tracing::Level::TRACE),
    }
}

/// `peer(ptr: i32, cap: i32) -> i32`: writes the client's address as UTF-8 text
/// `ip:port` (IPv6 as `[ip]:port`) to `ptr` if it fits in `cap` bytes, and returns
/// its length either way, so a guest can retry with a larger buffer. Outside a
/// datagram (in the start function) there is no client: it returns 0.
fn peer(mut caller: Caller<'_, HostState>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
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

/// Writes `addr` as `SocketAddr`'s `Display` does, into `buf`; its length.
/// IPv4, by far the most common, with `itoa` and no formatting machinery,
/// which costs more than the rest of the call; guests ask on every datagram.
fn peer_text(addr: &SocketAddr, buf: &mut [u8; 64]) -> std::io::Result<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            // At most "255.255.255.255:65535", 21 bytes.
            let mut digits = itoa::Buffer::new();
            let mut at = 0;
            let mut put = |text: &str| {
                buf[at..at + text.len()].copy_from_slice(text.as_bytes());
                at += text.len();
            };
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    put(".");
                }
                put(digits.format(octet));
            }
            put(":");
            put(digits.format(v4.port()));
            Ok(at)
        }
        SocketAddr::V6(_) => {
            // "[" + 45-char IPv6 + "%" + 10-digit scope + "]:" + 5-digit port fits in 64 bytes.
            let mut cursor = &mut buf[..];
            write!(cursor, "{addr}")?;
            Ok(64 - cursor.len())
        }
    }
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
    caller: Caller<'_, HostState>,
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
    caller: Caller<'_, HostState>,
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
    mut caller: Caller<'_, HostState>,
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
fn send(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "send")?;
    let (memory, state) = mem.data_and_store_mut(&mut caller);
    let data = region(memory, ptr, len, "send", "the data")?;
    Ok(match state.send(data) {
        Ok(()) => 0,
        Err(error) => error.code(),
    })
}

/// `upstream(ptr: i32, cap: i32) -> i32`: inside `on_reply`, the endpoint that
/// sent the datagram as `POOL/ip:port`, written if it fits in `cap` bytes; its
/// length either way. Elsewhere 0.
fn upstream(mut caller: Caller<'_, HostState>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
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
fn abort(mut caller: Caller<'_, HostState>, message: i32, file: i32, line: i32, column: i32) -> wasmtime::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_what_display_writes() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:53",
            "10.20.30.40:8080",
            "255.255.255.255:65535",
            "1.2.3.4:5",
            "[::1]:53",
            "[fe80::1%4294967295]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:1",
        ];
        for text in addrs {
            let addr: SocketAddr = text.parse().unwrap();
            let mut buf = [0u8; 64];
            let len = peer_text(&addr, &mut buf).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), addr.to_string());
        }
        // Every digit count of an octet and of a port.
        for octet in [0u8, 9, 10, 99, 100, 255] {
            for port in [0u16, 9, 10, 99, 100, 999, 1000, 9999, 10000, 65535] {
                let addr = SocketAddr::from(([octet, 255 - octet, octet / 2, 1], port));
                let mut buf = [0u8; 64];
                let len = peer_text(&addr, &mut buf).unwrap();
                assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), addr.to_string());
            }
        }
    }

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
