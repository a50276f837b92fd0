//! The seed tutorial's behaviours, with the embedded uppercase guest, over real UDP.

use crate::common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{ask, client, recv, start, upper};
use wasmgate::DEFAULT_GUEST_WASM;
use wasmgate::verdict::DropReason;

#[test]
fn chen_comes_back_as_chen_uppercased() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let c = client();
    assert_eq!(ask(&c, gateway.local_addr(), b"chen"), b"CHEN");
}

/// The seed's four datagrams, sent back to back: four replies, in order, the
/// empty one included.
fn assert_seed_exchange(c: &std::net::UdpSocket, addr: std::net::SocketAddr) {
    for msg in [&b"chen"[..], b"hello", b"world", b""] {
        c.send_to(msg, addr).unwrap();
    }
    let replies: Vec<Vec<u8>> = (0..4).map(|_| recv(c, addr)).collect();
    assert_eq!(replies, [&b"CHEN"[..], b"HELLO", b"WORLD", b""]);
}

#[test]
fn four_datagrams_back_to_back_come_back_as_four_replies_in_order() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr();
    let c = client();
    assert_seed_exchange(&c, addr);
    let stats = gateway.shutdown();
    assert_eq!((stats.received, stats.replied, stats.dropped_total()), (4, 4, 0));
}

#[test]
fn largest_datagram_comes_back_whole_and_uppercased() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let c = client();
    let payload: Vec<u8> = (0..65_507u32).map(|i| (i % 251) as u8).collect();
    let reply = ask(&c, gateway.local_addr(), &payload);
    assert_eq!(reply.len(), 65_507);
    assert_eq!(reply, upper(&payload));
}

#[test]
fn every_byte_value_is_uppercased_like_python_bytes_upper() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let c = client();
    // Lengths around the guest's 16-byte SIMD chunks, so both paths are covered.
    for len in [1usize, 15, 16, 17, 255, 256, 1400, 16_384] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(ask(&c, gateway.local_addr(), &payload), upper(&payload), "length {len}");
    }
}

#[test]
fn hundred_concurrent_clients_each_get_exactly_their_own_replies() {
    const CLIENTS: usize = 100;
    const MESSAGES: usize = 20;
    let gateway = start(DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr();
    let start_line = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start_line = Arc::clone(&start_line);
            std::thread::spawn(move || {
                let c = client();
                start_line.wait();
                for j in 0..MESSAGES {
                    let msg = format!("client {i} message {j} abc");
                    assert_eq!(ask(&c, addr, msg.as_bytes()), upper(msg.as_bytes()));
                }
            })
        })
        .collect();
    // Every client is joined before judging, so that a failure comes with the
    // gateway's counts (a drop says why it was dropped).
    let failed = threads.into_iter().filter_map(|t| t.join().err()).count();
    let stats = gateway.shutdown();
    assert_eq!(failed, 0, "clients got a wrong or missing reply: {stats}");
    let total = (CLIENTS * MESSAGES) as u64;
    assert_eq!((stats.received, stats.replied), (total, total), "{stats}");
}

#[test]
fn ipv6_loopback_is_served_and_oversize_ipv6_datagrams_are_counted() {
    let mut config = common::config();
    config.listen = "[::1]:0".parse().unwrap();
    let gateway = common::start_with(DEFAULT_GUEST_WASM, Default::default(), config);
    let addr = gateway.local_addr();
    let c = common::client_on("[::1]:0");
    assert_eq!(ask(&c, addr, b"over six"), b"OVER SIX");
    // IPv6 carries up to 65,527 payload bytes; more than 65,507 cannot be answered
    // over IPv4-sized replies, so the gateway drops it by count, not by truncating.
    c.send_to(&vec![b'a'; 65_527], addr).unwrap();
    assert_eq!(ask(&c, addr, b"probe"), b"PROBE");
    let stats = gateway.shutdown();
    assert_eq!(stats.dropped(DropReason::Oversize), 1);
    assert_eq!(stats.replied, 2);
}

#[test]
fn a_client_that_vanished_before_its_reply_does_not_stop_the_gateway() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr();
    for _ in 0..20 {
        let gone = client();
        gone.send_to(b"bye", addr).unwrap();
        drop(gone);
    }
    std::thread::sleep(Duration::from_millis(100));
    let c = client();
    assert_eq!(ask(&c, addr, b"still there?"), b"STILL THERE?");
    // Replies to a closed port leave the unconnected socket without error, and the
    // ICMP "port unreachable" that comes back is not reported to an unconnected
    // socket: nothing is a receive or send error here. (A send that does fail is
    // counted: tests/all/hardening.rs, a_reply_that_cannot_be_sent_is_counted….)
    std::thread::sleep(Duration::from_millis(50));
    let stats = gateway.shutdown();
    assert_eq!((stats.received, stats.replied), (21, 21), "{stats}");
    assert_eq!((stats.recv_errors, stats.dropped_total()), (0, 0), "{stats}");
}

#[test]
fn per_datagram_system_calls_serve_the_same_as_batches() {
    let mut config = common::config();
    config.batch = 1;
    let gateway = common::start_with(DEFAULT_GUEST_WASM, Default::default(), config);
    let addr = gateway.local_addr();
    let c = client();
    assert_seed_exchange(&c, addr);
    let big: Vec<u8> = (0..65_507u32).map(|i| (i % 97) as u8).collect();
    assert_eq!(ask(&c, addr, &big), upper(&big));
}

#[test]
fn a_burst_larger_than_a_batch_is_answered_in_order() {
    let gateway = start(DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr();
    let c = client();
    let n = wasmgate::config::DEFAULT_BATCH * 3 + 5;
    for i in 0..n {
        c.send_to(format!("msg {i}").as_bytes(), addr).unwrap();
    }
    for i in 0..n {
        assert_eq!(recv(&c, addr), format!("MSG {i}").as_bytes());
    }
}

#[test]
fn differential_every_length_from_0_to_65507_matches_python_bytes_upper() {
    // Random bytes (a fixed xorshift seed, so a failure can be replayed), sent as
    // one datagram of every length from 0 to 65,507: each window starts at its own
    // offset in a buffer, and its reply must be Python's `bytes.upper()` of it:
    // ASCII a-z raised, every other byte value (UTF-8 included) left alone.
    const MAX: usize = 65_507;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..2 * MAX)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let expected = upper(&data);
    let gateway = start(wasmgate::DEFAULT_GUEST_WASM);
    let addr = gateway.local_addr();
    let c = client();
    let mut buf = vec![0u8; 70_000];
    for len in 0..=MAX {
        let at = (len * 7919) % MAX;
        c.send_to(&data[at..at + len], addr).unwrap();
        let (n, from) = c
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no reply to the {len}-byte datagram: {e}: {}", gateway.stats()));
        assert_eq!(from, addr);
        assert!(
            n == len && buf[..n] == expected[at..at + len],
            "the {len}-byte datagram at offset {at} was not answered with its uppercase"
        );
    }
    let stats = gateway.shutdown();
    assert_eq!(
        (stats.received, stats.replied),
        (MAX as u64 + 1, MAX as u64 + 1),
        "{stats}"
    );
}
