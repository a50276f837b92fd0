//! The DNS filtering proxy (examples/dns-proxy) through a real gateway, in front
//! of a real DNS server (hickory-server, serving a small zone on loopback).

use crate::common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr as _;
use std::time::Duration;

use common::dns::{addresses, dns_ask, query};
use common::{Upstream, assert_silent, client, closed_port};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use wasmgate::config::Limits;
use wasmgate::config::ListenerSpec;
use wasmgate::config::PoolSpec;
use wasmgate::gateway::Gateway;
use wasmgate::verdict::DropReason;

const DNS_PROXY: &[u8] = include_bytes!("../../examples/dns-proxy/dns_proxy.wasm");

/// `example.org` (192.0.2.10) and `blocked.test` (192.0.2.66, so that an answer
/// for it shows the query got past the guest).
fn dns_server() -> SocketAddr {
    common::dns::dns_server(&[
        ("example.org.", &[("example.org.", [192, 0, 2, 10], 60)]),
        ("blocked.test.", &[("blocked.test.", [192, 0, 2, 66], 60)]),
    ])
}

fn proxy(endpoints: &[SocketAddr]) -> Gateway {
    proxy_with(PoolSpec::new(
        "resolvers",
        endpoints.iter().map(SocketAddr::to_string).collect(),
    ))
}

/// A shared pool (`sessions = "shared"`), as examples/dns-proxy.toml has it.
fn shared(endpoints: &[SocketAddr]) -> PoolSpec {
    PoolSpec {
        shared: Some(wasmgate::config::SharedSpec::default()),
        ..PoolSpec::new("resolvers", endpoints.iter().map(SocketAddr::to_string).collect())
    }
}

fn proxy_with(pool: PoolSpec) -> Gateway {
    common::start_with(
        DNS_PROXY,
        Limits::default(),
        ListenerSpec {
            pools: vec![pool],
            ..common::config()
        },
    )
}

#[test]
fn allowed_names_are_answered_by_the_resolver_and_blocked_ones_by_the_guest() {
    let gateway = proxy(&[dns_server()]);
    let c = client();
    let to = gateway.local_addr();

    let reply = dns_ask(&c, to, &query("example.org.", 0x1234));
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        addresses(&reply),
        ["192.0.2.10"],
        "the resolver's answer, through the proxy"
    );

    for (i, name) in ["blocked.test.", "ads.blocked.test.", "A.Deep.BLOCKED.Test."]
        .iter()
        .enumerate()
    {
        let q = query(name, 0x2000 + i as u16);
        let reply = dns_ask(&c, to, &q);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(reply.metadata.id, q.metadata.id, "{name}");
        assert_eq!(reply.queries, q.queries, "{name}: the question is echoed");
        assert!(reply.answers.is_empty(), "{name}: {:?}", addresses(&reply));
    }
    // A name that merely ends in the same letters is not blocked: the resolver
    // answers it (it serves no such zone, so it refuses).
    let reply = dns_ask(&c, to, &query("notblocked.test.", 9));
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);

    let s = gateway.stats();
    assert_eq!(s.forwarded, 2, "example.org and notblocked.test");
    assert_eq!(s.upstream_received, 2);
    assert_eq!(s.dropped_total(), 0);
}

#[test]
fn answers_that_match_no_forwarded_query_are_dropped() {
    forged_answers_are_dropped(proxy, DropReason::NoReply);
}

#[test]
fn answers_that_match_no_forwarded_query_are_dropped_by_a_shared_pool_too() {
    // No query, no handle: the host counts each answer the guest names no client for.
    forged_answers_are_dropped(|e| proxy_with(shared(e)), DropReason::Unclaimed);
}

#[test]
fn a_shared_pool_answers_ten_thousand_distinct_clients_each_with_its_own_answer() {
    let resolver = dns_server();
    let gateway = proxy_with(shared(&[resolver]));
    let to = gateway.local_addr();
    // 100 rounds of 100 clients at once; a socket whose port an earlier
    // client had is made again, so that all 10,000 clients differ. (Loopback
    // clients send from ephemeral ports: the gateway takes a fixed port on
    // loopback for another server of the host and never answers it.)
    let mut seen = HashSet::new();
    let mut fresh_client = || loop {
        let c = client();
        if seen.insert(c.local_addr().unwrap()) {
            return c;
        }
    };
    for round in 0..100u16 {
        let clients: Vec<UdpSocket> = (0..100).map(|_| fresh_client()).collect();
        for (i, c) in clients.iter().enumerate() {
            let id = round.wrapping_mul(100).wrapping_add(i as u16);
            c.send_to(&query("example.org.", id).to_vec().unwrap(), to).unwrap();
        }
        for (i, c) in clients.iter().enumerate() {
            let id = round.wrapping_mul(100).wrapping_add(i as u16);
            let mut buf = [0u8; 1500];
            let Ok(n) = c.recv(&mut buf) else {
                panic!("round {round}, client {i}: no answer; {:?}", gateway.stats());
            };
            let reply = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(
                (reply.metadata.id, addresses(&reply)),
                (id, vec!["192.0.2.10".to_string()])
            );
        }
    }
    // A reply is counted once its send returns, which may be after it arrived.
    common::wait_until("every reply to be counted", || gateway.stats().replied == 10_000);
    let s = gateway.stats();
    assert_eq!((s.forwarded, s.dropped_total()), (10_000, 0));
    assert_eq!(s.sessions_active, 0, "no session per client");
    assert_eq!(s.upstream_dropped.iter().sum::<u64>(), 0);
}

