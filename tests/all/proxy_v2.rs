//! wasmgate's PROXY v2 codec against an independent one (the `ppp` crate):
//! what ours writes, `ppp` reads as the same addresses and datagram mode,
//! and what `ppp` writes (TLVs included), ours reads as the same.

use std::net::SocketAddr;

use ppp::v2::{AddressFamily, Addresses, Builder, Command, Header, IPv4, IPv6, Protocol, Type, Version};
use wasmgate::net::proxy_v2::{self, Parsed};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The source and destination `ppp` reads, as socket addresses.
fn ppp_addresses(header: &Header<'_>) -> (SocketAddr, SocketAddr) {
    match header.addresses {
        Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        Addresses::IPv6(a) => (
            SocketAddr::new(a.source_address.to_canonical(), a.source_port),
            SocketAddr::new(a.destination_address.to_canonical(), a.destination_port),
        ),
        ref other => panic!("not an IP header: {other:?}"),
    }
}

#[test]
fn what_wasmgate_writes_ppp_reads_as_the_same_client_in_datagram_mode() {
    for (source, destination) in [
        ("198.51.100.7:40000", "192.0.2.1:53"),
        ("[2001:db8::7]:5353", "[2001:db8::1]:53"),
        ("198.51.100.7:40000", "[2001:db8::1]:53"),
    ] {
        let mut datagram = Vec::new();
        proxy_v2::write(addr(source), addr(destination), &mut datagram);
        let len = datagram.len();
        datagram.extend_from_slice(b"query");
        let header = Header::try_from(&datagram[..]).unwrap_or_else(|e| panic!("{source}: {e:?}"));
        assert_eq!(header.len(), len, "the header ends where the datagram starts");
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(header.protocol, Protocol::Datagram);
        assert_eq!(ppp_addresses(&header), (addr(source), addr(destination)));
        assert_eq!(&datagram[header.len()..], b"query");
    }
}

#[test]
fn what_ppp_writes_wasmgate_reads_tlvs_and_all() {
    let v4 = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Datagram,
        IPv4::new([198, 51, 100, 7], [192, 0, 2, 1], 40000, 53),
    )
    .write_tlv(Type::NoOp, b"padding")
    .unwrap()
    .write_tlv(Type::Authority, b"example.org")
    .unwrap()
    .build()
    .unwrap();
    let source6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let destination6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    let v6 = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Datagram,
        IPv6::new(source6, destination6, 5353, 53),
    )
    .build()
    .unwrap();
    for (header, source, destination) in [
        (v4, "198.51.100.7:40000", "192.0.2.1:53"),
        (v6, "[2001:db8::7]:5353", "[2001:db8::1]:53"),
    ] {
        let mut datagram = header;
        datagram.extend_from_slice(b"answer");
        assert_eq!(
            proxy_v2::parse(&datagram),
            Ok(Parsed::Proxied {
                source: addr(source),
                destination: addr(destination),
                payload: b"answer"
            })
        );
    }
    // LOCAL (a proxy's own health check): no client, the datagram is the proxy's.
    let mut local = Builder::new(
        Version::Two | Command::Local,
        AddressFamily::Unspecified | Protocol::Unspecified,
    )
    .build()
    .unwrap();
    local.extend_from_slice(b"ping");
    assert_eq!(proxy_v2::parse(&local), Ok(Parsed::Local { payload: b"ping" }));
}

// ---- Behind a proxy: the gateway with `proxy_protocol_from`, a test proxy
// whose headers `ppp` builds and whose answers `ppp` reads. ----

use std::net::UdpSocket;
use std::time::Duration;

use crate::common::{self, Upstream, assert_silent, client, client_on, recv, wait_until};
use wasmgate::config::{Limits, ListenerSpec, PoolSpec};
use wasmgate::gateway::Gateway;
use wasmgate::net::proxy_v2::HeaderError;
use wasmgate::verdict::DropReason;

/// Replies with the client's address (`peer`) and whether a quota of one
/// datagram per client (`limit` keyed on that address) still allowed this one:
/// `Y` or `N`.
const PEER_LIMIT: &str = r#"(module
  (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "alloc") (param i32) (result i32) i32.const 1024)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (local $n i32)
    (local.set $n (call $peer (i32.const 100) (i32.const 64)))
    (i32.store8 (i32.add (i32.const 100) (local.get $n))
      (select (i32.const 89) (i32.const 78)
        (i32.eq (call $limit (i32.const 100) (local.get $n) (i32.const 0) (i32.const 1)) (i32.const 1))))
    (i64.or (i64.shl (i64.const 100) (i64.const 32)) (i64.extend_i32_u (i32.add (local.get $n) (i32.const 1))))))"#;

const FORWARD: &str = include_str!("../../examples/forward.wat");

/// The trusted proxy's address: another loopback address than the clients'.
const PROXY_IP: &str = "127.0.0.2";

