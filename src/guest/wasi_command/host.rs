//! WASI command modules as handlers: `_start` runs once per datagram in a fresh
//! instance, with the datagram on stdin, the reply taken from stdout, the client in
//! `WASMGATE_PEER` and stderr passed to the log.
//!
//! WASI itself is wasmtime-wasi's preview 1 implementation, with no preopened
//! directories, no sockets and no inherited environment. `poll_oneoff` (sleeping
//! and waiting) is refused, because it would block the worker outside wasm, where
//! the time budget cannot interrupt it; `random_get` is capped at
//! [`MAX_RANDOM_BYTES`] a call for the same reason, and the socket calls answer
//! `ENOTSOCK` without wasmtime-wasi's unlimited warning line.

use std::net::SocketAddr;

use bytes::Bytes;
use wasmtime::{Engine, Linker};

use crate::guest::instance_limits::InstanceLimits;
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::guest::abi::WASI_MODULE;
use crate::verdict::{MAX_DATAGRAM, OUTPUT_CAP};

/// The environment variable that holds the client's address, as `ip:port`.
pub(crate) const PEER_VARIABLE: &str = "WASMGATE_PEER";

/// The program name a handler sees as `argv[0]`.
const PROGRAM_NAME: &str = "wasmgate-handler";

/// WASI's `ENOTSUP` errno.
const ERRNO_NOTSUP: i32 = 58;

/// WASI's `ENOTSOCK` errno: no descriptor a handler holds is a socket.
const ERRNO_NOTSOCK: i32 = 57;

/// The most one `random_get` may ask for; more traps. wasi-libc's `getentropy`
/// asks for 256 bytes at most; without a cap one call from a small guest makes
/// the host allocate and fill 64 MiB, outside the time budget.
pub(crate) const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// Per-store state of a WASI command instance.
pub(crate) struct WasiHost {
    pub(crate) limits: InstanceLimits,
    wasi: WasiP1Ctx,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

/// A linker with WASI preview 1 defined, but for `poll_oneoff` and the socket
/// calls, which are answered here.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<WasiHost>> {
    let mut linker = Linker::new(engine);
    p1::add_to_linker_sync(&mut linker, |h: &mut WasiHost| &mut h.wasi)?;
    linker.allow_shadowing(true);
    linker.func_wrap(
        WASI_MODULE,
        "poll_oneoff",
        |_subscriptions: i32, _events: i32, _count: i32, _written: i32| -> i32 { ERRNO_NOTSUP },
    )?;
    // wasmtime-wasi logs a warning on every call of these, outside any rate limit,
    // so a guest looping on them would flood the log. A handler has no sockets.
    linker.func_wrap(WASI_MODULE, "sock_accept", |_fd: i32, _flags: i32, _out: i32| -> i32 {
        ERRNO_NOTSOCK
    })?;
    linker.func_wrap(
        WASI_MODULE,
        "sock_recv",
        |_fd: i32, _iovs: i32, _len: i32, _flags: i32, _out_len: i32, _out_flags: i32| -> i32 { ERRNO_NOTSOCK },
    )?;
    linker.func_wrap(
        WASI_MODULE,
        "sock_send",
        |_fd: i32, _iovs: i32, _len: i32, _flags: i32, _out_len: i32| -> i32 { ERRNO_NOTSOCK },
    )?;
    linker.func_wrap(WASI_MODULE, "sock_shutdown", |_fd: i32, _how: i32| -> i32 {
        ERRNO_NOTSOCK
    })?;
    Ok(linker)
}

impl WasiHost {
    /// State for one run: `datagram` on stdin, `peer` in the environment. `None`
    /// (the trial instantiation when a module is loaded) gives an empty stdin and
    /// no `WASMGATE_PEER`.
    pub(crate) fn new(limits: InstanceLimits, datagram: &[u8], peer: Option<SocketAddr>) -> Self {
        // One byte over the largest datagram, so that an oversize reply shows.
        let stdout = MemoryOutputPipe::new(MAX_DATAGRAM + 1);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAP);
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdin(MemoryInputPipe::new(Bytes::copy_from_slice(datagram)))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .max_random_size(MAX_RANDOM_BYTES)
            .arg(PROGRAM_NAME);
        if let Some(peer) = peer {
            builder.env(PEER_VARIABLE, peer.to_string());
        }
        Self {
            limits,
            wasi: builder.build_p1(),
            stdout,
            stderr,
        }
    }

    /// What the program wrote to stdout.
    pub(crate) fn stdout(&self) -> Bytes {
        self.stdout.contents()
    }

    /// What the program wrote to stderr, at most [`OUTPUT_CAP`] (writes past it fail).
    pub(crate) fn stderr(&self) -> Bytes {
        self.stderr.contents()
    }
}

/// Starts wasmtime-wasi's fallback Tokio runtime, on which its synchronous calls
/// block, so that the first datagram does not pay for starting it (about a third of
/// a millisecond here) out of its time budget. Cheap once started.
pub(crate) fn warm_up() {
    wasmtime_wasi::runtime::in_tokio(async {});
}

/// The exit status of a run of `_start`: 0 if it returned, the status if the
/// program called `exit`, or the error if it trapped or ran out of time.
pub(crate) fn exit_status(result: wasmtime::Result<()>) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(status)) => Ok(*status),
            None => Err(e),
        },
    }
}
