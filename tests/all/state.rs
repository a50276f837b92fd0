//! The state handlers share (`state_*`, `limit`, `penalize`), over real UDP on
//! loopback: shared by a listener's workers, kept across reloads and traps,
//! bounded, and refusing what is too big with its code.

use crate::common;
use crate::common::fixtures::{command, commands};

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{ask, assert_silent, client, config, start_with};
use wasmgate::config::Limits;
use wasmgate::gateway::Gateway;
use wasmgate::guest::Env;
use wasmgate::state::StateLimits;

/// Replies with two bytes: the instance's number (from a shared counter, taken
/// on its first datagram) and whether `limit("shared", rate 0, burst 100)` allowed it.
const LIMITER: &str = r#"(module
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
  (memory (export "memory") 1)
  (global $id (mut i32) (i32.const 0))
  (data (i32.const 1000) "sharedinstances")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (if (i32.eqz (global.get $id))
      (then (global.set $id (i32.wrap_i64 (call $incr (i32.const 1006) (i32.const 9) (i64.const 1) (i64.const 0))))))
    (i32.store8 (i32.const 2000) (global.get $id))
    (i32.store8 (i32.const 2001) (call $limit (i32.const 1000) (i32.const 6) (i32.const 0) (i32.const 100)))
    (i64.const 0x000007D000000002)))"#;

/// A gateway serving [`commands`], with no reply-size ratio (replies carry values).
fn serve(state: StateLimits) -> (Gateway, Env) {
    let limits = Limits {
        state,
        ..Limits::default()
    };
    let env = Env::new(limits).unwrap();
    let program = env.load("commands", commands("v1").as_bytes()).unwrap();
    let mut spec = config();
    spec.max_reply_ratio = 0.0;
    let gateway = Gateway::start(&env, program, &spec).unwrap();
    (gateway, env)
}

struct Talk {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Talk {
    fn new(gateway: &Gateway) -> Self {
        Self {
            socket: client(),
            to: gateway.local_addr(),
        }
    }

    fn code(&self, op: u8, arg: i32, key: &[u8], value: &[u8]) -> i32 {
        let reply = ask(&self.socket, self.to, &command(op, arg, key, value));
        i32::from_le_bytes(reply[..4].try_into().unwrap())
    }

    /// `Ok(value)` or `Err(code)`.
    fn get(&self, key: &[u8]) -> Result<Vec<u8>, i32> {
        let reply = ask(&self.socket, self.to, &command(b'g', 4096, key, b""));
        match i32::from_le_bytes(reply[..4].try_into().unwrap()) {
            n if n >= 0 => Ok(reply[4..].to_vec()),
            code => Err(code),
        }
    }

