//! The state handlers share (`state_*`, `limit`, `penalize`), over real UDP on
//! loopback: shared by a listener's workers, kept across reloads and traps,
//! bounded, and refusing what is too big with its code.

use crate::common;
use crate::common::fixtures::{command, commands};

use common::{Served, ask, client, sample, scrape, write_file};

#[test]
fn the_binary_takes_state_bounds_and_reports_state_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "commands.wat", commands("bin").as_bytes());
    let served = Served::start(&[
        "--module",
        &module,
        "--max-reply-ratio",
        "0",
        "--state-max-entries",
        "4",
        "--state-max-bytes",
        "1MiB",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let socket = client();
    let code = |op, arg, key: &[u8]| {
        let reply = ask(&socket, served.addr, &command(op, arg, key, b""));
        i32::from_le_bytes(reply[..4].try_into().unwrap())
    };
    for (i, key) in [b"a", b"b", b"c", b"d", b"e"].iter().enumerate() {
        assert_eq!(code(b's', 60_000 + i as i32, &key[..]), 0);
    }
    // Rate 1/s, burst 3: three allowed, then denied.
    let results: Vec<i32> = (0..5).map(|_| code(b'l', 1, b"client")).collect();
    assert_eq!(results, [1, 1, 1, 0, 0]);
    let body = scrape(served.metrics_addr());
    assert!(
        sample(&body, r#"wasmgate_state_entries{listener="default"}"#) <= 4.0,
        "{body}"
    );
    assert!(sample(&body, r#"wasmgate_state_bytes{listener="default"}"#) > 0.0);
    assert!(sample(&body, r#"wasmgate_state_evictions_total{listener="default"}"#) >= 1.0);
    assert_eq!(
        sample(&body, r#"wasmgate_limit_total{listener="default",result="allowed"}"#),
        3.0
    );
    assert_eq!(
        sample(&body, r#"wasmgate_limit_total{listener="default",result="denied"}"#),
        2.0
    );
}

#[test]
fn a_bad_state_flag_is_refused_with_the_reason() {
    let (code, _, err) = common::run_to_end(&["--state-max-bytes", "lots"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--state-max-bytes") && err.contains("lots"), "{err}");
}
