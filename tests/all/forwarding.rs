//! Forwarding through real gateways to real upstream servers on loopback:
//! policies, sessions, `forward_key`, `on_reply`, `send`, health, limits.

use crate::common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{REPLY_TIMEOUT, Upstream, ask, assert_silent, client, closed_port, recv, wait_until};
use wasmgate::config::Limits;
use wasmgate::config::ListenerSpec;
use wasmgate::config::PoolSpec;
use wasmgate::gateway::Gateway;
use wasmgate::upstream::pool::Policy;
use wasmgate::verdict::CallError;
use wasmgate::verdict::DropReason;

const FORWARD: &str = include_str!("../../examples/forward.wat");
const TOKEN_ROUTER: &str = include_str!("../../examples/token-router.wat");

fn pool(name: &str, upstreams: &[&Upstream]) -> PoolSpec {
    pool_of(name, &upstreams.iter().map(|u| u.addr).collect::<Vec<_>>())
}

fn pool_of(name: &str, addrs: &[SocketAddr]) -> PoolSpec {
    PoolSpec::new(name, addrs.iter().map(SocketAddr::to_string).collect())
}

fn forwarding(module: &str, pools: Vec<PoolSpec>) -> Gateway {
    forwarding_with(
        module,
        pools,
        ListenerSpec {
            workers: 1,
            ..ListenerSpec::default()
        },
    )
}

/// A gateway with one worker, so that it sees every session.
fn one_worker(module: &str, pool: PoolSpec) -> Gateway {
    forwarding_with(
        module,
        vec![pool],
        ListenerSpec {
            workers: 1,
            ..ListenerSpec::default()
        },
    )
}

fn forwarding_with(module: &str, pools: Vec<PoolSpec>, config: ListenerSpec) -> Gateway {
    common::start_with(
        module.as_bytes(),
        Limits::default(),
        ListenerSpec {
            pools,
            ..ListenerSpec {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..config
            }
        },
    )
}

/// Which upstream (by tag, `u0:` …) answered.
fn tag(reply: &[u8]) -> String {
    String::from_utf8_lossy(&reply[..reply.iter().position(|&b| b == b':').unwrap_or(0)]).into_owned()
}

#[test]
fn forward_wat_proxies_to_an_upstream_and_replies_come_from_the_listener() {
    let up = Upstream::echo("u0:");
    let gateway = forwarding(FORWARD, vec![pool("backend", &[&up])]);
    let c = client();
    for i in 0..20 {
        let msg = format!("hello {i}");
        // `ask` checks that the reply comes from the gateway's own address.
        assert_eq!(
            ask(&c, gateway.local_addr(), msg.as_bytes()),
            format!("u0:{msg}").as_bytes()
        );
    }
    // The upstream saw the datagrams unchanged, all from one session socket.
    let got = up.received();
    assert_eq!(got.len(), 20);
    assert_eq!(got[3].0, b"hello 3");
    assert!(got.iter().all(|(_, from)| *from == got[0].1), "one session per client");
    assert_ne!(got[0].1, gateway.local_addr(), "sessions have their own socket");
    // Replies are counted just after they are sent.
    wait_until("20 replies counted", || gateway.stats().replied == 20);
    let s = gateway.stats();
    assert_eq!((s.received, s.forwarded), (20, 20));
    assert_eq!((s.sessions_created, s.sessions_active, s.upstream_received), (1, 1, 20));
    assert_eq!(s.dropped(DropReason::NoReply), 0, "a forward is not a no_reply");
    // An empty datagram is forwarded too.
    assert_eq!(ask(&c, gateway.local_addr(), b""), b"u0:");
}

/// Sends one datagram from each of `clients` and returns the tag of each reply.
fn tags_for(gateway: &Gateway, clients: &[UdpSocket], msg: &[u8]) -> Vec<String> {
    clients
        .iter()
        .map(|c| tag(&ask(c, gateway.local_addr(), msg)))
        .collect()
}

