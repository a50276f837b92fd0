//! Running it in production, with the built binary: listeners from a config file,
//! Prometheus metrics, JSON logs, graceful shutdown, and the `send` client.

use crate::common;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{ask, client, run_to_end, sample, scrape, wasmgate, write_file};

/// A running `wasmgate --config …`, its listeners by name, and its metrics address.
struct Service {
    child: Child,
    log: Receiver<String>,
    listeners: HashMap<String, SocketAddr>,
    metrics: Option<SocketAddr>,
    /// The log lines up to the last "serving" line.
    before: Vec<String>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of a text log line (` key=value`) or of a JSON one (`"key":"value"`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    if let Some(rest) = line.split(&format!(r#""{key}":""#)).nth(1) {
        return rest.split('"').next();
    }
    let rest = line.split(&format!(" {key}=")).nth(1)?;
    Some(rest.split_whitespace().next()?.trim_matches('"'))
}

impl Service {
    fn start(args: &[&str], listeners: usize) -> Self {
        let mut child = wasmgate(args).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Self {
            child,
            log,
            listeners: HashMap::new(),
            metrics: None,
            before: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while service.listeners.len() < listeners {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = service.log.recv_timeout(left).expect("wasmgate did not start serving");
            if let Some(url) = field(&line, "metrics") {
                let addr = url.trim_start_matches("http://").trim_end_matches("/metrics");
                service.metrics = Some(addr.parse().unwrap());
            }
            if let (Some(name), Some(addr)) = (field(&line, "listener"), field(&line, "listen")) {
                service.listeners.insert(name.to_string(), addr.parse().unwrap());
            }
            service.before.push(line);
        }
        service
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners[listener]
    }

    fn signal(&self, name: &str) {
        common::signal(self.child.id(), name);
    }

    /// Waits up to `limit` for exit; the exit code and every remaining log line.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.log.iter().collect());
            }
            assert!(Instant::now() < deadline, "wasmgate did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const ECHO: &[u8] = include_bytes!("../../examples/echo.wat");

fn two_listener_config(dir: &std::path::Path) -> String {
    write_file(dir, "echo.wat", ECHO);
    write_file(
        dir,
        "wasmgate.toml",
        br#"
        [metrics]
        listen = "127.0.0.1:0"

        [[listener]]
        name = "upper"
        listen = "127.0.0.1:0"
        workers = 2

        [[listener]]
        name = "echo"
        listen = "127.0.0.1:0"
        module = "echo.wat"
        workers = 1
        max_memory = "1MiB"
        "#,
    )
}

fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn config_errors_name_the_file_the_key_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "unknown.toml",
            "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nworkerz = 2\n",
            &["unknown.toml", "workerz"],
        ),
        (
            "address.toml",
            "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1\"\n",
            &["address.toml", "listener[0] (a): listen", "IP:PORT"],
        ),
        (
            "missing.toml",
            "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nmodule = \"gone.wasm\"\n",
            &["missing.toml", "module", "gone.wasm", "does not exist"],
        ),
        (
            "clash.toml",
            "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:7\"\n[[listener]]\nname = \"b\"\nlisten = \"0.0.0.0:7\"\n",
            &["clash.toml", "`a`", "`b`", "would share a port"],
        ),
    ];
    for (name, text, words) in cases {
        let path = write_file(dir.path(), name, text.as_bytes());
        let (code, _, stderr) = run_to_end(&["--config", &path]);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        for w in words {
            assert!(stderr.contains(w), "{name}: lacks {w:?}: {stderr}");
        }
    }
    // A bad module in one listener stops start-up, naming the listener and the file.
    let bad = write_file(dir.path(), "bad.wat", b"(module)");
    let path = write_file(
        dir.path(),
        "badmodule.toml",
        format!("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nmodule = \"{bad}\"\n").as_bytes(),
    );
    let (code, _, stderr) = run_to_end(&["--config", &path]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("listener `a`") && stderr.contains("bad.wat") && stderr.contains("missing export"));
}

#[test]
fn send_prints_each_reply_or_no_reply() {
    let gateway = common::start(wasmgate::DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr().to_string();
    let (code, stdout, _) = run_to_end(&["send", &addr, "chen", "", "hello world"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout, "CHEN\n\nHELLO WORLD\n");

    // Nobody listening: "no reply", exit 1.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quiet = nobody.local_addr().unwrap().to_string();
    let (code, stdout, _) = run_to_end(&["send", &quiet, "hello?", "--timeout-ms", "200"]);
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "no reply (after 200 ms)\n");
}

#[test]
fn send_without_messages_reads_lines_until_eof() {
    let gateway = common::start(wasmgate::DEFAULT_GUEST_WASM);
    let mut child = wasmgate(&["send", &gateway.local_addr().to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"chen\nhello\n\nworld\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "CHEN\nHELLO\n\nWORLD\n");
}

#[test]
fn two_listeners_from_a_config_file_with_metrics_reload_and_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = two_listener_config(dir.path());
    let mut service = Service::start(&["--config", &config], 2);
    let (upper, echo) = (service.addr("upper"), service.addr("echo"));
    let c = client();
    for _ in 0..3 {
        assert_eq!(ask(&c, upper, b"chen"), b"CHEN");
    }
    assert_eq!(ask(&c, echo, b"chen"), b"chen");

    // A reply is counted once `sendmmsg` returns, which can be just after the client
    // has it: wait for the counters to settle before checking them.
    let metrics = service.metrics.expect("a metrics line");
    let deadline = Instant::now() + Duration::from_secs(2);
    let body = loop {
        let body = scrape(metrics);
        if sample(&body, r#"wasmgate_datagrams_replied_total{listener="echo"}"#) == 1.0
            && sample(&body, r#"wasmgate_datagrams_replied_total{listener="upper"}"#) == 3.0
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        sample(&body, r#"wasmgate_datagrams_received_total{listener="upper"}"#),
        3.0
    );
    assert_eq!(
        sample(&body, r#"wasmgate_datagrams_replied_total{listener="upper"}"#),
        3.0
    );
    assert_eq!(sample(&body, r#"wasmgate_bytes_sent_total{listener="upper"}"#), 12.0);
    assert_eq!(
        sample(&body, r#"wasmgate_datagrams_received_total{listener="echo"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"wasmgate_datagrams_dropped_total{listener="echo",reason="timeout"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(&body, r#"wasmgate_guest_duration_seconds_count{listener="upper"}"#),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            r#"wasmgate_guest_duration_seconds_bucket{listener="upper",le="+Inf"}"#
        ),
        3.0
    );
    // Each answered datagram ran within its 10 ms budget (one over it is dropped as
    // a timeout), so all three are in the cumulative 50 ms bucket, and the sum is
    // that of three real calls in seconds.
    assert_eq!(
        sample(
            &body,
            r#"wasmgate_guest_duration_seconds_bucket{listener="upper",le="0.05"}"#
        ),
        3.0
    );
    let sum = sample(&body, r#"wasmgate_guest_duration_seconds_sum{listener="upper"}"#);
    assert!(sum > 0.0 && sum <= 3.0 * 0.011, "sum {sum}");
    let uppercase_sha: String = sha256_of(wasmgate::DEFAULT_GUEST_WASM);
    assert!(
        body.contains(&format!(r#"abi="abi-v1",sha256="{uppercase_sha}""#)),
        "no module info for the embedded guest:\n{body}"
    );

    // Edit the echo module: only the echo listener changes.
    let module = dir.path().join("echo.wat");
    let silent = String::from_utf8_lossy(ECHO)
        .replace("(i64.or", "(drop (i64.or")
        .replace(
            "(i64.extend_i32_u (local.get $len)))))",
            "(i64.extend_i32_u (local.get $len)))) (i64.const -1)))",
        );
    std::fs::write(&module, &silent).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = scrape(service.metrics.unwrap());
        if sample(&body, r#"wasmgate_reloads_total{listener="echo"}"#) == 1.0 {
            assert_eq!(sample(&body, r#"wasmgate_reloads_total{listener="upper"}"#), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "the echo module was not reloaded:\n{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send_to(b"anyone?", echo).unwrap();
    common::assert_silent(&c, Duration::from_millis(300));
    assert_eq!(ask(&c, upper, b"still"), b"STILL");

    service.signal("TERM");
    let (code, lines) = service.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{lines:?}");
    let stopped: Vec<&String> = lines.iter().filter(|l| l.contains("stopped")).collect();
    assert_eq!(stopped.len(), 2, "one final line per listener: {lines:?}");
}

#[test]
fn sigterm_during_traffic_answers_what_was_read_and_exits_zero() {
    let mut service = Service::start(&["--listen", "127.0.0.1:0", "--workers", "2"], 1);
    let addr = service.addr("default");
    // Clients keep requests in flight until the gateway goes away, and count
    // every reply they get.
    let senders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let c = client();
                c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut buf = [0u8; 64];
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut answered = 0u64;
                while Instant::now() < deadline {
                    for _ in 0..8 {
                        c.send_to(b"in flight", addr).unwrap();
                    }
                    for _ in 0..8 {
                        match c.recv(&mut buf) {
                            Ok(_) => answered += 1,
                            Err(_) => return answered,
                        }
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    service.signal("TERM");
    let (code, lines) = service.wait_exit(Duration::from_secs(3));
    let took = stopping.elapsed();
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    let answered: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(answered > 0);
    let stopped = lines.iter().find(|l| l.contains("stopped")).expect("final counters");
    let stat = |key: &str| -> u64 {
        let rest = stopped
            .split(&format!("={key}="))
            .nth(1)
            .or_else(|| stopped.split(&format!(" {key}=")).nth(1));
        rest.and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap()
    };
    // `received` is counted where recvmmsg returns, before the guest runs: every
    // datagram read was answered, and every answer reached its client.
    let (received, replied) = (stat("received"), stat("replied"));
    assert_eq!(received, replied, "a datagram that was read went unanswered: {stopped}");
    assert_eq!(answered, replied, "the clients got {answered} replies: {stopped}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    // A guest whose log text holds a newline: it too must stay inside one object.
    let dir = tempfile::tempdir().unwrap();
    let module = common::write_file(
        dir.path(),
        "logger.wat",
        br#"(module
            (import "wasmgate" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "two\nlines")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $log (i32.const 2) (i32.const 0) (i32.const 9))
                i64.const -1))"#,
    );
    let mut service = Service::start(
        &["--listen", "127.0.0.1:0", "--log-format", "json", "--module", &module],
        1,
    );
    client().send_to(b"x", service.addr("default")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    service.signal("TERM");
    let (code, mut lines) = service.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0));
    lines.extend(service.before.iter().cloned());
    assert!(lines.len() >= 4, "{lines:?}");
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains(r#""timestamp":"#),
            "not one JSON object: {line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#""message":"serving""#) && l.contains(r#""listener":"default""#))
    );
    // The guest's newline is JSON-escaped inside its one line.
    assert!(
        lines.iter().any(|l| l.contains(r#""message":"two\nlines""#)),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains(r#""message":"stopped""#)), "{lines:?}");
}
