//! Defects a hostile review found, each reproduced against the built binary:
//! forged log lines, log floods outside the rate limit, files that are not files,
//! unbounded configuration, a metrics endpoint that holds connections, and more.
//! Each test here failed on the code before its fix.

mod common;

use std::time::{Duration, Instant};

use common::{Served, client, write_file};

/// Every line the gateway wrote within `wait`.
fn lines_for(served: &Served, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut lines = Vec::new();
    while let Ok(line) = served
        .log
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        lines.push(line);
    }
    lines
}

#[test]
fn guest_text_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    // The same forged text three ways: wasmgate.log, WASI stderr, env.abort.
    let logger = write_file(
        dir.path(),
        "logger.wat",
        br#"(module
            (import "wasmgate" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "hello\nFORGED INFO wasmgate: reloaded\r\1b[2J")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $log (i32.const 2) (i32.const 0) (i32.const 41))
                i64.const -1))"#,
    );
    let stderr = write_file(
        dir.path(),
        "stderr.wat",
        br#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 64) "hello\nFORGED INFO wasmgate: reloaded\n")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const 37))
                (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    );
    let abort = write_file(
        dir.path(),
        "abort.wat",
        br#"(module
            (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 96) "\12\00\00\00h\00i\00\0a\00F\00O\00R\00G\00E\00D\00")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $abort (i32.const 100) (i32.const 0) (i32.const 1) (i32.const 1))
                i64.const -1))"#,
    );
    for (module, escaped) in [
        (&logger, "hello\\nFORGED INFO wasmgate: reloaded\\r\\u{1b}[2J"),
        (&stderr, "hello\\nFORGED INFO wasmgate: reloaded"),
        (&abort, "hi\\nFORGED"),
    ] {
        let served = Served::start(&["--listen", "127.0.0.1:0", "--module", module]);
        client().send_to(b"x", served.addr).unwrap();
        let line = served
            .line_with(&[escaped])
            .unwrap_or_else(|| panic!("{module}: no escaped line"));
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
        let rest = lines_for(&served, Duration::from_millis(300));
        assert!(
            !rest.iter().any(|l| l.starts_with("FORGED")),
            "{module}: a guest started a log line of its own: {rest:?}"
        );
    }
}

#[test]
fn wasi_socket_calls_in_a_loop_do_not_flood_the_log() {
    // Each datagram calls every socket function 1,000 times; wasmtime-wasi used to
    // log a warning per call (28,850 lines for 20 datagrams).
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "sockets.wat",
        br#"(module
            (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_shutdown" (func $shutdown (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (local $i i32)
                (loop $next
                    (drop (call $accept (i32.const 0) (i32.const 0) (i32.const 64)))
                    (drop (call $recv (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 68)))
                    (drop (call $send (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 64)))
                    (drop (call $shutdown (i32.const 1) (i32.const 0)))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $next (i32.lt_u (local.get $i) (i32.const 1000))))))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path, "--workers", "1"]);
    let c = client();
    for _ in 0..20 {
        c.send_to(b"x", served.addr).unwrap();
    }
    let lines = lines_for(&served, Duration::from_millis(1500));
    assert!(
        lines.len() <= 10,
        "{} log lines for 20 datagrams: {:?}",
        lines.len(),
        &lines[..lines.len().min(5)]
    );
}
