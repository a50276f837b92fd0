//! wasmgate: a UDP gateway whose behaviour is a sandboxed, hot-swappable
//! WebAssembly module.
//!
//! # Layout
//!
//! - [`cli`]: the command line, and the `serve`, `check`, `send`, `new` and
//!   `replay` commands; [`cli::new`] makes a handler project from `templates/`.
//! - [`config`]: listeners from flags or a TOML file, checked before anything binds;
//!   every listener setting and its default as plain data (no engine, no socket).
//! - [`service`]: running every listener, the signals, and under it
//!   [`service::reload`] (watching module files, publishing new versions safely)
//!   and [`service::exposition`] (Prometheus metrics over HTTP, read from the
//!   counters at scrape time).
//! - [`gateway`]: the datagram path: a listener's socket group and its handle
//!   (`mod.rs`), each worker's socket-free decisions (`core.rs`:
//!   `Core<H: Handler, T: Tap>`, client and upstream datagrams in, replies and
//!   session commands out), what answers (`handler.rs`) and what watches
//!   (`tap.rs`), the worker thread's I/O around them (`worker.rs`), what the
//!   workers share (`shared.rs`); `loop_guard.rs` ends loops with other
//!   gateways that no local check can see.
//! - [`prove`]: proving a module before it serves: [`prove::capture`] reads
//!   pcap and pcapng captures and records a listener's datagrams (`--record`)
//!   to files no planted link can redirect; [`prove::replay`] runs a capture
//!   through a module, streamed, on the core with no socket (`offline.rs`);
//!   `--candidate` is judged in `candidate.rs`, served to canary clients by
//!   `canary.rs` (a handler wrapping two guests), sampled with the recorder by
//!   `tap.rs` (a tap), and run beside the active module by the thread of
//!   `shadow.rs`.
//! - [`guest`]: loading modules (`loader.rs`, the one place that tells a
//!   module's kind, for serving, reloads and `check`), running a guest under
//!   limits (`runner.rs`, which lends a call the worker's sessions); the host
//!   calls written once (`host/`), and a folder per kind (`abi_v1/`,
//!   `wasi_command/`, `component/`) that adapts its imports to them.
//! - [`state`]: the key-value store, limits and penalties a listener's
//!   handlers share (`store.rs`: sharded, bounded, clock-free; `shard.rs`: one
//!   shard under its lock), behind the
//!   `state_*` host calls; `cluster.rs` merges what gateways share through
//!   Redis, `redis.rs` is the flusher thread that talks to it over the link in
//!   `link.rs`, and `scope.rs` what the flusher and the datagram path share.
//! - [`engine`]: the wasmtime engine's settings, reading and compiling module bytes,
//!   ([`engine::child`]) compiling in a child process under CPU-time and memory
//!   bounds, ([`engine::budget`]) a guest call's CPU-time budget, and
//!   ([`engine::cache`]) compiled modules kept on disk, trusted only when their
//!   HMAC checks out.
//! - [`metrics`]: per-worker counters, drop reasons, rate-limited warnings.
//! - [`upstream`]: a listener's pools ([`upstream::pool`]: endpoint choice by
//!   policy, rendezvous hashing, ejection shared by every worker; I/O-free), and
//!   one worker's session table with no socket and no clock of its own
//!   (affinity, caps, idle expiry, drain, passive health), with each client's
//!   ledger (`ledger.rs`: what it may be sent, when it proved its address): it
//!   emits open/send/close commands.
//! - [`net`]: sockets and addresses: batched receive and send
//!   ([`net::batch`], `recvmmsg`/`sendmmsg` with buffers allocated once), the
//!   session sockets that apply the session table's commands, and
//!   ([`net::source_filter`]) the client sources never answered (denied ports,
//!   our own sockets, upstream endpoints), so that a spoofed datagram cannot
//!   start a loop; [`net::proxy_v2`] reads and writes the PROXY protocol v2
//!   header of a datagram.
//! - [`verdict`]: what can happen to a datagram or a guest's call (drop reasons,
//!   call errors, their codes and labels); pure, imported by every layer.
//! - [`text`]: outside text (guest logs, file contents, replies) escaped and cut for printing.
//!
//! # Running a guest without a network
//!
//! ```
//! use std::sync::Arc;
//! use wasmgate::config::{Isolation, Limits};
//! use wasmgate::guest::{Guest, Env};
//!
//! let env = Env::new(Limits::default())?;
//! let program = Arc::new(env.load("uppercase", wasmgate::DEFAULT_GUEST_WASM)?);
//! let mut guest = Guest::new(env, program, Isolation::Reuse, 3.0);
//! assert_eq!(guest.handle(b"chen", "127.0.0.1:9".parse()?)?, b"CHEN");
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod cli;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod guest;
pub mod metrics;
pub mod net;
pub mod prove;
pub mod service;
pub mod state;
pub mod text;
pub mod upstream;
pub mod verdict;

/// The default guest (`guest/uppercase`), built by `scripts/build-guests.sh`.
pub const DEFAULT_GUEST_WASM: &[u8] = include_bytes!("../guest/uppercase.wasm");
