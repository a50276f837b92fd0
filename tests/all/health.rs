//! Active health checks over real UDP: a pool's endpoints probed by the
//! listener's prober, a silent one taken out and its clients moved, brought
//! back when it answers again; refusals and wrong answers fail probes.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{self, ask, client, closed_port, wait_until};
use wasmgate::config::{HealthSpec, Limits, ListenerSpec, PoolSpec};
use wasmgate::gateway::Gateway;

const FORWARD: &str = include_str!("../../examples/forward.wat");

/// An upstream that answers `TAG` and what it got while `answering`, and
/// nothing otherwise (a host gone quiet: no ICMP, no answer).
struct Quiet {
    addr: SocketAddr,
    answering: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Quiet {
    fn start(tag: &'static str) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let answering = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (on, done) = (Arc::clone(&answering), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf)
                    && on.load(Ordering::Relaxed)
                {
                    let _ = socket.send_to(&[tag.as_bytes(), &buf[..n]].concat(), from);
                }
            }
        });
        Self { addr, answering, stop }
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Probes `ping` every 200 ms, 100 ms to answer, out after 2 failed and back
/// after 2 passed; any answer passes.
fn health() -> HealthSpec {
    HealthSpec {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(100),
        healthy_after: 2,
        unhealthy_after: 2,
        send: b"ping".to_vec(),
        expect: Vec::new(),
        guest: false,
        slow_start: Duration::ZERO,
    }
}

/// `examples/forward.wat` forwarding to `endpoints`, checked with `health`.
fn checked(endpoints: &[SocketAddr], health: HealthSpec) -> Gateway {
    serving(FORWARD, endpoints, health)
}

/// `module` serving with the pool `backend` of `endpoints`, checked with `health`.
fn serving(module: &str, endpoints: &[SocketAddr], health: HealthSpec) -> Gateway {
    let mut pool = PoolSpec::new("backend", endpoints.iter().map(SocketAddr::to_string).collect());
    pool.health = Some(health);
    common::start_with(
        module.as_bytes(),
        Limits::default(),
        ListenerSpec {
            pools: vec![pool],
            ..common::config()
        },
    )
}

fn healthy(gateway: &Gateway, addr: SocketAddr) -> bool {
    let pools = gateway.publisher().pools().unwrap();
    pools
        .endpoints(Instant::now())
        .iter()
        .find(|e| e.addr == addr)
        .is_some_and(|e| e.healthy)
}

fn totals(gateway: &Gateway, addr: SocketAddr) -> wasmgate::upstream::EndpointTotals {
    let pools = gateway.publisher().pools().unwrap();
    pools
        .endpoints(Instant::now())
        .into_iter()
        .find(|e| e.addr == addr)
        .unwrap()
        .totals
}

/// Which upstream answered each of `clients` (by its tag, the reply's first byte).
fn tags(gateway: &Gateway, clients: &[UdpSocket]) -> Vec<u8> {
    clients
        .iter()
        .map(|c| ask(c, gateway.local_addr(), b"hello")[0])
        .collect()
}

#[test]
fn a_silent_endpoint_is_taken_out_its_clients_move_and_it_comes_back_when_it_answers() {
    let (a, b) = (Quiet::start("A:"), Quiet::start("B:"));
    let gateway = checked(&[a.addr, b.addr], health());
    let clients: Vec<UdpSocket> = (0..24).map(|_| client()).collect();
    let before = tags(&gateway, &clients);
    assert!(
        before.contains(&b'A') && before.contains(&b'B'),
        "the hash spreads clients: {before:?}"
    );

    a.answering.store(false, Ordering::Relaxed);
    let quiet_at = Instant::now();
    wait_until("the silent endpoint taken out", || !healthy(&gateway, a.addr));
    // The bound is interval × unhealthy_after + timeout (here 0.5 s, plus a
    // tenth of jitter); it is asserted exactly on a fake clock in
    // upstream::health's tests. This only shows it was the probes, in time.
    eprintln!("taken out {:?} after it went quiet", quiet_at.elapsed());
    assert!(healthy(&gateway, b.addr));
    let t = totals(&gateway, a.addr);
    assert_eq!(t.probe_ejections, 1);
    assert!(t.probes_timeout >= 2, "{t:?}");

    // Every client now gets B, those that had A included.
    let after = tags(&gateway, &clients);
    assert!(after.iter().all(|t| *t == b'B'), "{after:?}");

    a.answering.store(true, Ordering::Relaxed);
    let back_at = Instant::now();
    wait_until("the endpoint back", || healthy(&gateway, a.addr));
    eprintln!("back {:?} after it answered again", back_at.elapsed());
    // New clients go to it again.
    let fresh: Vec<UdpSocket> = (0..24).map(|_| client()).collect();
    assert!(tags(&gateway, &fresh).contains(&b'A'));
}

