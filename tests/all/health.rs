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
    }
}

/// `examples/forward.wat` forwarding to `endpoints`, checked with `health`.
fn checked(endpoints: &[SocketAddr], health: HealthSpec) -> Gateway {
    let mut pool = PoolSpec::new("backend", endpoints.iter().map(SocketAddr::to_string).collect());
    pool.health = Some(health);
    common::start_with(
        FORWARD.as_bytes(),
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
