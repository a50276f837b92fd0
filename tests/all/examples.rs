//! Every shipped example handler, run from its committed `.wasm` through a real
//! gateway over UDP: C (freestanding), AssemblyScript, the Rust SDK's DNS
//! responder, and WASI commands in C and Rust. No wasm toolchain is needed.

use crate::common;

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::Duration;

use common::{ask, assert_silent, client, config, start, start_with};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use wasmgate::config::Limits;
use wasmgate::verdict::DropReason;

fn example(path: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// CRC-32 (IEEE), bit by bit: the reference the C example is checked against.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Base64 with padding (RFC 4648 §4), the reference for the AssemblyScript example.
fn base64(data: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    out
}

/// Bytes that are not text, the same in every run.
fn binary(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn c_checksum_replies_with_the_crc32_of_the_datagram() {
    let gateway = start(&example("examples/c/checksum.wasm"));
    let (addr, c) = (gateway.local_addr(), client());
    assert_eq!(ask(&c, addr, b"123456789"), b"cbf43926", "the CRC-32 check value");
    for len in [3, 100, 1400, 65_507] {
        let data = binary(len);
        let expected = format!("{:08x}", crc32(&data));
        assert_eq!(ask(&c, addr, &data), expected.as_bytes(), "{len} bytes");
    }
    // Eight hex digits for two bytes is over the default 3× reply ratio.
    c.send_to(b"ab", addr).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    let stats = gateway.shutdown();
    assert_eq!(stats.dropped(DropReason::Amplification), 1, "{stats}");
    assert_eq!(stats.replied, 5, "{stats}");
}

#[test]
fn assemblyscript_base64_encodes_like_rfc_4648() {
    let gateway = start(&example("examples/assemblyscript/base64.wasm"));
    let (addr, c) = (gateway.local_addr(), client());
    // RFC 4648 §10 test vectors ("f" alone would be a 4× reply: over the ratio).
    for (plain, encoded) in [
        ("", ""),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(ask(&c, addr, plain.as_bytes()), encoded.as_bytes(), "{plain:?}");
    }
    for len in [1000, 1001, 1002, 49_128] {
        let data = binary(len);
        assert_eq!(ask(&c, addr, &data), base64(&data), "{len} bytes");
    }
    // 49,129 bytes encode to 65,508: one byte over the largest datagram.
    c.send_to(&binary(49_129), addr).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    let stats = gateway.shutdown();
    assert_eq!(stats.dropped(DropReason::Oversize), 1, "{stats}");
    assert_eq!(stats.dropped_total(), 1, "{stats}");
}

fn dns_query(name: &str, kind: RecordType, id: u16) -> Message {
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name).unwrap(), kind));
    query
}

fn dns_ask(c: &std::net::UdpSocket, addr: SocketAddr, query: &Message) -> Message {
    let reply = ask(c, addr, &query.to_vec().unwrap());
    Message::from_vec(&reply).unwrap_or_else(|e| panic!("unparseable DNS reply {reply:02x?}: {e}"))
}

#[test]
fn dns_example_answers_a_queries_under_wasmgate_test_with_127_0_0_1() {
    let gateway = start(&example("examples/dns/dns.wasm"));
    let (addr, c) = (gateway.local_addr(), client());
    for (i, name) in ["host.wasmgate.test.", "a.b.c.WasmGate.TEST.", "wasmgate.test."]
        .into_iter()
        .enumerate()
    {
        let query = dns_query(name, RecordType::A, 0x1000 + i as u16);
        let reply = dns_ask(&c, addr, &query);
        let m = &reply.metadata;
        assert_eq!(m.id, query.metadata.id, "{name}");
        assert_eq!(m.message_type, MessageType::Response, "{name}");
        assert_eq!(m.op_code, OpCode::Query, "{name}");
        assert!(m.authoritative && m.recursion_desired && !m.truncation, "{name}: {m:?}");
        assert_eq!(m.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(reply.queries, query.queries, "{name}: the question is echoed");
        assert_eq!(reply.answers.len(), 1, "{name}: {reply:?}");
        let answer = &reply.answers[0];
        assert_eq!(answer.name, Name::from_str(name).unwrap(), "{name}");
        assert_eq!(answer.dns_class, DNSClass::IN);
        assert_eq!(answer.ttl, 60);
        assert_eq!(answer.data, RData::A("127.0.0.1".parse().unwrap()), "{name}");
        assert!(reply.edns.is_none(), "no OPT record was asked for");
    }
    drop(gateway);
}

#[test]
fn dns_example_says_nxdomain_outside_the_zone_and_nodata_with_an_soa_for_other_types() {
    let gateway = start(&example("examples/dns/dns.wasm"));
    let (addr, c) = (gateway.local_addr(), client());

    for name in ["example.com.", "wasmgate.test.example.", "test."] {
        let reply = dns_ask(&c, addr, &dns_query(name, RecordType::A, 7));
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(reply.answers.is_empty(), "{name}");
        assert_eq!(reply.queries.len(), 1, "{name}");
    }

    let reply = dns_ask(&c, addr, &dns_query("host.wasmgate.test.", RecordType::AAAA, 8));
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty(), "NODATA: {reply:?}");
    assert_eq!(reply.authorities.len(), 1, "{reply:?}");
    let soa = &reply.authorities[0];
    assert_eq!(soa.name, Name::from_str("wasmgate.test.").unwrap());
    let RData::SOA(soa) = &soa.data else {
        panic!("not an SOA: {soa:?}")
    };
    assert_eq!(soa.mname, Name::from_str("ns.wasmgate.test.").unwrap());
    assert_eq!(soa.rname, Name::from_str("hostmaster.wasmgate.test.").unwrap());
    assert_eq!(soa.minimum, 60);

    // What dig sends by default: an EDNS OPT record, which is answered with one.
    let mut query = dns_query("edns.wasmgate.test.", RecordType::A, 9);
    query.set_edns(Edns::new());
    let reply = dns_ask(&c, addr, &query);
    assert_eq!(reply.answers.len(), 1, "{reply:?}");
    let edns = reply.edns.expect("an OPT record in the reply");
    assert_eq!((edns.version(), edns.max_payload()), (0, 1232));
    drop(gateway);
}

