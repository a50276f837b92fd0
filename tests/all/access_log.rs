//! `--access-log`: a JSON line per client datagram, over real UDP with the
//! built binary: exact fields, the guest's note, a forward's upstream, a
//! drop's reason; 0600, no symbolic link, reopened on SIGHUP; and a flood
//! against a reader that never reads costs dropped lines, not memory.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::common::{self, Served, Upstream, client, sample, scrape, write_file};

/// Echoes, except: `n…` notes `noted <the datagram>` first, `d…` is not
/// answered (`no_reply`), `f…` goes to the pool `backend`.
const GUEST: &str = r#"(module
  (import "wasmgate" "note" (func $note (param i32 i32) (result i32)))
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (data (i32.const 16) "noted ")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param $p i32) (param $n i32) (result i64)
    (local $first i32)
    (if (i32.gt_u (local.get $n) (i32.const 0)) (then
      (local.set $first (i32.load8_u (local.get $p)))
      (if (i32.eq (local.get $first) (i32.const 110)) (then
        (memory.copy (i32.const 22) (local.get $p) (local.get $n))
        (drop (call $note (i32.const 16) (i32.add (i32.const 6) (local.get $n))))))
      (if (i32.eq (local.get $first) (i32.const 100)) (then (return (i64.const -1))))
      (if (i32.eq (local.get $first) (i32.const 102)) (then
        (drop (call $forward (i32.const 0) (i32.const 7) (local.get $p) (local.get $n)))
        (return (i64.const -1))))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))"#;

/// The file's lines once it has `n` (waiting up to 5 s), parsed.
fn lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} lines of {n} in {}:\n{text}",
            text.lines().count(),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn keys(line: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = line.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

#[test]
fn each_datagram_is_a_json_line_with_exact_fields_the_note_upstream_and_drop_reason() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "guest.wat", GUEST.as_bytes());
    let log = dir.path().join("access.log");
    let upstream = Upstream::echo("up:");
    let pool = format!("backend={}", upstream.addr);
    let served = Served::start(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--upstream",
        &pool,
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let c = client();
    let me = c.local_addr().unwrap().to_string();
    assert_eq!(common::ask(&c, served.addr, b"hello"), b"hello");
    assert_eq!(common::ask(&c, served.addr, b"n \"quoted\"\n"), b"n \"quoted\"\n");
    c.send_to(b"drop me", served.addr).unwrap();
    assert_eq!(common::ask(&c, served.addr, b"fwd"), b"up:fwd");
    let lines = lines(&log, 4);
    let sha: String = Sha256::digest(GUEST.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let base = [
        "bytes_in",
        "bytes_out",
        "client",
        "guest_us",
        "listener",
        "module",
        "role",
        "time",
        "verdict",
    ];
    for line in &lines {
        assert_eq!(line["listener"], "default");
        assert_eq!(line["client"], me.as_str());
        assert_eq!(line["module"], sha.as_str());
        assert_eq!(line["role"], "active");
        let time = line["time"].as_str().unwrap();
        assert!(
            time.len() == 27 && time.starts_with("20") && time.ends_with('Z'),
            "{time}"
        );
        assert!(line["guest_us"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(keys(&lines[0]), base);
    assert_eq!(
        (&lines[0]["verdict"], &lines[0]["bytes_in"], &lines[0]["bytes_out"]),
        (&"reply".into(), &5.into(), &5.into())
    );
    let mut noted = base.to_vec();
    noted.push("note");
    noted.sort_unstable();
    assert_eq!(keys(&lines[1]), noted);
    assert_eq!(
        lines[1]["note"], "noted n \"quoted\"\n",
        "quotes and newlines are JSON's to escape"
    );
    let mut dropped = base.to_vec();
    dropped.push("drop_reason");
    dropped.sort_unstable();
    assert_eq!(keys(&lines[2]), dropped);
    assert_eq!(
        (&lines[2]["verdict"], &lines[2]["drop_reason"]),
        (&"drop".into(), &"no_reply".into())
    );
    assert_eq!(lines[2]["bytes_out"], 0);
    let mut forwarded = base.to_vec();
    forwarded.push("upstream");
    forwarded.sort_unstable();
    assert_eq!(keys(&lines[3]), forwarded);
    assert_eq!(lines[3]["verdict"], "forward");
    assert_eq!(lines[3]["upstream"], format!("backend/{}", upstream.addr));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn the_log_follows_no_symbolic_link_and_is_opened_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "guest.wat", GUEST.as_bytes());
    let target = write_file(dir.path(), "elsewhere", b"");
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, _, stderr) = common::run_to_end(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--access-log",
        link.to_str().unwrap(),
    ]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("link.log") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"", "nothing written through the link");

    let log = dir.path().join("access.log");
    let served = Served::start(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let c = client();
    assert_eq!(common::ask(&c, served.addr, b"one"), b"one");
    lines(&log, 1);
    // logrotate: move the file away, then SIGHUP.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    common::signal(served.child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.exists() {
        // The writer opens the new file at its next line or within 200 ms.
        assert!(Instant::now() < deadline, "no new access.log after SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(common::ask(&c, served.addr, b"two"), b"two");
    let after = lines(&log, 1);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["bytes_in"], 3);
    assert_eq!(lines(&rotated, 1).len(), 1, "the rotated file keeps its line");
}

#[test]
fn a_flood_to_a_reader_that_never_reads_drops_lines_and_keeps_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "guest.wat", GUEST.as_bytes());
    // Standard output is a pipe the test never reads: once it is full the
    // writer waits, the queue fills, and lines are dropped.
    let served = Served::start(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--access-log",
        "-",
        "--access-log-sample",
        "1",
    ]);
    let metrics = served.metrics_addr();
    let c = client();
    let payload = [b'x'; 32];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rss_warm = 0;
    for i in 0..1_000_000u32 {
        // Sent as fast as the socket takes them; the kernel drops what the
        // gateway cannot take.
        let _ = c.send_to(&payload, served.addr);
        if i == 200_000 {
            rss_warm = common::rss_kib(served.child.id());
        }
        if Instant::now() > deadline {
            break;
        }
    }
    // Until the worker has handled what it took in (the log counts as it goes).
    let count = |name: &str| sample(&scrape(metrics), &format!("{name}{{listener=\"default\"}}"));
    let handled = || count("wasmgate_access_log_dropped_total") + count("wasmgate_access_log_lines_total");
    let mut last = -1.0;
    while handled() != last {
        last = handled();
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_end = common::rss_kib(served.child.id());
    let received = count("wasmgate_datagrams_received_total");
    let dropped = count("wasmgate_access_log_dropped_total");
    let written = count("wasmgate_access_log_lines_total");
    assert!(received > 20_000.0, "received {received}");
    assert!(dropped > 0.0, "dropped {dropped} of {received} (written {written})");
    // Every line written, dropped, or waiting: in the queue (8,192) or in the
    // blocked write (at most 60 KiB of lines, some of them 100 bytes).
    assert!(
        written + dropped <= received && received - written - dropped <= 8_192.0 + 620.0,
        "received {received}, written {written}, dropped {dropped}"
    );
    assert!(
        rss_end < rss_warm + 8 * 1024,
        "RSS grew from {rss_warm} KiB to {rss_end} KiB"
    );
}
