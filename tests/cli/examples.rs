//! Every shipped example handler, run from its committed `.wasm` through a real
//! gateway over UDP: C (freestanding), AssemblyScript, the Rust SDK's DNS
//! responder, and WASI commands in C and Rust. No wasm toolchain is needed.

use crate::common;

use std::time::Duration;

use common::{Served, ask, assert_silent, client};

fn example(path: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn wasi_stderr_reaches_the_gateway_log() {
    let sort = format!("{}/examples/wasi-c/sort.wasm", env!("CARGO_MANIFEST_DIR"));
    let served = Served::start(&["--listen", "127.0.0.1:0", "--workers", "1", "--module", &sort]);
    let c = client();
    c.send_to(b"x\0y", served.addr).unwrap();
    assert_silent(&c, Duration::from_millis(100));
    let line = served
        .line_with(&["stderr:"])
        .expect("a log line for the program's stderr");
    assert!(
        line.contains("sort: binary input") && line.contains("status=1"),
        "{line}"
    );
}

#[test]
fn a_serving_gateway_reloads_from_abi_v1_to_a_wasi_command_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handler.wasm");
    let swap_to = |module: &str| {
        let tmp = dir.path().join("next.tmp");
        std::fs::write(&tmp, example(module)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    swap_to("examples/c/checksum.wasm");
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", path.to_str().unwrap()]);
    let c = client();
    assert_eq!(ask(&c, served.addr, b"123456789"), b"cbf43926");

    // Each swap is served within a few seconds; until then the old module answers.
    let until_reply = |request: &[u8], expected: &[u8]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if ask(&c, served.addr, request) == expected {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{expected:?} never came");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    swap_to("examples/wasi-c/sort.wasm");
    until_reply(b"b\na\n", b"a\nb\n");
    swap_to("examples/assemblyscript/base64.wasm");
    until_reply(b"foobar", b"Zm9vYmFy");
    // The process's one engine has an instance pool whatever module a listener
    // started with, so the WASI command got its fresh instances from it.
    let lines = served
        .lines_until(&["reloaded", "abi-v1"])
        .expect("the reload to base64 logged");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reloaded") && l.contains("wasi-command")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("no instance pool")), "{lines:#?}");
    drop(served);
}