#[test]
fn every_policy_chooses_as_named_and_a_client_keeps_its_endpoint() {
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::echo(&format!("u{i}:"))).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    for (name, policy) in Policy::ALL {
        let spec = PoolSpec {
            policy,
            ..pool("backend", &refs)
        };
        // One worker, so that round-robin and least-sessions see every session.
        let gateway = one_worker(FORWARD, spec);
        let clients: Vec<UdpSocket> = (0..30).map(|_| client()).collect();
        let first = tags_for(&gateway, &clients, b"aa");
        // Every client stays with its endpoint, whatever the policy.
        assert_eq!(
            tags_for(&gateway, &clients, b"bb"),
            first,
            "{name}: sessions are sticky"
        );
        let mut per = HashMap::new();
        for t in &first {
            *per.entry(t.clone()).or_insert(0) += 1;
        }
        match policy {
            Policy::RoundRobin => {
                let expected: Vec<String> = (0..30).map(|i| format!("u{}", i % 3)).collect();
                assert_eq!(first, expected, "round-robin takes each endpoint in turn");
            }
            Policy::LeastSessions => {
                assert!(per.values().all(|&n| n == 10), "least-sessions balances: {per:?}");
                // Round-robin balances these too; an imbalance tells them apart.
                assert_least_sessions_fills_the_emptiest(&ups);
            }
            Policy::Hash | Policy::Random => {
                assert_eq!(per.len(), 3, "{name} uses every endpoint: {per:?}");
            }
        }
        assert_eq!(gateway.stats().sessions_created, 30, "{name}");
    }
}

/// `k` + an 8-byte key: `forward_key` with that key; anything else: `forward`.
const KEYED_OR_PLAIN: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "forward_key" (func $forward_key (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.and (i32.ge_u (local.get $len) (i32.const 9))
                 (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 107)))
      (then (drop (call $forward_key (i32.const 0) (i32.const 7)
                    (i32.add (local.get $ptr) (i32.const 1)) (i32.const 8)
                    (local.get $ptr) (local.get $len))))
      (else (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))))
    i64.const -1))"#;

/// Six keyed sessions on one endpoint, then twelve new clients: least-sessions
/// gives them all to the other two (round-robin would give it four).
fn assert_least_sessions_fills_the_emptiest(ups: &[Upstream]) {
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let spec = PoolSpec {
        policy: Policy::LeastSessions,
        ..pool_of("backend", &addrs)
    };
    let gateway = one_worker(KEYED_OR_PLAIN, spec);
    let reference = wasmgate::upstream::pool::Pool::new("backend", Policy::Hash, &addrs);
    let now = std::time::Instant::now();
    let key = (0u32..)
        .map(|i| format!("{i:08}"))
        .find(|k| reference.by_hash(k.as_bytes(), now) == Some(0))
        .unwrap();
    for _ in 0..6 {
        let reply = ask(&client(), gateway.local_addr(), format!("k{key}").as_bytes());
        assert_eq!(tag(&reply), "u0");
    }
    let later: Vec<String> = (0..12)
        .map(|_| tag(&ask(&client(), gateway.local_addr(), b"plain")))
        .collect();
    assert!(
        later.iter().all(|t| t != "u0"),
        "least-sessions sent a client to the fullest: {later:?}"
    );
    assert_eq!(later.iter().filter(|t| *t == "u1").count(), 6, "{later:?}");
}

#[test]
fn hash_policy_owners_are_those_of_the_pool_for_the_client_address() {
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::echo(&format!("u{i}:"))).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let gateway = forwarding(FORWARD, vec![pool("backend", &refs)]);
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let reference = wasmgate::upstream::pool::Pool::new("backend", Policy::Hash, &addrs);
    let now = std::time::Instant::now();
    for _ in 0..20 {
        let c = client();
        let port = c.local_addr().unwrap().port();
        let mut key = vec![127, 0, 0, 1];
        key.extend_from_slice(&port.to_be_bytes());
        let owner = reference.by_hash(&key, now).unwrap();
        assert_eq!(tag(&ask(&c, gateway.local_addr(), b"xx")), format!("u{owner}"));
    }
}

const FAN_OUT: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "ab")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 1) (local.get $ptr) (local.get $len)))
    (drop (call $forward (i32.const 1) (i32.const 1) (local.get $ptr) (local.get $len)))
    i64.const -1))"#;

