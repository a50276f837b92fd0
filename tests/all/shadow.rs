//! `--candidate`: a second module shadowing the active one on real UDP
//! traffic (clients and upstreams see only the active's behaviour, verdicts
//! compared and counted), canaried for a stable share of clients, promoted
//! after N clean datagrams or by SIGUSR1, rolled back when it traps or loops.

use crate::common;
use crate::common::fixtures::{start, with_candidate};

use std::path::Path;
use std::time::Duration;

use common::{Upstream, ask, client, client_on, wait_until};
use wasmgate::config::PoolSpec;
use wasmgate::gateway::Gateway;

const ECHO: &str = include_str!("../../examples/echo.wat");
const FORWARD: &str = include_str!("../../examples/forward.wat");

const TRAPS: &str = include_str!("../guests/traps.wat");
const LOOPS: &str = include_str!("../guests/loops.wat");

/// Shadow counts in the order of `ShadowResult::ALL`.
const MATCH: usize = 0;
const MISMATCH: usize = 1;
const TRAP: usize = 2;
const TIMEOUT: usize = 3;

/// `examples/forward.wat` serving, beside `candidate`, with the pool
/// `backend` on `upstream`.
fn forwarding(dir: &Path, candidate: &str, upstream: &Upstream) -> Gateway {
    let mut spec = with_candidate(dir, candidate, |_| {});
    spec.pools = vec![PoolSpec::new("backend", vec![upstream.addr.to_string()])];
    start(FORWARD.as_bytes(), spec)
}

/// Asks `q0`…`q9`; each must come back as the upstream's `up:` answer.
fn ask_ten_through_upstream(gateway: &Gateway) {
    let socket = client();
    for i in 0..10 {
        let m = format!("q{i}");
        assert_eq!(
            ask(&socket, gateway.local_addr(), m.as_bytes()),
            format!("up:{m}").as_bytes()
        );
    }
}

fn shadowed(gateway: &Gateway) -> u64 {
    gateway.stats().shadow.iter().sum()
}

#[test]
fn a_trapping_candidate_costs_clients_nothing_and_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(wasmgate::DEFAULT_GUEST_WASM, with_candidate(dir.path(), TRAPS, |_| {}));
    let socket = client();
    for i in 0..20 {
        let m = format!("ok {i}");
        assert_eq!(
            ask(&socket, gateway.local_addr(), m.as_bytes()),
            m.to_uppercase().as_bytes()
        );
    }
    wait_until("the rollback", || gateway.publisher().candidate().is_none());
    let stats = gateway.stats();
    assert!(stats.shadow[TRAP] >= 1, "{:?}", stats.shadow);
    assert_eq!(stats.dropped_total(), 0, "the clients lost nothing");
    assert_eq!(
        gateway.program().origin(),
        "test module",
        "the active module still serves"
    );
}

#[test]
fn a_looping_candidate_times_out_in_the_shadow_and_is_rolled_back() {
    // A candidate that spends its whole 500 ms budget on every datagram: were
    // the shadow run on the worker, each answer would wait for it.
    let dir = tempfile::tempdir().unwrap();
    let limits = wasmgate::config::Limits {
        timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let gateway = common::start_with(
        wasmgate::DEFAULT_GUEST_WASM,
        limits,
        with_candidate(dir.path(), LOOPS, |_| {}),
    );
    let socket = client();
    let started = std::time::Instant::now();
    // More than the shadow queue holds while the candidate is on its first.
    for _ in 0..1_100 {
        assert_eq!(ask(&socket, gateway.local_addr(), b"still here"), b"STILL HERE");
    }
    // Inline, 1,100 × 500 ms.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "answers waited for the candidate: {:?}",
        started.elapsed()
    );
    assert!(
        gateway.stats().shadow_skipped > 0,
        "the shadow fell behind and skipped samples"
    );
    // Its first datagram's 500 ms of CPU time, at the shadow's lower priority
    // on a busy machine: longer than `wait_until` waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gateway.publisher().candidate().is_some() {
        assert!(std::time::Instant::now() < deadline, "no rollback in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gateway.stats().shadow[TIMEOUT] >= 1, "{:?}", gateway.stats().shadow);
}

#[test]
fn a_candidate_is_held_to_the_listeners_memory_cap() {
    // The candidate grows its memory to 6.4 MiB on every datagram; the
    // listener allows 1 MiB. It traps in the shadow (the active answers) and,
    // trapping more often than the active, is rolled back.
    let grows = r#"(module
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64)
            (drop (memory.grow (i32.const 100)))
            (i64.const 1)))"#;
    let dir = tempfile::tempdir().unwrap();
    let limits = wasmgate::config::Limits {
        max_memory: 1 << 20,
        ..Default::default()
    };
    let gateway = common::start_with(
        wasmgate::DEFAULT_GUEST_WASM,
        limits,
        with_candidate(dir.path(), grows, |_| {}),
    );
    assert_eq!(ask(&client(), gateway.local_addr(), b"cap"), b"CAP");
    wait_until("the rollback", || gateway.publisher().candidate().is_none());
    assert_eq!(gateway.stats().shadow[TRAP], 1, "{:?}", gateway.stats().shadow);
}

