//! Shared pools (`sessions = "shared"`) over real UDP: every client's datagrams
//! go to an endpoint on a few sockets, and `on_reply` names each answer's
//! client by the handle it kept (tests/guests/shared.wat, keyed on a
//! datagram's first byte). Upstreams here are real UDP servers, some hostile:
//! they answer IDs nobody asked, answer twice, answer for another endpoint's
//! client, or answer after the client's handle has expired.

use crate::common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Upstream, assert_silent, client, recv, wait_until};
use wasmgate::config::{Limits, ListenerSpec, PoolSpec, SharedSpec};
use wasmgate::gateway::Gateway;
use wasmgate::upstream::pool::Policy;
use wasmgate::verdict::DropReason;

const SHARED: &str = include_str!("../guests/shared.wat");

fn shared_pool(endpoints: &[SocketAddr]) -> PoolSpec {
    PoolSpec {
        shared: Some(SharedSpec {
            sockets: 2,
            ..SharedSpec::default()
        }),
        ..PoolSpec::new("backend", endpoints.iter().map(SocketAddr::to_string).collect())
    }
}

fn gateway(pool: PoolSpec, workers: usize) -> Gateway {
    common::start_with(
        SHARED.as_bytes(),
        Limits::default(),
        ListenerSpec {
            pools: vec![pool],
            workers,
            ..common::config()
        },
    )
}

/// A real UDP upstream that answers each datagram as `script` says, after
/// `delay`; it records what it received. Stops when dropped.
struct Scripted {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<common::Received>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scripted {
    fn new(delay: Duration, script: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    g.lock().unwrap().push((buf[..n].to_vec(), from));
                    std::thread::sleep(delay);
                    for answer in script(&buf[..n]) {
                        let _ = socket.send_to(&answer, from);
                    }
                }
            }
        });
        Self {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<common::Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn many_clients_share_a_few_sockets_and_each_gets_its_own_answers() {
    let upstream = Upstream::echo("");
    let gw = gateway(shared_pool(&[upstream.addr]), 2);
    // 200 clients at once, each with its own ID (the guest keys on one byte,
    // and "?" is not an ID).
    let id = |i: usize| if i == usize::from(b'?') { 250 } else { i as u8 };
    let clients: Vec<UdpSocket> = (0..200).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(&[id(i), b'q', i as u8], gw.local_addr()).unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(recv(c, gw.local_addr()), [id(i), b'q', i as u8], "client {i}");
    }
    // 2 workers × 2 sockets at most carried them.
    let ports: HashSet<SocketAddr> = upstream.received().into_iter().map(|(_, from)| from).collect();
    assert!(ports.len() <= 4, "{} sockets for 200 clients", ports.len());
    // A reply is counted once its send returns, which may be after it arrived.
    wait_until("every reply to be counted", || gw.stats().replied == 200);
    let s = gw.stats();
    assert_eq!(s.sessions_active, 0, "no session per client");
    assert_eq!(s.handles_active, 200);
}

#[test]
fn unknown_duplicated_and_forged_answers_reach_no_one_and_are_counted() {
    // Each query is answered with an ID nobody asked for, then the answer, then the answer again.
    let upstream = Scripted::new(Duration::ZERO, |q| {
        vec![vec![q[0].wrapping_add(100)], q.to_vec(), q.to_vec()]
    });
    let gw = gateway(shared_pool(&[upstream.addr]), 1);
    let c = client();
    for id in 1..=3u8 {
        c.send_to(&[id, b'q'], gw.local_addr()).unwrap();
        assert_eq!(recv(&c, gw.local_addr()), [id, b'q']);
    }
    assert_silent(&c, Duration::from_millis(200));
    // Anyone else sending to the shared socket's port is not its endpoint:
    // the connected socket never takes it in.
    let socket_port = upstream.received()[0].1;
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    forger.send_to(&[1, b'q'], socket_port).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    wait_until("the drops to be counted", || {
        gw.stats().upstream_dropped(DropReason::Unclaimed) == 6
    });
    assert_eq!(gw.stats().upstream_received, 9, "the forger's datagram never arrived");
}

#[test]
fn an_endpoint_answering_for_another_endpoints_client_is_refused() {
    // One worker, round robin: the first client's query goes to `quiet`, the
    // second's to `liar`, which answers with the first client's ID.
    let quiet = Upstream::silent();
    let liar = Scripted::new(Duration::ZERO, |_| vec![vec![7, b'q']]);
    let gw = gateway(
        PoolSpec {
            policy: Policy::RoundRobin,
            ..shared_pool(&[quiet.addr, liar.addr])
        },
        1,
    );
    let (first, second) = (client(), client());
    first.send_to(&[7, b'q'], gw.local_addr()).unwrap();
    wait_until("the first query to reach its endpoint", || quiet.count() == 1);
    second.send_to(&[8, b'q'], gw.local_addr()).unwrap();
    assert_silent(&first, Duration::from_millis(300));
    assert_eq!(liar.received().len(), 1);
    wait_until("the refusal to be counted", || {
        gw.stats().upstream_dropped(DropReason::WrongEndpoint) == 1
    });
}

