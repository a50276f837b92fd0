//! WASI command modules, written as inline WAT: each echoes stdin to stdout, and
//! misbehaves (or probes the sandbox) when the datagram starts with `!`. After each
//! one a probe must still be answered, and a drop must be counted under the right reason.

use crate::common;

use std::time::{Duration, Instant};

use common::{ask, assert_silent, client, start};
use wasmgate::verdict::DropReason;

/// A WASI command that copies stdin to stdout, and runs `misbehaviour` first when
/// the datagram starts with `!`. Memory: iovec at 0, counts at 8 and 12, data at 1024.
/// `extra` adds module-level items.
fn command(misbehaviour: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"(module
        (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
        (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "path_open"
            (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
        {extra}
        (memory (export "memory") 2)
        (data (i32.const 512) "etc/passwd")
        (func (export "_start")
            (i32.store (i32.const 0) (i32.const 1024))
            (i32.store (i32.const 4) (i32.const 65536))
            (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)) (then unreachable))
            (if (i32.and (i32.gt_u (i32.load (i32.const 8)) (i32.const 0))
                         (i32.eq (i32.load8_u (i32.const 1024)) (i32.const 33)))
                (then {misbehaviour}))
            (i32.store (i32.const 4) (i32.load (i32.const 8)))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))"#
    )
    .into_bytes()
}

/// Sends one `!` datagram between probes and checks how it was handled:
/// `Some(reason)` if it must be dropped for that reason, `None` if echoed.
fn survives(module: &[u8], outcome: Option<DropReason>) {
    let gateway = start(module);
    let addr = gateway.local_addr();
    let c = client();
    assert_eq!(ask(&c, addr, b"before"), b"before");
    match outcome {
        Some(_) => {
            c.send_to(b"!attack", addr).unwrap();
            assert_silent(&c, Duration::from_millis(300));
        }
        None => assert_eq!(ask(&c, addr, b"!probe"), b"!probe"),
    }
    for i in 0..3 {
        let probe = format!("probe number {i}");
        assert_eq!(ask(&c, addr, probe.as_bytes()), probe.as_bytes());
    }
    let stats = gateway.shutdown();
    match outcome {
        Some(reason) => {
            assert_eq!(stats.dropped(reason), 1, "expected one {reason} drop: {stats}");
            assert_eq!(stats.dropped_total(), 1, "{stats}");
        }
        None => assert_eq!(stats.dropped_total(), 0, "{stats}"),
    }
}

#[test]
fn an_endless_loop_in_start_is_a_timeout() {
    let started = Instant::now();
    survives(&command("(loop $l (br $l))", ""), Some(DropReason::Timeout));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn a_memory_grow_bomb_traps_at_the_memory_cap() {
    survives(
        &command(
            "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))",
            "",
        ),
        Some(DropReason::Trap),
    );
}

#[test]
fn a_non_zero_exit_status_sends_nothing() {
    survives(
        &command("(call $proc_exit (i32.const 3))", ""),
        Some(DropReason::NoReply),
    );
}

#[test]
fn exit_status_zero_sends_stdout() {
    // proc_exit(0) after writing: the write stands.
    survives(
        &command(
            "(i32.store (i32.const 4) (i32.load (i32.const 8)))
             (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
             (call $proc_exit (i32.const 0))",
            "",
        ),
        None,
    );
}

#[test]
fn more_than_a_datagram_on_stdout_is_oversize() {
    survives(
        &command(
            "(i32.store (i32.const 4) (i32.const 70000))
             (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
             (return)",
            "",
        ),
        Some(DropReason::Oversize),
    );
}

#[test]
fn a_flood_on_stderr_is_cut_short_and_the_reply_still_goes() {
    survives(
        &command(
            "(i32.store (i32.const 4) (i32.const 100000))
             (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 12)))",
            "",
        ),
        None,
    );
}

#[test]
fn sleeping_is_refused_at_once_rather_than_blocking_the_worker() {
    // One clock subscription of 10 s at 64; poll_oneoff must fail with ENOTSUP (58).
    let sleep = "(i64.store (i32.const 64) (i64.const 1))
        (i32.store8 (i32.const 72) (i32.const 0))
        (i32.store (i32.const 80) (i32.const 1))
        (i64.store (i32.const 88) (i64.const 10000000000))
        (if (i32.ne (call $poll_oneoff (i32.const 64) (i32.const 256) (i32.const 1) (i32.const 16)) (i32.const 58))
            (then unreachable))";
    let started = Instant::now();
    survives(&command(sleep, ""), None);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn no_directory_is_preopened_and_no_file_can_be_opened() {
    // fd 3 would be the first preopen; there is none, so both calls fail.
    let probe = "(if (i32.eqz (call $fd_prestat_get (i32.const 3) (i32.const 64))) (then unreachable))
        (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 512) (i32.const 10)
                (i32.const 0) (i64.const 2) (i64.const 2) (i32.const 0) (i32.const 64)))
            (then unreachable))";
    survives(&command(probe, ""), None);
}

