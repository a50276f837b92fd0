//! Components as handlers (the `wasmgate:handler` worlds of wit/handler.wit):
//! the Python, JavaScript and Rust examples through a real gateway, hostile
//! Python, WASI 0.2 as deny-all, `wasmgate check` on components that do not fit,
//! and the compilation cache.

use crate::common;
use crate::common::fixtures::ECHO_COMPONENT;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ask, client};
use wasmgate::config::{Isolation, Limits};
use wasmgate::guest::{Env, Guest};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path).display().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The Rust probe, run in-process without sockets: it reports what WASI let it do.
fn rust_probe() -> Guest {
    let limits = Limits {
        timeout: Duration::from_millis(1000),
        ..Limits::default()
    };
    let env = Env::new(limits).unwrap();
    let bytes = std::fs::read(repo("tests/guests/rust-probe/probe.wasm")).unwrap();
    let program = Arc::new(env.load("rust-probe", &bytes).unwrap());
    Guest::new(env, program, Isolation::Reuse, 0.0)
}

#[test]
fn wasi_0_2_is_deny_all_network_files_environment_and_waiting() {
    let mut guest = rust_probe();
    let peer: SocketAddr = "127.0.0.1:4242".parse().unwrap();
    let mut ask = |what: &str| match guest.handle(what.as_bytes(), peer) {
        Ok(reply) => text(reply),
        Err(rejection) => format!("dropped: {rejection}"),
    };
    assert_eq!(ask("udp"), "denied: PermissionDenied");
    assert_eq!(ask("tcp"), "denied: PermissionDenied");
    assert!(ask("dns").starts_with("denied:"));
    assert_eq!(ask("file"), "denied: NotFound");
    assert_eq!(ask("dir"), "denied: NotFound");
    assert_eq!(ask("env"), "[]");
    assert_eq!(ask("args"), "[]");
    assert_eq!(ask("stdin"), r#"allowed: """#);
    assert_eq!(ask("clock"), "allowed: ()");
    let started = Instant::now();
    let slept = ask("sleep");
    assert!(slept.contains("may not wait"), "{slept}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "sleep blocked for {:?}",
        started.elapsed()
    );
    // Printing past the per-datagram cap is not an error.
    assert_eq!(ask("print"), "printed");
    assert_eq!(ask("anything"), "ok 127.0.0.1:4242");
}

#[test]
fn a_wat_component_is_served_reused_or_fresh_and_a_trap_or_timeout_costs_one_datagram() {
    for isolation in [Isolation::Reuse, Isolation::Fresh] {
        let limits = Limits::default();
        let env = match isolation {
            Isolation::Reuse => Env::new(limits).unwrap(),
            Isolation::Fresh => Env::with_instance_pool(limits, 3).unwrap(),
        };
        let program = env.load("echo component", ECHO_COMPONENT.as_bytes()).unwrap();
        let config = wasmgate::config::ListenerSpec {
            isolation,
            ..common::config()
        };
        let gw = wasmgate::gateway::Gateway::start(&env, program, &config).unwrap();
        let addr = gw.local_addr();
        let c = client();
        assert_eq!(ask(&c, addr, b"hello"), b"hello");
        for bad in [&b"loop"[..], b"trap"] {
            c.send_to(bad, addr).unwrap();
            assert_eq!(ask(&c, addr, b"after"), b"after", "{isolation}");
        }
        // Reused, the instance keeps its count; fresh, every datagram starts at 1.
        let counts: Vec<Vec<u8>> = (0..3).map(|_| ask(&c, addr, b"c")).collect();
        let expected: [&[u8]; 3] = match isolation {
            Isolation::Reuse => [b"1", b"2", b"3"],
            Isolation::Fresh => [b"1", b"1", b"1"],
        };
        assert_eq!(counts, expected, "{isolation}");
        let stats = gw.stats();
        assert_eq!(stats.dropped(wasmgate::verdict::DropReason::Timeout), 1, "{isolation}");
        assert_eq!(stats.dropped(wasmgate::verdict::DropReason::Trap), 1, "{isolation}");
    }
}

#[test]
fn a_components_memories_count_together_against_max_memory() {
    // Two memories of 40 pages (2.5 MiB) each; "g" grows the first by 1 MiB.
    // Before, the cap applied to each memory: 16 memories could each reach it.
    let hog = ECHO_COMPONENT
        .replace(r#"(memory (export "memory") 1)"#, r#"(memory (export "memory") 40)"#)
        .replace(
            "(if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x74)) (then unreachable))",
            "(if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x74)) (then unreachable))
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x67)) (then (drop (memory.grow (i32.const 16)))))",
        )
        .replace(
            "(core instance $i (instantiate $m))",
            "(core instance $i (instantiate $m))
  (core module $other (memory (export \"m\") 40))
  (core instance $o (instantiate $other))",
        );
    let limits = |mib: usize| Limits {
        max_memory: mib << 20,
        ..Limits::default()
    };
    // 5 MiB in all does not fit 4 MiB, though each memory alone would.
    let err = Env::new(limits(4)).unwrap().load("hog", hog.as_bytes()).unwrap_err();
    assert!(format!("{err:#}").contains("memory cap"), "{err:#}");
    // At 8 MiB it loads, and grows three times (to 8 MiB in all), not five.
    let env = Env::new(limits(8)).unwrap();
    let program = Arc::new(env.load("hog", hog.as_bytes()).unwrap());
    let mut guest = Guest::new(env, program, Isolation::Reuse, 0.0);
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for _ in 0..3 {
        assert_eq!(guest.handle(b"g", peer).unwrap(), b"g");
    }
    let rejection = guest.handle(b"g", peer).unwrap_err();
    assert_eq!(rejection.reason, wasmgate::verdict::DropReason::Trap, "{rejection}");
    // A fresh instance serves the next datagram.
    assert_eq!(guest.handle(b"ok", peer).unwrap(), b"ok");
}

/// Sets `from-abi-v1` to `hello` in the shared state, and replies `set`.
const SETS_A_VALUE: &str = r#"(module
  (import "wasmgate" "state_set" (func $set (param i32 i32 i32 i32 i64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1000) "from-abi-v1hello")
  (data (i32.const 2000) "set")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param i32 i32) (result i64)
    (drop (call $set (i32.const 1000) (i32.const 11) (i32.const 1011) (i32.const 5) (i64.const 0)))
    (i64.const 0x000007D000000003)))"#;