#[test]
fn fan_out_mirrors_each_datagram_to_two_pools() {
    let (a, b) = (Upstream::echo("a:"), Upstream::echo("b:"));
    let gateway = forwarding(FAN_OUT, vec![pool("a", &[&a]), pool("b", &[&b])]);
    let c = client();
    c.send_to(b"mmmm", gateway.local_addr()).unwrap();
    let mut replies = vec![recv(&c, gateway.local_addr()), recv(&c, gateway.local_addr())];
    replies.sort();
    assert_eq!(replies, [b"a:mmmm".to_vec(), b"b:mmmm".to_vec()]);
    assert_eq!((a.count(), b.count()), (1, 1));
    let s = gateway.stats();
    assert_eq!((s.sessions_created, s.forwarded), (2, 1));
}

#[test]
fn forward_key_sends_every_datagram_with_a_token_to_one_endpoint_whatever_the_client() {
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::echo(&format!("u{i}:"))).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let gateway = forwarding(TOKEN_ROUTER, vec![pool("backend", &refs)]);
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let reference = wasmgate::upstream::pool::Pool::new("backend", Policy::Hash, &addrs);
    let now = std::time::Instant::now();
    let mut owners = HashMap::new();
    for token in ["tok-0001", "tok-0002", "tok-0003", "tok-0004", "tok-0005", "tok-0006"] {
        for _ in 0..8 {
            // A new client address each time: only the token decides.
            let c = client();
            let reply = ask(&c, gateway.local_addr(), format!("{token}payload").as_bytes());
            let t = tag(&reply);
            assert_eq!(&reply[t.len() + 1..], b"payload", "the token is stripped");
            assert_eq!(owners.entry(token).or_insert_with(|| t.clone()), &t, "{token} moved");
        }
        // The owner is the one rendezvous hashing of the token names.
        let owner = reference.by_hash(token.as_bytes(), now).unwrap();
        assert_eq!(owners[token], format!("u{owner}"), "{token}");
    }
    let spread: std::collections::HashSet<&String> = owners.values().collect();
    assert!(spread.len() >= 2, "six tokens all on one endpoint: {owners:?}");
    // Too short for a token: dropped by the guest.
    let c = client();
    c.send_to(b"short", gateway.local_addr()).unwrap();
    assert_silent(&c, Duration::from_millis(200));
}

const ON_REPLY: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (import "wasmgate" "upstream" (func $upstream (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 1024)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1)
  ;; Upstream answers beginning with "u0:X" are dropped; the others come back
  ;; as "<POOL/ip:port>|<answer>".
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (local $n i32)
    (if (i32.eq (i32.load8_u (i32.add (local.get $ptr) (i32.const 3))) (i32.const 88))
      (then (return (i64.const -1))))
    (local.set $n (call $upstream (i32.const 8192) (i32.const 256)))
    (i32.store8 (i32.add (i32.const 8192) (local.get $n)) (i32.const 124))
    (memory.copy (i32.add (i32.const 8193) (local.get $n)) (local.get $ptr) (local.get $len))
    (i64.or (i64.shl (i64.const 8192) (i64.const 32))
      (i64.extend_i32_u (i32.add (i32.add (local.get $n) (i32.const 1)) (local.get $len))))))"#;

#[test]
fn on_reply_rewrites_and_drops_upstream_answers_and_sees_which_endpoint_sent_them() {
    let up = Upstream::echo("u0:");
    let gateway = forwarding_with(
        ON_REPLY,
        vec![pool("backend", &[&up])],
        ListenerSpec {
            workers: 1,
            max_reply_ratio: 0.0,
            ..ListenerSpec::default()
        },
    );
    let c = client();
    let reply = ask(&c, gateway.local_addr(), b"hi");
    assert_eq!(String::from_utf8(reply).unwrap(), format!("backend/{}|u0:hi", up.addr));
    c.send_to(b"Xdrop me", gateway.local_addr()).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    let s = gateway.stats();
    assert_eq!(s.upstream_received, 2);
    assert_eq!(s.upstream_dropped(DropReason::NoReply), 1);
}

