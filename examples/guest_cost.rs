//! What each shipped guest costs per datagram, without sockets: `Guest::handle`
//! called in a loop on one thread, beside a native Rust uppercase function on the
//! same payload, so the figures are comparable within one run.
//!
//!     cargo run --release --example guest_cost [-- --runs 5 --datagrams 100000]
//!     cargo run --release --example guest_cost -- --extra old=/path/to/uppercase.wasm
//!
//! Every module runs as the gateway would run it: ABI v1 guests reuse one instance
//! (and the default guest is also shown with `--isolation fresh`); WASI commands get
//! a fresh instance per datagram from an instance pool. Runs are interleaved and the
//! median is reported. Bounded: `runs × datagrams` calls per module.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Parser;
use wasmgate::config::{Isolation, Limits};
use wasmgate::engine::read_module;
use wasmgate::guest::abi::GuestKind;
use wasmgate::guest::{Env, Guest};

#[derive(Debug, Parser)]
struct Args {
    /// Runs per module; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Datagrams per run (WASI commands get a tenth of these: each is a fresh program).
    #[arg(long, default_value_t = 100_000)]
    datagrams: usize,
    /// More modules to measure on the 64-byte text payload, as NAME=PATH.
    #[arg(long, value_name = "NAME=PATH")]
    extra: Vec<String>,
    /// Measure only the modules whose name contains this (the default guest always
    /// runs: it is the reference), for profiling one of them.
    #[arg(long)]
    only: Option<String>,
}

const TEXT: &[u8] = b"the quick brown fox jumps over the lazy dog, 0123456789 times!!\n";

struct Case {
    name: String,
    bytes: Vec<u8>,
    payload: Vec<u8>,
    isolation: Isolation,
    expect: Option<Vec<u8>>,
}