#[test]
fn a_shadowed_candidate_has_a_state_of_its_own() {
    // Both count datagrams in the state (`state_incr("hits")`) and reply the
    // count. Were the state shared, the active's count would move twice a
    // datagram and the two would differ.
    let counter = r#"(module
        (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
        (memory (export "memory") 1)
        (data (i32.const 1000) "hits")
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64)
            (i64.store (i32.const 2000) (call $incr (i32.const 1000) (i32.const 4) (i64.const 1) (i64.const 0)))
            (i64.const 0x000007D000000008)))"#;
    let dir = tempfile::tempdir().unwrap();
    let v2 = format!("{counter}\n;; v2\n");
    let gateway = start(counter.as_bytes(), with_candidate(dir.path(), &v2, |_| {}));
    let socket = client();
    for n in 1..=5u64 {
        // Eight bytes asked, eight answered: within the reply ratio.
        let reply = ask(&socket, gateway.local_addr(), b"count me");
        assert_eq!(reply, n.to_le_bytes(), "the active's own count");
        wait_until("the shadow to run it", || shadowed(&gateway) == n);
    }
    assert_eq!(gateway.stats().shadow, [5, 0, 0, 0], "the candidate counted 1 to 5 too");
}

/// The niceness of this process's thread named `name`, from /proc.
fn nice_of_thread(name: &str) -> Option<i64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // After the command in parentheses: state is field 3, nice field 19.
            let rest = stat.rsplit_once(')')?.1;
            return rest.split_whitespace().nth(16)?.parse().ok();
        }
    }
    None
}

#[test]
fn the_shadow_thread_runs_below_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(
        wasmgate::DEFAULT_GUEST_WASM,
        with_candidate(dir.path(), ECHO, |c| c.shadow_sample = 1.0),
    );
    assert_eq!(ask(&client(), gateway.local_addr(), b"x"), b"X");
    let worker = nice_of_thread("wasmgate-worker").expect("a worker thread");
    wait_until("the shadow thread to lower itself", || {
        nice_of_thread("wasmgate-shadow") == Some(worker + i64::from(wasmgate::prove::SHADOW_NICE))
    });
}

#[test]
fn a_candidate_that_agrees_is_promoted_after_n_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    // The echo again, as different bytes: a new version that behaves the same.
    let v2 = format!("{ECHO}\n;; v2\n");
    let gateway = start(
        ECHO.as_bytes(),
        with_candidate(dir.path(), &v2, |c| {
            c.promote_after = Some(25);
            // One client here; the many-networks rule has tests of its own.
            c.promote_min_clients = 1;
            c.promote_min_time = std::time::Duration::ZERO;
        }),
    );
    let candidate = gateway.publisher().candidate().unwrap();
    assert_ne!(candidate.sha256(), gateway.program().sha256());
    let socket = client();
    for i in 0..24 {
        ask(&socket, gateway.local_addr(), format!("m{i}").as_bytes());
    }
    wait_until("24 shadowed", || shadowed(&gateway) == 24);
    assert!(gateway.publisher().candidate().is_some(), "not before 25");
    ask(&socket, gateway.local_addr(), b"the 25th");
    wait_until("the promotion", || gateway.program().sha256() == candidate.sha256());
    assert!(gateway.publisher().candidate().is_none());
    assert_eq!(gateway.stats().shadow[MATCH], 25);
    assert_eq!(gateway.stats().shadow, [25, 0, 0, 0]);
    assert_eq!(gateway.stats().reloads, 1, "a promotion counts as a reload");
}