#[test]
fn there_are_no_sockets_to_accept_on() {
    let probe = "(if (i32.eqz (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 64))) (then unreachable))";
    survives(&command(probe, ""), None);
}

#[test]
fn the_environment_holds_only_the_peer() {
    let probe = "(if (call $environ_sizes_get (i32.const 64) (i32.const 68)) (then unreachable))
        (if (i32.ne (i32.load (i32.const 64)) (i32.const 1)) (then unreachable))";
    survives(&command(probe, ""), None);
}

#[test]
fn every_datagram_gets_a_fresh_instance() {
    // A global counter, reported as the first byte: always 1.
    let module = command(
        "(global.set $n (i32.add (global.get $n) (i32.const 1)))
         (i32.store8 (i32.const 1024) (i32.add (i32.const 48) (global.get $n)))",
        "(global $n (mut i32) (i32.const 0))",
    );
    let gateway = start(&module);
    let c = client();
    for _ in 0..5 {
        assert_eq!(ask(&c, gateway.local_addr(), b"!x"), b"1x");
    }
}

#[test]
fn a_huge_random_get_traps_at_once_instead_of_filling_64_mib_outside_the_budget() {
    // Twenty calls asking for 64 MiB each: before the cap these ran ~11 s per
    // datagram outside the time budget, each allocating 64 MiB in the host.
    let twenty = "(block $done (loop $next
            (br_if $done (i32.ge_u (global.get $i) (i32.const 20)))
            (drop (call $random_get (i32.const 1024) (i32.const 67108864)))
            (global.set $i (i32.add (global.get $i) (i32.const 1)))
            (br $next)))";
    let extra = r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
        (global $i (mut i32) (i32.const 0))"#;
    let started = Instant::now();
    survives(&command(twenty, extra), Some(DropReason::Trap));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn random_bytes_within_the_cap_are_given() {
    // 256 bytes (what getentropy asks for) into 1024..1280: returns 0, and the
    // datagram's first bytes are overwritten by them, so the echo differs.
    let probe = "(if (call $random_get (i32.const 1024) (i32.const 256)) (then unreachable))
        (i32.store8 (i32.const 1024) (i32.const 33))";
    let extra = r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))"#;
    let gateway = start(&command(probe, extra));
    let c = client();
    let sent = [b'!'; 64];
    let reply = ask(&c, gateway.local_addr(), &sent);
    assert_eq!(reply.len(), 64);
    assert_eq!(reply[0], b'!');
    assert_ne!(
        &reply[1..],
        &sent[1..],
        "the bytes after the first are random, not the datagram"
    );
}

#[test]
fn argv_is_the_handler_name_alone() {
    // One argument, "wasmgate-handler" (16 bytes and a NUL), read back whole.
    let probe = "(if (call $args_sizes_get (i32.const 64) (i32.const 68)) (then unreachable))
        (if (i32.ne (i32.load (i32.const 64)) (i32.const 1)) (then unreachable))
        (if (i32.ne (i32.load (i32.const 68)) (i32.const 17)) (then unreachable))
        (if (call $args_get (i32.const 72) (i32.const 128)) (then unreachable))
        (if (i32.ne (i32.load (i32.const 72)) (i32.const 128)) (then unreachable))
        ;; wasmgate as a little-endian i64.
        (if (i64.ne (i64.load (i32.const 128)) (i64.const 0x657461676d736177)) (then unreachable))";
    let extra = r#"(import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))"#;
    survives(&command(probe, extra), None);
}

#[test]
fn clocks_tell_the_real_time_and_a_monotonic_time() {
    // Realtime is after 2020 (1.6e18 ns); monotonic does not go back.
    let probe = "(if (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 64)) (then unreachable))
        (if (i64.lt_u (i64.load (i32.const 64)) (i64.const 1600000000000000000)) (then unreachable))
        (if (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 72)) (then unreachable))
        (if (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 80)) (then unreachable))
        (if (i64.lt_u (i64.load (i32.const 80)) (i64.load (i32.const 72))) (then unreachable))";
    let extra =
        r#"(import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))"#;
    survives(&command(probe, extra), None);
}
