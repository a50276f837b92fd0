//! The forwarding comparison (run by `scripts/bench.sh` after the main table):
//!
//! - **UDP forwarding**: every gateway forwards to the same native upstream (the
//!   library's data path with a Rust uppercase handler, `examples/native_gateway`),
//!   and `loadgen` checks every answer: a native forwarder on wasmgate's data path
//!   without the wasm hop (the floor), wasmgate with `examples/forward.wat`,
//!   wasmgate with a guest that also has an `on_reply`, wasmgate with
//!   `forward.wat` and the pool's health checks probing 10 times a second, and
//!   NGINX stream (Debian's
//!   `nginx` + `libnginx-mod-stream`, one worker, `proxy_responses 1`, `reuseport`).
//! - **DNS proxy**: `examples/dns-proxy` against `dnsdist` with the same rule
//!   (`blocked.test` answered NXDOMAIN by the proxy itself), both in front of
//!   `dnsmasq`, loaded by `dnsperf`; allowed names (forwarded) and blocked ones.
//!
//!     cargo build --release --bins --examples && target/release/examples/forward_bench [--runs 3] [--seconds 3]
//!
//! Gateways have one worker and are pinned to CPU 0 with the upstream (both wait
//! in epoll, so they share the core as the traffic asks); the load generator,
//! which polls without blocking, has CPU 1 to itself. CPU per round trip is the
//! gateway process's own. For DNS, dnsmasq and dnsperf share CPU 1. Runs are
//! interleaved and the median by throughput is shown. A tool that is not
//! installed is skipped with a note. Loopback only.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;

#[path = "support/dns.rs"]
mod dns;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/procfs.rs"]
mod procfs;
use harness::{Row, RunArgs, Running, free_port, measure, median_run, pinned, release_dir, spawn, wait_ready};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Another `wasmgate` binary (a build of an earlier commit, say), run with
    /// the same guests beside this one, interleaved: old against new.
    #[arg(long, value_name = "PATH")]
    baseline: Option<std::path::PathBuf>,
    /// Only the DNS proxy's table.
    #[arg(long)]
    dns_only: bool,
}

/// Clients × window × payload bytes.
const MATRIX: [(usize, usize, usize); 3] = [(64, 16, 64), (64, 16, 1400), (1, 1, 64)];

struct Contender {
    name: &'static str,
    _running: Running,
    port: u16,
    /// The process doing the work (NGINX's worker, not its master).
    pid: u32,
    _dir: Option<tempfile::TempDir>,
}