    fn incr(&self, key: &[u8], ttl_ms: i32) -> i64 {
        let reply = ask(&self.socket, self.to, &command(b'i', ttl_ms, key, b""));
        i64::from_le_bytes(reply[..8].try_into().unwrap())
    }
}

const NOT_FOUND: i32 = -9;
const FULL: i32 = -10;
const KEY_TOO_LONG: i32 = -11;
const VALUE_TOO_LONG: i32 = -12;
const MISMATCH: i32 = -13;
const NOT_A_COUNTER: i32 = -14;
const TOO_MANY_CALLS: i32 = -8;

#[test]
fn two_workers_share_one_limit_exactly() {
    let gateway = start_with(LIMITER.as_bytes(), Limits::default(), config());
    let to = gateway.local_addr();
    // Twenty clients: the kernel spreads them over both workers by address.
    let clients: Vec<UdpSocket> = (0..20).map(|_| client()).collect();
    let (mut allowed, mut instances) = (0, std::collections::BTreeSet::new());
    for round in 0..10 {
        for socket in &clients {
            let reply = ask(socket, to, format!("{round}").as_bytes());
            instances.insert(reply[0]);
            allowed += usize::from(reply[1]);
        }
    }
    assert!(instances.len() >= 2, "both workers' instances answered: {instances:?}");
    assert_eq!(allowed, 100, "200 asks, one bucket of 100 shared by both workers");
    let stats = gateway.stats().state;
    assert_eq!((stats.allowed, stats.denied), (100, 100));
}

#[test]
fn values_counters_and_cas_over_udp() {
    let (gateway, _) = serve(StateLimits::default());
    let talk = Talk::new(&gateway);
    assert_eq!(talk.get(b"k"), Err(NOT_FOUND));
    assert_eq!(talk.code(b's', 0, b"k", b"hello"), 0);
    assert_eq!(talk.get(b"k").as_deref(), Ok(&b"hello"[..]));
    assert_eq!(talk.code(b'c', 0, b"k", b"\x03nothere"), MISMATCH);
    assert_eq!(talk.code(b'c', 0, b"k", b"\x05helloworld"), 0);
    assert_eq!(talk.get(b"k").as_deref(), Ok(&b"world"[..]));
    assert_eq!(talk.code(b'c', 0, b"k", b"\xffagain"), MISMATCH, "expected absent");
    assert_eq!(talk.code(b'd', 0, b"k", b""), 1);
    assert_eq!(talk.code(b'd', 0, b"k", b""), 0);
    assert_eq!(talk.code(b'c', 0, b"k", b"\xffnew"), 0);
    assert_eq!(talk.get(b"k").as_deref(), Ok(&b"new"[..]));
    // A buffer too small: the length, nothing written.
    let reply = ask(&talk.socket, talk.to, &command(b'g', 2, b"k", b""));
    assert_eq!(reply, 3i32.to_le_bytes(), "length 3, no value");
    assert_eq!(talk.incr(b"n", 0), 1);
    assert_eq!(talk.incr(b"n", 0), 2);
    assert_eq!(
        talk.get(b"n"),
        Ok(2i64.to_le_bytes().to_vec()),
        "a counter reads as 8 bytes"
    );
    assert_eq!(talk.incr(b"k", 0), i64::MIN - i64::from(NOT_A_COUNTER));
}

#[test]
fn state_survives_a_module_reload_and_a_trap() {
    let (gateway, env) = serve(StateLimits::default());
    let talk = Talk::new(&gateway);
    assert_eq!(talk.code(b's', 0, b"before", b"reload"), 0);
    assert_eq!(talk.incr(b"count", 0), 1);
    // Set, then trap: the datagram is dropped and the instance replaced; the value stays.
    talk.socket
        .send_to(&command(b't', 0, b"trapped", b"yes"), talk.to)
        .unwrap();
    assert_silent(&talk.socket, Duration::from_millis(300));
    assert_eq!(gateway.stats().dropped(wasmgate::verdict::DropReason::Trap), 1);
    assert_eq!(talk.get(b"trapped").as_deref(), Ok(&b"yes"[..]));
    let new = env.load("commands v2", commands("v2").as_bytes()).unwrap();
    let sha = new.sha256_hex();
    gateway.publisher().publish(new);
    assert_eq!(gateway.program().sha256_hex(), sha);
    assert_eq!(talk.get(b"before").as_deref(), Ok(&b"reload"[..]));
    assert_eq!(talk.incr(b"count", 0), 2);
}

#[test]
fn entries_expire_after_their_ttl() {
    let (gateway, _) = serve(StateLimits::default());
    let talk = Talk::new(&gateway);
    assert_eq!(talk.code(b's', 300, b"short", b"lived"), 0);
    assert_eq!(talk.code(b'p', 300, b"1.2.3.4", b""), 0);
    assert_eq!(talk.incr(b"window", 300), 1);
    assert_eq!(talk.get(b"short").as_deref(), Ok(&b"lived"[..]));
    assert_eq!(talk.code(b'q', 0, b"1.2.3.4", b""), 1);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(talk.get(b"short"), Err(NOT_FOUND));
    assert_eq!(talk.code(b'q', 0, b"1.2.3.4", b""), 0);
    assert_eq!(talk.incr(b"window", 300), 1, "a new window");
}

#[test]
fn a_full_store_evicts_the_shortest_ttl_and_refuses_when_nothing_can_go() {
    let (gateway, _) = serve(StateLimits {
        max_entries: 8,
        max_bytes: 1 << 20,
    });
    let talk = Talk::new(&gateway);
    for i in 0..8 {
        let ttl = 60_000 + 1000 * i;
        assert_eq!(talk.code(b's', ttl, format!("k{i}").as_bytes(), b""), 0);
    }
    assert_eq!(talk.code(b's', 0, b"forever", b""), 0);
    assert_eq!(talk.get(b"k0"), Err(NOT_FOUND), "the shortest TTL went first");
    assert_eq!(talk.get(b"k7"), Ok(Vec::new()));
    let stats = gateway.stats().state;
    assert!(stats.evictions >= 1 && stats.entries <= 8, "{stats:?}");
    for i in 0..8 {
        talk.code(b's', 0, format!("no ttl {i}").as_bytes(), b"");
    }
    assert_eq!(talk.code(b's', 0, b"one too many", b""), FULL);
    assert_eq!(gateway.stats().state.entries, 8);
}

#[test]
fn keys_and_values_over_the_limits_are_refused_with_their_codes() {
    let (gateway, _) = serve(StateLimits::default());
    let talk = Talk::new(&gateway);
    let key = vec![b'k'; 255];
    assert_eq!(talk.code(b's', 0, &key, b"v"), 0, "255 bytes is a fine key");
    // Longer keys than a datagram's length byte allows: `S` sets `arg` bytes from
    // offset 0 as the value; the key limit is checked through `limit` below.
    assert_eq!(
        talk.code(b'S', 65_507, b"big", b""),
        0,
        "a datagram's worth is a fine value"
    );
    assert_eq!(talk.code(b'S', 65_508, b"big", b""), VALUE_TOO_LONG);
    assert_eq!(
        talk.code(b'n', 0, b"calls", b""),
        TOO_MANY_CALLS,
        "70 calls in one datagram"
    );
    assert!(gateway.stats().refused(wasmgate::verdict::CallError::TooMany) >= 6);
    // A key of 600 bytes, from the guest's own memory.
    let module = r#"(module
      (import "wasmgate" "state_set" (func $set (param i32 i32 i32 i32 i64) (result i32)))
      (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) i32.const 0)
      (func (export "handle") (param $p i32) (param $len i32) (result i64)
        (i32.store (i32.const 4096) (call $set (i32.const 0) (i32.const 600) (i32.const 0) (i32.const 1) (i64.const 0)))
        (i32.store (i32.const 4100) (call $limit (i32.const 0) (i32.const 513) (i32.const 1) (i32.const 1)))
        (i32.store (i32.const 4104) (call $limit (i32.const 0) (i32.const 512) (i32.const 1) (i32.const 1)))
        (i64.const 0x000010000000000c)))"#;
    assert_eq!(codes_of(module), [KEY_TOO_LONG, KEY_TOO_LONG, 1]);
}

