//! Every integration test that runs the gateway in this process, in one binary
//! (as wasmtime's own `tests/all/`): each test binary links wasmtime, and 24 of
//! them took 24 links and gigabytes of `target/`. Each module is the suite of
//! one concern; the tests that need the built binary as a process (its log
//! lines, signals, exit codes, a second process) are in `tests/cli/`. Run one
//! suite with `cargo test --test all SUITE::`.

#[path = "../common/mod.rs"]
mod common;

mod access_log;
mod components;
mod dashboard;
mod dns_proxy;
mod dns_state;
mod docs;
mod examples;
mod forwarding;
mod guest_metrics;
mod hardening;
mod health;
mod hostile;
mod overload;
mod pools;
mod production;
mod proxy_v2;
mod reload;
mod replay;
mod sdk;
mod seed;
mod shadow;
mod shared_pools;
mod spoofing;
mod state;
mod wasi;