#[test]
fn a_component_shares_the_listeners_state_with_the_module_it_replaced() {
    let limits = Limits {
        timeout: Duration::from_millis(1000),
        ..Limits::default()
    };
    let env = Env::new(limits).unwrap();
    let program = env.load("abi v1", SETS_A_VALUE.as_bytes()).unwrap();
    let gateway = wasmgate::gateway::Gateway::start(&env, program, &common::config()).unwrap();
    let to = gateway.local_addr();
    let c = client();
    assert_eq!(text(&ask(&c, to, b"set it")), "set");
    let component = std::fs::read(repo("tests/guests/rust-state/state.wasm")).unwrap();
    let program = env.load("tests/guests/rust-state/state.wasm", &component).unwrap();
    assert!(
        program
            .imports()
            .iter()
            .any(|i| i.starts_with("wasmgate:handler/state")),
        "{:?}",
        program.imports()
    );
    gateway.publisher().publish(program);
    // Padded: the replies may be longer than the commands (the reply ratio).
    let say = |line: &str| text(&ask(&c, to, format!("{line:40}").as_bytes()));
    assert_eq!(say("get from-abi-v1"), "hello", "what the ABI v1 module set");
    assert_eq!(say("get nothing"), "None");
    assert_eq!(say("set k v 0"), "()");
    assert_eq!(say("cas k - w"), "false");
    assert_eq!(say("cas k v w"), "true");
    assert_eq!(say("get k"), "w");
    assert_eq!(say("incr n 5"), "5");
    assert_eq!(say("incr k"), "error not-a-counter");
    assert_eq!(say("del k"), "true");
    assert_eq!(say("penalize ip 60000"), "()");
    assert_eq!(say("penalized ip"), "true");
    let long = format!("get {}", "k".repeat(600));
    assert_eq!(say(&long), "error key-too-long");
    // One bucket of 5 for clients on both workers.
    let allowed = (0..12)
        .filter(|_| text(&ask(&client(), to, b"limit bucket 0 5")) == "true")
        .count();
    assert_eq!(allowed, 5);
}
