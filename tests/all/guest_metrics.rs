//! Metrics a guest defines (docs/ABI.md, "Metrics"), over real UDP and a
//! real scrape: exact values across workers, the series cap, refusals with
//! their codes, reloads and the candidate's series apart.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use crate::common::{self, Served, Service, client, sample, scrape, wait_until, write_file};

const GUEST: &str = include_str!("../guests/metrics.wat");

fn codes(reply: &[u8]) -> Vec<i32> {
    reply
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<i32> {
    codes(&common::ask(socket, to, payload))
}

/// `module` served in-process on a port of its own, with metrics, and `extra` flags.
fn serve(module: &str, extra: &[&str]) -> Service {
    let mut args = vec![
        "--module",
        module,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Service::start(&args)
}

fn series(name: &str, labels: &str) -> String {
    format!("wasmgate_guest_{name}{{listener=\"default\",role=\"active\"{labels}}}")
}

#[test]
fn counters_gauges_and_histograms_are_exact_across_four_workers() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", GUEST.as_bytes());
    let served = serve(&module, &["--workers", "4"]);
    // 400 clients (spread over the workers by their ports), one datagram each.
    // At least 4 bytes: the 12-byte reply must fit 3 × the request.
    let lengths: Vec<usize> = (0..400).map(|i| 4 + (i % 10) * 60 + i % 2).collect();
    for &len in &lengths {
        let c = client();
        assert_eq!(ask(&c, served.addr, &vec![b'x'; len]), [0, 0, 0], "length {len}");
    }
    // The last one alone, so the gauge's last value is known.
    assert_eq!(ask(&client(), served.addr, &[b'x'; 7]), [0, 0, 0]);
    let mut all = lengths.clone();
    all.push(7);
    let body = scrape(served.metrics_addr());
    let even = all.iter().filter(|&&l| l % 2 == 0).count();
    let count = |kind: &str| sample(&body, &series("requests_total", &format!(",kind=\"{kind}\"")));
    assert_eq!(count("even"), even as f64);
    assert_eq!(count("odd"), (all.len() - even) as f64);
    assert_eq!(sample(&body, &series("last_len", "")), 7.0);
    let le = |bound: &str| sample(&body, &series("size_bytes_bucket", &format!(",le=\"{bound}\"")));
    assert_eq!(le("8"), all.iter().filter(|&&l| l <= 8).count() as f64);
    assert_eq!(le("64"), all.iter().filter(|&&l| l <= 64).count() as f64);
    assert_eq!(le("512"), all.iter().filter(|&&l| l <= 512).count() as f64);
    assert_eq!(le("+Inf"), all.len() as f64);
    assert_eq!(sample(&body, &series("size_bytes_count", "")), all.len() as f64);
    assert_eq!(
        sample(&body, &series("size_bytes_sum", "")),
        all.iter().sum::<usize>() as f64
    );
    // Nothing overflowed, nothing was refused.
    assert_eq!(sample(&body, &series("requests_total", ",overflow=\"true\"")), 0.0);
    assert_eq!(
        sample(
            &body,
            "wasmgate_guest_metrics_refused_total{listener=\"default\",role=\"active\",reason=\"invalid\"}"
        ),
        0.0
    );
}

/// `requests` summed over its series (the overflow one too), of `role`.
fn requests(body: &str, role: &str) -> (usize, f64) {
    let prefix = format!("wasmgate_guest_requests_total{{listener=\"default\",role=\"{role}\"");
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    (values.len(), values.iter().sum())
}

#[test]
fn the_series_cap_holds_under_100000_label_values_with_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", GUEST.as_bytes());
    let served = Served::start(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let metrics = served.metrics_addr();
    let c = client();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut own, mut overflowed, mut rss_warm) = (0u32, 0u32, 0);
    const TOTAL: u32 = 100_000;
    const BATCH: u32 = 50;
    let mut buf = [0u8; 64];
    for start in (0..TOTAL).step_by(BATCH as usize) {
        for i in start..start + BATCH {
            c.send_to(format!("#v{i}").as_bytes(), served.addr).unwrap();
        }
        for _ in 0..BATCH {
            let (n, _) = c.recv_from(&mut buf).expect("every datagram is answered");
            match codes(&buf[..n])[..] {
                [0] => own += 1,
                [1] => overflowed += 1,
                ref other => panic!("code {other:?}"),
            }
        }
        if start + BATCH == 20_000 {
            rss_warm = common::rss_kib(served.child.id());
        }
    }
    let rss_end = common::rss_kib(served.child.id());
    let body = scrape(metrics);
    // Each label set its own series until the cap (1,024 of all metrics;
    // the guest updates no other here), then the overflow series.
    assert_eq!(own, 1024, "series given");
    assert_eq!(overflowed, TOTAL - own);
    let (count, sum) = requests(&body, "active");
    assert_eq!(count, 1025, "1,024 label sets and the overflow series");
    assert_eq!(sum, f64::from(TOTAL));
    assert_eq!(
        sample(&body, &series("requests_total", ",overflow=\"true\"")),
        f64::from(overflowed)
    );
    assert_eq!(
        sample(
            &body,
            "wasmgate_guest_metrics_overflowed_total{listener=\"default\",role=\"active\"}"
        ),
        f64::from(overflowed)
    );
    assert!(
        rss_end < rss_warm + 4 * 1024,
        "RSS grew from {rss_warm} KiB after 20,000 label values to {rss_end} KiB after 100,000"
    );
}

