//! Components as handlers (the `wasmgate:handler` worlds of wit/handler.wit):
//! the Python, JavaScript and Rust examples through a real gateway, hostile
//! Python, WASI 0.2 as deny-all, `wasmgate check` on components that do not fit,
//! and the compilation cache.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{REPLY_TIMEOUT, Served, Upstream, ask, assert_silent, client, run_to_end, sample, scrape, wasmgate};
use wasmgate::config::{Isolation, Limits};
use wasmgate::guest::{Env, Guest};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path).display().to_string()
}

/// One compilation cache for every test here: the Python and JavaScript
/// components take seconds to compile in a debug build, and once is enough.
fn cache_dir() -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("component-cache")
        .display()
        .to_string()
}

/// The shared cache's key, beside it (never under the user's home).
fn cache_key() -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("component-cache.key")
        .display()
        .to_string()
}

/// Compiles `module` into the shared cache, one at a time, so that tests
/// starting together do not all compile the same large component at once.
fn warm(module: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = wasmgate(&[
        "check",
        module,
        "--cache-dir",
        &cache_dir(),
        "--cache-key",
        &cache_key(),
        "--timeout-ms",
        "5000",
        "--max-memory",
        "256MiB",
    ])
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "wasmgate check {module} failed");
            return;
        }
        assert!(Instant::now() < deadline, "compiling {module} took over 180 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Serves `module` from the shared cache with room for a debug build: the
/// budget per datagram is 1 s (an unoptimised host is slow to instantiate).
fn serve(module: &str, extra: &[&str]) -> Served {
    warm(module);
    let (cache, key) = (cache_dir(), cache_key());
    let mut args = vec![
        "--module",
        module,
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        &cache,
        "--cache-key",
        &key,
        "--timeout-ms",
        "1000",
        "--max-memory",
        "256MiB",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    // Guests' debug lines too: some tests read what a handler logged.
    Served::start_logging(&args, "info,wasmgate::guest=debug")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn python_example_answers_canonical_json_through_the_gateway() {
    let gw = serve(&repo("examples/python/python.wasm"), &[]);
    let c = client();
    assert_eq!(
        text(&ask(
            &c,
            gw.addr,
            br#"{"b": 1, "a": [1,  2], "n": null, "s": "caf\u00e9"}"#
        )),
        r#"{"a":[1,2],"b":1,"n":null,"s":"café"}"#
    );
    assert_eq!(text(&ask(&c, gw.addr, b"[3, 2,1]")), "[3,2,1]");
    assert_eq!(text(&ask(&c, gw.addr, b"not json")), "invalid JSON");
    // Message boundaries hold: each datagram gets its own answer.
    for i in 0..20 {
        let doc = format!(r#"{{"i": {i}, "a": 0}}"#);
        assert_eq!(text(&ask(&c, gw.addr, doc.as_bytes())), format!(r#"{{"a":0,"i":{i}}}"#));
    }
    // An empty datagram is legal, and gets no answer from this handler.
    c.send_to(b"", gw.addr).unwrap();
    assert_silent(&c, Duration::from_millis(300));
    common::wait_until("23 replies counted", || {
        sample(
            &scrape(gw.metrics_addr()),
            r#"wasmgate_datagrams_replied_total{listener="default"}"#,
        ) == 23.0
    });
}

#[test]
fn javascript_example_redacts_through_the_gateway() {
    let gw = serve(&repo("examples/js/redact.wasm"), &[]);
    let c = client();
    assert_eq!(
        text(&ask(
            &c,
            gw.addr,
            b"user bob@example.com paid with 4111 1111 1111 1111 at 12:00"
        )),
        "user <email> paid with <number> at 12:00"
    );
    assert_eq!(text(&ask(&c, gw.addr, b"nothing to hide 1234")), "nothing to hide 1234");
    assert_eq!(text(&ask(&c, gw.addr, "é: a.b@c.io".as_bytes())), "é: <email>");
    // Not UTF-8: the handler answers nothing.
    c.send_to(&[0xff, 0xfe, 0x00], gw.addr).unwrap();
    assert_silent(&c, Duration::from_millis(300));
}

#[test]
fn a_component_candidate_shadows_a_wasi_command_and_only_the_active_answers() {
    // Active: sort(1) as a WASI command; candidate: the JavaScript redactor.
    // One line without an address: both give it back (match); two lines: only
    // sort reorders them (mismatch).
    let redact = repo("examples/js/redact.wasm");
    warm(&redact);
    let gw = serve(&repo("examples/wasi-c/sort.wasm"), &["--candidate", &redact]);
    let c = client();
    assert_eq!(ask(&c, gw.addr, b"pear"), b"pear");
    assert_eq!(ask(&c, gw.addr, b"b\na"), b"a\nb");
    let metrics = gw.metrics_addr();
    let count = |result: &str| {
        let body = scrape(metrics);
        sample(
            &body,
            &format!(r#"wasmgate_shadow_total{{listener="default",result="{result}"}}"#),
        )
    };
    common::wait_until("both judged", || count("match") + count("mismatch") == 2.0);
    assert_eq!((count("match"), count("mismatch")), (1.0, 1.0));
    let body = scrape(metrics);
    assert!(
        body.contains(r#"role="candidate",module=""#) && body.contains(r#"abi="component""#),
        "{body}"
    );
}

#[test]
fn rust_component_routes_by_key_through_a_pool_and_answers_through_on_reply() {
    let (a, b) = (Upstream::echo("a:"), Upstream::echo("b:"));
    let pool = format!("shards={},{}", a.addr, b.addr);
    let gw = serve(&repo("examples/rust-component/router.wasm"), &["--upstream", &pool]);
    // Every datagram for one key reaches one backend, whichever client sends it.
    let mut owner = std::collections::HashMap::new();
    for round in 0..3 {
        let c = client();
        // Twelve keys: all twelve on one of two backends by chance is 1 in 2,048.
        for key in [
            "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
        ] {
            let reply = text(&ask(&c, gw.addr, format!("{key} hello {round}").as_bytes()));
            let (tag, rest) = reply.split_once(':').unwrap();
            assert_eq!(rest, format!("{key} hello {round}"));
            let first = owner.entry(key).or_insert_with(|| tag.to_string());
            assert_eq!(first, tag, "key {key} moved between backends");
        }
    }
    assert!(owner.values().any(|t| t == "a") && owner.values().any(|t| t == "b"));
    // The answers came through on-reply, which logs each one (its reply is its
    // input, so only the log tells it ran): the endpoint, the client, the size.
    let line = gw
        .line_with(&["answered", "shards/127.0.0.1:"])
        .expect("on-reply's log line");
    assert!(line.contains("with ") && line.contains(" bytes"), "{line}");
    // No key: the component answers at once, without forwarding.
    let c = client();
    assert_eq!(text(&ask(&c, gw.addr, b" leading space")), "ERR no key");
    let body = scrape(gw.metrics_addr());
    assert_eq!(
        sample(&body, r#"wasmgate_datagrams_forwarded_total{listener="default"}"#),
        36.0
    );
}

#[test]
fn hostile_python_costs_one_datagram_each_and_the_next_is_answered() {
    let gw = serve(
        &repo("tests/guests/python-probe/probe.wasm"),
        &["--max-reply-ratio", "0"],
    );
    let c = client();
    let ok = |c: &std::net::UdpSocket| {
        let reply = text(&ask(c, gw.addr, b"hello"));
        assert_eq!(reply, format!("ok {}", c.local_addr().unwrap()));
    };
    ok(&c);
    for (attack, reason) in [
        ("loop", "timeout"),
        ("alloc", "trap"),
        ("raise", "trap"),
        ("sleep", "trap"),
    ] {
        let started = Instant::now();
        c.send_to(attack.as_bytes(), gw.addr).unwrap();
        // The next datagram is answered, by a fresh instance.
        ok(&c);
        assert!(started.elapsed() < REPLY_TIMEOUT, "{attack} held the worker");
        let line = gw
            .line_with(&["dropped a datagram", &format!("reason={reason}")])
            .unwrap_or_else(|| panic!("no drop line for {attack}"));
        match attack {
            "alloc" => assert!(line.contains("memory cap"), "{line}"),
            "sleep" => assert!(line.contains("may not wait"), "{line}"),
            _ => {}
        }
    }
    // Counted just after the reply is sent.
    common::wait_until("five replies counted", || {
        sample(
            &scrape(gw.metrics_addr()),
            r#"wasmgate_datagrams_replied_total{listener="default"}"#,
        ) == 5.0
    });
    let body = scrape(gw.metrics_addr());
    let dropped = |reason: &str| {
        sample(
            &body,
            &format!(r#"wasmgate_datagrams_dropped_total{{listener="default",reason="{reason}"}}"#),
        )
    };
    assert_eq!(dropped("timeout"), 1.0);
    assert_eq!(dropped("trap"), 3.0);
}

#[test]
fn python_sees_no_environment_or_files_and_its_prints_reach_the_log() {
    let gw = serve(
        &repo("tests/guests/python-probe/probe.wasm"),
        &["--max-reply-ratio", "0"],
    );
    let c = client();
    assert_eq!(text(&ask(&c, gw.addr, b"env")), "{}");
    assert_eq!(text(&ask(&c, gw.addr, b"file")), "denied: FileNotFoundError");
    assert_eq!(text(&ask(&c, gw.addr, b"dir")), "denied: FileNotFoundError");
    assert_eq!(text(&ask(&c, gw.addr, b"random")), "16");
    assert_eq!(text(&ask(&c, gw.addr, b"forward")), "refused: UNKNOWN_POOL");
    assert_eq!(text(&ask(&c, gw.addr, b"print")), "printed");
    assert!(gw.line_with(&["stdout: hello from python on stdout"]).is_some());
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

/// A component in WAT: `handle` echoes the datagram, but loops forever on one
/// that starts with `l` and traps on one that starts with `t`. Its allocator
/// bumps through the first page and starts over.
const ECHO_COMPONENT: &str = r#"(component
  (core module $m
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    (global $count (mut i32) (i32.const 0))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (if (i32.gt_u (global.get $heap) (i32.const 32768)) (then (global.set $heap (i32.const 1024))))
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (global.get $heap) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p))
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
    (canon lift (core func $i "handle") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))"#;

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

/// A component that calls the world's `log` and `send`: every datagram is
/// logged, then sent back once with `send` and once as the reply. "big…" sends
/// 70,000 bytes and "amp…" 1,000 bytes instead; each answers with the result's
/// discriminant and error case as two digits (`13` oversize, `16`
/// amplification).
const SENDING_COMPONENT: &str = r#"(component
  (import "wasmgate:handler/types@0.1.0" (instance $types
    (type $e (enum "unknown-pool" "no-healthy-endpoint" "session-overflow" "oversize"
                   "no-client" "upstream-error" "amplification" "too-many-calls"))
    (export "call-error" (type (eq $e)))))
  (alias export $types "call-error" (type $call-error))
  (import "log" (func $log (param "level" u8) (param "message" string)))
  (import "send" (func $send (param "datagram" (list u8)) (result (result (error $call-error)))))
  (core module $memory (memory (export "memory") 2))
  (core instance $mem (instantiate $memory))
  (core func $log_lowered (canon lower (func $log) (memory (core memory $mem "memory"))))
  (core func $send_lowered (canon lower (func $send) (memory (core memory $mem "memory"))))
  (core module $m
    (import "env" "memory" (memory 2))
    (import "host" "log" (func $log (param i32 i32 i32)))
    (import "host" "send" (func $send (param i32 i32 i32)))
    (global $heap (mut i32) (i32.const 80000))
    (data (i32.const 200) "component says hi")
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (if (i32.gt_u (global.get $heap) (i32.const 120000)) (then (global.set $heap (i32.const 80000))))
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (global.get $heap) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p))
    ;; Answers with the result of the send just made (at 64) as two digits.
    (func $answer (result i32)
      (i32.store8 (i32.const 300) (i32.add (i32.const 48) (i32.load8_u (i32.const 64))))
      (i32.store8 (i32.const 301) (i32.add (i32.const 48) (i32.load8_u (i32.const 65))))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (i32.const 300))
      (i32.store (i32.const 24) (i32.const 2))
      (i32.const 16))
    (func (export "handle") (param $d i32) (param $n i32) (param $p i32) (param $pn i32) (result i32)
      (call $log (i32.const 2) (i32.const 200) (i32.const 17))
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x62))
        (then
          (call $send (i32.const 1024) (i32.const 70000) (i32.const 64))
          (return (call $answer))))
      (if (i32.eq (i32.load8_u (local.get $d)) (i32.const 0x61))
        (then
          (call $send (i32.const 1024) (i32.const 1000) (i32.const 64))
          (return (call $answer))))
      (call $send (local.get $d) (local.get $n) (i32.const 64))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (local.get $d))
      (i32.store (i32.const 24) (local.get $n))
      (i32.const 16)))
  (core instance $i (instantiate $m
    (with "env" (instance $mem))
    (with "host" (instance (export "log" (func $log_lowered)) (export "send" (func $send_lowered))))))
  (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
    (canon lift (core func $i "handle") (memory (core memory $mem "memory")) (realloc (core func $i "realloc")))))"#;

#[test]
fn a_components_log_and_send_reach_the_log_and_the_client_and_are_held_to_size_and_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_file(dir.path(), "sending.wat", SENDING_COMPONENT.as_bytes());
    let gw = serve(&path, &["--max-reply-ratio", "3"]);
    let c = client();
    // `send` goes out first, then the reply: two datagrams, in order.
    c.send_to(b"hello", gw.addr).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }
    assert!(gw.line_with(&["component says hi"]).is_some());
    // 70,000 bytes is over any datagram: refused as oversize, the handler goes on.
    assert_eq!(text(&ask(&c, gw.addr, b"big")), "13");
    // 1,000 bytes for a 3-byte request is past 3x: refused as amplification.
    assert_eq!(text(&ask(&c, gw.addr, b"amp")), "16");
    assert_silent(&c, Duration::from_millis(200));
    let body = scrape(gw.metrics_addr());
    let refused = |reason: &str| {
        sample(
            &body,
            &format!(r#"wasmgate_guest_calls_refused_total{{listener="default",reason="{reason}"}}"#),
        )
    };
    assert_eq!(refused("oversize"), 1.0);
    assert_eq!(refused("amplification"), 1.0);
}