/// A real UDP server that answers every datagram with `answer(datagram)`, each
/// element one datagram. Stops when dropped.
struct Answering {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Answering {
    fn new(answer: fn(&[u8]) -> Vec<Vec<u8>>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    for d in answer(&buf[..n]) {
                        let _ = socket.send_to(&d, from);
                    }
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn on_reply_is_held_to_the_ratio_of_what_the_client_sent_not_of_the_upstream_datagram() {
    // The upstream answers one byte; on_reply turns it into
    // "backend/127.0.0.1:PORT|k" (about 27 bytes). The client's datagram sets
    // the budget: 3 × 12 bytes admits it, 3 × 2 bytes does not. (Held to the
    // upstream datagram's 3 × 1 byte, both would be dropped.)
    let up = Answering::new(|_| vec![b"k".to_vec()]);
    let gateway = forwarding(ON_REPLY, vec![pool_of("backend", &[up.addr])]);
    let c = client();
    let reply = ask(&c, gateway.local_addr(), b"hello, world");
    assert_eq!(String::from_utf8(reply).unwrap(), format!("backend/{}|k", up.addr));
    let other = client();
    other.send_to(b"hi", gateway.local_addr()).unwrap();
    assert_silent(&other, Duration::from_millis(300));
    assert_eq!(gateway.stats().upstream_dropped(DropReason::Amplification), 1);
}

/// Ten datagrams of 600 bytes for a datagram that starts with "big", else an echo.
fn amplifier(datagram: &[u8]) -> Vec<Vec<u8>> {
    if datagram.starts_with(b"big") {
        vec![vec![b'A'; 600]; 10]
    } else {
        vec![datagram.to_vec()]
    }
}

#[test]
fn upstream_answers_to_an_unproven_client_are_held_to_the_reply_ratio_of_what_it_sent() {
    // Before: 21 bytes in, 6,000 bytes out to whatever address the request claimed.
    let up = Answering::new(amplifier);
    let gateway = one_worker(FORWARD, pool_of("backend", &[up.addr]));
    let victim = client();
    victim.send_to(b"big: 21 bytes, spoofed", gateway.local_addr()).unwrap();
    assert_silent(&victim, Duration::from_millis(300));
    assert_eq!(gateway.stats().upstream_dropped(DropReason::Amplification), 10);

    // A real client talks on after its first answer: two datagrams after an
    // answer prove its address, and then answers are no longer capped.
    let c = client();
    for msg in [&b"hello-1"[..], b"hello-2", b"hello-3"] {
        assert_eq!(ask(&c, gateway.local_addr(), msg), msg);
    }
    c.send_to(b"big", gateway.local_addr()).unwrap();
    for _ in 0..10 {
        assert_eq!(recv(&c, gateway.local_addr()), vec![b'A'; 600]);
    }
    assert_eq!(gateway.stats().upstream_dropped(DropReason::Amplification), 10);
}

const SENDER: &str = include_str!("../guests/sender.wat");

#[test]
fn send_shares_the_amplification_budget_and_what_fits_still_goes_out() {
    // No pools at all: `send` works on a plain gateway.
    let gateway = common::start(SENDER.as_bytes());
    let c = client();
    c.send_to(b"s-hello", gateway.local_addr()).unwrap();
    for _ in 0..3 {
        assert_eq!(recv(&c, gateway.local_addr()), b"s-hello");
    }
    assert_silent(&c, Duration::from_millis(200));
    // Three sends use the whole budget (3 × 7 bytes): the reply is refused, the sends are not.
    c.send_to(b"r-hello", gateway.local_addr()).unwrap();
    for _ in 0..3 {
        assert_eq!(recv(&c, gateway.local_addr()), b"r-hello");
    }
    assert_silent(&c, Duration::from_millis(200));
    let s = gateway.stats();
    // The fourth send and the reply past the budget are refused; the datagrams
    // were answered (by their sends), so neither is a drop.
    assert_eq!(s.refused(CallError::Amplification), 2);
    assert_eq!(s.dropped_total(), 0);
    assert_eq!(s.replied, 6);

    // Without a ratio, all four sends and the reply go out.
    let gateway = common::start_with(
        SENDER.as_bytes(),
        Limits::default(),
        ListenerSpec {
            max_reply_ratio: 0.0,
            ..common::config()
        },
    );
    c.send_to(b"s", gateway.local_addr()).unwrap();
    for _ in 0..4 {
        assert_eq!(recv(&c, gateway.local_addr()), b"s");
    }
    c.send_to(b"r", gateway.local_addr()).unwrap();
    for _ in 0..4 {
        assert_eq!(recv(&c, gateway.local_addr()), b"r");
    }
    assert_silent(&c, Duration::from_millis(200));
}

const START_FORWARDS: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "backend")
  (func $start
    (i32.store (i32.const 0) (call $forward (i32.const 16) (i32.const 7) (i32.const 16) (i32.const 7))))
  (start $start)
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  ;; Replies with the code the start function got, then with this datagram's.
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (i32.store (i32.const 4) (call $forward (local.get $ptr) (local.get $len) (local.get $ptr) (local.get $len)))
    (i64.or (i64.shl (i64.const 0) (i64.const 32)) (i64.const 8))))"#;

