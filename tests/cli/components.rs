//! Components as handlers (the `wasmgate:handler` worlds of wit/handler.wit):
//! the Python, JavaScript and Rust examples through a real gateway, hostile
//! Python, WASI 0.2 as deny-all, `wasmgate check` on components that do not fit,
//! and the compilation cache.

use crate::common;
use crate::common::fixtures::ECHO_COMPONENT;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{REPLY_TIMEOUT, Served, Upstream, ask, assert_silent, client, run_to_end, sample, scrape, wasmgate};

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
    // What the handler counted (docs/ABI.md, "Metrics").
    let body = scrape(gw.metrics_addr());
    let documents = |result: &str| {
        sample(
            &body,
            &format!(r#"wasmgate_guest_json_documents_total{{listener="default",role="active",result="{result}"}}"#),
        )
    };
    assert_eq!((documents("canonical"), documents("invalid")), (22.0, 1.0));
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
    // What the handler counted (docs/ABI.md, "Metrics").
    let body = scrape(gw.metrics_addr());
    let redactions = |kind: &str| {
        sample(
            &body,
            &format!(r#"wasmgate_guest_redactions_total{{listener="default",role="active",kind="{kind}"}}"#),
        )
    };
    assert_eq!((redactions("email"), redactions("number")), (2.0, 1.0));
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
