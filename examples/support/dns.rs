//! What the DNS benchmarks share: a dnsmasq resolver, a one-worker wasmgate
//! proxy in front of it, and one dnsperf run measured with the server's CPU.
//! Uses the `harness` and `procfs` modules of the example that includes it.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::harness::{Running, dnsperf_field, free_port, pinned, spawn};
use crate::procfs::cpu_seconds;

/// What one dnsperf run measured.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DnsRow {
    pub(crate) qps: f64,
    pub(crate) lost: u64,
    pub(crate) completed: u64,
    pub(crate) latency_us: f64,
    pub(crate) cpu_us: f64,
}

/// dnsmasq on `port`, pinned to CPU 1, answering `example.test` and every
/// name under it with 192.0.2.1 itself (no cache, no upstream).
pub(crate) fn dnsmasq(dir: &Path, port: u16) -> anyhow::Result<Running> {
    let mut c = pinned(1, Path::new("/usr/sbin/dnsmasq"));
    c.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
    ])
    .args(["--user=root", "--address=/example.test/192.0.2.1", "--cache-size=0"])
    .arg(format!("--port={port}"))
    .arg(format!("--pid-file={}/dnsmasq-{port}.pid", dir.display()));
    spawn(c, "dnsmasq")
}

/// wasmgate serving `module` with one worker, pinned to CPU 0, with the pool
/// `resolvers` on `resolver`: per-client sessions (from flags), or, with
/// `shared` a folder for its config file, a shared pool; its port and the process.
pub(crate) fn proxy(
    wasmgate: &Path,
    module: &Path,
    resolver: u16,
    shared: Option<&Path>,
) -> anyhow::Result<(u16, Running)> {
    let port = free_port()?;
    let mut c = pinned(0, wasmgate);
    match shared {
        None => {
            c.args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "1", "--no-watch"])
                .args(["--upstream", &format!("resolvers=127.0.0.1:{resolver}")])
                .arg("--module")
                .arg(module);
        }
        Some(dir) => {
            let file = dir.join(format!("shared-{port}.toml"));
            std::fs::write(
                &file,
                format!(
                    "[[listener]]\nname = \"dns\"\nlisten = \"127.0.0.1:{port}\"\nmodule = \"{}\"\nworkers = 1\nwatch = false\n\n\
                     [upstreams.resolvers]\nendpoints = [\"127.0.0.1:{resolver}\"]\nsessions = \"shared\"\n",
                    module.display()
                ),
            )?;
            c.arg("--config").arg(&file);
        }
    }
    Ok((port, spawn(c, "wasmgate")?))
}

/// Waits up to `within` until the DNS server on `port` answers a query.
pub(crate) fn wait_answering(port: u16, within: std::time::Duration) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    probe.set_read_timeout(Some(Duration::from_millis(100)))?;
    // example.test, type A, ID 7.
    let query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x04test\x00\x00\x01\x00\x01";
    let (deadline, mut buf) = (Instant::now() + within, [0u8; 512]);
    while Instant::now() < deadline {
        probe.send_to(query, ("127.0.0.1", port))?;
        if probe.recv(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("the DNS server on port {port} did not answer within {within:?}")
}

/// dnsperf on CPU 1 for `seconds` against `port` (64 clients, 256 queries in
/// flight, 1 s timeout), with the CPU the process `pid` spent meanwhile.
pub(crate) fn dnsperf(queries: &Path, port: u16, pid: u32, seconds: f64) -> anyhow::Result<DnsRow> {
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let out = pinned(1, Path::new("/usr/bin/dnsperf"))
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &seconds.to_string(), "-c", "64", "-q", "256", "-t", "1"])
        .output()
        .context("cannot run dnsperf")?;
    let after = cpu_seconds(pid).unwrap_or(0.0);
    let text = String::from_utf8_lossy(&out.stdout);
    let completed = dnsperf_field(&text, "Queries completed").unwrap_or(0.0);
    if completed == 0.0 {
        bail!("dnsperf got no answers: {text}");
    }
    Ok(DnsRow {
        qps: dnsperf_field(&text, "Queries per second").unwrap_or(0.0),
        lost: dnsperf_field(&text, "Queries lost").unwrap_or(0.0) as u64,
        completed: completed as u64,
        latency_us: dnsperf_field(&text, "Average Latency (s)").unwrap_or(0.0) * 1e6,
        cpu_us: (after - before) * 1e6 / completed,
    })
}
