//! `--record` and `wasmgate replay`: a gateway records real UDP traffic on
//! loopback, tcpdump and tshark read the file, and the built binary replays it
//! (and a capture tcpdump itself wrote) through modules, with its exit codes.

use crate::common;
use crate::common::fixtures::{installed, record_uppercase, recording};

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Upstream, ask, client, run_to_end, signal, write_file};
use wasmgate::config::PoolSpec;

const FORWARD: &str = include_str!("../../examples/forward.wat");
const ECHO: &str = include_str!("../../examples/echo.wat");

/// Traps on a datagram that starts with `!`, else echoes.
const TRAPS_ON_BANG: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0))
                 (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 33)))
      (then unreachable))
    (i64.extend_i32_u (local.get $len))))"#;

/// A pcapng file of raw-IP UDP datagrams to 127.0.0.1:8008, its interface
/// with timestamp resolution `resolution`, each packet at its raw timestamp.
fn pcapng_at(resolution: u8, stamps: &[u64]) -> Vec<u8> {
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use pcap_file::pcapng::blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption};
    let mut writer = pcap_file::pcapng::PcapNgWriter::new(Vec::new()).unwrap();
    writer
        .write_pcapng_block(InterfaceDescriptionBlock {
            linktype: pcap_file::DataLink::RAW,
            snaplen: 0,
            options: vec![InterfaceDescriptionOption::IfTsResol(resolution)],
        })
        .unwrap();
    for (i, &raw) in stamps.iter().enumerate() {
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
            .udp(4000 + i as u16, 8008)
            .write(&mut packet, b"hello")
            .unwrap();
        writer
            .write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                // pcap-file writes the raw count as nanoseconds.
                timestamp: std::time::Duration::from_nanos(raw),
                original_len: packet.len() as u32,
                data: packet.into(),
                options: vec![],
            })
            .unwrap();
    }
    writer.into_inner()
}

