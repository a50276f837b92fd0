//! Many distinct clients through the DNS proxy (`examples/dns-proxy`) in
//! front of dnsmasq: 100,000 clients (each its own source address and port,
//! from 127.0.0.1 to 127.0.0.8), one query each, 500 in flight, through a
//! shared pool (`sessions = "shared"`) and through per-client sessions. Every
//! 10,000 clients it prints what the gateway process holds: descriptors, RSS,
//! sessions and client handles (from its metrics), and the answers so far.
//!
//!     cargo build --release --bins --examples && target/release/examples/clients_bench [--clients 100000]
//!
//! The gateway has one worker pinned to CPU 0; dnsmasq and this client share
//! CPU 1. Loopback only; a client waits at most 500 ms for its answer.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;

// Its dnsmasq and readiness check are used here.
#[allow(dead_code)]
#[path = "support/dns.rs"]
mod dns;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/procfs.rs"]
mod procfs;

#[derive(Debug, Parser)]
struct Args {
    /// Distinct clients, each with one query.
    #[arg(long, default_value_t = 100_000)]
    clients: usize,
    /// Queries in flight at once.
    #[arg(long, default_value_t = 500)]
    window: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wasmgate = harness::release_dir()?.join("wasmgate");
    if !Path::new("/usr/sbin/dnsmasq").exists() {
        bail!("dnsmasq is not installed (apt install dnsmasq-base)");
    }
    let dir = tempfile::tempdir()?;
    let resolver = harness::free_port()?;
    let _dnsmasq = dns::dnsmasq(dir.path(), resolver)?;
    let module = root.join("examples/dns-proxy/dns_proxy.wasm");
    for shared in [true, false] {
        let (port, metrics) = (harness::free_port()?, harness::free_port()?);
        let running = proxy(&wasmgate, &module, resolver, dir.path(), shared, port, metrics)?;
        dns::wait_answering(port, Duration::from_secs(20))?;
        println!(
            "{}: {} distinct clients, {} in flight",
            if shared { "shared pool" } else { "per-client sessions" },
            args.clients,
            args.window
        );
        println!(
            "  {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8}",
            "clients", "answered", "fds", "RSS KiB", "sessions", "handles", "q/s"
        );
        run(&args, port, running.0.id(), metrics)?;
        // Where the unanswered went.
        let body = scrape(metrics).unwrap_or_default();
        for line in body.lines().filter(|l| {
            (l.starts_with("wasmgate_datagrams_dropped_total")
                || l.starts_with("wasmgate_upstream_datagrams_dropped_total")
                || l.starts_with("wasmgate_queue_overflows_total")
                || l.starts_with("wasmgate_client_handles_evicted_total")
                || l.starts_with("wasmgate_endpoint_sessions_evicted_total"))
                && !l.ends_with(" 0")
        }) {
            println!("  {line}");
        }
        println!();
    }
    Ok(())
}

/// The DNS proxy on `port`, with one worker pinned to CPU 0, its pool shared
/// or per-client, and metrics on `metrics`.
fn proxy(
    wasmgate: &Path,
    module: &Path,
    resolver: u16,
    dir: &Path,
    shared: bool,
    port: u16,
    metrics: u16,
) -> anyhow::Result<harness::Running> {
    let file = dir.join(format!("clients-{port}.toml"));
    std::fs::write(
        &file,
        format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n\
             [[listener]]\nname = \"dns\"\nlisten = \"127.0.0.1:{port}\"\nmodule = \"{}\"\nworkers = 1\nwatch = false\n\n\
             [upstreams.resolvers]\nendpoints = [\"127.0.0.1:{resolver}\"]\nsessions = \"{}\"\n",
            module.display(),
            if shared { "shared" } else { "per-client" }
        ),
    )?;
    let mut c = harness::pinned(0, wasmgate);
    c.arg("--config").arg(&file);
    harness::spawn(c, "wasmgate")
}

fn run(args: &Args, port: u16, pid: u32, metrics: u16) -> anyhow::Result<()> {
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let mut seen = HashSet::new();
    let (mut sent, mut answered) = (0usize, 0usize);
    let started = Instant::now();
    while sent < args.clients {
        let n = args.window.min(args.clients - sent);
        let mut batch: Vec<(UdpSocket, u16)> = Vec::with_capacity(n);
        while batch.len() < n {
            let ip = format!("127.0.0.{}", 1 + (sent + batch.len()) % 8);
            let socket = UdpSocket::bind((ip.as_str(), 0))?;
            if !seen.insert(socket.local_addr()?) {
                continue;
            }
            let id = (sent + batch.len()) as u16;
            socket.send_to(&query(id, sent + batch.len()), to)?;
            socket.set_nonblocking(true)?;
            batch.push((socket, id));
        }
        // Every socket looked at in turn until all are answered or 500 ms pass.
        let (mut buf, deadline) = ([0u8; 512], Instant::now() + Duration::from_millis(500));
        while !batch.is_empty() && Instant::now() < deadline {
            batch.retain(|(socket, id)| match socket.recv(&mut buf) {
                Ok(len) => {
                    answered += usize::from(len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == *id);
                    false
                }
                Err(_) => true,
            });
            std::thread::sleep(Duration::from_micros(200));
        }
        sent += n;
        if sent % 10_000 == 0 || sent == args.clients {
            let body = scrape(metrics).unwrap_or_default();
            println!(
                "  {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8.0}",
                sent,
                answered,
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0),
                procfs::rss_kib(pid),
                sample(&body, "wasmgate_sessions_active{"),
                sample(&body, "wasmgate_client_handles{"),
                sent as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// A recursive query for `c<i>.example.test`, type A.
fn query(id: u16, i: usize) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in [format!("c{i}"), "example".into(), "test".into()] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn scrape(port: u16) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).context("metrics")?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of the first series starting with `name`.
fn sample(body: &str, name: &str) -> String {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("-")
        .to_string()
}
