//! `--candidate`: a second module shadowing the active one on real UDP
//! traffic (clients and upstreams see only the active's behaviour, verdicts
//! compared and counted), canaried for a stable share of clients, promoted
//! after N clean datagrams or by SIGUSR1, rolled back when it traps or loops.

use crate::common;
use crate::common::fixtures::{start, with_candidate};

use std::time::Duration;

use common::{Served, ask, client, run_to_end, sample, scrape, signal, wait_until, write_file};
use wasmgate::gateway::Gateway;

const ECHO: &str = include_str!("../../examples/echo.wat");
fn shadowed(gateway: &Gateway) -> u64 {
    gateway.stats().shadow.iter().sum()
}

#[test]
fn clients_see_only_the_active_replies_and_every_shadowed_datagram_is_judged_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mismatches = dir.path().join("mismatches.pcapng");
    let spec = with_candidate(dir.path(), ECHO, |c| c.mismatches = Some(mismatches.clone()));
    let gateway = start(wasmgate::DEFAULT_GUEST_WASM, spec);
    let socket = client();
    // 30 with lowercase letters (the echo differs), 20 without (it agrees).
    for i in 0..30 {
        let m = format!("hello {i}");
        assert_eq!(
            ask(&socket, gateway.local_addr(), m.as_bytes()),
            m.to_uppercase().as_bytes()
        );
    }
    for i in 0..20 {
        let m = format!("HELLO {i}");
        assert_eq!(ask(&socket, gateway.local_addr(), m.as_bytes()), m.as_bytes());
    }
    wait_until("50 shadowed datagrams", || shadowed(&gateway) == 50);
    let stats = gateway.stats();
    assert_eq!(stats.shadow, [20, 30, 0, 0]);
    assert_eq!(stats.shadow_skipped, 0);
    assert!(
        gateway.publisher().candidate().is_some(),
        "a mismatch alone does not unload it"
    );
    drop(gateway);

    // The mismatches replay as a regression test: the echo differs on each.
    let file = mismatches.display().to_string();
    let (code, out, err) = run_to_end(&[
        "replay",
        &file,
        "--module",
        &dir.path().join("candidate.wat").display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("replayed 30 client datagrams"), "{out}");
    assert!(out.contains("same: 0  different: 30"), "{out}");
    let (code, out, err) = run_to_end(&["replay", &file, "--module", "guest/uppercase.wasm"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn sighup_reloads_the_active_and_the_candidate_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let active = write_file(dir.path(), "active.wat", ECHO.as_bytes());
    let candidate = write_file(dir.path(), "candidate.wat", ECHO.as_bytes());
    let served = Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--module",
        &active,
        "--candidate",
        &candidate,
        "--no-watch",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = served.metrics_addr();
    let sha = |role: &str| -> String {
        let body = scrape(metrics);
        let line = body
            .lines()
            .find(|l| l.starts_with("wasmgate_module_info") && l.contains(&format!(r#"role="{role}""#)))
            .unwrap_or_else(|| panic!("no {role} in {body}"))
            .to_string();
        line.split("sha256=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string()
    };
    let (active_before, candidate_before) = (sha("active"), sha("candidate"));
    let socket = client();
    assert_eq!(ask(&socket, served.addr, b"abc"), b"abc");
    // Both files change; with --no-watch only SIGHUP takes them.
    std::fs::copy("guest/uppercase.wasm", &active).unwrap();
    std::fs::write(&candidate, format!("{ECHO}\n;; v2\n")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ask(&socket, served.addr, b"abc"),
        b"abc",
        "nothing reloaded before SIGHUP"
    );
    signal(served.child.id(), "HUP");
    wait_until("both roles reloaded", || {
        sha("active") != active_before && sha("candidate") != candidate_before
    });
    assert_eq!(ask(&socket, served.addr, b"abc"), b"ABC");
}

#[test]
fn sigusr1_promotes_and_metrics_show_both_roles() {
    let dir = tempfile::tempdir().unwrap();
    let echo = write_file(dir.path(), "echo.wat", ECHO.as_bytes());
    let served = Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--candidate",
        &echo,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = served.metrics_addr();
    let body = scrape(metrics);
    assert!(
        body.contains(r#"role="active",module="<embedded uppercase guest>""#),
        "{body}"
    );
    assert!(body.contains(&format!(r#"role="candidate",module="{echo}""#)), "{body}");
    let socket = client();
    assert_eq!(ask(&socket, served.addr, b"abc"), b"ABC");
    wait_until("the shadow's count", || {
        sample(
            &scrape(metrics),
            r#"wasmgate_shadow_total{listener="default",result="mismatch"}"#,
        ) == 1.0
    });

    signal(served.child.id(), "USR1");
    let line = served.line_with(&["candidate promoted"]).expect("a promotion line");
    assert!(line.contains("previous=") && line.contains("sha256="), "{line}");
    assert_eq!(ask(&socket, served.addr, b"abc"), b"abc");
    let body = scrape(metrics);
    assert!(body.contains(&format!(r#"role="active",module="{echo}""#)), "{body}");
    assert!(!body.contains(r#"role="candidate""#), "{body}");

    // Editing the candidate file loads it as the next candidate.
    std::fs::write(&echo, format!("{ECHO}\n;; v3\n")).unwrap();
    served
        .line_with(&["reloaded", "role=\"candidate\""])
        .expect("the candidate reloaded");
    wait_until("a candidate again", || scrape(metrics).contains(r#"role="candidate""#));
}

#[test]
fn bad_candidate_flags_are_refused_with_the_reason() {
    let (code, _, err) = run_to_end(&["--canary-percent", "10"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--candidate"), "{err}");
    let (code, _, err) = run_to_end(&["--candidate", "examples/echo.wat", "--canary-percent", "101"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("101 is not a percentage"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(dir.path(), "bad.wat", b"(module");
    let (code, _, err) = run_to_end(&["--listen", "127.0.0.1:0", "--candidate", &bad]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--candidate") && err.contains("bad.wat"), "{err}");
}
