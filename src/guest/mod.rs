//! The WebAssembly sandbox: a listener's limits on the process's one engine
//! ([`Runtime`], `runtime.rs`), loading modules into
//! checked [`Program`]s (`loader.rs`, `program.rs`), and running a program as a [`Guest`] under
//! time and memory limits, which gives an [`Answer`] or a [`Rejection`] (`outcome.rs`).
//!
//! A [`Guest`] is I/O-free: it takes a datagram and the client's address and says
//! what to send back, so it is tested without a network.
//!
//! `loader.rs` is the one place that tells a module's kind. What every store
//! needs, whatever its kind, is [`Env`] (`env.rs`); the host calls are written
//! once in `host/`; each kind (`abi_v1/`, `wasi_command/`, `component/`) holds
//! its instances and adapts its imports to `host/`, and never the other way round.

pub mod abi;
mod abi_v1;
pub mod component;
mod env;
mod host;
pub mod instance_limits;
mod kind;
mod loader;
mod outcome;
mod program;
mod runner;
mod runtime;
mod wasi_command;

pub use env::Env;
pub use runner::Guest;

pub use loader::EMBEDDED_ORIGIN;
pub use outcome::{Answer, Rejection};
pub use program::{Program, short_hex};
pub use runtime::Runtime;

/// The stack a worker thread needs: wasmtime stops guests at its 512 KiB
/// `max_wasm_stack` default, and the host needs room on top of that.
pub const WORKER_STACK_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests;