fn codes(reply: &[u8]) -> (i32, i32) {
    (
        i32::from_le_bytes(reply[0..4].try_into().unwrap()),
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
    )
}

#[test]
fn forward_in_the_start_function_or_to_an_unknown_pool_gets_its_code() {
    let up = Upstream::echo("u0:");
    let gateway = forwarding(START_FORWARDS, vec![pool("backend", &[&up])]);
    let c = client();
    // The datagram is the pool name: "nope" is unknown; "backend" works.
    let (start, unknown) = codes(&ask(&c, gateway.local_addr(), b"nope"));
    assert_eq!(
        (start, unknown),
        (CallError::NoClient.code(), CallError::UnknownPool.code())
    );
    let (_, ok) = codes(&ask(&c, gateway.local_addr(), b"backend"));
    assert_eq!(ok, 0);
    // The guest replied, so the upstream's answer to "backend" arrives as well.
    assert_eq!(recv(&c, gateway.local_addr()), b"u0:backend");
    assert_eq!(gateway.stats().refused(CallError::UnknownPool), 1);
    // On a gateway with no pools every name is unknown.
    let plain = common::start(START_FORWARDS.as_bytes());
    assert_eq!(
        codes(&ask(&c, plain.local_addr(), b"backend")).1,
        CallError::UnknownPool.code()
    );
}

#[test]
fn a_datagram_whose_forwards_all_fail_is_dropped_under_their_reason() {
    let gateway = forwarding(FORWARD, vec![pool_of("other", &[closed_port()])]);
    let c = client();
    c.send_to(b"xx", gateway.local_addr()).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    let s = gateway.stats();
    assert_eq!(
        s.dropped(DropReason::UnknownPool),
        1,
        "forward.wat forwards to `backend`"
    );
    assert_eq!(s.refused(CallError::UnknownPool), 1);
}

/// Whether `addr` is a healthy endpoint of `gateway`'s pools now.
fn healthy(gateway: &Gateway, addr: SocketAddr) -> bool {
    gateway
        .publisher()
        .pools()
        .unwrap()
        .endpoints(std::time::Instant::now())
        .iter()
        .find(|e| e.addr == addr)
        .unwrap()
        .healthy
}

/// New clients, one datagram each, until the closed port `down` is ejected:
/// those that hash to it lose their datagram (the ICMP error comes after it),
/// and how many it takes depends on where their ports hash. The clients.
fn eject(gateway: &Gateway, down: SocketAddr) -> Vec<UdpSocket> {
    let mut clients = Vec::new();
    for _ in 0..200 {
        if !healthy(gateway, down) {
            break;
        }
        let c = client();
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        c.send_to(b"111", gateway.local_addr()).unwrap();
        let mut buf = [0u8; 64];
        let _ = c.recv_from(&mut buf);
        clients.push(c);
    }
    wait_until("the closed port to be ejected", || !healthy(gateway, down));
    clients
}

#[test]
fn a_down_endpoint_is_ejected_the_others_serve_and_it_comes_back_after_eject_for() {
    let live = Upstream::echo("live:");
    let down = closed_port();
    let spec = PoolSpec {
        // Long enough that the ejection is still on when checked on a slow
        // machine, short enough to see it end within wait_until's 5 s.
        eject_for: Duration::from_secs(3),
        ..pool_of("backend", &[live.addr, down])
    };
    let gateway = one_worker(FORWARD, spec);
    let healthy = |addr: SocketAddr| healthy(&gateway, addr);
    let mut clients = eject(&gateway, down);
    // Then every datagram, of old clients and new, reaches the live one.
    clients.extend((0..12).map(|_| client()));
    for c in &clients {
        c.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        assert_eq!(
            ask(c, gateway.local_addr(), b"222"),
            b"live:222",
            "all go to the live endpoint"
        );
    }
    assert!(!healthy(down), "the closed port is ejected");
    assert!(healthy(live.addr));
    // It comes back: the port serves again, and after eject_for new sessions reach it.
    let back = Upstream::on(&down.to_string(), "back:", true);
    wait_until("the ejection to end", || healthy(down));
    let mut reached = false;
    for _ in 0..40 {
        let c = client();
        if tag(&ask(&c, gateway.local_addr(), b"333")) == "back" {
            reached = true;
            break;
        }
    }
    assert!(reached, "no new client reached the endpoint after it came back");
    assert!(back.count() > 0);
}

