//! Guests and set-ups that both halves of a suite use: the in-process tests
//! (`tests/all/`) and the process tests (`tests/cli/`) of the same concern.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use wasmgate::config::{CandidateSpec, ListenerSpec, RecordSpec};
use wasmgate::gateway::Gateway;

use super::{ask, client};

// The `state` suites.

/// A guest that runs one state call per datagram: `op(1) arg(4, i32 LE)
/// key_len(1) key value`, and replies with what the call returned (4 bytes,
/// LE; `g` adds the value, `i` gives 8 bytes).
///
/// g get (arg: buffer size)   s set (arg: ttl ms)   S set `arg` bytes from offset 0
/// d delete   i incr by 1 (arg: ttl ms)   l limit (arg: rate, burst 3)
/// p penalize (arg: ttl ms)   q penalized   t set, then trap
/// o get with a key outside memory (traps)   n 70 limit calls (the last one's code)
/// c cas: the value is `expected_len(1) expected new`; expected_len 255: absent
pub fn commands(tag: &str) -> String {
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

pub fn command(op: u8, arg: i32, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut d = vec![op];
    d.extend_from_slice(&arg.to_le_bytes());
    d.push(key.len() as u8);
    d.extend_from_slice(key);
    d.extend_from_slice(value);
    d
}

// The `components` suites.

/// A component core module's memory and `realloc` in WAT, for the WAT
/// components of the tests: the allocator bumps through the first page from
/// 1,024 and starts over.
#[macro_export]
macro_rules! bump_allocator {
    () => {
        r#"
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (if (i32.gt_u (global.get $heap) (i32.const 32768)) (then (global.set $heap (i32.const 1024))))
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (global.get $heap) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p))"#
    };
}

/// A component in WAT: `handle` echoes the datagram, but loops forever on one
/// that starts with `l` and traps on one that starts with `t`.
pub const ECHO_COMPONENT: &str = concat!(
    r#"(component
  (core module $m"#,
    crate::bump_allocator!(),
    r#"
    (global $count (mut i32) (i32.const 0))
    (func (export "handle") (param $d i32) (param $n i32) (param $p i32) (param $pn i32) (result i32)
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x6c)) (then (loop $forever (br $forever))))
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x74)) (then unreachable))
      ;; "c": the count of "c" datagrams this instance has seen, as a digit.
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x63))
        (then
          (global.set $count (i32.add (global.get $count) (i32.const 1)))
          (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $count)))
          (local.set $d (i32.const 100))
          (local.set $n (i32.const 1))))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (local.get $d))
      (i32.store (i32.const 24) (local.get $n))
      (i32.const 16)))
  (core instance $i (instantiate $m))
  (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
    (canon lift (core func $i "handle") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))"#
);

// The `replay` suites.

pub fn recording(dir: &Path, name: &str) -> ListenerSpec {
    ListenerSpec {
        record: Some(RecordSpec::new(dir.join(name))),
        ..super::config()
    }
}

/// Serves the default guest with `--record`, asks `messages`, and stops the
/// gateway (which writes the file out); returns its path.
pub fn record_uppercase(dir: &Path, messages: &[&[u8]]) -> String {
    let gateway = super::start_with(
        wasmgate::DEFAULT_GUEST_WASM,
        Default::default(),
        recording(dir, "up.pcapng"),
    );
    let socket = client();
    for m in messages {
        assert_eq!(ask(&socket, gateway.local_addr(), m), m.to_ascii_uppercase());
    }
    gateway.shutdown();
    dir.join("up.pcapng").display().to_string()
}

pub fn installed(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        super::skip(&format!("{tool} is not installed here"));
    }
    found
}

// The `pools` suites.

pub fn example(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .to_str()
        .unwrap()
        .to_string()
}

/// A config file with one listener forwarding to the pool `backend`.
pub fn config(endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[listener]]\nname = \"fwd\"\nlisten = \"127.0.0.1:0\"\nmodule = \"{}\"\nworkers = 2\n\n\
         [upstreams.backend]\nendpoints = [{}]\n{extra}",
        example("examples/forward.wat"),
        list.join(", ")
    )
}

// The `reload` suites.

/// A module that replies with `tag` followed by the datagram.
pub fn tagged(tag: u8) -> Vec<u8> {
    format!(
        r#";; replies "{tag_char}" + datagram
        (module
          (memory (export "memory") 2)
          (func (export "alloc") (param i32) (result i32) i32.const 1025)
          (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (i32.store8 (i32.const 1024) (i32.const {tag}))
            (i64.or (i64.const 0x0000040000000000)
                    (i64.extend_i32_u (i32.add (local.get $len) (i32.const 1))))))"#,
        tag_char = tag as char
    )
    .into_bytes()
}

// The `shadow` suites.

pub fn with_candidate(dir: &Path, source: &str, edit: impl FnOnce(&mut CandidateSpec)) -> ListenerSpec {
    let mut candidate = CandidateSpec::new(dir.join("candidate.wat"));
    std::fs::write(&candidate.path, source).unwrap();
    edit(&mut candidate);
    ListenerSpec {
        candidate: Some(candidate),
        ..super::config()
    }
}

pub fn start(module: &[u8], spec: ListenerSpec) -> Gateway {
    super::start_with(module, Default::default(), spec)
}
