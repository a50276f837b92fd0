//! The Rust guest SDK (`guest/sdk`), through its test guest `guest/sdk-probe.wasm`
//! run by the built binary: the handler macro, replies built in place or in the
//! reply buffer, no reply, the peer, logging, and panics.

use crate::common;

use std::time::Duration;

use common::{Served, ask, assert_silent, client};

fn probe() -> Served {
    probe_with(&[])
}

fn probe_with(extra: &[&str]) -> Served {
    let module = format!("{}/guest/sdk-probe.wasm", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1", "--module", &module];
    args.extend_from_slice(extra);
    Served::start(&args)
}

/// Waits for a log line containing every one of `words`.
fn log_line(served: &Served, words: &[&str]) -> String {
    served
        .line_with(words)
        .unwrap_or_else(|| panic!("no log line with {words:?}"))
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
