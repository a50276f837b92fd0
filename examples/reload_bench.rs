//! Measures hot reload under steady traffic: how long after a write the new module
//! answers, and whether any datagram is lost or wrong while modules are swapped.
//!
//!     cargo run --release --example reload_bench -- --swaps 100 --mode write
//!
//! A gateway and its reloader run in this process on 127.0.0.1:0. Probe clients
//! send numbered datagrams one at a time throughout. The module file alternates
//! between the default guest (replies uppercase) and examples/echo.wat (replies
//! unchanged); after each write, a timing client asks until the reply shows the
//! new module. `--mode write` overwrites the file in place, `--mode rename` writes a
//! temporary file and renames it over the module.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
#[path = "support/procfs.rs"]
mod procfs;
use procfs::rss_kib;
use wasmgate::config::Limits;
use wasmgate::config::ListenerSpec;
use wasmgate::gateway::Gateway;
use wasmgate::guest::Env;
use wasmgate::service::reload::Reloader;

#[derive(Debug, Parser)]
struct Args {
    /// Consecutive swaps.
    #[arg(long, default_value_t = 100)]
    swaps: usize,
    /// `write` (in place) or `rename` (temporary file renamed over the module).
    #[arg(long, default_value = "write")]
    mode: String,
    /// Probe clients sending throughout.
    #[arg(long, default_value_t = 4)]
    probes: usize,
}

const ECHO: &[u8] = include_bytes!("echo.wat");

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("guest.wasm");
    std::fs::write(&path, wasmgate::DEFAULT_GUEST_WASM)?;

    let env = Env::new(Limits::default())?;
    let program = env.load(path.display().to_string(), wasmgate::DEFAULT_GUEST_WASM)?;
    let config = ListenerSpec {
        listen: "127.0.0.1:0".parse()?,
        workers: 2,
        ..ListenerSpec::default()
    };
    let gateway = Gateway::start(&env, program, &config)?;
    let _reloader = Reloader::start(env, path.clone(), gateway.publisher(), true)?;
    let addr = gateway.local_addr();

    // Probe load: each reply must be the uppercase or the unchanged datagram.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, lost, wrong) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let probes: Vec<_> = (0..args.probes)
        .map(|id| {
            let (stop, sent, lost, wrong) = (stop.clone(), sent.clone(), lost.clone(), wrong.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let c = UdpSocket::bind("127.0.0.1:0")?;
                c.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut buf = [0u8; 256];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let payload = format!("probe {id} number {n}");
                    n += 1;
                    c.send_to(payload.as_bytes(), addr)?;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match c.recv(&mut buf) {
                        Ok(len) => {
                            let reply = &buf[..len];
                            if reply != payload.as_bytes() && reply != payload.to_ascii_uppercase().as_bytes() {
                                wrong.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                Ok(())
            })
        })
        .collect();

    let timer = UdpSocket::bind("127.0.0.1:0")?;
    timer.set_read_timeout(Some(Duration::from_secs(2)))?;
    let ask = |payload: &[u8]| -> anyhow::Result<Vec<u8>> {
        let mut buf = [0u8; 256];
        timer.send_to(payload, addr)?;
        let len = timer.recv(&mut buf)?;
        Ok(buf[..len].to_vec())
    };
    let deadline_per_swap = Duration::from_secs(5);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(std::process::id());
    let mut times = Vec::new();
    for i in 0..args.swaps {
        // Odd swaps install echo, even ones the default guest.
        let (bytes, expect_upper) = if i % 2 == 0 {
            (ECHO, false)
        } else {
            (wasmgate::DEFAULT_GUEST_WASM, true)
        };
        match args.mode.as_str() {
            "rename" => {
                let tmp = dir.path().join(".guest.wasm.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &path)?;
            }
            _ => std::fs::write(&path, bytes)?,
        }
        let written = Instant::now();
        loop {
            let reply = ask(b"swap probe")?;
            if (reply == b"SWAP PROBE") == expect_upper {
                times.push(written.elapsed());
                break;
            }
            anyhow::ensure!(written.elapsed() < deadline_per_swap, "swap {i} not seen within 5 s");
            std::thread::sleep(Duration::from_micros(200));
        }
        // Let a little traffic through each version before the next swap.
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss_kib(std::process::id());
    stop.store(true, Ordering::Relaxed);
    for p in probes {
        p.join().map_err(|_| anyhow::anyhow!("probe panicked"))??;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let stats = gateway.shutdown();
    println!(
        "mode={} swaps={} reloads={} reload_failures={}",
        args.mode, args.swaps, stats.reloads, stats.reload_failures
    );
    println!(
        "write-to-new-reply ms: median={:.1} p90={:.1} worst={:.1}",
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(times[times.len() - 1])
    );
    println!(
        "probes sent={} lost={} wrong={}",
        sent.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed)
    );
    println!("rss_kib before={rss_before} after={rss_after}");
    Ok(())
}
