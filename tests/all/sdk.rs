//! The Rust guest SDK (`guest/sdk`), through its test guest `guest/sdk-probe.wasm`
//! run by the built binary: the handler macro, replies built in place or in the
//! reply buffer, no reply, the peer, logging, and panics.

use crate::common;

use std::time::Duration;

use common::{Service, ask, assert_silent, client, client_on};

fn probe() -> Service {
    probe_with(&[])
}

fn probe_with(extra: &[&str]) -> Service {
    let module = format!("{}/guest/sdk-probe.wasm", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1", "--module", &module];
    args.extend_from_slice(extra);
    Service::start(&args)
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
    let v6 = Service::start(&["--listen", "[::1]:0", "--workers", "1", "--module", &module]);
    let c6 = client_on("[::1]:0");
    let me6 = c6.local_addr().unwrap().to_string();
    assert!(me6.starts_with("[::1]:"), "{me6}");
    assert_eq!(ask(&c6, v6.addr, b"peer please"), me6.as_bytes());
}

#[test]
fn sdk_forward_forward_key_send_and_on_reply_with_typed_errors() {
    let (a, b) = (common::Upstream::echo("a:"), common::Upstream::echo("b:"));
    let pool = format!("backend={},{}", a.addr, b.addr);
    let served = probe_with(&["--upstream", &pool, "--max-reply-ratio", "0"]);
    let c = client();
    // forward: the answer comes back through `on_reply`, which names the endpoint.
    let reply = String::from_utf8(ask(&c, served.addr, b"fwd backend hello")).unwrap();
    let (via, data) = reply
        .split_once(' ')
        .map(|(v, rest)| (v, rest.split_once(' ').unwrap()))
        .unwrap();
    assert_eq!(via, "via");
    let endpoint = if data.1 == "a:hello" { a.addr } else { b.addr };
    assert_eq!(data.0, format!("backend/{endpoint}"), "{reply}");
    // forward_key: one key, one endpoint, whichever client sends it.
    let tags: std::collections::HashSet<String> = (0..6)
        .map(|_| String::from_utf8(ask(&client(), served.addr, b"key backend k-1 x")).unwrap())
        .collect();
    assert_eq!(tags.len(), 1, "{tags:?}");
    // Typed errors.
    assert_eq!(ask(&c, served.addr, b"fwd nowhere x"), b"UnknownPool");
    // send: two datagrams, then the reply.
    c.send_to(b"send hi", served.addr).unwrap();
    for expected in [&b"hi"[..], b"hi", b"sent"] {
        assert_eq!(common::recv(&c, served.addr), expected);
    }
}

#[test]
fn sdk_send_past_the_budget_is_a_typed_error() {
    let served = probe();
    let c = client();
    assert_eq!(ask(&c, served.addr, b"sendbig"), b"Amplification");
}

#[test]
fn sdk_metrics_count_set_and_observe_across_workers() {
    let module = format!("{}/guest/sdk-probe.wasm", env!("CARGO_MANIFEST_DIR"));
    let served = Service::start(&[
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "4",
        "--module",
        &module,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let sizes = [5, 50, 500, 7, 70];
    for i in 0..100 {
        let c = client();
        let label = if i % 4 == 0 { "a" } else { "b" };
        let n = sizes[i % sizes.len()];
        assert_eq!(
            ask(&c, served.addr, format!("metric {label} {n}").as_bytes()),
            b"counted"
        );
    }
    assert_eq!(ask(&client(), served.addr, b"metric a 3"), b"counted");
    assert_eq!(ask(&client(), served.addr, b"badmetric"), b"Invalid");
    let body = common::scrape(served.metrics_addr());
    let get = |series: &str| common::sample(&body, &format!("wasmgate_guest_{series}"));
    let active = "listener=\"default\",role=\"active\"";
    assert_eq!(get(&format!("probe_requests_total{{{active},label=\"a\"}}")), 26.0);
    assert_eq!(get(&format!("probe_requests_total{{{active},label=\"b\"}}")), 75.0);
    assert_eq!(get(&format!("probe_last{{{active}}}")), 3.0);
    assert_eq!(get(&format!("probe_sizes_bucket{{{active},le=\"10\"}}")), 41.0);
    assert_eq!(get(&format!("probe_sizes_bucket{{{active},le=\"100\"}}")), 81.0);
    assert_eq!(get(&format!("probe_sizes_count{{{active}}}")), 101.0);
    assert_eq!(
        get(&format!("probe_sizes_sum{{{active}}}")),
        20.0 * (5.0 + 50.0 + 500.0 + 7.0 + 70.0) + 3.0
    );
    assert_eq!(
        common::sample(
            &body,
            &format!("wasmgate_guest_metrics_refused_total{{{active},reason=\"invalid\"}}")
        ),
        1.0
    );
}
