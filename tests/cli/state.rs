//! The state handlers share (`state_*`, `limit`, `penalize`), over real UDP on
//! loopback: shared by a listener's workers, kept across reloads and traps,
//! bounded, and refusing what is too big with its code.

use crate::common;

use common::{Served, ask, client, sample, scrape, write_file};

/// A guest that runs one state call per datagram: `op(1) arg(4, i32 LE)
/// key_len(1) key value`, and replies with what the call returned (4 bytes,
/// LE; `g` adds the value, `i` gives 8 bytes).
///
/// g get (arg: buffer size)   s set (arg: ttl ms)   S set `arg` bytes from offset 0
/// d delete   i incr by 1 (arg: ttl ms)   l limit (arg: rate, burst 3)
/// p penalize (arg: ttl ms)   q penalized   t set, then trap
/// o get with a key outside memory (traps)   n 70 limit calls (the last one's code)
/// c cas: the value is `expected_len(1) expected new`; expected_len 255: absent
fn commands(tag: &str) -> String {
    format!(
        r#"(module
  ;; {tag}
  (import "wasmgate" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "state_set" (func $set (param i32 i32 i32 i32 i64) (result i32)))
  (import "wasmgate" "state_delete" (func $del (param i32 i32) (result i32)))
  (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
  (import "wasmgate" "state_cas" (func $cas (param i32 i32 i32 i32 i32 i32 i64) (result i32)))
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "penalize" (func $penalize (param i32 i32 i64) (result i32)))
  (import "wasmgate" "penalized" (func $penalized (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func $code (param $r i32) (result i64)
    (i32.store (i32.const 131072) (local.get $r))
    (i64.const 0x0002000000000004))
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (local $op i32) (local $arg i32) (local $klen i32) (local $v i32) (local $vlen i32) (local $r i32) (local $i i32) (local $e i32)
    (local.set $op (i32.load8_u (i32.const 0)))
    (local.set $arg (i32.load (i32.const 1)))
    (local.set $klen (i32.load8_u (i32.const 5)))
    (local.set $v (i32.add (i32.const 6) (local.get $klen)))
    (local.set $vlen (i32.sub (local.get $len) (local.get $v)))
    (if (i32.eq (local.get $op) (i32.const 0x67)) ;; g
      (then
        (local.set $r (call $get (i32.const 6) (local.get $klen) (i32.const 131076) (local.get $arg)))
        (i32.store (i32.const 131072) (local.get $r))
        (if (i32.or (i32.lt_s (local.get $r) (i32.const 0)) (i32.gt_s (local.get $r) (local.get $arg)))
          (then (local.set $r (i32.const 0))))
        (return (i64.or (i64.const 0x0002000000000000) (i64.extend_i32_u (i32.add (local.get $r) (i32.const 4)))))))
    (if (i32.eq (local.get $op) (i32.const 0x73)) ;; s
      (then (return (call $code (call $set (i32.const 6) (local.get $klen) (local.get $v) (local.get $vlen) (i64.extend_i32_s (local.get $arg)))))))
    (if (i32.eq (local.get $op) (i32.const 0x53)) ;; S
      (then (return (call $code (call $set (i32.const 6) (local.get $klen) (i32.const 0) (local.get $arg) (i64.const 0))))))
    (if (i32.eq (local.get $op) (i32.const 0x64)) ;; d
      (then (return (call $code (call $del (i32.const 6) (local.get $klen))))))
    (if (i32.eq (local.get $op) (i32.const 0x69)) ;; i
      (then
        (i64.store (i32.const 131072) (call $incr (i32.const 6) (local.get $klen) (i64.const 1) (i64.extend_i32_s (local.get $arg))))
        (return (i64.const 0x0002000000000008))))
    (if (i32.eq (local.get $op) (i32.const 0x6c)) ;; l
      (then (return (call $code (call $limit (i32.const 6) (local.get $klen) (local.get $arg) (i32.const 3))))))
    (if (i32.eq (local.get $op) (i32.const 0x70)) ;; p
      (then (return (call $code (call $penalize (i32.const 6) (local.get $klen) (i64.extend_i32_s (local.get $arg)))))))
    (if (i32.eq (local.get $op) (i32.const 0x71)) ;; q
      (then (return (call $code (call $penalized (i32.const 6) (local.get $klen))))))
    (if (i32.eq (local.get $op) (i32.const 0x74)) ;; t
      (then
        (drop (call $set (i32.const 6) (local.get $klen) (local.get $v) (local.get $vlen) (i64.const 0)))
        unreachable))
    (if (i32.eq (local.get $op) (i32.const 0x6f)) ;; o
      (then (return (call $code (call $get (i32.const 0xfffffff0) (i32.const 64) (i32.const 0) (i32.const 0))))))
    (if (i32.eq (local.get $op) (i32.const 0x6e)) ;; n
      (then
        (loop $again
          (local.set $r (call $limit (i32.const 6) (local.get $klen) (i32.const 1000) (i32.const 1000)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $i) (i32.const 70))))
        (return (call $code (local.get $r)))))
    (if (i32.eq (local.get $op) (i32.const 0x63)) ;; c
      (then
        (local.set $e (i32.load8_u (local.get $v)))
        (if (i32.eq (local.get $e) (i32.const 255))
          (then (return (call $code (call $cas (i32.const 6) (local.get $klen) (i32.const 0) (i32.const -1)
            (i32.add (local.get $v) (i32.const 1)) (i32.sub (local.get $vlen) (i32.const 1)) (i64.const 0))))))
        (return (call $code (call $cas (i32.const 6) (local.get $klen) (i32.add (local.get $v) (i32.const 1)) (local.get $e)
          (i32.add (i32.add (local.get $v) (i32.const 1)) (local.get $e))
          (i32.sub (i32.sub (local.get $vlen) (i32.const 1)) (local.get $e)) (i64.const 0))))))
    (call $code (i32.const -100))))"#
    )
}

