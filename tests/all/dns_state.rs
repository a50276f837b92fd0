//! The DNS examples built on the shared state, through a real gateway with two
//! workers, in front of a real DNS server (hickory-server on loopback):
//! examples/dns-limit (a per-client rate limit with penalties) and
//! examples/dns-cache (answers cached for their TTL).

use crate::common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::dns::{addresses, dns_ask, dns_server, query};
use common::{client, client_on};
use hickory_proto::op::ResponseCode;
use wasmgate::config::Limits;
use wasmgate::config::{ListenerSpec, PoolSpec};
use wasmgate::gateway::Gateway;

const DNS_LIMIT: &[u8] = include_bytes!("../../examples/dns-limit/dns_limit.wasm");
const DNS_CACHE: &[u8] = include_bytes!("../../examples/dns-cache/dns_cache.wasm");
/// examples/dns-limit's bucket: 10 queries at once, 5 a second after that.
const BURST: usize = 10;

fn resolver() -> SocketAddr {
    dns_server(&[(
        "example.org.",
        &[
            ("example.org.", [192, 0, 2, 10], 60),
            ("short.example.org.", [192, 0, 2, 11], 1),
        ],
    )])
}

fn serve(module: &[u8], resolver: SocketAddr) -> Gateway {
    serve_logged(module, resolver, None)
}

fn serve_logged(module: &[u8], resolver: SocketAddr, access_log: Option<&std::path::Path>) -> Gateway {
    common::start_with(
        module,
        Limits::default(),
        ListenerSpec {
            pools: vec![PoolSpec::new("resolvers", vec![resolver.to_string()])],
            access_log: access_log.map(|path| wasmgate::config::AccessLogSpec {
                path: path.to_owned(),
                sample: 1.0,
            }),
            ..common::config()
        },
    )
}

/// A client on `ip` that may be refused a port another gateway of this test
/// process listens on (the source filter denies those): it asks again from
/// another port.
fn client_at(ip: &str) -> UdpSocket {
    client_on(&format!("{ip}:0"))
}

#[test]
fn a_client_past_its_bucket_is_refused_then_penalized_and_others_are_served() {
    let gateway = serve(DNS_LIMIT, resolver());
    let to = gateway.local_addr();
    // Three source ports of one address: the kernel spreads them over both
    // workers, and they share one bucket.
    let sockets: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    let mut codes = Vec::new();
    for i in 0..30 {
        let reply = dns_ask(&sockets[i % 3], to, &query("example.org.", i as u16));
        assert_eq!(reply.metadata.id, i as u16);
        if reply.metadata.response_code == ResponseCode::NoError {
            assert_eq!(addresses(&reply), ["192.0.2.10"]);
        }
        codes.push(reply.metadata.response_code);
    }
    let answered = codes.iter().take_while(|&&c| c == ResponseCode::NoError).count();
    // A token comes back every 200 ms: a slow machine may earn one or two more.
    assert!((BURST..BURST + 3).contains(&answered), "{codes:?}");
    assert!(
        codes[answered..].iter().all(|&c| c == ResponseCode::Refused),
        "once refused, penalized: {codes:?}"
    );
    let stats = gateway.stats();
    assert_eq!(stats.state.denied, 1, "then the penalty answers, without the bucket");
    assert_eq!(
        stats.forwarded as usize, answered,
        "refused queries never reach the resolver"
    );
    // What the handler counted, by reason (docs/ABI.md, "Metrics").
    let counted = |name: &str, values: &[&str]| common::guest_value(&gateway, name, values);
    assert_eq!(counted("dns_limit_refused", &["rate"]), Some(1.0));
    assert_eq!(
        counted("dns_limit_refused", &["penalized"]),
        Some((30 - answered - 1) as f64)
    );
    assert_eq!(counted("dns_limit_penalties", &[]), Some(1.0));
    assert_eq!(counted("dns_limit_forwarded", &[]), Some(answered as f64));
    // Another client address has a bucket of its own.
    let other = client_at("127.0.0.2");
    let reply = dns_ask(&other, to, &query("example.org.", 99));
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
}

#[test]
fn a_cached_answer_is_served_to_any_client_without_the_resolver_until_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gateway = serve_logged(DNS_CACHE, resolver(), Some(&log));
    let to = gateway.local_addr();
    let first = client();
    let reply = dns_ask(&first, to, &query("example.org.", 1));
    assert_eq!(addresses(&reply), ["192.0.2.10"]);
    assert_eq!(gateway.stats().forwarded, 1);
    // Other clients (on either worker), another ID, another case: from the cache.
    for i in 0..6 {
        let c = client();
        // hickory writes names in lowercase: the case is changed on the wire.
        let mut asked = query("example.org.", 100 + i).to_vec().unwrap();
        let name_end = asked.len() - 4;
        let upper = if i % 2 == 0 { 13..20 } else { 21..name_end };
        asked[upper].make_ascii_uppercase();
        let raw = common::ask(&c, to, &asked);
        assert_eq!(raw[12..asked.len()], asked[12..], "the question as asked, in its case");
        let reply = hickory_proto::op::Message::from_vec(&raw).unwrap();
        assert_eq!(reply.metadata.id, 100 + i);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&reply), ["192.0.2.10"]);
    }
    assert_eq!(gateway.stats().forwarded, 1, "six answers from the cache");
    // Less than a second in the cache (or just over, on a slow machine).
    let fresh = reply_ttls(&dns_ask(&first, to, &query("example.org.", 9)));
    assert!(fresh == [60] || fresh == [59], "{fresh:?}");
    // A TTL of 1 s: cached, then gone.
    dns_ask(&first, to, &query("short.example.org.", 2));
    dns_ask(&first, to, &query("short.example.org.", 3));
    assert_eq!(gateway.stats().forwarded, 2);
    std::thread::sleep(Duration::from_millis(1100));
    let reply = dns_ask(&first, to, &query("short.example.org.", 4));
    assert_eq!(addresses(&reply), ["192.0.2.11"]);
    assert_eq!(gateway.stats().forwarded, 3, "expired: asked again");
    // Served from the cache a second later, the answer has aged a second.
    let aged = reply_ttls(&dns_ask(&first, to, &query("example.org.", 10)));
    assert!(
        aged.len() == 1 && (57..=59).contains(&aged[0]),
        "the TTL less the whole seconds in the cache: {aged:?}"
    );
    assert_eq!(gateway.stats().forwarded, 3);
    // Names the resolver refuses are not cached.
    for id in 5..7 {
        let reply = dns_ask(&first, to, &query("elsewhere.test.", id));
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    }
    assert_eq!(gateway.stats().forwarded, 5);
    // What the handler counted (docs/ABI.md, "Metrics"): every forward was a miss.
    let counted = |name: &str, values: &[&str]| common::guest_value(&gateway, name, values);
    assert_eq!(counted("dns_cache_lookups", &["miss"]), Some(5.0));
    assert_eq!(counted("dns_cache_lookups", &["hit"]), Some(9.0));
    assert_eq!(counted("dns_cache_stored", &[]), Some(3.0));
    // And each query's access log line says which (once the writer has them all).
    drop(gateway);
    let text = std::fs::read_to_string(&log).unwrap();
    let notes = |note: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("\"note\":\"{note}\"")))
            .count()
    };
    assert_eq!((notes("cache hit"), notes("cache miss")), (9, 5), "{text}");
}

/// The TTLs of an answer's records.
fn reply_ttls(m: &hickory_proto::op::Message) -> Vec<u32> {
    m.answers.iter().map(|r| r.ttl).collect()
}
