//! Every integration test, in one binary (as wasmtime's own `tests/all/`):
//! each links wasmtime, and 24 binaries took 24 links and gigabytes of
//! `target/`. Each module is the suite of one concern; `common` holds the
//! helpers they share. Run one suite with `cargo test --test all SUITE::`.

mod common;

mod binary;
mod cluster;
mod components;
mod dns_proxy;
mod dns_state;
mod docs;
mod examples;
mod forwarding;
mod hardening;
mod hostile;
mod invalid;
mod new;
mod overload;
mod pools;
mod production;
mod proxy_v2;
mod reload;
mod replay;
mod sdk;
mod seed;
mod shadow;
mod spoofing;
mod state;
mod wasi;