#[test]
fn invalid_names_labels_and_values_are_refused_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", GUEST.as_bytes());
    let served = serve(&module, &[]);
    let c = client();
    assert_eq!(ask(&c, served.addr, b"hello"), [0, 0, 0]);
    let long = format!("!{}", "a".repeat(65));
    let invalid: [&[u8]; 11] = [
        b"!bad-name",
        b"!9lives",
        b"!duration_seconds",
        b"!metrics_overflowed",
        b"!x_bucket",
        long.as_bytes(),
        b"?listener",
        b"?a\na",
        b"?__x",
        b"#bad\x01value",
        b"#two\nvalues",
    ];
    for payload in invalid {
        assert_eq!(
            ask(&c, served.addr, payload),
            [-17],
            "{:?}",
            String::from_utf8_lossy(payload)
        );
    }
    // A bucket count past 16 (-1 read as 4,294,967,295) is refused, not a trap.
    assert_eq!(ask(&c, served.addr, b"~x"), [-17]);
    // Defined alike: the same id, however often; `_total` is the counter's suffix.
    let id = ask(&c, served.addr, b"!fine")[0];
    assert!(id >= 0);
    assert_eq!(ask(&c, served.addr, b"!fine_total"), [id]);
    assert!(ask(&c, served.addr, b"?a\nb")[0] >= 0);
    // `requests` has a label; the same module cannot define it without.
    assert_eq!(ask(&c, served.addr, b"!requests"), [-18]);
    // `last_len` is a gauge.
    assert_eq!(ask(&c, served.addr, b"!last_len"), [-18]);
    // Every metric call counts against the datagram's 64 calls (`requests`
    // is defined already): the 65th to the 70th are refused.
    assert_eq!(ask(&c, served.addr, b"*many"), [-8]);
    // Quotes and backslashes are values like others, escaped when exported.
    assert_eq!(ask(&c, served.addr, b"#say \"hi\" \\o/"), [0]);
    let body = scrape(served.metrics_addr());
    let refused = |reason: &str| {
        sample(
            &body,
            &format!(
                "wasmgate_guest_metrics_refused_total{{listener=\"default\",role=\"active\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(refused("invalid"), 12.0);
    assert_eq!(refused("conflict"), 2.0);
    assert_eq!(
        sample(&body, &series("requests_total", ",kind=\"say \\\"hi\\\" \\\\o/\"")),
        1.0
    );
    assert_eq!(sample(&body, &series("requests_total", ",kind=\"many\"")), 64.0);
    assert_eq!(
        sample(
            &body,
            "wasmgate_guest_calls_refused_total{listener=\"default\",reason=\"too_many_calls\"}"
        ),
        6.0
    );
    assert!(!body.contains("bad-name") && !body.contains("bad\u{1}"), "{body}");
}

#[test]
fn metrics_keep_their_values_across_a_reload_while_their_kind_stays() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", GUEST.as_bytes());
    let served = serve(&module, &[]);
    let metrics = served.metrics_addr();
    let c = client();
    let reloads = || sample(&scrape(metrics), "wasmgate_reloads_total{listener=\"default\"}");
    for _ in 0..10 {
        assert_eq!(ask(&c, served.addr, b"even"), [0, 0, 0]);
    }
    // Another module, the same metrics.
    write_file(dir.path(), "metrics.wat", format!(";; v2\n{GUEST}").as_bytes());
    wait_until("the reload", || reloads() == 1.0);
    for _ in 0..5 {
        assert_eq!(ask(&c, served.addr, b"even"), [0, 0, 0]);
    }
    assert_eq!(requests(&scrape(metrics), "active").1, 15.0);
    // `requests` becomes a gauge: a new metric, from 0.
    let gauge = GUEST.replace(
        "(call $define (i32.const 0) (i32.const 0) (i32.const 8)",
        "(call $define (i32.const 1) (i32.const 0) (i32.const 8)",
    );
    assert_ne!(gauge, GUEST);
    write_file(dir.path(), "metrics.wat", gauge.as_bytes());
    wait_until("the second reload", || reloads() == 2.0);
    for _ in 0..3 {
        assert_eq!(ask(&c, served.addr, b"even"), [0, 0, 0]);
    }
    let body = scrape(metrics);
    assert_eq!(requests(&body, "active").0, 0, "the counter is gone:\n{body}");
    assert_eq!(sample(&body, &series("requests", ",kind=\"even\"")), 3.0);
    assert!(body.contains("# TYPE wasmgate_guest_requests gauge"), "{body}");
}

#[test]
fn a_shadowed_candidates_metrics_are_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", GUEST.as_bytes());
    let candidate = write_file(dir.path(), "candidate.wat", format!(";; v2\n{GUEST}").as_bytes());
    let served = serve(&module, &["--candidate", &candidate, "--no-watch"]);
    let metrics = served.metrics_addr();
    let c = client();
    for _ in 0..10 {
        assert_eq!(ask(&c, served.addr, b"even"), [0, 0, 0]);
    }
    let shadowed = || {
        scrape(metrics)
            .lines()
            .filter(|l| l.starts_with("wasmgate_shadow_total{listener=\"default\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    wait_until("the candidate to shadow all 10", || shadowed() == 10.0);
    let body = scrape(metrics);
    assert_eq!(requests(&body, "active"), (2, 10.0), "{body}");
    assert_eq!(requests(&body, "candidate"), (2, 10.0), "{body}");
}

/// A component of the `metered-handler` world: every datagram defines the
/// counter `component_requests{kind}` and adds 1 to the series named by the
/// datagram; the reply is define's and add's result discriminants and add's
/// payload (1: its own series).
const METRICS_COMPONENT: &str = r#"(component
  (import "wasmgate:handler/metrics@0.1.0" (instance $metrics
    (type $me (enum "too-many-calls" "invalid" "conflict" "unknown-metric" "cap"))
    (export "metric-error" (type $me-e (eq $me)))
    (type $mk (enum "counter" "gauge" "histogram"))
    (export "metric-kind" (type $mk-e (eq $mk)))
    (export "define" (func (param "kind" $mk-e) (param "name" string) (param "labels" (list string))
      (param "buckets" (list f64)) (result (result u32 (error $me-e)))))
    (export "add" (func (param "id" u32) (param "values" (list string)) (param "value" f64)
      (result (result bool (error $me-e)))))))
  (alias export $metrics "define" (func $define))
  (alias export $metrics "add" (func $add))
  (core module $mem
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (if (i32.gt_u (global.get $heap) (i32.const 16384)) (then (global.set $heap (i32.const 1024))))
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (global.get $heap) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p)))
  (core instance $mi (instantiate $mem))
  (core func $define-lowered (canon lower (func $define) (memory (core memory $mi "memory"))))
  (core func $add-lowered (canon lower (func $add) (memory (core memory $mi "memory"))))
  (core module $m
    (import "host" "memory" (memory 1))
    (import "host" "define" (func $define (param i32 i32 i32 i32 i32 i32 i32 i32)))
    (import "host" "add" (func $add (param i32 i32 i32 f64 i32)))
    (data (i32.const 40) "component_requests")
    (data (i32.const 64) "kind")
    (func (export "handle") (param $d i32) (param $n i32) (param $p i32) (param $pn i32) (result i32)
      (i32.store (i32.const 120) (i32.const 64))
      (i32.store (i32.const 124) (i32.const 4))
      (call $define (i32.const 0) (i32.const 40) (i32.const 18) (i32.const 120) (i32.const 1)
        (i32.const 0) (i32.const 0) (i32.const 140))
      (i32.store (i32.const 100) (local.get $d))
      (i32.store (i32.const 104) (local.get $n))
      (call $add (i32.load (i32.const 144)) (i32.const 100) (i32.const 1) (f64.const 1) (i32.const 160))
      (i32.store8 (i32.const 200) (i32.load8_u (i32.const 140)))
      (i32.store8 (i32.const 201) (i32.load8_u (i32.const 160)))
      (i32.store8 (i32.const 202) (i32.load8_u (i32.const 161)))
      (i32.store8 (i32.const 16) (i32.const 1))
      (i32.store (i32.const 20) (i32.const 200))
      (i32.store (i32.const 24) (i32.const 3))
      (i32.const 16)))
  (core instance $i (instantiate $m (with "host" (instance
    (export "memory" (memory $mi "memory"))
    (export "define" (func $define-lowered))
    (export "add" (func $add-lowered))))))
  (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
    (canon lift (core func $i "handle") (memory (core memory $mi "memory")) (realloc (core func $mi "realloc")))))"#;

#[test]
fn a_component_counts_through_the_metrics_interface() {
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metered.wat", METRICS_COMPONENT.as_bytes());
    let served = serve(&module, &["--workers", "2"]);
    for _ in 0..5 {
        assert_eq!(common::ask(&client(), served.addr, b"ok!"), [0, 0, 1]);
    }
    // A value holding a newline would name two labels: refused (`invalid` is case 1).
    assert_eq!(common::ask(&client(), served.addr, b"a\nb"), [0, 1, 1]);
    let body = scrape(served.metrics_addr());
    assert_eq!(sample(&body, &series("component_requests_total", ",kind=\"ok!\"")), 5.0);
    assert_eq!(
        sample(
            &body,
            "wasmgate_guest_metrics_refused_total{listener=\"default\",role=\"active\",reason=\"invalid\"}"
        ),
        1.0
    );
}