/// The only child of `pid` (NGINX's worker), once it exists.
fn only_child(pid: u32) -> anyhow::Result<u32> {
    for _ in 0..100 {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return Ok(child.parse()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("process {pid} has no child")
}

fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = release_dir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (wasmgate, native) = (bin.join("wasmgate"), bin.join("examples/native_gateway"));
    println!(
        "Forwarding: gateways (1 worker) and the upstream pinned to CPU 0; load generator on CPU 1; \
         {} runs of {} s per cell, median shown\n",
        args.run.runs, args.run.seconds
    );
    if args.dns_only {
        return dns_table(&args, &wasmgate, root);
    }

    // The upstream every gateway forwards to: a native uppercase server.
    let up_port = free_port()?;
    let mut up = pinned(0, &native);
    up.args(["--listen", &format!("127.0.0.1:{up_port}"), "--workers", "1"]);
    let _upstream = spawn(up, "the upstream")?;
    wait_ready(up_port)?;
    let pool = format!("backend=127.0.0.1:{up_port}");

    let mut contenders = Vec::new();
    let mut add = |name: &'static str,
                   mut cmd: Command,
                   port: u16,
                   dir: Option<tempfile::TempDir>,
                   worker_is_child: bool|
     -> anyhow::Result<()> {
        cmd.stdin(Stdio::null());
        let running = spawn(cmd, name)?;
        wait_ready(port)?;
        let pid = if worker_is_child {
            only_child(running.0.id())?
        } else {
            running.0.id()
        };
        contenders.push(Contender {
            name,
            _running: running,
            port,
            pid,
            _dir: dir,
        });
        Ok(())
    };
    let listen = |port: u16| format!("127.0.0.1:{port}");
    let port = free_port()?;
    let mut c = pinned(0, &native);
    c.args(["--listen", &listen(port), "--workers", "1", "--upstream", &pool]);
    add("native forwarder", c, port, None, false)?;
    // The last field turns UDP segmentation offload off (`WASMGATE_GSO=off`):
    // what sending runs of datagrams saves, in the same build.
    let mut gateways = vec![
        ("wasm forward.wat", "examples/forward.wat", &wasmgate, false),
        ("wasm + on_reply", "bench/forward_on_reply.wat", &wasmgate, false),
        ("wasm forward.wat, no GSO", "examples/forward.wat", &wasmgate, true),
    ];
    if let Some(baseline) = &args.baseline {
        gateways.push(("baseline: wasm forward.wat", "examples/forward.wat", baseline, false));
        gateways.push((
            "baseline: wasm + on_reply",
            "bench/forward_on_reply.wat",
            baseline,
            false,
        ));
    }
    for (name, module, binary, no_gso) in gateways {
        let port = free_port()?;
        let mut c = pinned(0, binary);
        if no_gso {
            c.env("WASMGATE_GSO", "off");
        }
        c.args([
            "--listen",
            &listen(port),
            "--workers",
            "1",
            "--upstream",
            &pool,
            "--no-watch",
        ])
        .arg("--module")
        .arg(root.join(module));
        add(name, c, port, None, false)?;
    }
    // The same forwarding with the pool's active health checks probing the
    // upstream every 100 ms (as often as anyone would): what the prober costs
    // the datagram path, side by side with the row without it.
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("probed.toml");
    std::fs::write(
        &conf,
        format!(
            "[[listener]]\nname = \"probed\"\nlisten = \"127.0.0.1:{port}\"\nmodule = \"{}\"\nworkers = 1\nwatch = false\n\n\
             [upstreams.backend]\nendpoints = [\"127.0.0.1:{up_port}\"]\n\n\
             [upstreams.backend.health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nsend = \"ping\"\nexpect = \"PING\"\n",
            root.join("examples/forward.wat").display()
        ),
    )?;
    let mut c = pinned(0, &wasmgate);
    c.arg("--config").arg(&conf);
    add("wasm, probed 10/s", c, port, Some(dir), false)?;
    if exists("/usr/sbin/nginx") && exists("/usr/lib/nginx/modules/ngx_stream_module.so") {
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 daemon off; worker_processes 1; error_log stderr crit; pid {}/nginx.pid;\n\
                 events {{ worker_connections 16384; }}\n\
                 stream {{ server {{ listen 127.0.0.1:{port} udp reuseport; proxy_pass 127.0.0.1:{up_port}; \
                 proxy_responses 1; proxy_timeout 10s; }} }}\n",
                dir.path().display()
            ),
        )?;
        let mut c = pinned(0, Path::new("/usr/sbin/nginx"));
        c.arg("-p").arg(dir.path()).arg("-c").arg(&conf);
        add("nginx stream", c, port, Some(dir), true)?;
    } else {
        println!("(NGINX stream skipped: install nginx and libnginx-mod-stream)\n");
    }

    let loadgen = bin.join("examples/loadgen");
    let mut runs = vec![vec![Vec::new(); contenders.len()]; MATRIX.len()];
    for run in 0..args.run.runs {
        for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
            for (i, k) in contenders.iter().enumerate() {
                runs[ci][i].push(measure(&loadgen, k.port, k.pid, (c, w, s), args.run.seconds, k.name)?);
            }
            eprintln!("  run {} of {}: measured {c}x{w}x{s}", run + 1, args.run.runs);
        }
    }
    for (ci, &(c, w, s)) in MATRIX.iter().enumerate() {
        let rows: Vec<Row> = runs[ci].iter_mut().map(|r| median_run(r)).collect();
        println!("UDP forwarding, C×W×S = {c}×{w}×{s}");
        println!(
            "  {:<18} {:>10} {:>8} {:>7} {:>6} {:>8} {:>8} {:>13} {:>8}",
            "gateway", "replies/s", "×floor", "lost", "wrong", "p50 µs", "p99 µs", "CPU µs/trip", "×floor"
        );
        for (i, k) in contenders.iter().enumerate() {
            let (r, floor) = (rows[i], rows[0]);
            println!(
                "  {:<18} {:>10.0} {:>8.2} {:>7} {:>6} {:>8.0} {:>8.0} {:>13.2} {:>8.2}",
                k.name,
                r.rate,
                r.rate / floor.rate,
                r.lost,
                r.wrong,
                r.p50,
                r.p99,
                r.cpu_us,
                r.cpu_us / floor.cpu_us
            );
        }
        println!();
    }
    drop(contenders);
    dns_table(&args, &wasmgate, root)
}

