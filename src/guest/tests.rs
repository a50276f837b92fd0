//! The loader and the runner on inline WAT guests: kinds, limits, traps,
//! timeouts and the host calls, with no network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abi::GuestKind;
use super::env::Env;
use super::runner::Guest;
use crate::config::{Isolation, Limits};
use crate::engine::MAX_TABLE_ELEMENTS;
use crate::verdict::{CallError, DropReason, MAX_DATAGRAM};

fn peer() -> SocketAddr {
    "127.0.0.1:4242".parse().unwrap()
}

fn env() -> Env {
    Env::new(Limits::default()).unwrap()
}

fn guest(wat: &str) -> Guest {
    let env = env();
    let program = Arc::new(env.load("test.wat", wat.as_bytes()).unwrap());
    Guest::new(env, program, Isolation::Reuse, 3.0)
}

/// Echoes the datagram, with a counter in global 0 that survives between datagrams
/// and is reported as the reply's first byte when the datagram is "count".
const COUNTER: &str = r#"(module
    (memory (export "memory") 1)
    (global $n (mut i32) (i32.const 0))
    (func (export "alloc") (param i32) (result i32) i32.const 16)
    (func (export "handle") (param $p i32) (param $len i32) (result i64)
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (i32.store8 (local.get $p) (i32.add (i32.const 48) (global.get $n)))
        (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.const 1)))
)"#;

#[test]
fn embedded_guest_uppercases_like_python() {
    let env = env();
    let program = Arc::new(env.load("<embedded>", crate::DEFAULT_GUEST_WASM).unwrap());
    let mut g = Guest::new(env, program, Isolation::Reuse, 3.0);
    assert_eq!(g.handle(b"chen", peer()).unwrap(), b"CHEN");
    assert_eq!(g.handle(b"", peer()).unwrap(), b"");
    let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let expected: Vec<u8> = all.iter().map(u8::to_ascii_uppercase).collect();
    assert_eq!(g.handle(&all, peer()).unwrap(), &expected[..]);
}

#[test]
fn reused_instance_keeps_state_fresh_does_not() {
    let mut g = guest(COUNTER);
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"2");
    g.isolation = Isolation::Fresh;
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
}

#[test]
fn a_trap_replaces_the_instance() {
    let mut g = guest(
        r#"(module
        (memory (export "memory") 1)
        (global $n (mut i32) (i32.const 0))
        (func (export "alloc") (param i32) (result i32) i32.const 16)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (global.set $n (i32.add (global.get $n) (i32.const 1)))
            (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)) (then unreachable))
            (i32.store8 (local.get $p) (i32.add (i32.const 48) (global.get $n)))
            (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.const 1))))"#,
    );
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"2");
    let rejection = g.handle(b"!", peer()).unwrap_err();
    assert_eq!(rejection.reason, DropReason::Trap);
    assert!(rejection.to_string().contains("unreachable"), "{rejection}");
    // The counter restarted: the trapped instance is gone.
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
}

#[test]
fn endless_loop_is_interrupted_as_a_timeout() {
    let mut g = guest(
        r#"(module (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64) (loop br 0) i64.const -1))"#,
    );
    let started = Instant::now();
    assert_eq!(g.handle(b"x", peer()).unwrap_err().reason, DropReason::Timeout);
    // A 10 ms budget: well under half a second even on a loaded machine.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn assemblyscript_abort_traps_with_its_message_and_place() {
    let mut g = guest(
        r#"(module
        (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
        (memory (export "memory") 1)
        (data (i32.const 96) "\0a\00\00\00b\00o\00o\00m\00!\00")
        (data (i32.const 196) "\08\00\00\00a\00.\00t\00s\00")
        (func (export "alloc") (param i32) (result i32) i32.const 1024)
        (func (export "handle") (param i32 i32) (result i64)
            (call $abort (i32.const 100) (i32.const 200) (i32.const 3) (i32.const 7))
            i64.const -1))"#,
    );
    let rejection = g.handle(b"x", peer()).unwrap_err();
    assert_eq!(rejection.reason, DropReason::Trap);
    assert!(rejection.to_string().contains("boom! at a.ts:3:7"), "{rejection}");
}

#[test]
fn wasi_commands_read_stdin_write_stdout_and_see_the_peer() {
    // Replies with the environment (`WASMGATE_PEER=…`) followed by the datagram.
    let mut g = guest(
        r#"(module
        (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_start")
            (local $env i32)
            (drop (call $sizes (i32.const 0) (i32.const 4)))
            (drop (call $environ_get (i32.const 16) (i32.const 1024)))
            ;; The variable without its trailing NUL, then the datagram after it.
            (local.set $env (i32.sub (i32.load (i32.const 4)) (i32.const 1)))
            (i32.store (i32.const 32) (i32.add (i32.const 1024) (local.get $env)))
            (i32.store (i32.const 36) (i32.const 4096))
            (drop (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
            (i32.store (i32.const 32) (i32.const 1024))
            (i32.store (i32.const 36) (i32.add (local.get $env) (i32.load (i32.const 40))))
            (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 44)))))"#,
    );
    g.max_ratio = 0.0;
    assert_eq!(g.program.kind(), GuestKind::WasiCommand);
    assert_eq!(g.handle(b" hi", peer()).unwrap(), b"WASMGATE_PEER=127.0.0.1:4242 hi");
    let v6: SocketAddr = "[::1]:9".parse().unwrap();
    assert_eq!(g.handle(b"", v6).unwrap(), b"WASMGATE_PEER=[::1]:9");
}

