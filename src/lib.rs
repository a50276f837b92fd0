//! wasmgate: a UDP gateway whose behaviour is a sandboxed, hot-swappable
//! WebAssembly module.
//!
//! # Layout
//!
//! - [`cli`]: the command line, and the `serve` and `check` commands.
//! - [`server`]: the datagram path: sockets, worker threads, the receive loop.
//! - [`sandbox`]: the wasmtime engine, loading modules, running a guest under limits.
//! - [`abi`]: guest ABI v1: required exports, allowed imports, reply checks (pure).
//! - `hostcalls`: the functions guests may import from `wasmgate`.
//! - [`metrics`]: per-worker counters, drop reasons, rate-limited warnings.

pub mod abi;
pub mod cli;
mod hostcalls;
pub mod metrics;
pub mod sandbox;
pub mod server;

/// The default guest (`guest/uppercase`), built by `scripts/build-guests.sh`.
pub const DEFAULT_GUEST_WASM: &[u8] = include_bytes!("../guest/uppercase.wasm");
