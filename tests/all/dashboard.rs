//! deploy/grafana/wasmgate.json queries only what the gateway exports: every
//! metric name in its queries is a sample of a real scrape of a gateway with
//! a pool, a candidate, a handler's metrics and a Redis link.

use std::collections::BTreeSet;

use crate::common::{self, Service, client, closed_port, scrape, write_file};

const DASHBOARD: &str = include_str!("../../deploy/grafana/wasmgate.json");

/// Every query of the dashboard: panels' `expr`, variables' `definition`.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The metric names a query names outright (a name in a regex matcher is a
/// pattern, and left out with every other quoted string).
fn names(query: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut quoted = false;
    for c in query.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted {
            unquoted.push(c);
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("wasmgate_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_dashboard_queries_is_one_the_gateway_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 30, "{} queries", all.len());
    let wanted: BTreeSet<String> = all.iter().flat_map(|q| names(q)).collect();
    assert!(wanted.len() >= 30, "{wanted:?}");

    let dir = tempfile::tempdir().unwrap();
    let guest = include_str!("../guests/metrics.wat");
    write_file(dir.path(), "metrics.wat", guest.as_bytes());
    write_file(dir.path(), "candidate.wat", format!(";; v2\n{guest}").as_bytes());
    // Redis is not there: its link's metrics are exported all the same.
    let redis = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[state]
redis = "redis://{redis}"

[[listener]]
name = "main"
listen = "127.0.0.1:0"
module = "metrics.wat"
candidate = "candidate.wat"

[upstreams.backend]
endpoints = ["{}"]
"#,
        closed_port()
    );
    let path = write_file(dir.path(), "gateway.toml", config.as_bytes());
    let served = Service::start(&["--config", &path]);
    assert_eq!(common::ask(&client(), served.addr, b"hello"), [0; 12]);
    let body = scrape(served.metrics_addr());
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\n{body}");
}

#[test]
fn the_exposition_with_a_handlers_metrics_passes_promtool_check_metrics() {
    if !common::fixtures::installed("promtool") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "metrics.wat", include_bytes!("../guests/metrics.wat"));
    let served = Service::start(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let c = client();
    // A counter with labels (one of them needing escapes), a gauge, a histogram.
    assert_eq!(common::ask(&c, served.addr, b"hello"), [0; 12]);
    assert_eq!(common::ask(&c, served.addr, b"#say \"hi\" \\o/"), [0, 0, 0, 0]);
    let body = scrape(served.metrics_addr());
    assert!(body.contains("wasmgate_guest_size_bytes_bucket"), "{body}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