#[test]
fn a_closed_port_and_a_wrong_answer_fail_their_probes_and_the_last_healthy_endpoint_stays() {
    let good = Quiet::start("");
    let closed = closed_port();
    let wrong = Quiet::start("no:");
    let expecting = HealthSpec {
        expect: b"ping".to_vec(),
        ..health()
    };
    let gateway = checked(&[good.addr, closed, wrong.addr], expecting);
    wait_until("both bad endpoints taken out", || {
        !healthy(&gateway, closed) && !healthy(&gateway, wrong.addr)
    });
    assert!(totals(&gateway, closed).probes_refused >= 2);
    assert!(totals(&gateway, wrong.addr).probes_mismatch >= 2);
    assert!(healthy(&gateway, good.addr));
    // The last healthy one goes quiet: it is kept, and that is counted.
    good.answering.store(false, Ordering::Relaxed);
    wait_until("panic mode counted", || totals(&gateway, good.addr).probe_spared == 1);
    assert!(healthy(&gateway, good.addr), "never the last healthy endpoint");
}

/// Forwards everything to `backend`, and writes its own probes: `probe` sends
/// `ping ` and the endpoint it probes (from `upstream`); `probe_reply` judges
/// an answer healthy when it starts with `o`. With `TRAP` in the probe, it traps.
const PROBING: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "upstream" (func $upstream (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (data (i32.const 16) "ping ")
  (func (export "alloc") (param i32) (result i32) i32.const 1024)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $p) (local.get $len)))
    i64.const -1)
  (func (export "probe") (param $p i32) (param $len i32) (result i64)
    (local $n i32)
    ;; TRAP
    (local.set $n (call $upstream (i32.const 21) (i32.const 200)))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.extend_i32_u (i32.add (i32.const 5) (local.get $n)))))
  (func (export "probe_reply") (param $p i32) (param $len i32) (result i64)
    (if (result i64)
      (i32.and (i32.gt_u (local.get $len) (i32.const 0)) (i32.eq (i32.load8_u (local.get $p)) (i32.const 111)))
      (then (i64.const 0))
      (else (i64.const -1)))))"#;

fn guest_checked(module: &str, endpoints: &[SocketAddr]) -> Gateway {
    // `expect` as in health(): what would pass were the guest not asked is any answer.
    serving(
        module,
        endpoints,
        HealthSpec {
            guest: true,
            ..health()
        },
    )
}

