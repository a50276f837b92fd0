//! Defects a hostile review found, each reproduced against the built binary:
//! forged log lines, log floods outside the rate limit, files that are not files,
//! unbounded configuration, a metrics endpoint that holds connections, and more.
//! Each test here failed on the code before its fix.

use crate::common;

use std::time::Duration;

use common::client;

/// Replies with the client's address as `wasmgate.peer` gives it.
const PEER: &[u8] = br#"(module
    (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "alloc") (param i32) (result i32) i32.const 0)
    (func (export "handle") (param i32 i32) (result i64)
        (i64.or (i64.const 0x0000040000000000)
                (i64.extend_i32_u (call $peer (i32.const 1024) (i32.const 64))))))"#;

#[test]
fn an_ipv4_client_of_a_dual_stack_listener_is_shown_its_ipv4_address() {
    let gateway = common::start_with(
        PEER,
        wasmgate::config::Limits::default(),
        wasmgate::config::ListenerSpec {
            listen: "[::]:0".parse().unwrap(),
            max_reply_ratio: 0.0,
            ..common::config()
        },
    );
    let c = client();
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], gateway.local_addr().port()));
    c.send_to(b"who", to).unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = c.recv_from(&mut buf).expect("a reply over IPv4");
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        c.local_addr().unwrap().to_string()
    );
}

#[test]
#[ignore = "needs CAP_NET_RAW for a raw socket; .ci/run runs it as root with --ignored"]
fn a_reply_that_cannot_be_sent_is_counted_and_serving_goes_on() {
    // The reply to port 0 fails in sendmmsg (EINVAL): counted as a send error, and
    // the datagrams around it, in the same batch or not, are answered. Port 0 is
    // denied by default (`denied_source`), so every port is allowed here to reach
    // the send.
    for batch in [32, 1] {
        let gateway = common::start_with(
            wasmgate::DEFAULT_GUEST_WASM,
            wasmgate::config::Limits::default(),
            wasmgate::config::ListenerSpec {
                workers: 1,
                batch,
                deny_source_ports: wasmgate::net::source_filter::PortSet::none(),
                ..common::config()
            },
        );
        let addr = gateway.local_addr();
        let c = client();
        for _ in 0..3 {
            // Port 0: no ordinary socket can send from it.
            common::send_spoofed(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), addr, b"nowhere");
            c.send_to(b"chen", addr).unwrap();
        }
        for _ in 0..3 {
            assert_eq!(common::recv(&c, addr), b"CHEN");
        }
        std::thread::sleep(Duration::from_millis(100));
        let stats = gateway.shutdown();
        assert_eq!(
            stats.dropped(wasmgate::verdict::DropReason::SendError),
            3,
            "batch {batch}: {stats}"
        );
        assert_eq!((stats.received, stats.replied), (6, 3), "batch {batch}: {stats}");
    }
}