#[test]
fn canaried_datagrams_are_compared_with_the_active_and_a_different_candidate_is_never_promoted() {
    // Before: a canaried datagram was judged clean if the candidate did not
    // fail, however it answered, and a candidate answering every one
    // differently was promoted.
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(
        wasmgate::DEFAULT_GUEST_WASM,
        with_candidate(dir.path(), ECHO, |c| {
            c.canary_percent = 100.0;
            c.shadow_sample = 0.0;
            c.promote_after = Some(5);
            c.promote_min_clients = 1;
            c.promote_min_time = std::time::Duration::ZERO;
        }),
    );
    let socket = client();
    for i in 0..20 {
        let m = format!("lower {i}");
        // Served by the candidate (the echo), for real.
        assert_eq!(ask(&socket, gateway.local_addr(), m.as_bytes()), m.as_bytes());
    }
    wait_until("20 compared", || shadowed(&gateway) == 20);
    assert_eq!(gateway.stats().shadow[MISMATCH], 20, "{:?}", gateway.stats().shadow);
    assert!(gateway.publisher().candidate().is_some(), "never promoted");
}

#[test]
fn a_canary_candidate_that_agrees_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = format!("{ECHO}\n;; v2\n");
    let gateway = start(
        ECHO.as_bytes(),
        with_candidate(dir.path(), &v2, |c| {
            c.canary_percent = 100.0;
            c.shadow_sample = 0.0;
            c.promote_after = Some(5);
            c.promote_min_clients = 1;
            c.promote_min_time = std::time::Duration::ZERO;
        }),
    );
    let candidate = gateway.publisher().candidate().unwrap();
    let socket = client();
    for i in 0..5 {
        ask(&socket, gateway.local_addr(), format!("m{i}").as_bytes());
    }
    wait_until("the promotion", || gateway.program().sha256() == candidate.sha256());
    assert_eq!(gateway.stats().shadow[MATCH], 5);
}

#[test]
fn a_forwarding_canary_serves_through_the_upstream_and_is_compared_by_its_forwards() {
    let up = Upstream::echo("up:");
    let dir = tempfile::tempdir().unwrap();
    let v2 = format!("{FORWARD}\n;; v2\n");
    let mut spec = with_candidate(dir.path(), &v2, |c| {
        c.canary_percent = 100.0;
        c.shadow_sample = 0.0;
        c.promote_after = Some(3);
        c.promote_min_clients = 1;
        c.promote_min_time = Duration::ZERO;
    });
    spec.pools = vec![PoolSpec::new("backend", vec![up.addr.to_string()])];
    let gateway = start(FORWARD.as_bytes(), spec);
    let candidate = gateway.publisher().candidate().unwrap();
    let socket = client();
    for i in 0..3 {
        let m = format!("c{i}");
        // Served by the candidate, through the upstream, for real.
        assert_eq!(
            ask(&socket, gateway.local_addr(), m.as_bytes()),
            format!("up:{m}").as_bytes()
        );
    }
    // The active's forwards (stubbed) are the same bytes: clean, and promoted.
    wait_until("the promotion", || gateway.program().sha256() == candidate.sha256());
    assert_eq!(gateway.stats().shadow[MATCH], 3);
    assert_eq!(up.count(), 3, "the active's forwards were never sent");
}

#[test]
fn a_candidate_that_mismatched_is_never_promoted_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(
        wasmgate::DEFAULT_GUEST_WASM,
        with_candidate(dir.path(), ECHO, |c| {
            c.promote_after = Some(5);
            c.promote_min_clients = 1;
            c.promote_min_time = std::time::Duration::ZERO;
        }),
    );
    let socket = client();
    ask(&socket, gateway.local_addr(), b"lower");
    for _ in 0..10 {
        ask(&socket, gateway.local_addr(), b"UPPER");
    }
    wait_until("11 shadowed", || shadowed(&gateway) == 11);
    assert_eq!(gateway.stats().shadow[MISMATCH], 1);
    assert!(gateway.publisher().candidate().is_some());
    assert_eq!(gateway.stats().reloads, 0);
}

