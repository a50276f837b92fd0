//! What a client that lies about its address can do, from the second hostile
//! review: loops started by one spoofed datagram (Loop DoS, CVE-2024-2169), the
//! sources a gateway never answers, and what a spoofed source costs.
//! Each test here failed on the code before its fix.

use crate::common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{ask, assert_silent, client, send_spoofed};

#[test]
fn the_flag_and_the_config_file_set_denied_ports_and_refuse_nonsense() {
    let (code, _, err) = common::run_to_end(&["--deny-source-ports", "53,70000"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`70000` is not a port"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_file(
        dir.path(),
        "gw.toml",
        b"[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\ndeny_source_ports = \"9-3\"\n",
    );
    let (code, _, err) = common::run_to_end(&["--config", &config]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("deny_source_ports") && err.contains("empty range"),
        "{err}"
    );

    // Served from flags: a client on a denied port gets nothing.
    let c = client();
    let port = c.local_addr().unwrap().port().to_string();
    let served = common::Served::start(&["--listen", "127.0.0.1:0", "--deny-source-ports", &port]);
    c.send_to(b"x", served.addr).unwrap();
    assert_silent(&c, Duration::from_millis(300));
    assert_eq!(ask(&client(), served.addr, b"y"), b"Y");
}

/// The `received=` count of a gateway process's final stats line, after SIGTERM.
fn received_at_exit(mut served: common::Served) -> u64 {
    let status = common::signal_and_wait(&mut served.child, "TERM", Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    let stopped = served
        .log
        .iter()
        .find(|l| l.contains("stopped"))
        .expect("a final stats line");
    let n = stopped
        .split("received=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next());
    n.and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no received= in {stopped}"))
}

#[test]
#[ignore = "needs CAP_NET_RAW for a raw socket; .ci/run runs it as root with --ignored"]
fn one_datagram_spoofed_between_two_gateway_processes_ends_as_a_loop() {
    // Before: gateways A and B in separate processes (which no local check of
    // one process can see) answered each other 63,989 times in 3 s.
    let a = common::Served::start(&["--listen", "127.0.0.1:0", "--workers", "1"]);
    let b = common::Served::start(&["--listen", "127.0.0.1:0", "--workers", "1"]);
    send_spoofed(a.addr, b.addr, b"LOOP");
    std::thread::sleep(Duration::from_millis(500));
    // Both still serve everyone else.
    assert_eq!(ask(&client(), a.addr, b"a"), b"A");
    assert_eq!(ask(&client(), b.addr, b"b"), b"B");
    let bound = u64::from(wasmgate::gateway::LOOP_AFTER);
    let (at_a, at_b) = (received_at_exit(a), received_at_exit(b));
    // Each gateway's own client, and at most LOOP_AFTER passes of the loop.
    assert!(at_a <= bound + 1, "A received {at_a}");
    assert!(at_b <= bound + 2, "B received {at_b}");
}

/// A UDP socket on 127.0.0.1 bound to a free port outside the ephemeral range
/// (where servers, and gateways, listen): tried from a port that depends on
/// this process, never a fixed one.
fn server_port_socket() -> UdpSocket {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let start = 10_000 + (std::process::id() as u16 % span);
    (0..span)
        .map(|i| 10_000 + (start - 10_000 + i) % span)
        .find_map(|port| UdpSocket::bind(("127.0.0.1", port)).ok())
        .expect("a free port below the ephemeral range")
}

#[test]
fn a_server_socket_of_another_process_on_this_host_is_never_answered() {
    // Before: only this process's own sockets were refused, so gateways in two
    // processes answered each other (63,989 datagrams in 3 s). Here the test
    // process holds the other "server": an unconnected socket on a server port.
    let server = server_port_socket();
    let gw = common::Served::start(&["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    server.send_to(b"loop?", gw.addr).unwrap();
    assert_silent(&server, Duration::from_millis(300));
    let metrics = common::scrape(gw.metrics_addr());
    let denied = common::sample(
        &metrics,
        "wasmgate_datagrams_dropped_total{listener=\"default\",reason=\"denied_source\"}",
    );
    assert_eq!(denied, 1.0, "{metrics}");
    // A client sending from an ephemeral port is answered as ever.
    assert_eq!(ask(&client(), gw.addr, b"hi"), b"HI");
    // A server started after the gateway: its first datagrams may be answered
    // (the gateway reads the host's tables again when one asks, at most once
    // a second), then it is refused.
    let later = server_port_socket();
    later.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    common::wait_until("a server started later to be refused", || {
        later.send_to(b"loop?", gw.addr).unwrap();
        let mut buf = [0u8; 64];
        later.recv_from(&mut buf).is_err()
    });
}

#[test]
#[ignore = "needs CAP_NET_RAW for a raw socket; .ci/run runs it as root with --ignored"]
fn gateways_in_two_processes_on_server_ports_never_answer_each_other() {
    // Two gateway processes listening where servers do: one datagram spoofed
    // from A to B is refused by B at once (A's listener is a server socket of
    // this host), not after the loop guard's 16 passes.
    let ports: Vec<u16> = (0..2)
        .map(|_| server_port_socket())
        .collect::<Vec<_>>()
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let listen = |port: u16| format!("127.0.0.1:{port}");
    let (la, lb) = (listen(ports[0]), listen(ports[1]));
    let a = common::Served::start(&["--listen", &la, "--workers", "1"]);
    let b = common::Served::start(&["--listen", &lb, "--workers", "1"]);
    // B read the host's UDP servers when it started, after A had bound its listener.
    send_spoofed(a.addr, b.addr, b"LOOP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ask(&client(), a.addr, b"a"), b"A");
    assert_eq!(ask(&client(), b.addr, b"b"), b"B");
    let (at_a, at_b) = (received_at_exit(a), received_at_exit(b));
    // Each its own client's datagram; B the spoofed one too, which it refused.
    assert_eq!(at_a, 1, "A received {at_a}");
    assert_eq!(at_b, 2, "B received {at_b}");
}