#[test]
fn peer_is_written_when_it_fits_and_never_past_cap() {
    // Memory from 1024 is filled with `Z` first; the reply is the 32 bytes at
    // 1024, so any byte the host wrote past what fits shows up in it.
    let mut g = guest(
        r#"(module
        (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (local $n i32)
            (memory.fill (i32.const 1024) (i32.const 90) (i32.const 32))
            ;; cap = 4 * datagram length.
            (local.set $n (call $peer (i32.const 1024) (i32.mul (local.get $len) (i32.const 4))))
            (i32.store8 (i32.const 1056) (local.get $n))
            (i64.const 0x0000040000000021)))"#,
    );
    g.max_ratio = 0.0;
    let text = |reply: &[u8]| (String::from_utf8_lossy(&reply[..32]).into_owned(), reply[32]);
    let (written, len) = text(g.handle(b"xxxxx", peer()).unwrap());
    assert_eq!((written.as_str(), len), ("127.0.0.1:4242ZZZZZZZZZZZZZZZZZZ", 14));
    // cap 4 < 14: nothing at all is written, and the length is still returned.
    let (written, len) = text(g.handle(b"x", peer()).unwrap());
    assert_eq!((written.as_str(), len), ("Z".repeat(32).as_str(), 14));
    // cap exactly the length: written whole, nothing after it.
    let (written, len) = text(g.handle(b"xxxx", "[::1]:9".parse().unwrap()).unwrap());
    assert_eq!((written.as_str(), len), ("[::1]:9ZZZZZZZZZZZZZZZZZZZZZZZZZ", 7));
}

/// A guest whose start function calls `peer` (no client yet: 0) and keeps the
/// answer in a global; `handle` replies with it, or asks for the peer at a
/// buffer outside memory when the datagram is `!`.
const PEER_IN_START: &str = r#"(module
    (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
    (memory (export "memory") 1)
    (global $at_start (mut i32) (i32.const -1))
    (func $start (global.set $at_start (call $peer (i32.const 0) (i32.const 64))))
    (start $start)
    (func (export "alloc") (param i32) (result i32) i32.const 0)
    (func (export "handle") (param $p i32) (param $len i32) (result i64)
        (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 33))
            (then (drop (call $peer (i32.const 65530) (i32.const 64)))))
        (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $at_start)))
        (i64.const 1)))"#;

#[test]
fn refused_calls_are_given_once_whatever_follows() {
    // Forwards twice to a pool that does not exist (there are no pools), then
    // traps when the datagram starts with "!".
    let mut g = guest(
        r#"(module
          (import "wasmgate" "forward" (func $f (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 2)
          (func (export "alloc") (param i32) (result i32) i32.const 64)
          (func (export "handle") (param $p i32) (param $n i32) (result i64)
            (drop (call $f (i32.const 0) (i32.const 1) (local.get $p) (local.get $n)))
            (drop (call $f (i32.const 0) (i32.const 1) (local.get $p) (local.get $n)))
            (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)) (then unreachable))
            i64.const -1))"#,
    );
    let refused = |g: &mut Guest| g.take_refused().collect::<Vec<_>>();
    let answer = g.handle_with(b"x", peer(), &mut None).unwrap();
    assert_eq!(answer.first_refusal(), Some(CallError::UnknownPool));
    assert_eq!(refused(&mut g), [(CallError::UnknownPool, 2)]);
    assert_eq!(refused(&mut g), [], "taken once");
    // A trap after refused calls still has them counted.
    assert!(g.handle_with(b"!", peer(), &mut None).is_err());
    assert_eq!(refused(&mut g), [(CallError::UnknownPool, 2)]);
    // A datagram refused before the guest runs adds none (the last call's
    // refusals are not given again).
    assert!(g.handle_with(&vec![0; MAX_DATAGRAM + 1], peer(), &mut None).is_err());
    assert_eq!(refused(&mut g), []);
}

#[test]
fn peer_in_the_start_function_is_0_and_a_buffer_outside_memory_traps() {
    let mut g = guest(PEER_IN_START);
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"0");
    let rejection = g.handle(b"!", peer()).unwrap_err();
    assert_eq!(rejection.reason, DropReason::Trap);
    assert!(rejection.to_string().contains("outside guest memory"), "{rejection}");
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"0");
}

#[test]
fn tables_are_capped_and_growing_past_the_cap_traps() {
    // A table declared over the cap cannot be instantiated at all.
    let env = env();
    let too_big = format!(
        r#"(module (memory (export "memory") 1) (table {} funcref)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
        MAX_TABLE_ELEMENTS + 1
    );
    let e = format!("{:#}", env.load("big-table.wat", too_big.as_bytes()).unwrap_err());
    assert!(e.contains("table"), "{e}");
    // Growing one past the cap at run time traps, and the next datagram is served.
    let mut g = guest(
        r#"(module (memory (export "memory") 1) (table $t 1 funcref)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 33))
                (then (drop (table.grow $t (ref.null func) (i32.const 200000)))))
            (i64.extend_i32_u (local.get $len))))"#,
    );
    assert_eq!(g.handle(b"x", peer()).unwrap(), b"x");
    assert_eq!(g.handle(b"!", peer()).unwrap_err().reason, DropReason::Trap);
    assert_eq!(g.handle(b"y", peer()).unwrap(), b"y");
}