#[test]
fn an_endpoint_ejected_by_one_worker_is_ejected_for_every_worker() {
    let live = Upstream::echo("live:");
    let down = closed_port();
    let spec = PoolSpec {
        eject_for: Duration::from_secs(30),
        ..pool_of("backend", &[live.addr, down])
    };
    let gateway = forwarding_with(
        FORWARD,
        vec![spec],
        ListenerSpec {
            workers: 2,
            ..ListenerSpec::default()
        },
    );
    let _clients = eject(&gateway, down);
    // New clients land on both workers (by their ports' hash): whichever
    // worker saw the refusals, none of them is sent to the ejected endpoint.
    for _ in 0..40 {
        let c = client();
        assert_eq!(ask(&c, gateway.local_addr(), b"222"), b"live:222");
    }
    let stats = gateway.stats();
    assert_eq!(stats.dropped(DropReason::UpstreamError), 0, "{stats}");
}

#[test]
fn with_every_endpoint_down_the_last_is_kept_and_forward_says_no_healthy_endpoint_only_when_all_are_ejected() {
    // Refusals from a pool's only endpoint never eject it (a panic threshold):
    // forged ICMP messages cannot empty a pool. Its refusals are counted.
    let spec = PoolSpec {
        eject_for: Duration::from_secs(30),
        ..pool_of("backend", &[closed_port()])
    };
    let gateway = one_worker(FORWARD, spec);
    for _ in 0..6 {
        client().send_to(b"11", gateway.local_addr()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let pools = gateway.publisher().pools().unwrap();
    wait_until("six refusals", || {
        pools.endpoints(std::time::Instant::now())[0].totals.refusals >= 6
    });
    let e = &pools.endpoints(std::time::Instant::now())[0];
    assert!(e.healthy && e.totals.ejections == 0);
    assert_eq!(gateway.stats().refused(CallError::NoHealthyEndpoint), 0);
}

#[test]
fn max_sessions_refuses_new_sessions_once_every_client_is_validated() {
    let up = Upstream::echo("u0:");
    let spec = PoolSpec {
        max_sessions: 4,
        ..pool("backend", &[&up])
    };
    let gateway = one_worker(FORWARD, spec);
    let clients: Vec<UdpSocket> = (0..10).map(|_| client()).collect();
    // Four validated clients (each talked on after its answer) fill the
    // table; none of them can be evicted.
    for c in &clients[..4] {
        for _ in 0..=wasmgate::upstream::VALIDATED_AFTER {
            assert_eq!(ask(c, gateway.local_addr(), b"xx"), b"u0:xx");
        }
    }
    for c in &clients[4..] {
        c.send_to(b"xx", gateway.local_addr()).unwrap();
    }
    for c in &clients[4..] {
        assert_silent(c, Duration::from_millis(100));
    }
    let s = gateway.stats();
    assert_eq!(s.dropped(DropReason::SessionOverflow), 6);
    assert_eq!(s.refused(CallError::SessionOverflow), 6);
    assert_eq!(s.sessions_active, 4);
    // The clients with sessions keep being served, every one.
    for c in &clients[..4] {
        assert_eq!(ask(c, gateway.local_addr(), b"yy"), b"u0:yy");
    }
}

#[test]
fn idle_sessions_expire_and_new_ones_open_on_the_next_datagram() {
    let up = Upstream::echo("u0:");
    let spec = PoolSpec {
        idle_timeout: Duration::from_millis(200),
        ..pool("backend", &[&up])
    };
    let gateway = forwarding(FORWARD, vec![spec]);
    let c = client();
    ask(&c, gateway.local_addr(), b"11");
    assert_eq!(gateway.stats().sessions_active, 1);
    wait_until("the session to expire", || gateway.stats().sessions_active == 0);
    assert_eq!(gateway.stats().sessions_expired, 1);
    assert_eq!(ask(&c, gateway.local_addr(), b"22"), b"u0:22");
    let s = gateway.stats();
    assert_eq!((s.sessions_created, s.sessions_active), (2, 1));
    let senders: std::collections::HashSet<SocketAddr> = up.received().iter().map(|(_, f)| *f).collect();
    assert_eq!(senders.len(), 2, "the new session has a new socket");
}

const FORWARD_LOOP: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  ;; "ok…" is answered as it is; anything else is forwarded for ever.
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.eq (i32.load16_u (local.get $ptr)) (i32.const 0x6b6f))
      (then (return (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
                            (i64.extend_i32_u (local.get $len))))))
    (loop $forever
      (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
      (br $forever))
    i64.const -1))"#;