#[test]
fn a_refused_key_still_counts_against_the_calls_allowance() {
    // 64 `state_get`s with a 600-byte key (each refused), then one `limit`:
    // the 65th call of the datagram, so `too_many_calls`.
    let module = r#"(module
      (import "wasmgate" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
      (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) i32.const 0)
      (func (export "handle") (param $p i32) (param $len i32) (result i64)
        (local $i i32)
        (loop $again
          (i32.store (i32.const 4096) (call $get (i32.const 0) (i32.const 600) (i32.const 8192) (i32.const 16)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $i) (i32.const 64))))
        (i32.store (i32.const 4100) (call $limit (i32.const 0) (i32.const 8) (i32.const 1) (i32.const 1)))
        (i64.const 0x0000100000000008)))"#;
    assert_eq!(codes_of(module), [KEY_TOO_LONG, TOO_MANY_CALLS]);
}

#[test]
fn a_region_outside_memory_traps_and_the_next_datagram_is_served() {
    let (gateway, _) = serve(StateLimits::default());
    let talk = Talk::new(&gateway);
    talk.socket.send_to(&command(b'o', 0, b"", b""), talk.to).unwrap();
    assert_silent(&talk.socket, Duration::from_millis(300));
    assert_eq!(gateway.stats().dropped(wasmgate::verdict::DropReason::Trap), 1);
    assert_eq!(talk.code(b'l', 0, b"after", b""), 1);
}

/// Serves `module` (which replies with the i32 codes its calls returned,
/// whatever the request's size) and asks it once: the codes.
fn codes_of(module: &str) -> Vec<i32> {
    let mut spec = config();
    spec.max_reply_ratio = 0.0;
    let gateway = start_with(module.as_bytes(), Limits::default(), spec);
    let reply = ask(&client(), gateway.local_addr(), b"x");
    reply
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn now_ms_runs_on_the_states_clock_between_datagrams() {
    let module = br#"(module
  (import "wasmgate" "now_ms" (func $now (result i64)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param i32 i32) (result i64)
    (i64.store (i32.const 2000) (call $now))
    (i64.const 0x000007D000000008)))"#;
    let gateway = start_with(module, Limits::default(), config());
    let c = client();
    let at = |reply: Vec<u8>| i64::from_le_bytes(reply.try_into().expect("8 bytes"));
    // Eight bytes asked, eight answered: within the reply ratio.
    let first = at(ask(&c, gateway.local_addr(), b"now, ms?"));
    std::thread::sleep(Duration::from_millis(200));
    let second = at(ask(&c, gateway.local_addr(), b"now, ms?"));
    // Coarse (a tick of 1 to 4 ms) and monotonic: at least the sleep, less a tick.
    assert!((195..10_000).contains(&(second - first)), "{first} then {second}");
    assert!(first >= 0);
}