#[test]
fn the_handlers_state_runs_on_the_captures_clock() {
    // Before: replay's state ran on the wall clock, so a rate limit that let
    // through datagrams two seconds apart when they were captured refused
    // them when replayed in a millisecond (20 false differences of 30).
    let dir = tempfile::tempdir().unwrap();
    // One token a second, one at most: `limit("shared", 1, 1)`, replies "y" or "n".
    let limiter = write_file(
        dir.path(),
        "limiter.wat",
        br#"(module
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1000) "shared")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (i32.store8 (i32.const 2000)
      (select (i32.const 121) (i32.const 110)
        (call $limit (i32.const 1000) (i32.const 6) (i32.const 1) (i32.const 1))))
    (i64.const 0x000007D000000001)))"#,
    );
    let seconds: Vec<u64> = (0..5).map(|i| 2_000_000_000 * i).collect();
    let capture = write_file(dir.path(), "spaced.pcapng", &pcapng_at(9, &seconds));
    let (_, out, err) = run_to_end(&["replay", &capture, "--module", &limiter]);
    assert_eq!(out.matches(r#"new: reply "y""#).count(), 5, "{out}{err}");
    // The same five within a second: one token, then refusals.
    let close: Vec<u64> = (0..5).map(|i| 100_000_000 * i).collect();
    let capture = write_file(dir.path(), "close.pcapng", &pcapng_at(9, &close));
    let (_, out, err) = run_to_end(&["replay", &capture, "--module", &limiter]);
    assert_eq!(out.matches(r#"new: reply "y""#).count(), 1, "{out}{err}");
    assert_eq!(out.matches(r#"new: reply "n""#).count(), 4, "{out}{err}");
}

#[test]
fn each_replayed_module_starts_from_a_fresh_state_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let capture = record_uppercase(dir.path(), &[b"a", b"b", b"c"]);
    // Replies its count of datagrams so far, as one digit, from the state.
    let counter = write_file(
        dir.path(),
        "counter.wat",
        br#"(module
  (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 1000) "n")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param i32 i32) (result i64)
    (i32.store8 (i32.const 2000)
      (i32.add (i32.const 48) (i32.wrap_i64 (call $incr (i32.const 1000) (i32.const 1) (i64.const 1) (i64.const 0)))))
    (i64.const 0x000007D000000001)))"#,
    );
    for _ in 0..2 {
        // Shared between the two modules, or kept from the run before, the
        // counts would differ.
        let (code, out, err) = run_to_end(&["replay", &capture, "--module", &counter, "--against", &counter]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("same: 3  different: 0"), "{out}");
    }
    let (_, out, _) = run_to_end(&["replay", &capture, "--module", &counter]);
    for n in ["1", "2", "3"] {
        assert!(out.contains(&format!(r#"new: reply "{n}""#)), "{out}");
    }
}

#[test]
fn hostile_captures_get_an_answer_never_a_panic_a_hang_or_all_memory() {
    // Before: two timestamp forms panicked (exit 101), /dev/zero was read until
    // memory ran out, and a FIFO blocked for ever.
    let dir = tempfile::tempdir().unwrap();
    let replay = |capture: &str| run_to_end(&["replay", capture, "--module", "guest/uppercase.wasm"]);
    // Seconds (resolution 0) far apart: past what an Instant can add.
    let seconds = write_file(dir.path(), "seconds.pcapng", &pcapng_at(0, &[1, u64::MAX]));
    // A binary resolution of 2^0 with the largest count: past a Duration.
    let binary = write_file(dir.path(), "binary.pcapng", &pcapng_at(0x80, &[1, u64::MAX]));
    for capture in [&seconds, &binary] {
        let (code, out, err) = replay(capture);
        // 1: the replies differ from the recorded ones (there are none).
        assert!(matches!(code, Some(0 | 1)), "{capture}: {code:?} {out}{err}");
        assert!(out.contains("2 client datagrams"), "{out}");
    }
    let fifo = dir.path().join("fifo.pcap");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for (capture, says) in [
        (fifo.to_str().unwrap(), "a FIFO"),
        ("/dev/zero", "a device"),
        ("/", "a directory"),
    ] {
        let (code, _, err) = replay(capture);
        assert_eq!(code, Some(2), "{capture}: {err}");
        assert!(
            err.contains(capture) && err.contains(says) && err.contains("not a regular file"),
            "{err}"
        );
    }
}

/// Runs the binary with `args` to its end; its exit code, its standard
/// output, and its peak resident memory in KiB (`VmHWM`, read every few
/// milliseconds while it runs: the `wait4` figure would also count the test
/// process, whose memory the child shares until it execs).
fn run_measured(args: &[&str]) -> (Option<i32>, String, u64) {
    use std::io::Read as _;
    let mut child = common::wasmgate(args).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let status_file = format!("/proc/{}/status", child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut peak = 0;
    let status = loop {
        let hwm = std::fs::read_to_string(&status_file).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        });
        peak = peak.max(hwm.unwrap_or(0));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "wasmgate {args:?} ran past 120 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    (status.code(), reader.join().unwrap(), peak)
}

#[test]
fn a_capture_larger_than_memory_allows_replays_in_bounded_memory() {
    // Before: replay read the whole file and then held every datagram (memory
    // 12 times a capture of small datagrams); a capture over 256 MiB was refused.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.pcap");
    let header = pcap_file::pcap::PcapHeader {
        datalink: pcap_file::DataLink::RAW,
        ..Default::default()
    };
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut writer = pcap_file::pcap::PcapWriter::with_header(file, header).unwrap();
    let n = 50_000u32;
    let payload = [b'a'; 1400];
    for i in 0..n {
        let mut packet = Vec::with_capacity(1500);
        let client = [10, 0, (i >> 8) as u8, i as u8];
        etherparse::PacketBuilder::ipv4(client, [127, 0, 0, 1], 64)
            .udp(4000, 8008)
            .write(&mut packet, &payload)
            .unwrap();
        // A second apart: each is compared once its reply window has passed.
        let at = Duration::from_secs(1_000_000 + u64::from(i));
        let p = pcap_file::pcap::PcapPacket::new(at, packet.len() as u32, &packet);
        writer.write_packet(&p).unwrap();
    }
    drop(writer);
    let size_kib = std::fs::metadata(&path).unwrap().len() / 1024;
    let (code, out, peak_kib) = run_measured(&["replay", path.to_str().unwrap(), "--module", "guest/uppercase.wasm"]);
    eprintln!("a {size_kib} KiB capture replayed in at most {peak_kib} KiB");
    // 1: there are no recorded replies to compare with, so all differ.
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("replayed {n} client datagrams")), "{out}");
    assert!(out.contains(&format!("different: {n}")), "{out}");
    assert!(
        peak_kib < size_kib,
        "replaying a {size_kib} KiB capture took {peak_kib} KiB: it is not streamed"
    );
}

#[test]
fn a_recording_replays_the_same_through_its_module_and_differs_through_another() {
    let dir = tempfile::tempdir().unwrap();
    let capture = record_uppercase(dir.path(), &[b"hello", b"", b"chen", b"MiXeD 42"]);
    let echo = write_file(dir.path(), "echo.wat", ECHO.as_bytes());

    let (code, out, err) = run_to_end(&["replay", &capture, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("replayed 4 client datagrams"), "{out}");
    assert!(out.contains("same: 4  different: 0"), "{out}");

    let (code, out, err) = run_to_end(&["replay", &capture, "--module", &echo]);
    assert_eq!(code, Some(1), "{out}{err}");
    // The empty datagram and "42"-only parts are the same upper or not: only
    // the three with lowercase letters differ.
    assert!(out.contains("same: 1  different: 3"), "{out}");
    assert!(
        out.contains(r#"old: reply "HELLO""#) && out.contains(r#"new: reply "hello""#),
        "{out}"
    );

    let (code, out, _) = run_to_end(&["replay", &capture, "--module", &echo, "--json"]);
    assert_eq!(code, Some(1));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["datagrams"], 4);
    assert_eq!(report["different"], 3);
    assert_eq!(report["differences"][0]["request"], "\"hello\"");
}

#[test]
fn against_another_module_counts_new_traps_and_compares_guest_time() {
    let dir = tempfile::tempdir().unwrap();
    let capture = record_uppercase(dir.path(), &[b"!boom", b"fine", b"!again"]);
    let echo = write_file(dir.path(), "echo.wat", ECHO.as_bytes());
    let traps = write_file(dir.path(), "traps.wat", TRAPS_ON_BANG.as_bytes());

    let (code, out, err) = run_to_end(&["replay", &capture, "--module", &traps, "--against", &echo, "--json"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["datagrams"], 3);
    assert_eq!(report["same"], 1);
    assert_eq!(report["only_old_answered"], 2);
    assert_eq!(report["new_traps"], 2);
    assert!(report["guest_time_ratio"].as_f64().is_some_and(|r| r > 0.0), "{report}");

    let (code, out, err) = run_to_end(&["replay", &capture, "--module", &echo, "--against", &echo]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("same: 3  different: 0"), "{out}");

    // The guest time compared is measured: an echo that first spins thirty
    // million turns takes many times the plain echo's time, either way round.
    let slow = ECHO.replace(
        r#"(func (export "handle") (param $ptr i32) (param $len i32) (result i64)"#,
        r#"(func (export "handle") (param $ptr i32) (param $len i32) (result i64)
            (local $spin i32)
            (local.set $spin (i32.const 30000000))
            (block $done (loop $again
                (br_if $done (i32.eqz (local.get $spin)))
                (local.set $spin (i32.sub (local.get $spin) (i32.const 1)))
                (br $again)))"#,
    );
    assert!(slow.contains("$spin"), "the echo was not edited");
    let slow = write_file(dir.path(), "slow.wat", slow.as_bytes());
    let ratio = |new: &str, old: &str| -> f64 {
        let args = [
            "replay",
            &capture,
            "--module",
            new,
            "--against",
            old,
            "--json",
            "--timeout-ms",
            "2000",
        ];
        let (_, out, err) = run_to_end(&args);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        report["guest_time_ratio"].as_f64().expect("a ratio")
    };
    let slower = ratio(&slow, &echo);
    let faster = ratio(&echo, &slow);
    assert!(slower > 5.0, "the spinning echo against the echo: {slower}");
    assert!(faster < 0.2, "the echo against the spinning echo: {faster}");
}

#[test]
fn a_forwarding_recording_feeds_its_upstream_answers_to_the_replayed_module() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::echo("up:");
    let mut spec = recording(dir.path(), "fwd.pcapng");
    spec.pools = vec![PoolSpec::new("backend", vec![upstream.addr.to_string()])];
    spec.workers = 1;
    let gateway = common::start_with(FORWARD.as_bytes(), Default::default(), spec);
    let socket = client();
    for m in [&b"one"[..], b"two"] {
        let mut want = b"up:".to_vec();
        want.extend_from_slice(m);
        assert_eq!(ask(&socket, gateway.local_addr(), m), want);
    }
    gateway.shutdown();
    assert_eq!(upstream.count(), 2);
    let capture = dir.path().join("fwd.pcapng").display().to_string();
    let forward = write_file(dir.path(), "forward.wat", FORWARD.as_bytes());
    let pool = format!("backend={}", upstream.addr);

    // Same pools: the forwards match and the recorded answers come back through it.
    let (code, out, err) = run_to_end(&["replay", &capture, "--module", &forward, "--upstream", &pool]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("same: 2  different: 0"), "{out}");
    // Nothing was sent for real.
    assert_eq!(upstream.count(), 2);

    // A module that answers itself differs in reply and in forwards.
    let (code, out, _) = run_to_end(&["replay", &capture, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(r#"old: reply "up:one", forward to {} "one""#, upstream.addr)),
        "{out}"
    );
    assert!(out.contains(r#"new: reply "ONE""#), "{out}");

    // A module with `on_reply` gets the recorded answers: it forwards the
    // same, and passes each answer on uppercased, which only the recorded
    // "up:one" fed to it can give.
    let shouting = FORWARD.replace(
        "\n  (func (export \"handle\")",
        r#"
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (if (i32.and (i32.ge_u (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 97))
                   (i32.le_u (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 122)))
        (then (i32.store8 (i32.add (local.get $ptr) (local.get $i))
                (i32.sub (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 32)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len))))
  (func (export "handle")"#,
    );
    assert!(shouting.contains("on_reply"), "the guest was not edited");
    let shouting = write_file(dir.path(), "shouting.wat", shouting.as_bytes());
    let (code, out, _) = run_to_end(&["replay", &capture, "--module", &shouting, "--upstream", &pool]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(r#"new: reply "UP:ONE""#), "{out}");
    assert_eq!(upstream.count(), 2, "nothing was sent for real");
}

#[test]
fn replay_says_what_is_wrong_with_bad_input_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_file(dir.path(), "notes.txt", b"these are not packets\n");
    let (code, _, err) = run_to_end(&["replay", &text, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("notes.txt") && err.contains("not a capture"), "{err}");

    let capture = record_uppercase(dir.path(), &[b"a", b"b"]);
    let bytes = std::fs::read(&capture).unwrap();
    let cut = write_file(dir.path(), "cut.pcapng", &bytes[..bytes.len() - 7]);
    let (code, _, err) = run_to_end(&["replay", &cut, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cut.pcapng") && err.contains("truncated"), "{err}");

    // A pcap header with no packets at all.
    let mut empty = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    empty.extend_from_slice(&[0; 8]);
    empty.extend_from_slice(&65_535u32.to_le_bytes());
    empty.extend_from_slice(&1u32.to_le_bytes());
    let empty = write_file(dir.path(), "empty.pcap", &empty);
    let (code, _, err) = run_to_end(&["replay", &empty, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("empty.pcap") && err.contains("no UDP datagrams"), "{err}");

    let (code, _, err) = run_to_end(&["replay", &capture, "--module", "no/such.wasm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no/such.wasm"), "{err}");
}

#[test]
fn a_capture_tcpdump_wrote_on_loopback_replays() {
    if !installed("tcpdump") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gateway = common::start(wasmgate::DEFAULT_GUEST_WASM);
    let port = gateway.local_addr().port();
    let file = dir.path().join("lo.pcap");
    let mut tcpdump = Command::new("tcpdump")
        .args(["--immediate-mode", "-i", "lo", "-U", "-w"])
        .arg(&file)
        .args(["udp", "port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(tcpdump.stderr.take().unwrap());
    let mut line = String::new();
    let _ = stderr.read_line(&mut line);
    if !line.contains("listening on") {
        let _ = tcpdump.kill();
        let _ = tcpdump.wait();
        common::skip(&format!("tcpdump cannot capture on lo here (not root?): {line}"));
        return;
    }
    // It says so a moment before its socket sees packets.
    std::thread::sleep(Duration::from_millis(500));
    let socket = client();
    let to: SocketAddr = gateway.local_addr();
    for m in [&b"from tcpdump"[..], b"", b"x"] {
        ask(&socket, to, m);
    }
    std::thread::sleep(Duration::from_millis(300));
    signal(tcpdump.id(), "INT");
    assert!(tcpdump.wait().unwrap().success());
    let capture = file.display().to_string();

    let (code, out, err) = run_to_end(&["replay", &capture, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("replayed 3 client datagrams to port {port}")),
        "{out}"
    );
    assert!(out.contains("same: 3  different: 0"), "{out}");

    let echo = write_file(dir.path(), "echo.wat", ECHO.as_bytes());
    let (code, out, _) = run_to_end(&["replay", &capture, "--module", &echo]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("same: 1  different: 2"), "{out}");
}
