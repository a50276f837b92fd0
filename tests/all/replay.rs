//! `--record` and `wasmgate replay`: a gateway records real UDP traffic on
//! loopback, tcpdump and tshark read the file, and the built binary replays it
//! (and a capture tcpdump itself wrote) through modules, with its exit codes.

use crate::common;
use crate::common::fixtures::{installed, record_uppercase, recording};

use std::process::Command;

use common::{Upstream, ask, client};
use wasmgate::config::PoolSpec;

const FORWARD: &str = include_str!("../../examples/forward.wat");
#[test]
fn a_sampled_recording_of_forwards_keeps_about_its_share_of_each_hop() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::echo("up:");
    let mut spec = recording(dir.path(), "half.pcapng");
    spec.pools = vec![PoolSpec::new("backend", vec![upstream.addr.to_string()])];
    if let Some(r) = spec.record.as_mut() {
        r.sample = 0.5;
    }
    let gateway = common::start_with(FORWARD.as_bytes(), Default::default(), spec);
    let socket = client();
    for i in 0..400 {
        let m = format!("m{i}");
        assert_eq!(
            ask(&socket, gateway.local_addr(), m.as_bytes()),
            format!("up:{m}").as_bytes()
        );
    }
    gateway.shutdown();
    let capture = wasmgate::prove::capture::read(&dir.path().join("half.pcapng")).unwrap();
    let count = |hop| capture.datagrams.iter().filter(|d| d.hop == Some(hop)).count();
    // Each hop is sampled on its own: about half of 400 of each, far from
    // none and from all (binomial: 200 ± 10 is one standard deviation).
    use wasmgate::prove::capture::Hop;
    for hop in [Hop::Client, Hop::Forward, Hop::Upstream] {
        let n = count(hop);
        assert!((140..=260).contains(&n), "{hop:?}: {n} of 400 recorded");
    }
}

#[test]
fn a_sample_of_zero_records_nothing_and_the_size_cap_stops_recording() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = recording(dir.path(), "none.pcapng");
    if let Some(r) = spec.record.as_mut() {
        r.sample = 0.0;
    }
    let gateway = common::start_with(wasmgate::DEFAULT_GUEST_WASM, Default::default(), spec);
    let socket = client();
    for _ in 0..20 {
        ask(&socket, gateway.local_addr(), b"x");
    }
    gateway.shutdown();
    let capture = wasmgate::prove::capture::read(&dir.path().join("none.pcapng"));
    assert!(format!("{:#}", capture.unwrap_err()).contains("no UDP datagrams"));

    let mut spec = recording(dir.path(), "capped.pcapng");
    if let Some(r) = spec.record.as_mut() {
        r.max_bytes = 4096;
    }
    let gateway = common::start_with(wasmgate::DEFAULT_GUEST_WASM, Default::default(), spec);
    for _ in 0..100 {
        ask(&socket, gateway.local_addr(), &[b'y'; 200]);
    }
    gateway.shutdown();
    let size = std::fs::metadata(dir.path().join("capped.pcapng")).unwrap().len();
    // It stops at the first packet past the cap.
    assert!((4096..4096 + 400).contains(&size), "{size} bytes");
    let capture = wasmgate::prove::capture::read(&dir.path().join("capped.pcapng")).unwrap();
    assert!(capture.datagrams.len() < 40, "{}", capture.datagrams.len());
}

#[test]
fn tcpdump_and_tshark_read_the_recorders_file() {
    let dir = tempfile::tempdir().unwrap();
    let capture = record_uppercase(dir.path(), &[b"hello", b"chen"]);
    if installed("tcpdump") {
        let out = Command::new("tcpdump").args(["-nr", &capture]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().filter(|l| l.contains("UDP, length")).count(), 4, "{text}");
    }
    if installed("tshark") {
        let out = Command::new("tshark")
            .args([
                "-r",
                &capture,
                "-T",
                "fields",
                "-e",
                "frame.comment",
                "-e",
                "udp.payload",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("wasmgate hop=client module=") && lines[0].contains("verdict=reply"),
            "{text}"
        );
        assert!(lines[0].ends_with("68656c6c6f"), "{text}"); // "hello"
        assert!(
            lines[1].starts_with("wasmgate hop=reply") && lines[1].ends_with("48454c4c4f"),
            "{text}"
        );
    }
}
