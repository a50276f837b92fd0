//! The DNS filtering proxy (examples/dns-proxy) through a real gateway, in front
//! of a real DNS server (hickory-server, serving a small zone on loopback).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use common::{Upstream, ask, assert_silent, client, closed_port, recv};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use wasmgate::config::PoolSpec;
use wasmgate::metrics::DropReason;
use wasmgate::sandbox::Limits;
use wasmgate::server::{Gateway, ServeConfig};

const DNS_PROXY: &[u8] = include_bytes!("../examples/dns-proxy/dns_proxy.wasm");

/// A zone with an SOA and one A record.
fn zone(origin: &str, address: [u8; 4]) -> (LowerName, InMemoryZoneHandler) {
    let origin = Name::from_str(origin).unwrap();
    let mut zone = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        Name::from_str("ns.example.org.").unwrap(),
        Name::from_str("hostmaster.example.org.").unwrap(),
        1,
        3600,
        600,
        86_400,
        60,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1));
    let [a, b, c, d] = address;
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::A(A::new(a, b, c, d))), 1));
    (LowerName::new(&origin), zone)
}

/// Starts hickory-server on a loopback port of its choosing, serving
/// `example.org` (192.0.2.10) and `blocked.test` (192.0.2.66, so that an answer
/// for it shows the query got past the guest). It runs until the test process ends.
fn dns_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut catalog = Catalog::new();
            for (name, address) in [("example.org.", [192, 0, 2, 10]), ("blocked.test.", [192, 0, 2, 66])] {
                let (origin, handler) = zone(name, address);
                catalog.upsert(origin, vec![Arc::new(handler)]);
            }
            let mut server = Server::new(catalog);
            server.register_socket(tokio::net::UdpSocket::from_std(socket).unwrap());
            let _ = server.block_until_done().await;
        });
    });
    addr
}

fn proxy(endpoints: &[SocketAddr]) -> Gateway {
    proxy_with(PoolSpec::new(
        "resolvers",
        endpoints.iter().map(SocketAddr::to_string).collect(),
    ))
}

fn proxy_with(pool: PoolSpec) -> Gateway {
    common::start_with(
        DNS_PROXY,
        Limits::default(),
        ServeConfig {
            pools: vec![pool],
            ..common::config()
        },
    )
}

fn query(name: &str, id: u16) -> Message {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    q
}

fn dns_ask(c: &UdpSocket, to: SocketAddr, q: &Message) -> Message {
    let reply = ask(c, to, &q.to_vec().unwrap());
    Message::from_vec(&reply).unwrap_or_else(|e| panic!("unparseable DNS reply {reply:02x?}: {e}"))
}

fn addresses(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
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
    assert_eq!(
        s.upstream_dropped(DropReason::NoReply),
        3,
        "wrong ID, wrong question, duplicate"
    );

    // An upstream that echoes the query back sends no response at all.
    let echo = Upstream::echo("");
    let gateway = proxy(&[echo.addr]);
    c.send_to(&query("example.org.", 78).to_vec().unwrap(), gateway.local_addr())
        .unwrap();
    assert_silent(&c, Duration::from_millis(300));
    assert_eq!(gateway.stats().upstream_dropped(DropReason::NoReply), 1);

    // The real resolver still works beside it all.
    let gateway = proxy(&[resolver]);
    assert_eq!(
        addresses(&dns_ask(&c, gateway.local_addr(), &query("example.org.", 79))),
        ["192.0.2.10"]
    );
}

#[test]
fn with_no_healthy_resolver_the_client_gets_servfail_at_once() {
    let gateway = proxy_with(PoolSpec {
        eject_for: Duration::from_secs(30),
        ..PoolSpec::new("resolvers", vec![closed_port().to_string()])
    });
    let c = client();
    let to = gateway.local_addr();
    // The first query goes out and draws ICMP port unreachable, which ejects the
    // only resolver; from then on the guest answers SERVFAIL itself.
    c.send_to(&query("example.org.", 1).to_vec().unwrap(), to).unwrap();
    let mut servfail = None;
    for id in 2..50 {
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        c.send_to(&query("example.org.", id).to_vec().unwrap(), to).unwrap();
        let mut buf = [0u8; 512];
        if let Ok((n, _)) = c.recv_from(&mut buf) {
            servfail = Some(Message::from_vec(&buf[..n]).unwrap());
            break;
        }
    }
    let reply = servfail.expect("no SERVFAIL within 50 queries");
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    c.set_read_timeout(Some(common::REPLY_TIMEOUT)).unwrap();
    // And every later query at once.
    let q = query("example.org.", 500);
    c.send_to(&q.to_vec().unwrap(), to).unwrap();
    let reply = Message::from_vec(&recv(&c, to)).unwrap();
    assert_eq!(
        (reply.metadata.id, reply.metadata.response_code),
        (500, ResponseCode::ServFail)
    );
}
