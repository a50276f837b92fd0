//! A real DNS server for the DNS examples' tests (hickory-server on a loopback
//! port of its choosing), and DNS messages to send through a gateway.

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr as _;
use std::sync::Arc;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

use super::ask;

/// An A record: name, address, TTL in seconds.
pub type ARecord = (&'static str, [u8; 4], u32);

/// A zone with an SOA and `records`.
fn zone(origin: &str, records: &[ARecord]) -> (LowerName, InMemoryZoneHandler) {
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
    for &(name, [a, b, c, d], ttl) in records {
        let name = Name::from_str(name).unwrap();
        assert!(zone.upsert_mut(Record::from_rdata(name, ttl, RData::A(A::new(a, b, c, d))), 1));
    }
    (LowerName::new(&origin), zone)
}

/// Starts hickory-server serving `zones` (origin, records) on a loopback port
/// of its choosing. It runs until the test process ends.
pub fn dns_server(zones: &[(&'static str, &[ARecord])]) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let zones: Vec<(LowerName, InMemoryZoneHandler)> = zones.iter().map(|(o, r)| zone(o, r)).collect();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut catalog = Catalog::new();
            for (origin, handler) in zones {
                catalog.upsert(origin, vec![Arc::new(handler)]);
            }
            let mut server = Server::new(catalog);
            server.register_socket(tokio::net::UdpSocket::from_std(socket).unwrap());
            let _ = server.block_until_done().await;
        });
    });
    addr
}

/// A recursive query for `name`'s A records.
pub fn query(name: &str, id: u16) -> Message {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    q
}

/// Sends `q` and parses the reply, failing the test if none comes.
pub fn dns_ask(c: &UdpSocket, to: SocketAddr, q: &Message) -> Message {
    let reply = ask(c, to, &q.to_vec().unwrap());
    Message::from_vec(&reply).unwrap_or_else(|e| panic!("unparseable DNS reply {reply:02x?}: {e}"))
}

/// The answer's records, as text.
pub fn addresses(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}
