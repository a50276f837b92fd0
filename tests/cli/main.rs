//! The integration tests that need the built `wasmgate` binary as a process:
//! its log lines, its signals (SIGHUP, SIGTERM), its exit codes, its flags as a
//! user types them, and more than one gateway process at once. Each module
//! holds the process side of the suite of the same name in `tests/all/`. Run
//! one suite with `cargo test --test cli SUITE::`.

#[path = "../common/mod.rs"]
mod common;

mod binary;
mod cluster;
mod components;
mod examples;
mod forwarding;
mod hardening;
mod invalid;
mod new;
mod pools;
mod production;
mod reload;
mod replay;
mod sdk;
mod shadow;
mod spoofing;
mod state;
