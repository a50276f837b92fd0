//! The Rust guest SDK (`guest/sdk`), through its test guest `guest/sdk-probe.wasm`
//! run by the built binary: the handler macro, replies built in place or in the
//! reply buffer, no reply, the peer, logging, and panics.

mod common;

use std::time::Duration;

use common::{Served, ask, assert_silent, client, client_on};

fn probe() -> Served {
    let module = format!("{}/guest/sdk-probe.wasm", env!("CARGO_MANIFEST_DIR"));
    Served::start(&["--listen", "127.0.0.1:0", "--workers", "1", "--module", &module])
}

/// Waits for a log line containing every one of `words`.
fn log_line(served: &Served, words: &[&str]) -> String {
    served
        .line_with(words)
        .unwrap_or_else(|| panic!("no log line with {words:?}"))
}

#[test]
fn sdk_handlers_echo_build_replies_and_stay_silent() {
    let served = probe();
    let c = client();
    assert_eq!(ask(&c, served.addr, b"hello there"), b"hello there");
    assert_eq!(ask(&c, served.addr, b""), b"", "an empty datagram is an empty reply");
    let long = vec![b'q'; 65_507];
    assert_eq!(ask(&c, served.addr, &long), long, "the largest datagram, whole");
    assert_eq!(ask(&c, served.addr, b"build 20"), vec![b'x'; 20]);
    assert_eq!(ask(&c, served.addr, b"build 0"), b"");
    c.send_to(b"silent", served.addr).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    assert_eq!(ask(&c, served.addr, b"after"), b"after");
}

#[test]
fn sdk_context_knows_the_peer_over_ipv4_and_ipv6() {
    let served = probe();
    let c = client();
    let me = c.local_addr().unwrap().to_string();
    // Padded so that the reply stays within 3× the request.
    assert_eq!(ask(&c, served.addr, b"peer please"), me.as_bytes());
    assert_eq!(ask(&c, served.addr, b"peer-text please"), me.as_bytes());

    let module = format!("{}/guest/sdk-probe.wasm", env!("CARGO_MANIFEST_DIR"));
    let v6 = Served::start(&["--listen", "[::1]:0", "--workers", "1", "--module", &module]);
    let c6 = client_on("[::1]:0");
    let me6 = c6.local_addr().unwrap().to_string();
    assert!(me6.starts_with("[::1]:"), "{me6}");
    assert_eq!(ask(&c6, v6.addr, b"peer please"), me6.as_bytes());
}

#[test]
fn sdk_log_and_panic_reach_the_gateway_log() {
    let served = probe();
    let c = client();
    assert_eq!(ask(&c, served.addr, b"log a line from the guest"), b"logged");
    log_line(&served, &["INFO", "a line from the guest"]);
    log_line(&served, &["WARN", "formatted: 21 bytes"]);

    c.send_to(b"panic", served.addr).unwrap();
    assert_silent(&c, Duration::from_millis(200));
    let line = log_line(&served, &["handler panicked at"]);
    assert!(line.contains("sdk-probe/src/lib.rs:"), "the panic's place: {line}");
    log_line(&served, &["reason=trap"]);
    assert_eq!(ask(&c, served.addr, b"still here"), b"still here");
}
