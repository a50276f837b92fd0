//! How fast `wasmgate replay` goes through a capture, on one core, beside a
//! native baseline in the same run: the same capture read and each request
//! uppercased and compared with its recorded reply by plain Rust (no guest).
//!
//!     cargo build --release --examples && target/release/examples/replay_bench [--datagrams 200000] [--runs 5]
//!
//! The capture is written first (pcap, raw IP, 64-byte requests from 1,000
//! clients, each answered with its uppercase), then each side runs `--runs`
//! times; the median is shown. "loop" is the replay loop alone (after the file
//! is read and the module loaded), "total" includes reading the file.

use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use etherparse::PacketBuilder;
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use wasmgate::config::Limits;
use wasmgate::config::ListenerSpec;
use wasmgate::prove::replay::{Options, run};

#[derive(Debug, Parser)]
struct Args {
    /// Client datagrams in the capture.
    #[arg(long, default_value_t = 200_000)]
    datagrams: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let capture = dir.path().join("bench.pcap");
    write_capture(&capture, args.datagrams)?;
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/uppercase.wasm");
    let options = Options {
        capture: capture.clone(),
        module,
        against: None,
        port: Some(8008),
        listener: ListenerSpec {
            // As many clients as the capture has: no session and no port is denied.
            ..ListenerSpec::default()
        },
        limits: Limits::default(),
    };

    let mut replay_loop = Vec::new();
    let mut replay_total = Vec::new();
    let mut native_loop = Vec::new();
    let mut native_total = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let report = run(&options)?;
        let total = started.elapsed();
        anyhow::ensure!(
            report.same == args.datagrams as u64,
            "replay found differences: {}",
            report.text()
        );
        replay_loop.push(report.datagrams_per_second);
        replay_total.push(args.datagrams as f64 / total.as_secs_f64());

        let started = Instant::now();
        let read = wasmgate::prove::capture::read(&capture)?;
        let read_done = started.elapsed();
        let (same, elapsed) = native(&read.datagrams);
        anyhow::ensure!(same == args.datagrams, "native found differences");
        native_loop.push(args.datagrams as f64 / elapsed.as_secs_f64());
        native_total.push(args.datagrams as f64 / (read_done + elapsed).as_secs_f64());
    }
    println!(
        "replay of {} client datagrams (64 bytes, 1,000 clients), median of {} runs, one core:",
        args.datagrams, args.runs
    );
    println!("| | loop datagrams/s | total datagrams/s |");
    println!("|---|---:|---:|");
    println!(
        "| wasmgate replay, default guest | {:.0} | {:.0} |",
        median(&mut replay_loop),
        median(&mut replay_total)
    );
    println!(
        "| native: uppercase and compare in Rust | {:.0} | {:.0} |",
        median(&mut native_loop),
        median(&mut native_total)
    );
    Ok(())
}

/// The floor: every request uppercased and compared with the reply that follows it.
fn native(datagrams: &[wasmgate::prove::capture::Datagram]) -> (usize, Duration) {
    let started = Instant::now();
    let mut same = 0;
    let mut pending: std::collections::HashMap<SocketAddr, Vec<u8>> = std::collections::HashMap::new();
    for d in datagrams {
        if d.dst.port() == 8008 {
            pending.insert(d.src, d.payload.to_ascii_uppercase());
        } else if pending.remove(&d.dst).is_some_and(|want| want == d.payload) {
            same += 1;
        }
    }
    (same, started.elapsed())
}

fn write_capture(path: &Path, n: usize) -> anyhow::Result<()> {
    let header = PcapHeader {
        datalink: DataLink::RAW,
        ..PcapHeader::default()
    };
    let mut writer = PcapWriter::with_header(BufWriter::new(std::fs::File::create(path)?), header)?;
    let gateway = [127, 0, 0, 1];
    let mut packet = Vec::with_capacity(128);
    for i in 0..n {
        let client = [127, 0, 0, 2 + (i % 250) as u8];
        let port = 20_000 + (i % 4) as u16;
        let request: Vec<u8> = (0..64).map(|j| b'a' + ((i + j) % 26) as u8).collect();
        let at = Duration::from_micros(i as u64 * 10);
        for (src, sp, dst, dp, payload) in [
            (client, port, gateway, 8008, request.clone()),
            (gateway, 8008, client, port, request.to_ascii_uppercase()),
        ] {
            packet.clear();
            PacketBuilder::ipv4(src, dst, 64)
                .udp(sp, dp)
                .write(&mut packet, &payload)?;
            writer.write_packet(&PcapPacket::new(at, packet.len() as u32, &packet))?;
        }
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
