//! The benchmarks' native baseline: wasmgate's own data path (its sockets,
//! workers, batching and sessions) with a Rust handler in place of the guest,
//! through the library's [`Native`] handlers. Runs until killed.
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
use wasmgate::gateway::{Gateway, Native, NativeAnswer};
use wasmgate::guest::Env;
use wasmgate::upstream::Sessions;

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

struct Uppercase;

impl Native for Uppercase {
    fn handle(&mut self, datagram: &[u8], _net: Option<&mut Sessions>, reply: &mut Vec<u8>) -> NativeAnswer {
        reply.extend_from_slice(datagram);
        reply.make_ascii_uppercase();
        NativeAnswer::Reply
    }
}

struct Forward;

impl Native for Forward {
    fn handle(&mut self, datagram: &[u8], net: Option<&mut Sessions>, _reply: &mut Vec<u8>) -> NativeAnswer {
        let Some(net) = net else {
            return NativeAnswer::Nothing;
        };
        match net.forward(b"backend", None, datagram) {
            Ok(()) => NativeAnswer::Forwarded,
            Err(e) => NativeAnswer::Refused(e),
        }
    }
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
    let native: fn() -> Box<dyn Native> = if forwarding {
        || Box::new(Forward)
    } else {
        || Box::new(Uppercase)
    };
    let gateway = Gateway::start_native(&env, program, &config, native)?;
    eprintln!(
        "native gateway on {} ({})",
        gateway.local_addr(),
        if forwarding { "forwarding" } else { "uppercase" }
    );
    loop {
        std::thread::park();
    }
}
