//! The whole comparison in one command: wasmgate with its default guest (reused and
//! fresh instances) against the same data path with a native uppercase function
//! (batched, and with one system call per datagram), and the seed tutorial's Python
//! server, over the same load generator.
//!
//!     scripts/bench.sh [--runs 3] [--seconds 3]
//!
//! (which builds the release binaries, then runs this). Each server has one worker
//! and is pinned to CPU 0; the load generator is pinned to CPU 1, and only one
//! server is loaded at a time. For every cell of the matrix and every server it runs
//! `loadgen` `--runs` times, interleaved, and keeps the median run by replies/s.
//! Loopback only; every run is bounded in time.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context as _;

#[path = "support/harness.rs"]
mod harness;
#[path = "support/procfs.rs"]
mod procfs;
use clap::Parser;
use harness::{Row, RunArgs, Running, free_port, measure, median_run, pinned, release_dir, server_pid, wait_ready};
use procfs::rss_kib;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Skip the Python seed server.
    #[arg(long)]
    no_python: bool,
    /// Another `wasmgate` binary (a build of an earlier commit, say), run with
    /// the default guest beside this one, interleaved: old against new.
    #[arg(long, value_name = "PATH")]
    baseline: Option<String>,
    /// Measure what a guest metric costs instead: bench/uppercase.wat against
    /// the same module updating a counter per datagram, beside native.
    #[arg(long)]
    guest_metrics: bool,
}

/// Clients × window × payload bytes.
const MATRIX: [(usize, usize, usize); 4] = [(1, 1, 64), (64, 16, 64), (64, 16, 1400), (8, 16, 16384)];

struct Server {
    name: &'static str,
    /// The binary in the release directory (`wasmgate` or `examples/native_gateway`).
    program: &'static str,
    /// Arguments after `PROGRAM --listen ADDR --workers 1`, or `None` for Python.
    wasmgate_args: Option<&'static [&'static str]>,
}

const SERVERS: [Server; 5] = [
    Server {
        name: "native batched",
        program: "examples/native_gateway",
        wasmgate_args: Some(&[]),
    },
    Server {
        name: "native per-datagram",
        program: "examples/native_gateway",
        wasmgate_args: Some(&["--batch", "1"]),
    },
    Server {
        name: "wasm reuse",
        program: "wasmgate",
        wasmgate_args: Some(&[]),
    },
    Server {
        name: "wasm fresh",
        program: "wasmgate",
        wasmgate_args: Some(&["--isolation", "fresh"]),
    },
    Server {
        name: "python seed",
        program: "",
        wasmgate_args: None,
    },
];

