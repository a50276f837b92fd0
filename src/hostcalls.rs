//! The functions the host offers guests under the `wasmgate` import module.
//!
//! Each reads or writes guest memory only through bounds-checked accessors and
//! traps, with a message saying why, when a guest passes a region outside its memory.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use wasmtime::{Caller, Engine, Extern, Linker, Memory, StoreLimits};

use crate::abi::HOST_MODULE;
use crate::metrics::RateLimit;

/// The longest guest log message passed on; the rest is cut off.
const MAX_LOG_BYTES: usize = 1024;

/// Per-store host state: what the host functions need to answer a guest.
pub(crate) struct HostState {
    pub(crate) limits: StoreLimits,
    /// The client whose datagram is being handled; `None` while the start function runs.
    pub(crate) peer: Option<SocketAddr>,
    /// Shared by every instance, so a chatty guest cannot flood the log.
    pub(crate) log_limit: Arc<RateLimit>,
}

/// A linker with every host function defined; filled once per engine.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(HOST_MODULE, "log", log)?;
    linker.func_wrap(HOST_MODULE, "peer", peer)?;
    Ok(linker)
}

fn memory(caller: &mut Caller<'_, HostState>, function: &str) -> wasmtime::Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("wasmgate.{function}: the guest exports no `memory`"),
    }
}

/// `log(level: i32, ptr: i32, len: i32)`: logs `len` bytes of UTF-8 text at `ptr`
/// (invalid UTF-8 is replaced, long messages are cut to 1 KiB) at `level`:
/// 0 error, 1 warn, 2 info, 3 debug, 4 or more trace. Lines are rate-limited.
fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<()> {
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
    let mem = memory(&mut caller, "log")?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        wasmtime::bail!("wasmgate.log: message at {start}..+{len} lies outside guest memory");
    };
    if !enabled {
        return Ok(());
    }
    let Some(suppressed) = caller.data().log_limit.allow() else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&bytes[..len.min(MAX_LOG_BYTES)]);
    let peer = caller.data().peer.map(|p| p.to_string()).unwrap_or_default();
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
    Ok(())
}

/// `peer(ptr: i32, cap: i32) -> i32`: writes the client's address as UTF-8 text
/// `ip:port` (IPv6 as `[ip]:port`) to `ptr` if it fits in `cap` bytes, and returns
/// its length either way, so a guest can retry with a larger buffer. Outside a
/// datagram (in the start function) there is no client: it returns 0.
fn peer(mut caller: Caller<'_, HostState>, ptr: i32, cap: i32) -> wasmtime::Result<i32> {
    let Some(addr) = caller.data().peer else {
        return Ok(0);
    };
    // "[" + 45-char IPv6 + "%" + 10-digit scope + "]:" + 5-digit port fits in 64 bytes.
    let mut buf = [0u8; 64];
    let mut cursor = &mut buf[..];
    write!(cursor, "{addr}")?;
    let len = 64 - cursor.len();
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
