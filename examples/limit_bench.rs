//! The rate-limited DNS proxy (`examples/dns-limit`) against dnsdist with
//! `MaxQPSIPRule`, both in front of the same dnsmasq, loaded by dnsperf:
//!
//! - **allowed**: a limit no client reaches (a build of dns-limit with
//!   `DNS_LIMIT_RATE`/`DNS_LIMIT_BURST` at 100,000,000; `MaxQPSIPRule(100000000)`),
//!   so every query is checked against its client's bucket and forwarded;
//! - **denied**: dns-limit as committed (5 a second, burst 10, then a 10 s
//!   penalty) and `MaxQPSIPRule(5, 32, 64, 10)`, both answering REFUSED: after
//!   the first few, every query is refused by the proxy.
//!
//!     cargo build --release --bins --examples && target/release/examples/limit_bench [--runs 3] [--seconds 3]
//!
//! The allowed table adds `examples/dns-proxy` (the same forwarding and answer
//! matching, without a limit) for what the limit itself costs.
//!
//! Each proxy has one thread's worth of CPU: it is pinned to CPU 0; dnsmasq
//! and dnsperf (64 clients, 256 queries in flight, 1 s timeout, all from
//! 127.0.0.1: one client address) share CPU 1. CPU per query is the proxy
//! process's own. The allowed build needs the wasm32-unknown-unknown target
//! (built into a temporary folder); a missing tool is reported and its table
//! skipped. The proxies' pools are shared (`sessions = "shared"`), as the
//! example configs have them. Loopback only; each run is bounded by `--seconds`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;

#[path = "support/dns.rs"]
mod dns;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/procfs.rs"]
mod procfs;
use harness::{free_port, pinned, release_dir, spawn};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

const NO_LIMIT: u32 = 100_000_000;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wasmgate = release_dir()?.join("wasmgate");
    for (tool, path) in [
        ("dnsmasq", "/usr/sbin/dnsmasq"),
        ("dnsdist", "/usr/bin/dnsdist"),
        ("dnsperf", "/usr/bin/dnsperf"),
    ] {
        if !Path::new(path).exists() {
            bail!("{tool} is not installed (Debian: apt install dnsmasq-base dnsdist dnsperf)");
        }
    }
    let dir = tempfile::tempdir()?;
    let unlimited = build_unlimited(root, dir.path())?;

    let resolver = free_port()?;
    let _dnsmasq = dns::dnsmasq(dir.path(), resolver)?;

    let queries = dir.path().join("queries.txt");
    let mut f = std::fs::File::create(&queries)?;
    for i in 0..1000 {
        writeln!(f, "q{i}.example.test A")?;
    }

    let cells = [
        (
            "allowed (every query checked and forwarded)",
            unlimited,
            NO_LIMIT.to_string(),
        ),
        (
            "denied (one client past its limit: REFUSED)",
            root.join("examples/dns-limit/dns_limit.wasm"),
            "5, 32, 64, 10".to_string(),
        ),
    ];
    for (cell, module, rule) in &cells {
        let (proxy_port, proxy) = dns::proxy(&wasmgate, module, resolver, Some(dir.path()))?;

        let dnsdist_port = free_port()?;
        let conf = dir.path().join("dnsdist.conf");
        std::fs::write(
            &conf,
            format!(
                "setLocal(\"127.0.0.1:{dnsdist_port}\")\n\
                 setSecurityPollSuffix(\"\")\n\
                 newServer({{address=\"127.0.0.1:{resolver}\", checkName=\"example.test.\"}})\n\
                 addAction(MaxQPSIPRule({rule}), RCodeAction(DNSRCode.REFUSED))\n"
            ),
        )?;
        let mut c = pinned(0, Path::new("/usr/bin/dnsdist"));
        c.args(["--supervised", "--disable-syslog", "-C"]).arg(&conf);
        let dnsdist = spawn(c, "dnsdist")?;
        std::thread::sleep(Duration::from_secs(2));

        // The same proxy without a limit (examples/dns-proxy), for what the limit costs.
        let (plain_port, plain) = dns::proxy(
            &wasmgate,
            &root.join("examples/dns-proxy/dns_proxy.wasm"),
            resolver,
            Some(dir.path()),
        )?;
        // (The limited proxy and dnsdist are not asked: a query would spend a token.)
        dns::wait_answering(plain_port, Duration::from_secs(20))?;
        let mut servers = vec![
            ("wasmgate dns-limit", proxy_port, proxy.0.id()),
            ("dnsdist 1.7", dnsdist_port, dnsdist.0.id()),
        ];
        if cell.starts_with("allowed") {
            servers.push(("(dns-proxy, no limit)", plain_port, plain.0.id()));
        }
        let mut runs = vec![Vec::new(); servers.len()];
        for _ in 0..args.runs {
            for (si, &(name, port, pid)) in servers.iter().enumerate() {
                runs[si]
                    .push(dns::dnsperf(&queries, port, pid, args.seconds as f64).with_context(|| name.to_string())?);
            }
        }
        println!("Rate-limited DNS proxy, dnsperf 64 clients × 256 in flight, {cell}");
        println!(
            "  {:<22} {:>10} {:>10} {:>8} {:>12} {:>14}",
            "server", "queries/s", "completed", "lost", "avg lat µs", "CPU µs/query"
        );
        for (si, (name, _, _)) in servers.iter().enumerate() {
            let r = &mut runs[si];
            r.sort_by(|a, b| a.qps.total_cmp(&b.qps));
            let all: Vec<String> = r.iter().map(|x| format!("{:.0}", x.qps)).collect();
            let m = r[r.len() / 2];
            println!(
                "  {:<22} {:>10.0} {:>10} {:>8} {:>12.0} {:>14.2}   (runs: {})",
                name,
                m.qps,
                m.completed,
                m.lost,
                m.latency_us,
                m.cpu_us,
                all.join(", ")
            );
        }
        println!();
    }
    Ok(())
}

/// dns-limit built with a limit no client reaches, into `dir`.
fn build_unlimited(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let status = Command::new("cargo")
        .current_dir(root.join("guest"))
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-unknown-unknown",
            "-p",
            "dns-limit",
        ])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env("DNS_LIMIT_RATE", NO_LIMIT.to_string())
        .env("DNS_LIMIT_BURST", NO_LIMIT.to_string())
        .env("RUSTFLAGS", "-C target-feature=+simd128 -C link-arg=-zstack-size=65536")
        .status()
        .context("cannot run cargo to build dns-limit")?;
    if !status.success() {
        bail!("building dns-limit for wasm32-unknown-unknown failed (rustup target add wasm32-unknown-unknown)");
    }
    Ok(dir.join("target/wasm32-unknown-unknown/release/dns_limit.wasm"))
}