fn forged_answers_are_dropped(proxy: impl Fn(&[SocketAddr]) -> Gateway, reason: DropReason) {
    let resolver = dns_server();
    // A forger in the pool: for each query it answers with a wrong ID, then with
    // the wrong question, then correctly, then correctly again.
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let forger_addr = forger.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = forger.recv_from(&mut buf) {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut answer = q.clone();
            answer.metadata.message_type = MessageType::Response;
            let mut wrong_id = answer.clone();
            wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
            let mut wrong_question = answer.clone();
            wrong_question.queries = vec![Query::query(Name::from_str("evil.example.").unwrap(), RecordType::A)];
            for m in [&wrong_id, &wrong_question, &answer, &answer] {
                forger.send_to(&m.to_vec().unwrap(), from).unwrap();
            }
        }
    });
    let gateway = proxy(&[forger_addr]);
    let c = client();
    let q = query("example.org.", 77);
    let reply = dns_ask(&c, gateway.local_addr(), &q);
    assert_eq!(reply.metadata.id, 77);
    assert_eq!(reply.queries, q.queries);
    assert_silent(&c, Duration::from_millis(300));
    let s = gateway.stats();
    assert_eq!(s.upstream_received, 4);
    assert_eq!(s.upstream_dropped(reason), 3, "wrong ID, wrong question, duplicate");

    // An upstream that echoes the query back sends no response at all.
    let echo = Upstream::echo("");
    let gateway = proxy(&[echo.addr]);
    c.send_to(&query("example.org.", 78).to_vec().unwrap(), gateway.local_addr())
        .unwrap();
    assert_silent(&c, Duration::from_millis(300));
    assert_eq!(gateway.stats().upstream_dropped(reason), 1);

    // The real resolver still works beside it all.
    let gateway = proxy(&[resolver]);
    assert_eq!(
        addresses(&dns_ask(&c, gateway.local_addr(), &query("example.org.", 79))),
        ["192.0.2.10"]
    );
}

#[test]
fn the_only_resolver_down_is_never_ejected_and_its_refusals_are_counted() {
    // One ICMP message ejected an endpoint before, so one forged message could
    // take a pool's only resolver away. Now it takes eject_after (3) in a row,
    // and the last healthy endpoint is never ejected (a panic threshold).
    let down = closed_port();
    let gateway = proxy_with(PoolSpec {
        eject_for: Duration::from_secs(30),
        ..PoolSpec::new("resolvers", vec![down.to_string()])
    });
    let to = gateway.local_addr();
    let pools = gateway.publisher();
    let endpoint = || {
        let pools = pools.pools().unwrap();
        let e = &pools.endpoints(std::time::Instant::now())[0];
        (e.healthy, e.totals.refusals, e.totals.ejections)
    };
    // Each query from its own client: a session each, every one refused.
    for id in 1..=6 {
        client()
            .send_to(&query("example.org.", id).to_vec().unwrap(), to)
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    common::wait_until("six refusals", || endpoint().1 >= 6);
    assert_eq!(endpoint(), (true, 6, 0));
}

#[test]
fn a_query_the_pool_cannot_take_gets_servfail_at_once() {
    // One session at most, held by a validated client: a second client's query
    // cannot be forwarded, and the guest answers it SERVFAIL itself instead of
    // leaving it to time out.
    let gateway = common::start_with(
        DNS_PROXY,
        Limits::default(),
        ListenerSpec {
            workers: 1,
            pools: vec![PoolSpec {
                max_sessions: 1,
                ..PoolSpec::new("resolvers", vec![dns_server().to_string()])
            }],
            ..common::config()
        },
    );
    let to = gateway.local_addr();
    let first = client();
    // A client that asks on after its answers has proven its address: its
    // session is not closed to make room for a newcomer.
    for id in 0..=wasmgate::upstream::VALIDATED_AFTER as u16 {
        let q = query("example.org.", 100 + id);
        assert_eq!(dns_ask(&first, to, &q).metadata.response_code, ResponseCode::NoError);
    }
    let second = client();
    let reply = dns_ask(&second, to, &query("example.org.", 8));
    assert_eq!(
        (reply.metadata.id, reply.metadata.response_code),
        (8, ResponseCode::ServFail)
    );
}

/// A resolver that answers every query with SERVFAIL (a broken upstream of
/// its own, say): the query, as a response, with RCODE 2.
fn servfail_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf)
                && n >= 12
            {
                buf[2] |= 0x80; // QR
                buf[3] = (buf[3] & 0xf0) | 2; // SERVFAIL
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop)
}

#[test]
fn the_guest_probes_each_resolver_with_a_real_query_and_servfail_is_unhealthy() {
    let good = dns_server();
    let (bad, stop) = servfail_server();
    let mut pool = PoolSpec::new("resolvers", vec![good.to_string(), bad.to_string()]);
    pool.health = Some(wasmgate::config::HealthSpec {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
        unhealthy_after: 2,
        guest: true,
        ..wasmgate::config::HealthSpec::default()
    });
    let gateway = proxy_with(pool);
    let health = |addr: SocketAddr| {
        let pools = gateway.publisher().pools().unwrap();
        let views = pools.endpoints(std::time::Instant::now());
        let e = views.iter().find(|e| e.addr == addr).unwrap();
        (e.healthy, e.totals)
    };
    common::wait_until("the SERVFAIL resolver taken out", || !health(bad).0);
    let (good_up, good_totals) = health(good);
    assert!(good_up, "NOERROR is healthy");
    assert!(
        good_totals.probes >= 1 && good_totals.probes_mismatch == 0,
        "{good_totals:?}"
    );
    assert!(health(bad).1.probes_mismatch >= 2, "judged by its RCODE");
    // Every client is answered by the healthy resolver.
    for i in 0..8 {
        let c = client();
        let reply = dns_ask(&c, gateway.local_addr(), &query("example.org.", 0x4000 + i));
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}