#[test]
fn dns_example_refuses_malformed_queries_and_ignores_responses() {
    let gateway = start(&example("examples/dns/dns.wasm"));
    let (addr, c) = (gateway.local_addr(), client());
    let query = dns_query("host.wasmgate.test.", RecordType::A, 42).to_vec().unwrap();

    // The question cut short: FORMERR, with the ID echoed.
    let reply = Message::from_vec(&ask(&c, addr, &query[..query.len() - 3])).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(reply.metadata.id, 42);

    // A compression pointer in the question: FORMERR.
    let mut pointer = query[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let reply = Message::from_vec(&ask(&c, addr, &pointer)).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // An opcode other than QUERY (here STATUS, 2): NOTIMP.
    let mut status = query.clone();
    status[2] = (status[2] & 0x87) | (2 << 3);
    let reply = Message::from_vec(&ask(&c, addr, &status)).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);

    // Too short for a header, or itself a response: no reply at all.
    c.send_to(b"hello", addr).unwrap();
    let mut response = query.clone();
    response[2] |= 0x80;
    c.send_to(&response, addr).unwrap();
    assert_silent(&c, Duration::from_millis(200));

    let stats = gateway.shutdown();
    assert_eq!(stats.dropped(DropReason::NoReply), 2, "{stats}");
    assert_eq!(stats.dropped_total(), 2, "{stats}");
}

#[test]
fn wasi_c_sort_sorts_the_lines_of_the_datagram() {
    // Sorting 5,000 lines in a fresh instance can pass the default 10 ms on a busy
    // machine; this test is about the sorting, so the budget is generous.
    let limits = Limits {
        timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let gateway = start_with(&example("examples/wasi-c/sort.wasm"), limits, config());
    let (addr, c) = (gateway.local_addr(), client());
    assert_eq!(ask(&c, addr, b"pear\napple\nfig\n"), b"apple\nfig\npear\n");
    assert_eq!(ask(&c, addr, b"b\na"), b"a\nb", "no final newline in, none out");
    assert_eq!(ask(&c, addr, b""), b"", "an empty datagram is an empty reply");
    let many: Vec<String> = (0..5000).map(|i| format!("line {:05}", (i * 7919) % 5000)).collect();
    let mut sorted = many.clone();
    sorted.sort();
    assert_eq!(ask(&c, addr, many.join("\n").as_bytes()), sorted.join("\n").as_bytes());
    // Binary input: the program exits 1, so nothing is sent.
    c.send_to(b"b\0a", addr).unwrap();
    assert_silent(&c, Duration::from_millis(300));
    assert_eq!(ask(&c, addr, b"z\ny"), b"y\nz", "the next datagram is served");
    let stats = gateway.shutdown();
    assert_eq!(stats.dropped(DropReason::NoReply), 1, "{stats}");
    assert_eq!(stats.dropped_total(), 1, "{stats}");
}

#[test]
fn wasi_rust_whoami_tells_each_client_its_address() {
    let gateway = start(&example("examples/wasi-rust/whoami.wasm"));
    let addr = gateway.local_addr();
    for _ in 0..3 {
        let c = client();
        let me = c.local_addr().unwrap().to_string();
        assert_eq!(ask(&c, addr, b"whoami\n"), me.as_bytes());
        c.send_to(b"who are you", addr).unwrap();
        assert_silent(&c, Duration::from_millis(100));
    }
    let stats = gateway.shutdown();
    assert_eq!((stats.replied, stats.dropped(DropReason::NoReply)), (3, 3), "{stats}");
}

#[test]
fn the_same_example_serves_with_isolation_fresh_and_small_limits() {
    // A WASI command is a fresh instance per datagram whatever the isolation; the
    // ABI v1 examples must work with fresh instances and a tight memory cap too.
    let limits = Limits {
        max_memory: 4 << 20,
        ..Limits::default()
    };
    let mut cfg = config();
    cfg.isolation = wasmgate::config::Isolation::Fresh;
    for (path, request, reply) in [
        ("examples/wasi-c/sort.wasm", &b"b\na"[..], &b"a\nb"[..]),
        ("examples/c/checksum.wasm", b"123456789", b"cbf43926"),
        ("examples/assemblyscript/base64.wasm", b"foobar", b"Zm9vYmFy"),
    ] {
        let gateway = start_with(&example(path), limits, cfg.clone());
        assert_eq!(ask(&client(), gateway.local_addr(), request), reply, "{path}");
    }
}