/// A DNS query for `host.wasmgate.test`, type A, with recursion desired.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["host", "wasmgate", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn cases(args: &Args) -> anyhow::Result<Vec<Case>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let file = |path: &str| read_module(&root.join(path)).with_context(|| format!("cannot read {path}"));
    let upper = TEXT.to_ascii_uppercase();
    let mut sorted: Vec<&[u8]> = TEXT.split(|&b| b == b' ').collect();
    sorted.sort();
    let sort_input: Vec<u8> = sorted.iter().rev().copied().collect::<Vec<_>>().join(&b'\n');
    let case = |name: &str, bytes: Vec<u8>, payload: &[u8], isolation, expect: Option<&[u8]>| Case {
        name: name.to_string(),
        bytes,
        payload: payload.to_vec(),
        isolation,
        expect: expect.map(<[u8]>::to_vec),
    };
    let mut cases = vec![
        case(
            "uppercase (default, Rust SDK)",
            wasmgate::DEFAULT_GUEST_WASM.to_vec(),
            TEXT,
            Isolation::Reuse,
            Some(&upper),
        ),
        case(
            "uppercase, --isolation fresh",
            wasmgate::DEFAULT_GUEST_WASM.to_vec(),
            TEXT,
            Isolation::Fresh,
            Some(&upper),
        ),
        case(
            "echo (WAT)",
            file("examples/echo.wat")?,
            TEXT,
            Isolation::Reuse,
            Some(TEXT),
        ),
        case(
            "checksum (C)",
            file("examples/c/checksum.wasm")?,
            TEXT,
            Isolation::Reuse,
            None,
        ),
        case(
            "base64 (AssemblyScript)",
            file("examples/assemblyscript/base64.wasm")?,
            TEXT,
            Isolation::Reuse,
            None,
        ),
        case(
            "dns (Rust SDK)",
            file("examples/dns/dns.wasm")?,
            &dns_query(),
            Isolation::Reuse,
            None,
        ),
        case(
            "sort (WASI, C)",
            file("examples/wasi-c/sort.wasm")?,
            &sort_input,
            Isolation::Fresh,
            None,
        ),
        case(
            "whoami (WASI, Rust)",
            file("examples/wasi-rust/whoami.wasm")?,
            b"whoami",
            Isolation::Fresh,
            Some(b"127.0.0.1:40000"),
        ),
    ];
    // Components: each reused, and each with a fresh instance per datagram (the
    // difference is the cost of instantiating it).
    let json = br#"{"user": "bob", "id": 42, "tags": ["a", "b"], "ok": true}"#;
    let redacted_in = b"user bob@example.com paid with 4111 1111 1111 1111 at 12:00\n";
    for (name, path, payload) in [
        ("json (Python component)", "examples/python/python.wasm", &json[..]),
        ("redact (JS component)", "examples/js/redact.wasm", &redacted_in[..]),
        (
            "probe (Rust component)",
            "tests/guests/rust-probe/probe.wasm",
            &b"hello"[..],
        ),
    ] {
        let bytes = file(path)?;
        cases.push(case(name, bytes.clone(), payload, Isolation::Reuse, None));
        cases.push(case(&format!("{name}, fresh"), bytes, payload, Isolation::Fresh, None));
    }
    for extra in &args.extra {
        let Some((name, path)) = extra.split_once('=') else {
            bail!("--extra takes NAME=PATH, not {extra}");
        };
        let bytes = read_module(path.as_ref()).with_context(|| format!("cannot read {path}"))?;
        cases.push(case(name, bytes, TEXT, Isolation::Reuse, None));
    }
    Ok(cases)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let peer: SocketAddr = "127.0.0.1:40000".parse()?;
    let mut guests = Vec::new();
    for (i, case) in cases(&args)?.into_iter().enumerate() {
        if i > 0
            && args
                .only
                .as_ref()
                .is_some_and(|only| !case.name.contains(only.as_str()))
        {
            continue;
        }
        let mut limits = Limits::default();
        if case.name.contains("component") {
            // SpiderMonkey's heap starts at about 65 MiB, and a garbage
            // collection now and then takes longer than the default 10 ms.
            limits.max_memory = 256 << 20;
            limits.timeout = std::time::Duration::from_millis(1000);
        }
        let env = Env::with_instance_pool(limits, 2)?;
        let program = Arc::new(env.load(case.name.clone(), &case.bytes)?);
        let kind = program.kind();
        let mut guest = Guest::new(env, program, case.isolation, 0.0);
        let reply = guest
            .handle(&case.payload, peer)
            .map_err(|r| anyhow::anyhow!("{}: {r}", case.name))?
            .to_vec();
        if let Some(expect) = &case.expect
            && &reply != expect
        {
            bail!("{}: unexpected reply {:?}", case.name, String::from_utf8_lossy(&reply));
        }
        guests.push((case, kind, guest, Vec::new()));
    }

    let native = |d: &[u8], out: &mut Vec<u8>| {
        out.clear();
        out.extend(d.iter().map(u8::to_ascii_uppercase));
    };
    let mut native_ns = Vec::new();
    let mut buf = Vec::with_capacity(TEXT.len());
    for _ in 0..args.runs {
        let started = Instant::now();
        for _ in 0..args.datagrams {
            native(black_box(TEXT), &mut buf);
            black_box(&buf);
        }
        native_ns.push(started.elapsed().as_nanos() as f64 / args.datagrams as f64);
        for (case, kind, guest, ns) in &mut guests {
            let n = match kind {
                GuestKind::AbiV1 | GuestKind::Component if case.isolation == Isolation::Reuse => args.datagrams,
                _ => (args.datagrams / 10).max(1),
            };
            let started = Instant::now();
            for _ in 0..n {
                let reply = guest.handle(black_box(&case.payload), peer);
                if let Err(r) = reply {
                    bail!("{}: {r}", case.name);
                }
            }
            ns.push(started.elapsed().as_nanos() as f64 / n as f64);
        }
    }

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let native = median(&mut native_ns);
    let default = median(&mut guests[0].3.clone());
    println!(
        "{:<32} {:>13} {:>7} {:>7} {:>13} {:>11} {:>10}",
        "module", "abi", "bytes", "payload", "ns/datagram", "× default", "× native"
    );
    println!(
        "{:<32} {:>13} {:>7} {:>7} {:>13.0} {:>11.2} {:>10.2}",
        "native Rust uppercase (no wasm)",
        "-",
        "-",
        TEXT.len(),
        native,
        native / default,
        1.0
    );
    for (case, kind, _, ns) in &mut guests {
        let m = median(ns);
        println!(
            "{:<32} {:>13} {:>7} {:>7} {:>13.0} {:>11.2} {:>10.2}",
            case.name,
            kind.name(),
            case.bytes.len(),
            case.payload.len(),
            m,
            m / default,
            m / native
        );
    }
    println!(
        "(median of {} interleaved runs; {} datagrams per run, a tenth of that for fresh instances)",
        args.runs, args.datagrams
    );
    Ok(())
}