/// A gateway serving `module` that trusts [`PROXY_IP`] to name its clients.
fn behind_proxy(module: &str, pools: Vec<PoolSpec>) -> Gateway {
    common::start_with(
        module.as_bytes(),
        Limits::default(),
        ListenerSpec {
            proxy_protocol_from: PROXY_IP.parse().unwrap(),
            pools,
            ..common::config()
        },
    )
}

/// The test proxy's socket.
fn proxy() -> UdpSocket {
    client_on(&format!("{PROXY_IP}:0"))
}

/// `payload` behind a v2 header (built by `ppp`) for `client`, which sent it to `service`.
pub(crate) fn relayed(client: &str, service: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (addr(client), service) else {
        panic!("IPv4 only here")
    };
    let mut datagram = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Datagram,
        IPv4::new(*c.ip(), *s.ip(), c.port(), s.port()),
    )
    .build()
    .unwrap();
    datagram.extend_from_slice(payload);
    datagram
}

/// A datagram's v2 header as `ppp` reads it: source, destination, and the payload after it.
fn unwrap_header(datagram: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let header = Header::try_from(datagram).unwrap_or_else(|e| panic!("no v2 header ppp reads: {e:?}"));
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(header.protocol, Protocol::Datagram);
    let (source, destination) = ppp_addresses(&header);
    (source, destination, datagram[header.len()..].to_vec())
}

/// Pads a request so that the reply stays within the reply ratio.
const PAD: &[u8] = b"0123456789abcdef";

#[test]
fn a_client_behind_a_trusted_proxy_is_the_client_for_peer_and_limits_and_answers_go_back_through_it() {
    let gateway = behind_proxy(PEER_LIMIT, Vec::new());
    let service = gateway.local_addr();
    let p = proxy();
    for (client, expected) in [
        ("198.51.100.7:4242", "198.51.100.7:4242Y"),
        // The quota is the real client's, not the proxy's.
        ("198.51.100.7:4242", "198.51.100.7:4242N"),
        ("198.51.100.8:4242", "198.51.100.8:4242Y"),
    ] {
        p.send_to(&relayed(client, service, PAD), service).unwrap();
        let answer = recv(&p, service);
        let (source, destination, payload) = unwrap_header(&answer);
        assert_eq!(source, service, "the header is from the address the client sent to");
        assert_eq!(destination, addr(client), "to the client the proxy named");
        assert_eq!(String::from_utf8_lossy(&payload), expected);
    }
    let s = gateway.stats();
    assert_eq!((s.proxied, s.dropped_total()), (3, 0));
}

#[test]
fn a_header_from_a_source_not_trusted_is_payload_and_names_no_one() {
    let gateway = behind_proxy(PEER_LIMIT, Vec::new());
    let service = gateway.local_addr();
    let spoofer = client();
    let me = spoofer.local_addr().unwrap().to_string();
    let forged = relayed("198.51.100.7:4242", service, PAD);
    spoofer.send_to(&forged, service).unwrap();
    let answer = recv(&spoofer, service);
    assert!(
        !answer.starts_with(&proxy_v2::SIGNATURE),
        "no header to an untrusted source"
    );
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("{me}Y"),
        "the sender is the client"
    );
    // The default guest sees the header's bytes as payload.
    let upper = common::start_with(
        include_bytes!("../../guest/uppercase.wasm"),
        Limits::default(),
        ListenerSpec {
            proxy_protocol_from: PROXY_IP.parse().unwrap(),
            ..common::config()
        },
    );
    assert_eq!(
        common::ask(&spoofer, upper.local_addr(), &forged),
        forged.to_ascii_uppercase()
    );
    assert_eq!(gateway.stats().proxied + upper.stats().proxied, 0);
}

#[test]
fn a_trusted_source_without_a_valid_header_is_dropped_counted_and_the_rest_are_served() {
    let gateway = behind_proxy(PEER_LIMIT, Vec::new());
    let service = gateway.local_addr();
    let p = proxy();
    let whole = relayed("198.51.100.7:4242", service, PAD);
    let mut lying = whole.clone();
    lying[14..16].copy_from_slice(&u16::MAX.to_be_bytes()); // a length past the end
    let mut v1 = b"PROXY UDP4 198.51.100.7 127.0.0.1 4242 53\r\n".to_vec();
    v1.extend_from_slice(PAD);
    for bad in [&b"no header at all"[..], &whole[..20], &lying, &v1, b""] {
        p.send_to(bad, service).unwrap();
    }
    assert_silent(&p, Duration::from_millis(300));
    // Everyone else is still served, the proxy included.
    p.send_to(&whole, service).unwrap();
    let (_, destination, _) = unwrap_header(&recv(&p, service));
    assert_eq!(destination, addr("198.51.100.7:4242"));
    let s = gateway.stats();
    assert_eq!(s.dropped(DropReason::ProxyHeader), 5);
    let errors = |e: HeaderError| s.proxy_header_errors[HeaderError::ALL.iter().position(|x| *x == e).unwrap()];
    assert_eq!(
        errors(HeaderError::Signature),
        3,
        "plain bytes, a v1 header, an empty datagram"
    );
    assert_eq!(errors(HeaderError::Truncated), 2, "cut short, and a length that lies");
}