/// `wasmgate check` on `wat`, written to a file; its exit code and stderr.
fn check(wat: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_file(dir.path(), "c.wat", wat.as_bytes());
    run_to_end(&["check", &path, "--no-cache"])
}

#[test]
fn check_says_exactly_what_is_wrong_with_a_component() {
    let (code, out, _) = check(ECHO_COMPONENT);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("fits the wasmgate:handler world"), "{out}");
    assert!(
        out.contains("export handle: func(datagram: list<u8>, peer: string) -> option<list<u8>>"),
        "{out}"
    );

    let (code, _, err) = check("(component)");
    assert_eq!(code, Some(1));
    assert!(err.contains("it exports no `handle` function"), "{err}");

    let wrong = r#"(component
      (core module $m (func (export "h") (param i32) (result i32) (i32.const 0)))
      (core instance $i (instantiate $m))
      (func (export "handle") (param "datagram" u32) (result u32) (canon lift (core func $i "h"))))"#;
    let (code, _, err) = check(wrong);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("its export `handle` is `func(datagram: u32) -> u32`; the world wants `func(datagram: list<u8>, peer: string) -> option<list<u8>>`"),
        "{err}"
    );

    let http = ECHO_COMPONENT.replacen(
        "(component",
        r#"(component (import "wasi:http/types@0.2.0" (instance))"#,
        1,
    );
    let (code, _, err) = check(&http);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("it imports `wasi:http/types@0.2.0`, which the gateway does not provide"),
        "{err}"
    );
    assert!(err.contains("componentize-js: `-d http -d fetch-event`"), "{err}");

    let unknown = ECHO_COMPONENT.replacen("(component", r#"(component (import "frobnicate" (func))"#, 1);
    let (code, _, err) = check(&unknown);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("it imports the function `frobnicate`, which the gateway does not provide"),
        "{err}"
    );

    let bad_log = ECHO_COMPONENT.replacen(
        "(component",
        r#"(component (import "log" (func (param "level" u32)))"#,
        1,
    );
    let (code, _, err) = check(&bad_log);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot be linked as the wasmgate:handler world"), "{err}");
    assert!(err.contains("log"), "{err}");
}

#[test]
fn a_component_is_swapped_in_by_a_reload_while_serving_and_the_log_says_how_long_it_took() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("handler.wasm");
    std::fs::copy(repo("guest/uppercase.wasm"), &module).unwrap();
    let module_arg = module.display().to_string();
    let gw = Served::start(&[
        "--module",
        &module_arg,
        "--listen",
        "127.0.0.1:0",
        "--no-cache",
        "--timeout-ms",
        "1000",
        "--max-reply-ratio",
        "0",
    ]);
    let c = client();
    assert_eq!(ask(&c, gw.addr, b"hello"), b"HELLO");
    // Renamed over, as a deploy does: the component replaces the ABI v1 module.
    let staged = dir.path().join("handler.wasm.new");
    std::fs::copy(repo("tests/guests/rust-probe/probe.wasm"), &staged).unwrap();
    std::fs::rename(&staged, &module).unwrap();
    let line = gw
        .line_with(&["reloaded", "abi=\"component\""])
        .expect("a reloaded line for the component");
    assert!(line.contains("compile_ms="), "{line}");
    let me = c.local_addr().unwrap();
    assert_eq!(text(&ask(&c, gw.addr, b"hello")), format!("ok {me}"));
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