#[test]
fn a_guest_forwarding_in_a_loop_is_cut_off_by_the_call_limit_and_the_time_budget() {
    let up = Upstream::silent();
    let gateway = forwarding(FORWARD_LOOP, vec![pool("backend", &[&up])]);
    let c = client();
    for _ in 0..3 {
        c.send_to(b"flood", gateway.local_addr()).unwrap();
    }
    wait_until("three timeouts", || gateway.stats().dropped(DropReason::Timeout) == 3);
    std::thread::sleep(Duration::from_millis(100));
    // At most 64 forwards per datagram reached the upstream; the rest were refused.
    assert_eq!(up.count(), 3 * wasmgate::verdict::MAX_CALLS_PER_DATAGRAM as usize);
    assert!(gateway.stats().refused(CallError::TooMany) > 1000);
    // The same gateway, and the same client, are served on.
    assert_eq!(ask(&c, gateway.local_addr(), b"ok"), b"ok");
}

#[test]
fn a_host_name_endpoint_is_resolved_and_served_through() {
    let up = Upstream::echo("u0:");
    let spec = PoolSpec {
        eject_for: Duration::from_secs(30),
        ..PoolSpec::new("backend", vec![format!("localhost:{}", up.addr.port())])
    };
    assert!(spec.resolve().unwrap().contains(&up.addr));
    let gateway = one_worker(FORWARD, spec);
    let endpoints: Vec<SocketAddr> = gateway
        .publisher()
        .pools()
        .unwrap()
        .endpoints(std::time::Instant::now())
        .iter()
        .map(|e| e.addr)
        .collect();
    assert!(
        endpoints.contains(&up.addr),
        "the name became its addresses: {endpoints:?}"
    );
    // `localhost` may also be ::1, where nothing listens: a datagram sent there
    // draws ICMP port unreachable and ejects it, and the next goes to 127.0.0.1.
    let c = client();
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 16];
    let answered = (0..3).any(|_| {
        c.send_to(b"nn", gateway.local_addr()).unwrap();
        matches!(c.recv_from(&mut buf), Ok((5, _))) && &buf[..5] == b"u0:nn"
    });
    assert!(answered, "no answer through the host-name endpoint");
}

#[test]
fn sessions_to_a_removed_endpoint_end_after_drain_timeout_however_busy() {
    // Before: a session to a removed endpoint carried on as long as either side
    // talked, so its client never moved.
    let (old, new) = (Upstream::echo("old:"), Upstream::echo("new:"));
    let spec = |up: &Upstream| PoolSpec {
        drain_timeout: Duration::from_millis(300),
        ..pool("backend", &[up])
    };
    let gateway = one_worker(FORWARD, spec(&old));
    let c = client();
    assert_eq!(ask(&c, gateway.local_addr(), b"one"), b"old:one");
    assert!(gateway.publisher().set_pools(&[spec(&new)]).unwrap());
    // The client talks every 50 ms: drained within the timeout, then moved.
    // The answer to a datagram in flight when its session closes is lost, as
    // on any network: the client asks again.
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let started = std::time::Instant::now();
    let mut moved = None;
    while started.elapsed() < Duration::from_secs(5) {
        c.send_to(b"again", gateway.local_addr()).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = c.recv_from(&mut buf)
            && tag(&buf[..n]) == "new"
        {
            moved = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = moved.expect("the client never moved to the new endpoint");
    assert!(
        moved >= Duration::from_millis(250),
        "moved after {moved:?}, before the drain ended"
    );
}

/// Forwards everything; `on_reply` traps on answers starting with `t`, loops
/// on `l`, and passes the rest on.
const ON_REPLY_HOSTILE: &str = r#"(module
  (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "backend")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func (export "handle") (param $ptr i32) (param $len i32) (result i64)
    (drop (call $forward (i32.const 0) (i32.const 7) (local.get $ptr) (local.get $len)))
    i64.const -1)
  (func (export "on_reply") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 108)) (then (loop $l (br $l))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len)))))"#;