fn dns_table(args: &Args, wasmgate: &Path, root: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("dnsmasq", "/usr/sbin/dnsmasq"),
        ("dnsdist", "/usr/bin/dnsdist"),
        ("dnsperf", "/usr/bin/dnsperf"),
    ]
    .iter()
    .filter(|(_, p)| !exists(p))
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        println!("(DNS proxy table skipped: install {})", missing.join(", "));
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let resolver = free_port()?;
    let _dnsmasq = dns::dnsmasq(dir.path(), resolver)?;

    let module = root.join("examples/dns-proxy/dns_proxy.wasm");
    let (proxy_port, proxy) = dns::proxy(wasmgate, &module, resolver, None)?;
    let (shared_port, shared) = dns::proxy(wasmgate, &module, resolver, Some(dir.path()))?;

    let dnsdist_port = free_port()?;
    let conf = dir.path().join("dnsdist.conf");
    std::fs::write(
        &conf,
        format!(
            "setLocal(\"127.0.0.1:{dnsdist_port}\")\n\
             setSecurityPollSuffix(\"\")\n\
             newServer({{address=\"127.0.0.1:{resolver}\", checkName=\"example.test.\"}})\n\
             blocked = newSuffixMatchNode()\nblocked:add(newDNSName(\"blocked.test.\"))\n\
             addAction(SuffixMatchNodeRule(blocked), RCodeAction(DNSRCode.NXDOMAIN))\n"
        ),
    )?;
    let mut c = pinned(0, Path::new("/usr/bin/dnsdist"));
    c.args(["--supervised", "--disable-syslog", "-C"]).arg(&conf);
    let dnsdist = spawn(c, "dnsdist")?;

    let queries = |name: &str| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(format!("{name}.txt"));
        let mut f = std::fs::File::create(&path)?;
        for i in 0..1000 {
            writeln!(f, "q{i}.{name} A")?;
        }
        Ok(path)
    };
    let cells = [
        ("allowed (forwarded)", queries("example.test")?),
        ("blocked (answered by the proxy)", queries("blocked.test")?),
    ];
    let mut servers = vec![
        ("wasmgate, shared", shared_port, shared.0.id()),
        ("wasmgate, per-client", proxy_port, proxy.0.id()),
        ("dnsdist 1.7", dnsdist_port, dnsdist.0.id()),
    ];
    // The baseline build's proxy beside it, interleaved, when one is given and
    // can load today's module (one that names clients needs a build with
    // shared pools).
    let baseline = match &args.baseline {
        Some(old) => Some(dns::proxy(old, &module, resolver, Some(dir.path()))?),
        None => None,
    };
    for (_, port, _) in &servers {
        dns::wait_answering(*port, Duration::from_secs(20))?;
    }
    if let Some((port, running)) = &baseline {
        match dns::wait_answering(*port, Duration::from_secs(5)) {
            Ok(()) => servers.push(("baseline, shared", *port, running.0.id())),
            Err(_) => println!(
                "(the baseline build is left out of the DNS table: it cannot serve today's dns-proxy through a shared pool)\n"
            ),
        }
    }
    let mut runs = vec![vec![Vec::new(); servers.len()]; cells.len()];
    for _ in 0..args.run.runs {
        for (ci, (_, file)) in cells.iter().enumerate() {
            for (si, &(name, port, pid)) in servers.iter().enumerate() {
                runs[ci][si].push(dns::dnsperf(file, port, pid, args.run.seconds).with_context(|| name.to_string())?);
            }
        }
    }
    for (ci, (cell, _)) in cells.iter().enumerate() {
        println!("DNS proxy, dnsperf 64 clients × 256 in flight, {cell}");
        println!(
            "  {:<22} {:>10} {:>10} {:>8} {:>12} {:>14}",
            "server", "queries/s", "completed", "lost", "avg lat µs", "CPU µs/query"
        );
        for (si, (name, _, _)) in servers.iter().enumerate() {
            let r = &mut runs[ci][si];
            r.sort_by(|a, b| a.qps.total_cmp(&b.qps));
            let m = r[r.len() / 2];
            println!(
                "  {:<22} {:>10.0} {:>10} {:>8} {:>12.0} {:>14.2}",
                name, m.qps, m.completed, m.lost, m.latency_us, m.cpu_us
            );
        }
        println!();
    }
    Ok(())
}
