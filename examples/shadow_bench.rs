//! What a candidate module costs serving: wasmgate with its default guest
//! alone, and with a `--candidate` shadowing every datagram (one that agrees,
//! one that traps on every datagram, one that loops until its time budget),
//! beside the native gateway as a baseline, over the same load generator.
//!
//!     cargo build --release --examples && cargo run --release --example shadow_bench [-- --runs 5]
//!
//! The failing candidates run with `--no-rollback`, or the first trap would
//! unload them and there would be nothing to measure. Each server has one
//! worker and is pinned to CPU 0 (its shadow thread too: the worst case, where
//! the candidate competes with the worker for the one core); the load
//! generator is on CPU 1. Runs are interleaved; the median by replies/s is
//! shown. Loopback only; every run is bounded in time.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context as _;
use clap::Parser;

#[path = "support/harness.rs"]
mod harness;
use harness::{Row, RunArgs, Running, free_port, measure, median_run, pinned, release_dir, server_pid, wait_ready};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

/// Clients × window × payload bytes: one request at a time (latency), and load.
const MATRIX: [(usize, usize, usize); 2] = [(1, 1, 64), (64, 16, 64)];

struct Server {
    name: &'static str,
    program: &'static str,
    /// The candidate module, if any (a file name in the scratch directory, or a path).
    candidate: Option<&'static str>,
}

const SERVERS: [Server; 5] = [
    Server {
        name: "native batched",
        program: "examples/native_gateway",
        candidate: None,
    },
    Server {
        name: "wasm, no candidate",
        program: "wasmgate",
        candidate: None,
    },
    Server {
        name: "+ agreeing candidate",
        program: "wasmgate",
        candidate: Some("agrees.wasm"),
    },
    Server {
        name: "+ trapping candidate",
        program: "wasmgate",
        candidate: Some("traps.wat"),
    },
    Server {
        name: "+ looping candidate",
        program: "wasmgate",
        candidate: Some("loops.wat"),
    },
];

fn start(server: &Server, bin: &Path, scratch: &Path, port: u16) -> anyhow::Result<Running> {
    let mut cmd = pinned(0, &bin.join(server.program));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "1"]);
    if let Some(candidate) = server.candidate {
        cmd.arg("--candidate").arg(scratch.join(candidate)).arg("--no-rollback");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", server.name))?;
    let running = Running(child);
    wait_ready(port)?;
    Ok(running)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = release_dir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let loadgen = bin.join("examples/loadgen");
    let scratch = tempfile::tempdir()?;
    // The hostile guests of the tests, and the default guest again as a file:
    // a candidate that always agrees.
    std::fs::copy(root.join("tests/guests/traps.wat"), scratch.path().join("traps.wat"))?;
    std::fs::copy(root.join("tests/guests/loops.wat"), scratch.path().join("loops.wat"))?;
    std::fs::copy(root.join("guest/uppercase.wasm"), scratch.path().join("agrees.wasm"))?;
    println!(
        "wasmgate shadow benchmark: server pinned to CPU 0 (1 worker, and the shadow thread), load \
         generator on CPU 1; {} runs of {} s per cell, median shown\n",
        args.run.runs, args.run.seconds
    );
    let mut running = Vec::new();
    for server in &SERVERS {
        let port = free_port()?;
        let child = start(server, &bin, scratch.path(), port)?;
        let pid = server_pid(&child);
        running.push((child, port, pid));
    }
    let mut runs = vec![vec![Vec::new(); SERVERS.len()]; MATRIX.len()];
    for run in 0..args.run.runs {
        for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
            for (si, server) in SERVERS.iter().enumerate() {
                let (_, port, pid) = &running[si];
                runs[ci][si].push(measure(
                    &loadgen,
                    *port,
                    *pid,
                    (c, w, s),
                    args.run.seconds,
                    server.name,
                )?);
            }
            eprintln!("  run {} of {}: measured {c}x{w}x{s}", run + 1, args.run.runs);
        }
    }
    drop(running);
    for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
        let rows: Vec<Row> = runs[ci].iter_mut().map(|r| median_run(r)).collect();
        println!("C×W×S = {c}×{w}×{s}");
        println!(
            "  {:<22} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "server", "replies/s", "lost", "wrong", "p50 µs", "p99 µs", "p99.9 µs", "CPU µs"
        );
        for (server, r) in SERVERS.iter().zip(&rows) {
            println!(
                "  {:<22} {:>10.0} {:>8} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.2}",
                server.name, r.rate, r.lost, r.wrong, r.p50, r.p99, r.p999, r.cpu_us
            );
        }
        println!();
    }
    Ok(())
}
