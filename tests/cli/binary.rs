//! The built `wasmgate` binary, run as a user would: serve, answer, log, stop.

use crate::common;

use std::time::Duration;

use common::{ABORT_IMPORT, Served, ask, client, write_file};

#[test]
fn binary_serves_the_embedded_guest_and_stops_cleanly_on_sigterm() {
    let mut served = Served::start(&["--listen", "127.0.0.1:0", "--workers", "2"]);
    let c = client();
    assert_eq!(ask(&c, served.addr, b"chen"), b"CHEN");
    assert_eq!(ask(&c, served.addr, b""), b"");
    // The README promises a stop in about 100 ms (one receive poll interval); a
    // second leaves room for a loaded machine.
    let status = common::signal_and_wait(&mut served.child, "TERM", Duration::from_secs(1));
    assert_eq!(status.code(), Some(0));
    // The process has exited, so its stderr ends and the reader's channel closes.
    let rest: Vec<String> = served.log.iter().collect();
    let stopped = rest.iter().find(|l| l.contains("stopped")).expect("a final stats line");
    assert!(stopped.contains("received=2 replied=2"), "{stopped}");
}

#[test]
fn binary_serves_a_wat_module_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "reverse.wat",
        br#"(module
            (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            ;; Replies with the datagram reversed, written after it.
            (func (export "handle") (param $p i32) (param $n i32) (result i64)
                (local $i i32)
                (block $done (loop $next
                    (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
                    (i32.store8 (i32.add (i32.const 32768) (local.get $i))
                        (i32.load8_u (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1))))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br $next)))
                (i64.or (i64.const 0x0000800000000000) (i64.extend_i32_u (local.get $n)))))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    assert_eq!(ask(&client(), served.addr, b"wasmgate"), b"etagmsaw");
}

#[test]
fn a_flood_of_bad_datagrams_does_not_become_a_flood_of_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "trap.wat",
        br#"(module (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) unreachable))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path, "--workers", "1"]);
    let c = client();
    for _ in 0..2000 {
        c.send_to(b"boom", served.addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    // One more in a later second: its line says how many were held back before it.
    c.send_to(b"boom", served.addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = served.log.try_iter().collect();
    let warnings = lines.iter().filter(|l| l.contains("dropped a datagram")).count();
    assert!(warnings >= 1, "the trap was never reported: {lines:?}");
    // Five a second are let through; the run lasts about two seconds.
    assert!(warnings <= 15, "{warnings} warning lines for 2000 bad datagrams");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("wasm `unreachable` instruction executed")),
        "the warning does not say what the guest did: {lines:?}"
    );
    // The lines let through say how many were held back since the previous one.
    let held_back: u64 = lines
        .iter()
        .filter_map(|l| {
            l.split("suppressed=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        held_back >= 1900,
        "only {held_back} of ~2000 reported as suppressed: {lines:?}"
    );
}

#[test]
fn sigint_stops_cleanly_like_sigterm() {
    let mut served = Served::start(&["--listen", "127.0.0.1:0", "--workers", "1"]);
    assert_eq!(ask(&client(), served.addr, b"ctrl-c"), b"CTRL-C");
    let status = common::signal_and_wait(&mut served.child, "INT", Duration::from_secs(1));
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = served.log.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped") && l.contains("received=1 replied=1")),
        "{rest:?}"
    );
}

#[test]
fn guest_log_lines_reach_the_gateway_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "logger.wat",
        br#"(module
            (import "wasmgate" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "hello from the guest")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $log (i32.const 2) (i32.const 0) (i32.const 20))
                i64.const -1))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    client().send_to(b"x", served.addr).unwrap();
    let line = served
        .line_with(&["hello from the guest"])
        .expect("the guest's log line");
    assert!(line.contains("INFO") && line.contains("peer=127.0.0.1:"), "{line}");
}

#[test]
fn assemblyscript_abort_messages_reach_the_gateway_log() {
    let dir = tempfile::tempdir().unwrap();
    let module = format!(
        r#"(module {ABORT_IMPORT}
            (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $abort (i32.const 100) (i32.const 200) (i32.const 3) (i32.const 7))
                i64.const -1))"#
    );
    let path = write_file(dir.path(), "aborts.wat", module.as_bytes());
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    client().send_to(b"x", served.addr).unwrap();
    // One line: the drop warning, with the trap's message and its reason.
    served
        .line_with(&["WARN", "env.abort: boom! at a.ts:3:7", "reason=trap"])
        .expect("the abort message in the drop warning");
}