#[test]
fn the_source_rules_hold_for_the_client_a_proxy_names() {
    let gateway = behind_proxy(PEER_LIMIT, Vec::new());
    let service = gateway.local_addr();
    let p = proxy();
    // Port 53 is in the default deny_source_ports: answering it could start a loop.
    p.send_to(&relayed("198.51.100.7:53", service, PAD), service).unwrap();
    assert_silent(&p, Duration::from_millis(300));
    assert_eq!(gateway.stats().dropped(DropReason::DeniedSource), 1);
}

#[test]
fn proxied_clients_get_sessions_of_their_own_and_upstream_answers_go_back_through_the_proxy() {
    let upstream = Upstream::echo("u:");
    let gateway = behind_proxy(FORWARD, vec![PoolSpec::new("backend", vec![upstream.addr.to_string()])]);
    let service = gateway.local_addr();
    let p = proxy();
    let clients = ["198.51.100.7:41000", "198.51.100.8:42000", "203.0.113.9:43000"];
    for c in clients {
        p.send_to(&relayed(c, service, c.as_bytes()), service).unwrap();
    }
    let mut answered = Vec::new();
    for _ in clients {
        let (source, destination, payload) = unwrap_header(&recv(&p, service));
        assert_eq!(source, service);
        assert_eq!(
            payload,
            [b"u:", destination.to_string().as_bytes()].concat(),
            "each answer to its own client"
        );
        answered.push(destination);
    }
    answered.sort();
    let mut expected: Vec<SocketAddr> = clients.iter().map(|c| addr(c)).collect();
    expected.sort();
    assert_eq!(answered, expected);
    // The upstream saw no header (the pool does not speak it) and one
    // session per real client, not one for the proxy.
    let got = upstream.received();
    assert_eq!(got.len(), 3);
    let sources: std::collections::HashSet<_> = got.iter().map(|(_, from)| *from).collect();
    assert_eq!(sources.len(), 3, "a session each");
    assert!(got.iter().all(|(d, _)| clients.iter().any(|c| d == c.as_bytes())));
    assert_eq!(gateway.stats().sessions_created, 3);
}

/// An upstream that reads PROXY v2 with `ppp`: it records the client each
/// header names, and answers `plain…` without a header, `bad…` with a
/// malformed one, anything else with a header of its own (as `ppp` builds it)
/// before `ok:` and the payload.
struct ProxyAwareUpstream {
    addr: SocketAddr,
    clients: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ProxyAwareUpstream {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let clients: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>> = std::sync::Arc::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, done) = (std::sync::Arc::clone(&clients), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(header) = Header::try_from(&buf[..n]) else {
                    continue;
                };
                let (client, _) = ppp_addresses(&header);
                let payload = buf[header.len()..n].to_vec();
                seen.lock().unwrap().push(client);
                let answer = if payload.starts_with(b"plain") {
                    b"plain answer".to_vec()
                } else if payload.starts_with(b"bad") {
                    let mut bad = proxy_v2::SIGNATURE.to_vec();
                    bad.extend_from_slice(&[0x21, 0x12, 0xff, 0xff, 1, 2, 3]);
                    bad
                } else {
                    [relayed("192.0.2.53:53", client, b"ok:"), payload].concat()
                };
                let _ = socket.send_to(&answer, from);
            }
        });
        Self { addr, clients, stop }
    }
}

impl Drop for ProxyAwareUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_pool_that_speaks_v2_tells_the_upstream_the_real_client_and_takes_the_header_off_answers() {
    let upstream = ProxyAwareUpstream::start();
    let mut pool = PoolSpec::new("backend", vec![upstream.addr.to_string()]);
    pool.proxy_protocol = true;
    let gateway = behind_proxy(FORWARD, vec![pool]);
    let service = gateway.local_addr();

    // A direct client: the upstream is told its address; the header on the
    // answer is taken off.
    let c = client();
    let me = c.local_addr().unwrap();
    assert_eq!(common::ask(&c, service, b"hello there"), b"ok:hello there");
    assert_eq!(
        common::ask(&c, service, b"plain one"),
        b"plain answer",
        "no header: as sent"
    );
    c.send_to(b"bad one", service).unwrap();
    assert_silent(&c, Duration::from_millis(300));
    wait_until("the malformed answer counted", || {
        gateway.stats().upstream_dropped(DropReason::ProxyHeader) == 1
    });

    // A client behind the trusted proxy: the upstream is told the real client.
    let p = proxy();
    p.send_to(&relayed("198.51.100.7:4242", service, b"from afar"), service)
        .unwrap();
    let (_, destination, payload) = unwrap_header(&recv(&p, service));
    assert_eq!(
        (destination, payload.as_slice()),
        (addr("198.51.100.7:4242"), &b"ok:from afar"[..])
    );

    let told = upstream.clients.lock().unwrap().clone();
    assert_eq!(told, [me, me, me, addr("198.51.100.7:4242")]);
}