#[test]
fn an_upstream_receives_only_the_active_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::echo("up:");
    // The candidate forwards every datagram twice.
    let once = "(drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))";
    assert!(FORWARD.contains(once));
    let twice = FORWARD.replace(once, &format!("{once} {once}"));
    let gateway = forwarding(dir.path(), &twice, &upstream);
    ask_ten_through_upstream(&gateway);
    // Each client datagram mismatches (two forwards against one); each answer,
    // passed on unchanged by both (no on_reply), matches.
    wait_until("20 shadowed", || shadowed(&gateway) == 20);
    assert_eq!(gateway.stats().shadow, [10, 10, 0, 0]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(upstream.count(), 10, "only the active's forwards were sent");
    assert_eq!(gateway.stats().sessions_created, 1, "the shadow opened no socket");
}

/// Asks from a new socket on `ip`. A port the kernel picks there may be one
/// that another gateway of this test process listens on (on 127.0.0.1), which
/// every gateway refuses as a source (a reflection loop); then it asks again
/// from another port, once that refusal is counted.
fn ask_from(gateway: &Gateway, ip: &str, payload: &[u8]) -> Vec<u8> {
    use wasmgate::verdict::DropReason;
    for _ in 0..5 {
        let socket = client_on(&format!("{ip}:0"));
        socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let denied = gateway.stats().dropped(DropReason::DeniedSource);
        socket.send_to(payload, gateway.local_addr()).unwrap();
        let mut buf = [0u8; 256];
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return buf[..n].to_vec();
        }
        assert!(
            gateway.stats().dropped(DropReason::DeniedSource) > denied,
            "no answer to {ip}, and not a denied source either"
        );
    }
    panic!("no answer to {ip} from five ports");
}

#[test]
fn the_candidates_on_reply_sees_the_active_upstream_answers_without_sending_anything() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::echo("up:");
    // The candidate forwards the same, and its on_reply capitalises each answer.
    let on_reply = r#"(func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (i32.store8 (local.get $ptr) (i32.const 85))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.extend_i32_u (local.get $len))))"#;
    let body = FORWARD.trim_end().strip_suffix(')').unwrap();
    let candidate = format!("{body}\n  {on_reply})\n");
    let gateway = forwarding(dir.path(), &candidate, &upstream);
    ask_ten_through_upstream(&gateway);
    // The same forwards (match); each answer through the candidate's on_reply
    // ("Up:…") against the active's straight pass ("up:…"): mismatch.
    wait_until("20 shadowed", || shadowed(&gateway) == 20);
    assert_eq!(gateway.stats().shadow, [10, 10, 0, 0]);
    assert_eq!(upstream.count(), 10);
}

#[test]
fn canary_clients_are_chosen_by_address_stably_and_near_the_percentage() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_candidate(dir.path(), ECHO, |c| {
        c.canary_percent = 30.0;
        c.shadow_sample = 0.0;
    });
    let gateway = start(wasmgate::DEFAULT_GUEST_WASM, spec);
    let mut canaries = 0;
    for i in 0..1_000u32 {
        // 1,000 clients on 1,000 loopback addresses, each asking twice from
        // two ports: the same side both times.
        let ip = format!("127.1.{}.{}", i / 250, 1 + i % 250);
        let answers: Vec<Vec<u8>> = (0..2).map(|_| ask_from(&gateway, &ip, b"abc")).collect();
        assert_eq!(answers[0], answers[1], "client {ip} flipped");
        match answers[0].as_slice() {
            b"abc" => canaries += 1,
            b"ABC" => {}
            other => panic!("{other:?}"),
        }
    }
    assert!((250..=350).contains(&canaries), "{canaries} of 1,000 at 30%");
    // Nothing else is shadowed; every canaried datagram is compared with the
    // active (or skipped when the shadow is behind), and each differed.
    wait_until("every canaried datagram compared", || {
        let s = gateway.stats();
        shadowed(&gateway) + s.shadow_skipped == 2 * canaries
    });
    assert_eq!(gateway.stats().shadow[MATCH], 0);
}

#[test]
fn a_canary_that_traps_is_rolled_back_and_its_clients_return_to_the_active() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_candidate(dir.path(), TRAPS, |c| {
        c.canary_percent = 100.0;
        c.shadow_sample = 0.0;
    });
    let gateway = start(wasmgate::DEFAULT_GUEST_WASM, spec);
    let socket = client();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    socket.send_to(b"first", gateway.local_addr()).unwrap();
    let mut buf = [0u8; 64];
    assert!(socket.recv_from(&mut buf).is_err(), "the canary trapped: no answer");
    wait_until("the rollback", || gateway.publisher().candidate().is_none());
    assert_eq!(ask(&client(), gateway.local_addr(), b"back"), b"BACK");
}