/// PROBING's probes as a component of the `probes` world (and `handle`
/// echoing): `probe` sends `ping ` and the endpoint, `probe-reply` judges an
/// answer healthy when it starts with `o`. With `TRAP`, `probe` traps.
const PROBING_COMPONENT: &str = concat!(
    r#"(component
  (core module $m"#,
    crate::bump_allocator!(),
    r#"
    (data (i32.const 200) "ping ")
    (func (export "handle") (param $d i32) (param $n i32) (param $p i32) (param $pn i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (local.get $d))
      (i32.store (i32.const 24) (local.get $n))
      (i32.const 16))
    (func (export "probe") (param $e i32) (param $n i32) (result i32)
      ;; TRAP
      (memory.copy (i32.const 205) (local.get $e) (local.get $n))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (i32.const 200))
      (i32.store (i32.const 24) (i32.add (i32.const 5) (local.get $n)))
      (i32.const 16))
    (func (export "probe-reply") (param $e i32) (param $en i32) (param $a i32) (param $an i32) (result i32)
      (if (result i32) (i32.eqz (local.get $an))
        (then (i32.const 0))
        (else (i32.eq (i32.load8_u (local.get $a)) (i32.const 111))))))
  (core instance $i (instantiate $m))
  (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
    (canon lift (core func $i "handle") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "probe") (param "endpoint" string) (result (option (list u8)))
    (canon lift (core func $i "probe") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "probe-reply") (param "endpoint" string) (param "answer" (list u8)) (result bool)
    (canon lift (core func $i "probe-reply") (memory (core memory $i "memory")) (realloc (core func $i "realloc")))))"#
);

#[test]
fn a_guest_writes_the_probe_for_each_endpoint_and_judges_the_answer() {
    writes_and_judges(PROBING);
}

#[test]
fn a_component_writes_its_probes_through_the_probes_world() {
    writes_and_judges(PROBING_COMPONENT);
}

/// `module` writes `ping ` and the endpoint as its probe, and judges answers
/// that start with `o` healthy.
fn writes_and_judges(module: &str) {
    // A plain socket as one endpoint, to read the probe the guest wrote.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(common::REPLY_TIMEOUT)).unwrap();
    let seen = socket.local_addr().unwrap();
    let (ok, no) = (Quiet::start("ok:"), Quiet::start("no:"));
    let gateway = guest_checked(module, &[seen, ok.addr, no.addr]);
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf).expect("a probe");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("ping backend/{seen}"));
    socket.send_to(b"ok", from).unwrap();
    // Answers starting `no:` are judged unhealthy by the guest, though any
    // answer would pass `expect`.
    wait_until("the endpoint the guest judged unhealthy taken out", || {
        !healthy(&gateway, no.addr)
    });
    assert!(healthy(&gateway, ok.addr));
    assert!(totals(&gateway, no.addr).probes_mismatch >= 2);
    // The plain socket answers no more probes, so it goes too; clients are
    // then served (forwarded, or echoed by the component) as before.
    wait_until("the silent socket taken out", || !healthy(&gateway, seen));
    let c = client();
    assert!(ask(&c, gateway.local_addr(), b"hi").ends_with(b"hi"));
}

#[test]
fn a_guest_probe_that_traps_fails_never_passes() {
    probe_traps(PROBING);
}

#[test]
fn a_component_probe_that_traps_fails_never_passes() {
    probe_traps(PROBING_COMPONENT);
}

fn probe_traps(module: &str) {
    let trapping = module.replace(";; TRAP", "unreachable");
    let (a, b) = (Quiet::start("ok:"), Quiet::start("ok:"));
    let gateway = guest_checked(&trapping, &[a.addr, b.addr]);
    wait_until("one endpoint out, the other kept in panic mode", || {
        let (ta, tb) = (totals(&gateway, a.addr), totals(&gateway, b.addr));
        ta.probe_ejections + tb.probe_ejections == 1 && ta.probe_spared + tb.probe_spared == 1
    });
    // Each failed for want of a probe: none reached the endpoints.
    assert!(totals(&gateway, a.addr).probes_mismatch + totals(&gateway, b.addr).probes_mismatch >= 4);
    assert_eq!(
        totals(&gateway, a.addr).probes_timeout + totals(&gateway, b.addr).probes_timeout,
        0
    );
}

#[test]
fn without_probe_exports_send_and_expect_serve() {
    let (a, b) = (Quiet::start("ok:"), Quiet::start("no:"));
    let gateway = guest_checked(FORWARD, &[a.addr, b.addr]);
    wait_until("probes passed", || totals(&gateway, b.addr).probes >= 3);
    assert!(
        healthy(&gateway, a.addr) && healthy(&gateway, b.addr),
        "any answer passes expect"
    );
}