#[test]
fn an_on_reply_that_traps_or_loops_costs_that_answer_and_the_next_is_passed_on() {
    let up = Upstream::echo("");
    let gateway = one_worker(ON_REPLY_HOSTILE, pool("backend", &[&up]));
    let c = client();
    assert_eq!(ask(&c, gateway.local_addr(), b"fine"), b"fine");
    for bad in [&b"trap"[..], b"loop"] {
        c.send_to(bad, gateway.local_addr()).unwrap();
        assert_silent(&c, Duration::from_millis(200));
        assert_eq!(ask(&c, gateway.local_addr(), b"after"), b"after");
    }
    let s = gateway.stats();
    assert_eq!(s.upstream_dropped(DropReason::Trap), 1);
    assert_eq!(s.upstream_dropped(DropReason::Timeout), 1);
    assert_eq!(s.dropped_total(), 0, "the client datagrams were all forwarded");
}

#[test]
fn two_workers_forward_for_many_clients_and_each_keeps_its_session() {
    let ups: Vec<Upstream> = (0..2).map(|i| Upstream::echo(&format!("u{i}:"))).collect();
    let refs: Vec<&Upstream> = ups.iter().collect();
    let gateway = forwarding_with(
        FORWARD,
        vec![pool("backend", &refs)],
        ListenerSpec {
            workers: 2,
            ..ListenerSpec::default()
        },
    );
    let clients: Vec<UdpSocket> = (0..40).map(|_| client()).collect();
    let first = tags_for(&gateway, &clients, b"one");
    assert_eq!(tags_for(&gateway, &clients, b"two"), first, "sessions are sticky");
    let s = gateway.stats();
    assert_eq!((s.sessions_created, s.sessions_active), (40, 40));
    assert_eq!(s.forwarded, 80);
    assert_eq!(ups[0].count() + ups[1].count(), 80);
}

#[test]
fn a_drained_endpoint_takes_no_new_clients_while_its_clients_finish() {
    let (a, b) = (Upstream::echo("a:"), Upstream::echo("b:"));
    let both = pool("backend", &[&a, &b]);
    let gateway = one_worker(FORWARD, both.clone());
    let clients: Vec<UdpSocket> = (0..16).map(|_| client()).collect();
    let before = tags_for(&gateway, &clients, b"one");
    assert!(
        before.iter().any(|t| t == "a") && before.iter().any(|t| t == "b"),
        "{before:?}"
    );
    // Drain `a` for a long while: its clients keep it, new clients go to `b`.
    let drained = PoolSpec {
        drain: vec![a.addr.to_string()],
        drain_timeout: Duration::from_secs(60),
        ..both.clone()
    };
    assert!(gateway.publisher().set_pools(&[drained]).unwrap());
    assert_eq!(
        tags_for(&gateway, &clients, b"two"),
        before,
        "old sessions finish where they are"
    );
    let fresh: Vec<UdpSocket> = (0..16).map(|_| client()).collect();
    assert!(
        tags_for(&gateway, &fresh, b"new").iter().all(|t| t == "b"),
        "no new client for `a`"
    );
    // Every endpoint drained is refused, naming the pool.
    let all = PoolSpec {
        drain: vec![a.addr.to_string(), b.addr.to_string()],
        ..both.clone()
    };
    let e = gateway.publisher().set_pools(&[all]).unwrap_err().to_string();
    assert!(e.contains("drain lists every endpoint"), "{e}");
    let stranger = PoolSpec {
        drain: vec!["127.0.0.1:9".into()],
        ..both
    };
    let e = gateway.publisher().set_pools(&[stranger]).unwrap_err().to_string();
    assert!(e.contains("not one of the pool's endpoints"), "{e}");
}
