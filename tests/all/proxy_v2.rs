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