/// Spins the number of turns given by the datagram's first four bytes (little
/// endian), then replies "ok".
const SPINS: &str = r#"(module
    (memory (export "memory") 1)
    (func (export "alloc") (param i32) (result i32) i32.const 1024)
    (func (export "handle") (param $p i32) (param $n i32) (result i64)
        (local $i i32)
        (local.set $i (i32.load (local.get $p)))
        (block $done (loop $spin
            (br_if $done (i32.eqz (local.get $i)))
            (local.set $i (i32.sub (local.get $i) (i32.const 1)))
            (br $spin)))
        (i32.store16 (i32.const 0) (i32.const 0x6b6f))
        (i64.const 2)))"#;

/// Sends `turns` and waits up to `wait` for "ok"; the round trip, or `None`.
fn spin(c: &std::net::UdpSocket, to: std::net::SocketAddr, turns: u32, wait: Duration) -> Option<Duration> {
    c.set_read_timeout(Some(wait)).unwrap();
    let started = std::time::Instant::now();
    c.send_to(&turns.to_le_bytes(), to).unwrap();
    let mut buf = [0u8; 16];
    let got = c.recv_from(&mut buf).ok().filter(|(n, _)| &buf[..*n] == b"ok");
    got.map(|_| started.elapsed())
}

#[test]
fn the_time_budget_is_cpu_time_so_a_preempted_guest_is_not_timed_out() {
    // Before: the budget was wall time, so a worker preempted mid-call was
    // charged for the preemption and good datagrams were dropped as `timeout`
    // on any busy host.
    let cpu = common::last_cpu();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "spin.wat", SPINS.as_bytes());
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--module",
        &path,
        "--workers",
        "1",
        "--timeout-ms",
        "20",
        "--wall-timeout-ms",
        "60000",
        "--no-cache",
    ];
    // The gateway at the lowest priority, on the CPU the busy loop will take.
    let served = Served::start_command(common::pinned(common::wasmgate(&args), cpu, 19));
    let c = client();
    // Calibrated on the quiet CPU: turns worth about 4 ms of the guest's time.
    let probe = 1_000_000;
    let quiet = (0..3)
        .map(|_| spin(&c, served.addr, probe, Duration::from_secs(5)).expect("a quiet reply"))
        .min()
        .unwrap();
    // At least the probe itself (about 1 ms here, and far within the budget on
    // any machine): a calibration slowed by other tests must not make the
    // work too small for the busy loop to show.
    let turns = (f64::from(probe) * 4e-3 / quiet.as_secs_f64()).clamp(f64::from(probe), 2e8) as u32;
    assert!(spin(&c, served.addr, turns, Duration::from_secs(5)).is_some());
    let busy = common::BusyLoop::on(cpu);
    let mut times = Vec::new();
    for i in 0..12 {
        let t = spin(&c, served.addr, turns, Duration::from_secs(20));
        times.push(t.unwrap_or_else(|| panic!("datagram {i} was dropped under load ({times:?})")));
    }
    drop(busy);
    times.sort();
    // The test means something only if the calls took longer than the budget
    // in wall time: the worker was preempted.
    assert!(
        times[times.len() / 2] > Duration::from_millis(20),
        "the busy loop did not slow the guest down: {times:?}"
    );
    // An endless loop is still cut off, and the next datagram answered.
    assert_eq!(spin(&c, served.addr, u32::MAX, Duration::from_millis(1500)), None);
    // Its 20 ms of CPU time may take seconds at niceness 19 beside other tests.
    assert!(spin(&c, served.addr, 1, Duration::from_secs(30)).is_some());
    drop(served);
    wall_ceiling(cpu, &path);
}

/// The wall ceiling still bounds a call whose worker hardly runs. (Run after
/// the CPU-time test, not beside it: both need the CPU to themselves.)
fn wall_ceiling(cpu: usize, path: &str) {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--module",
        path,
        "--workers",
        "1",
        "--timeout-ms",
        "50",
        "--wall-timeout-ms",
        "60",
        "--no-cache",
    ];
    let served = Served::start_command(common::pinned(common::wasmgate(&args), cpu, 19));
    let c = client();
    let busy = common::BusyLoop::on(cpu);
    // At the share a niceness of 19 leaves beside a busy loop (about 1.5%),
    // 60 ms of wall time hold about 1 ms of CPU time: the wall ceiling ends it.
    assert_eq!(spin(&c, served.addr, 200_000_000, Duration::from_secs(10)), None);
    let line = served.line_with(&["dropped a datagram"]).expect("a drop line");
    assert!(line.contains("reason=timeout"), "{line}");
    drop(busy);
    assert!(spin(&c, served.addr, 1, Duration::from_secs(30)).is_some());
}
