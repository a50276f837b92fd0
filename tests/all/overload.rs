//! Under overload the gateway sheds by count: what the kernel cannot queue is
//! dropped there and counted, and nothing piles up inside the gateway.

use crate::common;

use common::{ask, client, start_with};
use wasmgate::config::Limits;

#[test]
fn a_flood_past_the_socket_queue_is_shed_and_every_datagram_accounted_for() {
    // About 50 µs of work per datagram: far slower than the client can send.
    let slow = br#"(module
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (local $i i32)
            (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
                     (br_if $l (i32.lt_u (local.get $i) (i32.const 50000))))
            (i64.extend_i32_u (local.get $len))))"#;
    let mut config = common::config();
    config.workers = 1;
    // A generous budget: on a loaded machine a descheduled worker must not turn
    // this accounting test into a timeout test.
    let limits = Limits {
        timeout: std::time::Duration::from_secs(1),
        ..Limits::default()
    };
    let gateway = start_with(slow, limits, config);
    let addr = gateway.local_addr();
    let flood = client();
    const SENT: u64 = 20_000;
    let payload = [b'x'; 1000];
    for _ in 0..SENT {
        flood.send_to(&payload, addr).unwrap();
    }
    // The probe queues behind what the kernel kept, and carries its final drop count.
    let probe = client();
    assert_eq!(ask(&probe, addr, b"probe"), b"probe");
    let stats = gateway.shutdown();
    assert!(
        stats.queue_overflows > 0,
        "the flood fit the queue; nothing was shed: {stats}"
    );
    assert_eq!(stats.received + stats.queue_overflows, SENT + 1, "{stats}");
    assert_eq!(stats.replied + stats.dropped_total(), stats.received, "{stats}");
}