#[test]
fn an_answer_after_the_clients_handle_expired_reaches_no_one() {
    let late = Scripted::new(Duration::from_millis(1500), |q| vec![q.to_vec()]);
    let gw = gateway(
        PoolSpec {
            unanswered_timeout: Duration::from_millis(200),
            ..shared_pool(&[late.addr])
        },
        1,
    );
    let c = client();
    c.send_to(&[5, b'q'], gw.local_addr()).unwrap();
    assert_silent(&c, Duration::from_millis(2500));
    wait_until("the stale handle to be counted", || {
        gw.stats().upstream_dropped(DropReason::StaleHandle) == 1
    });
    assert_eq!(gw.stats().handles_active, 0);
}

/// tests/guests/shared.wat as a component of the `shared-proxy` world:
/// `handle` keeps `client`'s handle under the datagram's first byte and
/// forwards; `on-reply` names the client kept under the answer's first byte
/// with `reply-to` (once) and passes the answer on.
const SHARED_COMPONENT: &str = r#"(component
  (import "wasmgate:handler/types@0.1.0" (instance $types
    (type $ce (enum "unknown-pool" "no-healthy-endpoint" "session-overflow" "oversize" "no-client"
      "upstream-error" "amplification" "too-many-calls"))
    (export "call-error" (type (eq $ce)))))
  (alias export $types "call-error" (type $call-error))
  (import "forward" (func $forward (param "pool" string) (param "datagram" (list u8))
    (result (result (error $call-error)))))
  (import "wasmgate:handler/clients@0.1.0" (instance $clients
    (export "client" (func (result (option u64))))
    (export "reply-to" (func (param "handle" u64) (result bool)))))
  (alias export $clients "client" (func $client))
  (alias export $clients "reply-to" (func $reply-to))
  (core module $mem
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (if (i32.gt_u (global.get $heap) (i32.const 16384)) (then (global.set $heap (i32.const 1024))))
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (global.get $heap) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p)))
  (core instance $mi (instantiate $mem))
  (core func $client-lowered (canon lower (func $client) (memory (core memory $mi "memory"))))
  (core func $reply-to-lowered (canon lower (func $reply-to)))
  (core func $forward-lowered (canon lower (func $forward) (memory (core memory $mi "memory")) (realloc (core func $mi "realloc"))))
  (core module $m
    (import "host" "memory" (memory 1))
    (import "host" "client" (func $client (param i32)))
    (import "host" "reply-to" (func $reply_to (param i64) (result i32)))
    (import "host" "forward" (func $forward (param i32 i32 i32 i32 i32)))
    (data (i32.const 0) "backend")
    (func $slot (param $d i32) (result i32)
      (i32.add (i32.const 17000) (i32.shl (i32.load8_u (local.get $d)) (i32.const 3))))
    (func (export "handle") (param $d i32) (param $n i32) (param $p i32) (param $pn i32) (result i32)
      (i32.store8 (i32.const 16) (i32.const 0))
      (if (i32.eqz (local.get $n)) (then (return (i32.const 16))))
      (call $client (i32.const 40))
      (if (i32.eqz (i32.load8_u (i32.const 40))) (then (return (i32.const 16))))
      (i64.store (call $slot (local.get $d)) (i64.load (i32.const 48)))
      (call $forward (i32.const 0) (i32.const 7) (local.get $d) (local.get $n) (i32.const 64))
      (i32.const 16))
    (func (export "on-reply") (param $d i32) (param $n i32) (param $p i32) (param $pn i32)
        (param $u i32) (param $un i32) (result i32)
      (local $h i64)
      (i32.store8 (i32.const 16) (i32.const 0))
      (if (i32.eqz (local.get $n)) (then (return (i32.const 16))))
      (local.set $h (i64.load (call $slot (local.get $d))))
      (if (i64.eqz (local.get $h)) (then (return (i32.const 16))))
      (i64.store (call $slot (local.get $d)) (i64.const 0))
      (if (i32.eqz (call $reply_to (local.get $h))) (then (return (i32.const 16))))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (local.get $d))
      (i32.store (i32.const 24) (local.get $n))
      (i32.const 16)))
  (core instance $i (instantiate $m (with "host" (instance
    (export "memory" (memory $mi "memory"))
    (export "client" (func $client-lowered))
    (export "reply-to" (func $reply-to-lowered))
    (export "forward" (func $forward-lowered))))))
  (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
    (canon lift (core func $i "handle") (memory (core memory $mi "memory")) (realloc (core func $mi "realloc"))))
  (func (export "on-reply") (param "datagram" (list u8)) (param "peer" string) (param "upstream" string)
      (result (option (list u8)))
    (canon lift (core func $i "on-reply") (memory (core memory $mi "memory")) (realloc (core func $mi "realloc")))))"#;

#[test]
fn a_component_names_each_answers_client_through_the_clients_interface() {
    let upstream = Scripted::new(Duration::ZERO, |q| {
        vec![vec![q[0].wrapping_add(100)], q.to_vec(), q.to_vec()]
    });
    let gw = common::start_with(
        SHARED_COMPONENT.as_bytes(),
        Limits::default(),
        ListenerSpec {
            pools: vec![shared_pool(&[upstream.addr])],
            workers: 1,
            ..common::config()
        },
    );
    let clients: Vec<UdpSocket> = (0..5).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.send_to(&[i as u8 + 1, b'q'], gw.local_addr()).unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(recv(c, gw.local_addr()), [i as u8 + 1, b'q']);
        assert_silent(c, Duration::from_millis(50));
    }
    wait_until("the unknown IDs and duplicates to be counted", || {
        gw.stats().upstream_dropped(DropReason::Unclaimed) == 10
    });
}