fn command(op: u8, arg: i32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut d = vec![op];
    d.extend_from_slice(&arg.to_le_bytes());
    d.push(key.len() as u8);
    d.extend_from_slice(key);
    d.extend_from_slice(value);
    d
}

#[test]
fn the_binary_takes_state_bounds_and_reports_state_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "commands.wat", commands("bin").as_bytes());
    let served = Served::start(&[
        "--module",
        &module,
        "--max-reply-ratio",
        "0",
        "--state-max-entries",
        "4",
        "--state-max-bytes",
        "1MiB",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let socket = client();
    let code = |op, arg, key: &[u8]| {
        let reply = ask(&socket, served.addr, &command(op, arg, key, b""));
        i32::from_le_bytes(reply[..4].try_into().unwrap())
    };
    for (i, key) in [b"a", b"b", b"c", b"d", b"e"].iter().enumerate() {
        assert_eq!(code(b's', 60_000 + i as i32, &key[..]), 0);
    }
    // Rate 1/s, burst 3: three allowed, then denied.
    let results: Vec<i32> = (0..5).map(|_| code(b'l', 1, b"client")).collect();
    assert_eq!(results, [1, 1, 1, 0, 0]);
    let body = scrape(served.metrics_addr());
    assert!(
        sample(&body, r#"wasmgate_state_entries{listener="default"}"#) <= 4.0,
        "{body}"
    );
    assert!(sample(&body, r#"wasmgate_state_bytes{listener="default"}"#) > 0.0);
    assert!(sample(&body, r#"wasmgate_state_evictions_total{listener="default"}"#) >= 1.0);
    assert_eq!(
        sample(&body, r#"wasmgate_limit_total{listener="default",result="allowed"}"#),
        3.0
    );
    assert_eq!(
        sample(&body, r#"wasmgate_limit_total{listener="default",result="denied"}"#),
        2.0
    );
}

#[test]
fn a_bad_state_flag_is_refused_with_the_reason() {
    let (code, _, err) = common::run_to_end(&["--state-max-bytes", "lots"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--state-max-bytes") && err.contains("lots"), "{err}");
}