fn start(server: &Server, bin: &Path, root: &Path, port: u16) -> anyhow::Result<Running> {
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = match server.wasmgate_args {
        Some(extra) => {
            let mut c = pinned(0, &bin.join(server.program));
            c.args(["--listen", &addr, "--workers", "1"]).args(extra);
            c
        }
        None => {
            let mut c = pinned(0, Path::new("/usr/bin/env"));
            c.arg("python3")
                .arg(root.join("bench/seed_server.py"))
                .arg(port.to_string());
            c
        }
    };
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

const WAT_PLAIN: &str = "wat uppercase";
const WAT_COUNTED: &str = "wat + counter";

/// bench/uppercase.wat, and the same with its counter update, written to the
/// temporary directory: two servers differing by one `metric_add` a datagram.
fn guest_metrics_servers(root: &Path) -> anyhow::Result<Vec<Server>> {
    let plain = root.join("bench/uppercase.wat");
    let text = std::fs::read_to_string(&plain).with_context(|| format!("cannot read {}", plain.display()))?;
    let counted_text = text.replace(";; (call $count)", "(call $count)");
    anyhow::ensure!(
        counted_text != text,
        "bench/uppercase.wat has no `;; (call $count)` line"
    );
    let counted = std::env::temp_dir().join(format!("wasmgate-bench-counted-{}.wat", std::process::id()));
    std::fs::write(&counted, counted_text)?;
    let server = |name, module: &Path| Server {
        name,
        program: "wasmgate",
        wasmgate_args: Some(Box::leak(Box::new([
            "--module",
            Box::leak(module.display().to_string().into_boxed_str()),
        ]))),
    };
    Ok(vec![server(WAT_PLAIN, &plain), server(WAT_COUNTED, &counted)])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = release_dir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let loadgen = bin.join("examples/loadgen");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "wasmgate benchmark: {cores} cores, server pinned to CPU 0 (1 worker), load generator on CPU 1; \
         {} runs of {} s per cell, median shown\n",
        args.run.runs, args.run.seconds
    );

    // An absolute `program` replaces the release directory when joined to it.
    let baseline = args.baseline.map(|path| Server {
        name: "baseline: wasm reuse",
        program: Box::leak(path.into_boxed_str()),
        wasmgate_args: Some(&[]),
    });
    let metered = if args.guest_metrics {
        guest_metrics_servers(root)?
    } else {
        Vec::new()
    };
    let servers: Vec<&Server> = if args.guest_metrics {
        std::iter::once(&SERVERS[0]).chain(&metered).collect()
    } else {
        SERVERS
            .iter()
            .chain(baseline.as_ref())
            .filter(|s| !(args.no_python && s.wasmgate_args.is_none()))
            .collect()
    };
    // Every server runs for the whole benchmark (an idle one costs nothing), and
    // runs are interleaved: run r of every server and cell comes before run r + 1
    // of any, so a noisy spell on this shared machine is spread over all of them.
    let mut running = Vec::new();
    for server in &servers {
        let port = free_port()?;
        let child = start(server, &bin, root, port)?;
        let pid = server_pid(&child);
        running.push((child, port, pid));
    }
    // runs[cell][server]
    let mut runs = vec![vec![Vec::new(); servers.len()]; MATRIX.len()];
    for run in 0..args.run.runs {
        for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
            for (si, server) in servers.iter().enumerate() {
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
    let rss: Vec<u64> = running.iter().map(|(_, _, pid)| rss_kib(*pid)).collect();
    drop(running);
    let results: Vec<Vec<Row>> = runs
        .iter_mut()
        .map(|cell| cell.iter_mut().map(|r| median_run(r)).collect())
        .collect();

    for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
        println!("C×W×S = {c}×{w}×{s}");
        println!(
            "  {:<20} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "server", "replies/s", "×native", "lost", "wrong", "p50 µs", "p99 µs", "p99.9 µs", "CPU µs", "×native"
        );
        let native = results[ci][0];
        for (si, server) in servers.iter().enumerate() {
            let r = results[ci][si];
            println!(
                "  {:<20} {:>10.0} {:>8.2} {:>8} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.2} {:>8.2}",
                server.name,
                r.rate,
                r.rate / native.rate,
                r.lost,
                r.wrong,
                r.p50,
                r.p99,
                r.p999,
                r.cpu_us,
                r.cpu_us / native.cpu_us
            );
        }
        println!();
    }

    println!("Server resident memory after all runs (KiB):");
    for (si, server) in servers.iter().enumerate() {
        println!("  {:<20} {:>8}", server.name, rss[si]);
    }
    println!();

    let find = |name: &str| servers.iter().position(|s| s.name == name);
    if let (Some(plain), Some(counted)) = (find(WAT_PLAIN), find(WAT_COUNTED)) {
        println!("Guest metrics: one counter update per datagram (medians):");
        for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
            let (p, q) = (results[ci][plain], results[ci][counted]);
            let cost = (q.cpu_us / p.cpu_us - 1.0) * 100.0;
            println!(
                "  {c}×{w}×{s}: CPU/datagram {:.2} µs without, {:.2} µs with: {cost:+.1}% ({:+.0} ns an update; ≤ 5%: {}); replies/s {:.0} and {:.0}",
                p.cpu_us,
                q.cpu_us,
                (q.cpu_us - p.cpu_us) * 1000.0,
                if cost <= 5.0 { "met" } else { "NOT met" },
                p.rate,
                q.rate
            );
        }
        return Ok(());
    }
    let (Some(nat), Some(per), Some(reuse), Some(fresh)) = (
        find("native batched"),
        find("native per-datagram"),
        find("wasm reuse"),
        find("wasm fresh"),
    ) else {
        return Ok(());
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("Targets:");
    for ci in [1, 2] {
        let (c, w, s) = MATRIX[ci];
        let r = results[ci][reuse].rate / results[ci][nat].rate;
        let cpu = results[ci][reuse].cpu_us / results[ci][nat].cpu_us;
        println!(
            "  {c}×{w}×{s}: wasm reuse {r:.2}× native replies/s (≥ 0.95: {}), CPU/datagram {cpu:.2}× native (≤ 1.10: {})",
            verdict(r >= 0.95),
            verdict(cpu <= 1.10)
        );
        let b = results[ci][reuse].rate / results[ci][per].rate;
        println!(
            "  {c}×{w}×{s}: wasm reuse {b:.2}× the native per-datagram server (≥ 1.10: {})",
            verdict(b >= 1.10)
        );
        let f = results[ci][fresh].cpu_us / results[ci][nat].cpu_us;
        println!(
            "  {c}×{w}×{s}: wasm fresh CPU/datagram {f:.2}× native (≤ 2.00: {})",
            verdict(f <= 2.0)
        );
    }
    let p99 = results[1][reuse].p99 / results[1][nat].p99;
    println!(
        "  64×16×64: wasm reuse p99 {p99:.2}× native p99 (≤ 1.10: {})",
        verdict(p99 <= 1.10)
    );
    if let Some(py) = find("python seed") {
        for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
            let x = results[ci][reuse].rate / results[ci][py].rate;
            println!(
                "  {c}×{w}×{s}: wasm reuse {x:.0}× the Python seed server's replies/s (≥ 30: {}){}",
                verdict(x >= 30.0),
                if results[ci][py].wrong > 0 {
                    " (the seed server's replies were wrong: truncated at 8 KiB)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
