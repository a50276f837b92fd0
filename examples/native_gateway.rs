//! The benchmarks' native baseline: wasmgate's own data path (its sockets,
//! workers, batching and sessions) with a Rust handler in place of the guest,
//! through the handlers of `support/native.rs`. Runs until killed.
//!
//!     cargo run --release --example native_gateway -- --listen 127.0.0.1:18008 [--batch 1]
//!     cargo run --release --example native_gateway -- --listen 127.0.0.1:18008 \
//!         --upstream backend=127.0.0.1:9000
//!
//! Without `--upstream` it uppercases each datagram (as the default guest does);
//! with it, it forwards each datagram to the pool `backend`, and what the
//! upstream answers goes back unchanged (as `examples/forward.wat` does).

use std::net::SocketAddr;

use clap::Parser;
use wasmgate::config::Limits;
use wasmgate::config::ListenerSpec;
use wasmgate::config::{PoolSpec, parse_upstream_flag};
use wasmgate::gateway::Gateway;
use wasmgate::guest::Env;

#[path = "support/native.rs"]
mod native;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18008")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value_t = wasmgate::config::DEFAULT_BATCH)]
    batch: usize,
    /// Forward to this pool (NAME=ENDPOINTS) instead of uppercasing.
    #[arg(long, value_parser = parse_upstream_flag)]
    upstream: Option<PoolSpec>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = Env::new(Limits::default())?;
    let program = env.load("<native>", wasmgate::DEFAULT_GUEST_WASM)?;
    let forwarding = args.upstream.is_some();
    let config = ListenerSpec {
        listen: args.listen,
        workers: args.workers,
        batch: args.batch,
        pools: args
            .upstream
            .map(|p| {
                vec![PoolSpec {
                    name: "backend".into(),
                    ..p
                }]
            })
            .unwrap_or_default(),
        ..ListenerSpec::default()
    };
    let gateway = if forwarding {
        Gateway::start_with_handler(&env, program, &config, native::Forward::default)?
    } else {
        Gateway::start_with_handler(&env, program, &config, native::Uppercase::default)?
    };
    eprintln!(
        "native gateway on {} ({})",
        gateway.local_addr(),
        if forwarding { "forwarding" } else { "uppercase" }
    );
    loop {
        std::thread::park();
    }
}
