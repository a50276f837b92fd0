//! Forwarding through real gateways to real upstream servers on loopback:
//! policies, sessions, `forward_key`, `on_reply`, `send`, health, limits.

use crate::common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{REPLY_TIMEOUT, ask, client};

/// Answers datagrams that start with `p` itself and forwards the rest to
/// `backend`; passes every upstream datagram on through `on_reply`.
const PROBE_OR_FORWARD: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.and (i32.gt_u (local.get $len) (i32.const 0))
                 (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 112)))
      (then (return (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
                            (i64.extend_i32_u (local.get $len))))))
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1)
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))"#;

#[test]
fn a_flooding_upstream_keeps_memory_flat_and_the_listener_answered() {
    // Before: a worker drained a flooded session socket until it was empty and
    // queued every datagram for the client without sending: memory grew by
    // hundreds of MiB a second and the listener went unanswered for a second.
    let dir = tempfile::tempdir().unwrap();
    let module = common::write_file(dir.path(), "probe-or-forward.wat", PROBE_OR_FORWARD.as_bytes());
    let flooder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = flooder.local_addr().unwrap().to_string();
    let served = common::Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--module",
        &module,
        "--upstream",
        &format!("backend={upstream}"),
        "--workers",
        "1",
        "--no-cache",
        // Every answer goes through: only the flood itself is under test.
        "--max-reply-ratio",
        "0",
    ]);
    let before = common::rss_kib(served.child.id());
    // The victim's one datagram opens the session the flood comes back on.
    let victim = client();
    victim.send_to(b"start", served.addr).unwrap();
    flooder.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let (_, session) = flooder.recv_from(&mut buf).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two threads, at most 3 s and 3 million datagrams of 1,200 bytes each.
    let floods: Vec<_> = (0..2)
        .map(|_| {
            let (socket, stop) = (flooder.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                let payload = [b'f'; 1200];
                let started = std::time::Instant::now();
                let mut sent = 0u64;
                while sent < 1_500_000 && started.elapsed() < Duration::from_secs(3) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if socket.send_to(&payload, session).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    // Meanwhile another client is answered, every time.
    let prober = client();
    let mut slowest = Duration::ZERO;
    let mut peak = before;
    for i in 0..40 {
        let asked = std::time::Instant::now();
        let msg = format!("probe {i}");
        assert_eq!(ask(&prober, served.addr, msg.as_bytes()), msg.as_bytes());
        slowest = slowest.max(asked.elapsed());
        peak = peak.max(common::rss_kib(served.child.id()));
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = floods.into_iter().map(|t| t.join().unwrap()).sum();
    peak = peak.max(common::rss_kib(served.child.id()));
    println!(
        "flood: {sent} datagrams of 1,200 bytes; gateway RSS {before} KiB before, {peak} KiB at most; slowest probe {slowest:?}"
    );
    assert!(
        peak < before + 64 * 1024,
        "resident memory grew from {before} KiB to {peak} KiB under the flood"
    );
    // Milliseconds when the sessions take turns with the listener; a generous bound.
    assert!(slowest < Duration::from_secs(1), "a probe waited {slowest:?}");
}

#[test]
fn with_io_uring_off_a_turns_forwards_go_out_one_send_each_and_all_are_answered() {
    // Where io_uring is missing or forbidden (seccomp), or turned off, the
    // worker sends each forward on its own; bursts of clients must still be
    // forwarded and answered, every one.
    let upstream = common::Upstream::echo("u:");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    command
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--no-watch", "--module"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/forward.wat"))
        .args(["--upstream", &format!("backend={}", upstream.addr)])
        .env("RUST_LOG", "info,wasmgate::net=debug")
        .env("WASMGATE_IO_URING", "off");
    let served = common::Served::start_command(command);
    let clients: Vec<UdpSocket> = (0..4).map(|_| client()).collect();
    for (c, socket) in clients.iter().enumerate() {
        for i in 0..8 {
            socket.send_to(format!("{c}-{i}").as_bytes(), served.addr).unwrap();
        }
    }
    for (c, socket) in clients.iter().enumerate() {
        let mut got: Vec<String> = (0..8)
            .map(|_| String::from_utf8(common::recv(socket, served.addr)).unwrap())
            .collect();
        got.sort();
        let want: Vec<String> = (0..8).map(|i| format!("u:{c}-{i}")).collect();
        assert_eq!(got, want);
    }
    // The line was written before the first send; its reader may lag behind.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|l: &String| l.contains("no io_uring") && l.contains("WASMGATE_IO_URING"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match served.log.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => panic!("the fallback is never said: {log:#?}"),
        }
    }
}
