//! The TOML file (`--config`): its schema, parsed into checked listeners, and
//! the check that no two listeners clash on an address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::Deserialize;

use super::bounds::{
    check_batch, check_ratio, check_timeout_ms, check_wall_timeout_ms, check_workers, parse_addr, parse_duration,
    parse_size,
};
use super::listener::{Isolation, Limits, ListenerSpec};
use super::proving::{
    AccessLogSpec, CandidateSpec, DEFAULT_PROMOTE_MIN_CLIENTS, DEFAULT_PROMOTE_MIN_TIME, DEFAULT_RECORD_MAX_BYTES,
    RecordSpec, check_percent, check_sample,
};
use super::state::StateSection;
use crate::net::proxied::TrustedProxies;
use crate::state::StateLimits;
use crate::text::{cut, quote};

/// The whole file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    metrics: Option<MetricsSection>,
    #[serde(default)]
    state: Option<StateSection>,
    #[serde(default)]
    listener: Vec<ListenerSection>,
    #[serde(default)]
    upstreams: BTreeMap<String, super::upstreams::UpstreamSection>,
}

/// `[metrics]`: the Prometheus endpoint, for every listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// `IP:PORT` to serve `/metrics` on.
    listen: String,
}

/// `[[listener]]`: one address and the module that serves it. A key left
/// out takes its flag's default.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    /// The listener's name, in logs, metrics and state keys; unique.
    name: String,
    /// `IP:PORT` to receive datagrams on.
    listen: String,
    /// The module file (the embedded uppercase guest if left out).
    module: Option<PathBuf>,
    /// Worker threads, each with its own socket.
    workers: Option<usize>,
    /// `reuse` (one instance per worker) or `fresh` (one per datagram).
    isolation: Option<String>,
    /// CPU milliseconds a guest may spend on one datagram.
    timeout_ms: Option<u64>,
    /// Wall-clock milliseconds a guest call may take.
    wall_timeout_ms: Option<u64>,
    /// What one guest instance may hold, e.g. `64MiB`.
    max_memory: Option<String>,
    /// Bytes the listener's shared state may hold, e.g. `64MiB`.
    state_max_bytes: Option<String>,
    /// Keys the listener's shared state may hold.
    state_max_entries: Option<usize>,
    /// What a client may be sent for each byte it sent, until it proves its address.
    max_reply_ratio: Option<f64>,
    /// Datagrams per receive and send system call.
    batch: Option<usize>,
    /// Whether an edit of the module file is loaded while serving (default true).
    watch: Option<bool>,
    /// Client source ports never answered, as ranges (`"0-1023,5353"`) or `"none"`.
    deny_source_ports: Option<String>,
    /// Sources (CIDR blocks) whose every datagram starts with a PROXY protocol
    /// v2 header naming the real client; from anyone else a header is payload.
    proxy_protocol_from: Option<Vec<String>>,
    /// Records the listener's datagrams to this pcapng file.
    record: Option<PathBuf>,
    /// The share of datagrams recorded, 0 to 1.
    record_sample: Option<f64>,
    /// Where the recording stops growing, e.g. `100MiB`.
    record_max_bytes: Option<String>,
    /// Writes a JSON line per client datagram to this file (`-`: standard output).
    access_log: Option<PathBuf>,
    /// The share of client datagrams logged, 0 to 1.
    access_log_sample: Option<f64>,
    /// A module loaded beside the active one, to prove it (shadow and canary).
    candidate: Option<PathBuf>,
    /// The share of datagrams the candidate shadows, 0 to 1.
    shadow_sample: Option<f64>,
    /// The percentage of clients (by a hash of their address) the candidate serves for real.
    canary_percent: Option<f64>,
    /// Promotes the candidate after this many of its datagrams with no
    /// mismatch, trap or timeout.
    promote_after: Option<u64>,
    /// Client networks (IPv4 /24, IPv6 /48) the clean datagrams must come from.
    promote_min_clients: Option<usize>,
    /// How long after loading the candidate a promotion may come, e.g. `60s`.
    promote_min_time: Option<String>,
    /// Keeps the last shadow mismatches in this file, in the `record` format.
    shadow_mismatches: Option<PathBuf>,
    /// Whether a candidate that traps or times out more often than the
    /// active is unloaded (default true).
    rollback: Option<bool>,
}

/// The file's schema as JSON Schema, with each key's doc comment as its
/// description: what `wasmgate`'s reference of TOML keys is generated from.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(File)).unwrap_or_default()
}

/// A parsed and checked config file.
#[derive(Debug)]
pub struct FileConfig {
    pub listeners: Vec<ListenerSpec>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// Reads and checks a config file. Module paths are relative to the file's folder.
pub fn load(path: &Path, default_workers: usize) -> anyhow::Result<FileConfig> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {name}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, default_workers).with_context(|| format!("config {name}"))
}

fn parse(text: &str, base: &Path, default_workers: usize) -> anyhow::Result<FileConfig> {
    let file: File = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    if file.listener.is_empty() {
        bail!("no [[listener]] is defined");
    }
    let metrics = match &file.metrics {
        Some(m) => Some(
            parse_addr(&m.listen)
                .map_err(anyhow::Error::msg)
                .context("metrics.listen")?,
        ),
        None => None,
    };
    let cluster = file.state.as_ref().map(|s| s.cluster(base)).transpose()?.flatten();
    let pools = super::upstreams::pools(&file.upstreams)?;
    let mut listeners = Vec::new();
    for (i, l) in file.listener.iter().enumerate() {
        let at = |key: &str| format!("listener[{i}] ({}): {key}", l.name);
        let defaults = ListenerSpec {
            workers: default_workers,
            ..ListenerSpec::default()
        };
        let spec = ListenerSpec {
            name: l.name.clone(),
            listen: parse_addr(&l.listen)
                .map_err(anyhow::Error::msg)
                .with_context(|| at("listen"))?,
            module: l.module.as_ref().map(|m| base.join(m)),
            workers: match l.workers {
                Some(n) => check_workers(n)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| at("workers"))?,
                None => defaults.workers,
            },
            isolation: match l.isolation.as_deref() {
                None => defaults.isolation,
                Some("reuse") => Isolation::Reuse,
                Some("fresh") => Isolation::Fresh,
                Some(other) => bail!("{}: `{}` is not `reuse` or `fresh`", at("isolation"), quote(other)),
            },
            limits: Limits {
                timeout: match l.timeout_ms {
                    Some(ms) => check_timeout_ms(ms)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| at("timeout_ms"))?,
                    None => defaults.limits.timeout,
                },
                wall_timeout: match l.wall_timeout_ms {
                    Some(ms) => Some(
                        check_wall_timeout_ms(ms)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("wall_timeout_ms"))?,
                    ),
                    None => defaults.limits.wall_timeout,
                },
                max_memory: match &l.max_memory {
                    Some(s) => parse_size(s)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| at("max_memory"))?,
                    None => defaults.limits.max_memory,
                },
                state: StateLimits {
                    max_bytes: match &l.state_max_bytes {
                        Some(s) => parse_size(s)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("state_max_bytes"))?,
                        None => defaults.limits.state.max_bytes,
                    },
                    max_entries: l.state_max_entries.unwrap_or(defaults.limits.state.max_entries),
                },
            },
            max_reply_ratio: match l.max_reply_ratio {
                Some(r) => check_ratio(r)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| at("max_reply_ratio"))?,
                None => defaults.max_reply_ratio,
            },
            batch: match l.batch {
                Some(b) => check_batch(b)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| at("batch"))?,
                None => defaults.batch,
            },
            watch: l.watch.unwrap_or(defaults.watch),
            pools: pools.clone(),
            deny_source_ports: match &l.deny_source_ports {
                Some(s) => s
                    .parse()
                    .map_err(anyhow::Error::msg)
                    .with_context(|| at("deny_source_ports"))?,
                None => defaults.deny_source_ports.clone(),
            },
            proxy_protocol_from: match &l.proxy_protocol_from {
                Some(list) => TrustedProxies::from_list(list)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| at("proxy_protocol_from"))?,
                None => defaults.proxy_protocol_from.clone(),
            },
            record: match &l.record {
                None => {
                    if l.record_sample.is_some() || l.record_max_bytes.is_some() {
                        bail!(
                            "{}: record_sample and record_max_bytes need record = \"FILE\"",
                            at("record")
                        );
                    }
                    None
                }
                Some(path) => Some(RecordSpec {
                    // Like `module`, relative to the config file.
                    path: base.join(path),
                    sample: match l.record_sample {
                        Some(r) => check_sample(r)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("record_sample"))?,
                        None => 1.0,
                    },
                    max_bytes: match &l.record_max_bytes {
                        Some(s) => parse_size(s)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("record_max_bytes"))? as u64,
                        None => DEFAULT_RECORD_MAX_BYTES,
                    },
                }),
            },
            access_log: match &l.access_log {
                None if l.access_log_sample.is_some() => {
                    bail!("{}: access_log_sample needs access_log = \"FILE\"", at("access_log"))
                }
                None => None,
                Some(path) => Some(AccessLogSpec {
                    // Like `module`, relative to the config file; `-` is standard output.
                    path: if path.as_os_str() == "-" {
                        path.clone()
                    } else {
                        base.join(path)
                    },
                    sample: match l.access_log_sample {
                        Some(r) => check_sample(r)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("access_log_sample"))?,
                        None => 1.0,
                    },
                }),
            },
            candidate: match &l.candidate {
                None => {
                    if l.shadow_sample.is_some()
                        || l.canary_percent.is_some()
                        || l.promote_after.is_some()
                        || l.promote_min_clients.is_some()
                        || l.promote_min_time.is_some()
                        || l.shadow_mismatches.is_some()
                        || l.rollback.is_some()
                    {
                        bail!(
                            "{}: shadow_sample, canary_percent, promote_after, shadow_mismatches and rollback need \
                             candidate = \"FILE\"",
                            at("candidate")
                        );
                    }
                    None
                }
                Some(path) => Some(CandidateSpec {
                    path: base.join(path),
                    shadow_sample: match l.shadow_sample {
                        Some(r) => check_sample(r)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("shadow_sample"))?,
                        None => 1.0,
                    },
                    canary_percent: match l.canary_percent {
                        Some(p) => check_percent(p)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("canary_percent"))?,
                        None => 0.0,
                    },
                    promote_after: l.promote_after,
                    promote_min_clients: l.promote_min_clients.unwrap_or(DEFAULT_PROMOTE_MIN_CLIENTS),
                    promote_min_time: match &l.promote_min_time {
                        Some(t) => parse_duration(t)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| at("promote_min_time"))?,
                        None => DEFAULT_PROMOTE_MIN_TIME,
                    },
                    mismatches: l.shadow_mismatches.as_ref().map(|m| base.join(m)),
                    rollback: l.rollback.unwrap_or(true),
                }),
            },
            cluster: cluster.clone(),
        };
        if let Some(candidate) = &spec.candidate
            && !candidate.path.exists()
        {
            bail!(
                "{}: candidate {} does not exist",
                at("candidate"),
                candidate.path.display()
            );
        }
        if let Some(module) = &spec.module
            && !module.exists()
        {
            bail!("{}: module {} does not exist", at("module"), module.display());
        }
        listeners.push(spec);
    }
    check_clashes(&listeners)?;
    Ok(FileConfig { listeners, metrics })
}

/// A TOML error as its line, column and message, without the offending line
/// itself (which may be a megabyte long), and with the message cut.
fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let message = cut(e.message().trim(), 300);
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            anyhow::anyhow!("TOML error at line {line}, column {column}: {message}")
        }
        None => anyhow::anyhow!("TOML error: {message}"),
    }
}

/// Refuses two listeners with one name, or two sockets that would share a port.
/// Binding would not catch the latter: `SO_REUSEPORT` lets the second bind succeed
/// and the two listeners would silently split each other's traffic.
pub fn check_clashes(listeners: &[ListenerSpec]) -> anyhow::Result<()> {
    for (i, a) in listeners.iter().enumerate() {
        for b in &listeners[..i] {
            if a.name == b.name {
                bail!("two listeners are named `{}`", a.name);
            }
            if overlap(a.listen, b.listen) {
                bail!(
                    "listeners `{}` ({}) and `{}` ({}) would share a port",
                    b.name,
                    b.listen,
                    a.name,
                    a.listen
                );
            }
        }
    }
    Ok(())
}

/// Whether two UDP addresses would receive the same datagrams. Port 0 asks for a
/// fresh port, so it never clashes. An IPv4-mapped IPv6 address is its IPv4
/// address, and `[::]` is dual-stack: it receives IPv4 datagrams too.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    x == y || covers(x, y) || covers(y, x)
}

/// Whether a socket bound to `wildcard` receives datagrams sent to `other`.
fn covers(wildcard: IpAddr, other: IpAddr) -> bool {
    match wildcard {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bounds::MAX_WORKERS;
    use crate::config::listener::default_workers;
    use crate::config::pool::*;
    use crate::config::pool::{check_pools, parse_upstream_flag};
    use crate::state::ClusterSpec;
    use crate::upstream::pool::Policy;
    use std::time::Duration;

    fn parse_ok(text: &str) -> FileConfig {
        parse(text, Path::new("."), 2).unwrap()
    }

    fn parse_err(text: &str) -> String {
        format!("{:#}", parse(text, Path::new("."), 2).unwrap_err())
    }

    const LISTENER: &str = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n";

    #[test]
    fn a_state_table_shares_every_listeners_limits_through_redis() {
        let text = format!(
            "[state]\nredis = \"redis://127.0.0.1:6379\"\nredis_failure = \"closed\"\nredis_flush = \"10ms\"\n{LISTENER}"
        );
        let file = parse(&text, Path::new("."), 2).unwrap();
        assert_eq!(
            file.listeners[0].cluster,
            Some(ClusterSpec {
                url: "redis://127.0.0.1:6379".into(),
                fail_closed: true,
                flush: Duration::from_millis(10),
                namespace: None,
                ca: None,
            })
        );
        assert_eq!(parse(LISTENER, Path::new("."), 2).unwrap().listeners[0].cluster, None);
        // A CA file is read from beside the config file.
        let tls = format!("[state]\nredis = \"rediss://x:1\"\nredis_ca = \"ca.pem\"\n{LISTENER}");
        let file = parse(&tls, Path::new("etc/wasmgate"), 2).unwrap();
        let cluster = file.listeners[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.ca.as_deref(), Some(Path::new("etc/wasmgate/ca.pem")));
        for (state, words) in [
            ("redis = \"http://x:1\"", ["state.redis", "not a Redis URL"]),
            (
                "redis = \"redis://x:1\"\nredis_failure = \"maybe\"",
                ["state.redis", "`open` or `closed`"],
            ),
            (
                "redis = \"redis://x:1\"\nredis_flush = \"5s\"",
                ["state.redis", "1ms to 1s"],
            ),
            ("redis_failure = \"open\"", ["state:", "need redis"]),
            ("redis_ca = \"ca.pem\"", ["state:", "need redis"]),
            (
                "redis = \"redis://x:1\"\nredis_ca = \"ca.pem\"",
                ["state.redis", "rediss://"],
            ),
        ] {
            let e = parse_err(&format!("[state]\n{state}\n{LISTENER}"));
            assert!(words.iter().all(|w| e.contains(w)), "{state}: {e}");
        }
    }

    #[test]
    fn a_listener_gets_its_state_bounds_and_bad_ones_are_named() {
        let text = format!("{LISTENER}state_max_bytes = \"2MiB\"\nstate_max_entries = 500\n");
        let file = parse(&text, Path::new("."), 2).unwrap();
        assert_eq!(
            file.listeners[0].limits.state,
            StateLimits {
                max_bytes: 2 << 20,
                max_entries: 500
            }
        );
        let defaults = parse(LISTENER, Path::new("."), 2).unwrap();
        assert_eq!(defaults.listeners[0].limits.state, StateLimits::default());
        let e = parse_err(&format!("{LISTENER}state_max_bytes = \"lots\"\n"));
        assert!(e.contains("state_max_bytes") && e.contains("not a size"), "{e}");
        let e = parse_err(&format!("{LISTENER}state_max_entries = -1\n"));
        assert!(e.contains("line 4") && e.contains("-1"), "{e}");
    }

    #[test]
    fn a_listener_table_with_only_its_address_gets_the_listener_defaults() {
        let text = "[[listener]]\nname = \"default\"\nlisten = \"127.0.0.1:8008\"\n";
        let file = parse(text, Path::new("."), default_workers()).unwrap();
        assert_eq!(file.listeners, [ListenerSpec::default()]);
    }

    #[test]
    fn proxy_protocol_settings_are_read_for_listeners_and_pools() {
        let text = "[upstreams.backend]\nendpoints = [\"127.0.0.1:9\"]\nproxy_protocol = \"v2\"\n\n\
                    [[listener]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\n\
                    proxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\"]\n";
        let file = parse(text, Path::new("."), 1).unwrap();
        let l = &file.listeners[0];
        assert_eq!(l.proxy_protocol_from.to_string(), "10.0.0.0/8,192.0.2.7/32");
        assert!(l.pools[0].proxy_protocol);
        let plain = parse_ok(LISTENER);
        assert!(plain.listeners[0].proxy_protocol_from.is_empty(), "none unless listed");
    }

    #[test]
    fn a_health_table_is_read_with_its_defaults_and_bad_values_are_named() {
        let pool = |health: &str| {
            format!("{LISTENER}[upstreams.p]\nendpoints = [\"127.0.0.1:9\"]\n[upstreams.p.health]\n{health}")
        };
        let c = parse_ok(&pool(
            "interval = \"2s\"\nsend_hex = \"be ef 01\"\nexpect = \"ok\"\nslow_start = \"30s\"\n",
        ));
        let h = c.listeners[0].pools[0].health.clone().unwrap();
        assert_eq!(
            (h.interval, h.slow_start),
            (Duration::from_secs(2), Duration::from_secs(30))
        );
        assert_eq!(
            (h.timeout, h.healthy_after, h.unhealthy_after),
            (Duration::from_secs(1), 2, 3)
        );
        assert_eq!(
            (h.send.as_slice(), h.expect.as_slice()),
            (&[0xbe, 0xef, 0x01][..], &b"ok"[..])
        );
        let defaults = parse_ok(&pool(""));
        assert!(
            defaults.listeners[0].pools[0]
                .health
                .as_ref()
                .unwrap()
                .slow_start
                .is_zero(),
            "off unless given"
        );
        assert!(parse_ok(LISTENER).listeners[0].pools.is_empty());
        for (body, words) in [
            ("send = \"a\"\nsend_hex = \"61\"\n", "not both"),
            ("send_hex = \"abc\"\n", "odd number of hex digits"),
            ("expect_hex = \"zz\"\n", "not hex"),
            ("interval = \"0s\"\n", "health.interval: `0s` is out of range"),
            ("slow_start = \"soon\"\n", "health.slow_start"),
            ("unhealthy_after = 0\n", "health.unhealthy_after: 0 is out of range"),
            ("healthy_after = 101\n", "1 to 100"),
            ("probe = \"x\"\n", "health.probe: x is not a probe"),
            ("sned = \"x\"\n", "unknown field"),
        ] {
            let e = parse_err(&pool(body));
            assert!(e.contains(words), "{body:?}: {e}");
        }
    }

    #[test]
    fn drained_endpoints_are_read_and_must_be_endpoints_of_the_pool() {
        let pool = |drain: &str| {
            format!("{LISTENER}[upstreams.p]\nendpoints = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\ndrain = [{drain}]\n")
        };
        let c = parse_ok(&pool("\"127.0.0.1:10\""));
        assert_eq!(c.listeners[0].pools[0].drain, ["127.0.0.1:10"]);
        assert!(parse_err(&pool("\"127.0.0.1:11\"")).contains("not one of the pool's endpoints"));
        assert!(parse_err(&pool("\"127.0.0.1:9\", \"127.0.0.1:10\"")).contains("drain lists every endpoint"));
    }

    #[test]
    fn a_candidate_gets_its_file_shares_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.wat"), "(module)").unwrap();
        let path = dir.path().join("c.toml");
        let listener = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\ncandidate = \"c.wat\"\n\
                        shadow_sample = 0.5\ncanary_percent = 5\npromote_after = 100\nshadow_mismatches = \"m.pcapng\"\n";
        std::fs::write(&path, listener).unwrap();
        let c = load(&path, 1).unwrap();
        let candidate = c.listeners[0].candidate.clone().unwrap();
        assert_eq!(candidate.path, dir.path().join("c.wat"));
        assert_eq!((candidate.shadow_sample, candidate.canary_percent), (0.5, 5.0));
        assert_eq!(candidate.promote_after, Some(100));
        assert_eq!(candidate.mismatches, Some(dir.path().join("m.pcapng")));
        assert!(parse_err(&format!("{LISTENER}canary_percent = 5.0\n")).contains("need candidate"));
    }

    #[test]
    fn an_access_log_is_relative_to_the_file_or_standard_output_with_its_share() {
        let c = parse_ok(&format!(
            "{LISTENER}access_log = \"access.log\"\naccess_log_sample = 0.5\n"
        ));
        let log = c.listeners[0].access_log.clone().unwrap();
        assert_eq!((log.path.as_path(), log.sample), (Path::new("./access.log"), 0.5));
        let c = parse_ok(&format!("{LISTENER}access_log = \"-\"\n"));
        let log = c.listeners[0].access_log.clone().unwrap();
        assert_eq!((log.path.as_path(), log.sample), (Path::new("-"), 1.0));
        assert!(parse_err(&format!("{LISTENER}access_log_sample = 0.5\n")).contains("needs access_log"));
        assert!(
            parse_err(&format!("{LISTENER}access_log = \"a\"\naccess_log_sample = 1.5\n"))
                .contains("access_log_sample")
        );
    }

    #[test]
    fn a_recording_listener_gets_its_file_share_and_cap() {
        let c = parse_ok(&format!(
            "{LISTENER}record = \"r.pcapng\"\nrecord_sample = 0.25\nrecord_max_bytes = \"1MiB\"\n"
        ));
        let record = c.listeners[0].record.clone().unwrap();
        assert_eq!((record.sample, record.max_bytes), (0.25, 1 << 20));
        assert_eq!(record.path, Path::new("./r.pcapng"));
        let c = parse_ok(&format!("{LISTENER}record = \"r.pcapng\"\n"));
        assert_eq!(c.listeners[0].record, Some(RecordSpec::new("./r.pcapng".into())));
        assert!(parse_err(&format!("{LISTENER}record = \"r\"\nrecord_sample = 2.0\n")).contains("record_sample"));
        assert!(parse_err(&format!("{LISTENER}record_sample = 0.5\n")).contains("need record"));
    }

    #[test]
    fn upstream_pools_parse_with_their_defaults_and_every_listener_gets_them() {
        let c = parse_ok(&format!(
            r#"{LISTENER}
            [[listener]]
            name = "m"
            listen = "127.0.0.1:0"

            [upstreams.resolvers]
            endpoints = ["10.0.0.7:53", "[2001:db8::1]:53", "dns.example:53"]

            [upstreams.game]
            endpoints = ["10.0.1.1:7777"]
            policy = "least-sessions"
            idle_timeout = "500ms"
            max_sessions = 20
            eject_for = "2m"
            resolve_every = "1h"
            eject_after = 5
            unanswered_timeout = "2s"
            drain_timeout = "1m"
            max_sessions_per_prefix = 7
            "#
        ));
        for l in &c.listeners {
            assert_eq!(l.pools.len(), 2);
        }
        let pools = &c.listeners[0].pools;
        // In name order, as TOML tables are.
        let (game, resolvers) = (&pools[0], &pools[1]);
        assert_eq!(resolvers.name, "resolvers");
        assert_eq!(resolvers.endpoints.len(), 3);
        assert_eq!(resolvers.policy, Policy::Hash);
        assert_eq!(
            (
                resolvers.idle_timeout,
                resolvers.max_sessions,
                resolvers.eject_for,
                resolvers.resolve_every
            ),
            (
                Duration::from_secs(60),
                10_000,
                Duration::from_secs(10),
                Duration::from_secs(30)
            )
        );
        assert_eq!(
            (
                resolvers.eject_after,
                resolvers.unanswered_timeout,
                resolvers.drain_timeout,
                resolvers.max_sessions_per_prefix
            ),
            (3, Duration::from_secs(5), Duration::from_secs(30), 1_000)
        );
        assert_eq!(
            (
                game.eject_after,
                game.unanswered_timeout,
                game.drain_timeout,
                game.max_sessions_per_prefix
            ),
            (5, Duration::from_secs(2), Duration::from_secs(60), 7)
        );
        assert!(resolvers.has_host_names() && !game.has_host_names());
        assert_eq!(game.policy, Policy::LeastSessions);
        assert_eq!(
            (game.idle_timeout, game.max_sessions, game.eject_for, game.resolve_every),
            (
                Duration::from_millis(500),
                20,
                Duration::from_secs(120),
                Duration::from_secs(3600)
            )
        );
    }

    #[test]
    fn bad_pools_are_refused_naming_the_key() {
        let pool = |body: &str| parse_err(&format!("{LISTENER}[upstreams.p]\n{body}"));
        for (body, expected) in [
            ("endpoints = []", "upstreams.p: endpoints: the pool is empty"),
            (
                "endpoints = [\"10.0.0.1\"]",
                "upstreams.p: endpoints: `10.0.0.1` is not an endpoint",
            ),
            ("endpoints = [\"10.0.0.1:0\"]", "is not an endpoint"),
            ("endpoints = [\"0.0.0.0:53\"]", "is not an endpoint"),
            ("endpoints = [\"bad host:53\"]", "is not an endpoint"),
            (
                "endpoints = [\"a:1\"]\npolicy = \"fastest\"",
                "upstreams.p: policy: `fastest` is not a policy",
            ),
            (
                "endpoints = [\"a:1\"]\nidle_timeout = \"60\"",
                "upstreams.p: idle_timeout: `60` is not a duration",
            ),
            (
                "endpoints = [\"a:1\"]\neject_for = \"0s\"",
                "upstreams.p: eject_for: `0s` is out of range",
            ),
            ("endpoints = [\"a:1\"]\nresolve_every = \"2d\"", "is not a duration"),
            (
                "endpoints = [\"a:1\"]\nmax_sessions = 0",
                "upstreams.p: max_sessions: 0 is out of range",
            ),
            ("endpoints = [\"a:1\"]\nweight = 3", "unknown field `weight`"),
            (
                "endpoints = [\"a:1\"]\neject_after = 0",
                "upstreams.p: eject_after: 0 is out of range",
            ),
            (
                "endpoints = [\"a:1\"]\nmax_sessions_per_prefix = 0",
                "upstreams.p: max_sessions_per_prefix: 0 is out of range",
            ),
            (
                "endpoints = [\"a:1\"]\ndrain_timeout = \"0s\"",
                "upstreams.p: drain_timeout: `0s` is out of range",
            ),
            (
                "endpoints = [\"a:1\"]\nunanswered_timeout = \"soon\"",
                "upstreams.p: unanswered_timeout: `soon` is not a duration",
            ),
            ("policy = \"hash\"", "missing field `endpoints`"),
        ] {
            let e = pool(body);
            assert!(e.contains(expected), "{body}: {e}");
        }
        let e = parse_err(&format!("{LISTENER}[upstreams.\"a b\"]\nendpoints = [\"a:1\"]"));
        assert!(e.contains("is not a pool name"), "{e}");
    }

    #[test]
    fn upstream_flags_and_durations_parse() {
        let p = parse_upstream_flag("resolvers=10.0.0.7:53, 10.0.0.8:53,[::1]:53,localhost:5353").unwrap();
        assert_eq!(p.name, "resolvers");
        assert_eq!(
            p.endpoints,
            ["10.0.0.7:53", "10.0.0.8:53", "[::1]:53", "localhost:5353"]
        );
        assert_eq!(p.policy, Policy::Hash);
        for bad in [
            "resolvers",
            "=1.2.3.4:5",
            "r=",
            "r=1.2.3.4",
            "r=1.2.3.4:5,",
            "r w=1.2.3.4:5",
        ] {
            assert!(parse_upstream_flag(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        for bad in [
            "",
            "s",
            "5",
            "5 s",
            "1.5s",
            "-1s",
            "25h",
            "0ms",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let two = [PoolSpec::new("a", vec![]), PoolSpec::new("a", vec![])];
        assert!(
            check_pools(&two)
                .unwrap_err()
                .to_string()
                .contains("two pools are named `a`")
        );
    }

    #[test]
    fn a_full_file_parses_with_defaults_filled_in() {
        let c = parse_ok(
            r#"
            [metrics]
            listen = "127.0.0.1:9090"

            [[listener]]
            name = "upper"
            listen = "127.0.0.1:8008"

            [[listener]]
            name = "strict"
            listen = "[::1]:8009"
            workers = 1
            isolation = "fresh"
            timeout_ms = 5
            max_memory = "1MiB"
            max_reply_ratio = 1.0
            batch = 8
            watch = false
            "#,
        );
        assert_eq!(c.metrics, Some("127.0.0.1:9090".parse().unwrap()));
        let (a, b) = (&c.listeners[0], &c.listeners[1]);
        assert_eq!(
            (a.name.as_str(), a.workers, a.module.is_none(), a.watch),
            ("upper", 2, true, true)
        );
        assert_eq!(a.limits, Limits::default());
        assert_eq!(
            (b.workers, b.isolation, b.batch, b.watch),
            (1, Isolation::Fresh, 8, false)
        );
        assert_eq!(b.limits.max_memory, 1 << 20);
        assert_eq!(b.limits.timeout, Duration::from_millis(5));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nworkerz = 3\n");
        assert!(e.contains("workerz"), "{e}");
        let e = parse_err("[metrix]\nlisten = \"127.0.0.1:1\"\n");
        assert!(e.contains("metrix"), "{e}");
    }

    #[test]
    fn bad_values_name_the_listener_and_key() {
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"localhost:1\"\n");
        assert!(e.contains("listener[0] (a): listen") && e.contains("IP:PORT"), "{e}");
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmax_memory = \"lots\"\n");
        assert!(e.contains("max_memory") && e.contains("not a size"), "{e}");
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nisolation = \"none\"\n");
        assert!(e.contains("isolation"), "{e}");
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmodule = \"no/such.wasm\"\n");
        assert!(e.contains("module") && e.contains("does not exist"), "{e}");
        assert!(parse_err("").contains("no [[listener]]"));
    }

    #[test]
    fn port_clashes_are_refused_and_port_zero_is_not_one() {
        let two = |a: &str, b: &str| {
            format!("[[listener]]\nname = \"a\"\nlisten = \"{a}\"\n[[listener]]\nname = \"b\"\nlisten = \"{b}\"\n")
        };
        assert!(parse_err(&two("127.0.0.1:9000", "127.0.0.1:9000")).contains("would share a port"));
        assert!(parse_err(&two("0.0.0.0:9000", "127.0.0.1:9000")).contains("would share a port"));
        // `[::]` is dual-stack, and a mapped address is its IPv4 address.
        assert!(parse_err(&two("[::]:9000", "0.0.0.0:9000")).contains("would share a port"));
        assert!(parse_err(&two("127.0.0.1:9000", "[::]:9000")).contains("would share a port"));
        assert!(parse_err(&two("[::ffff:127.0.0.1]:9000", "127.0.0.1:9000")).contains("would share a port"));
        assert!(parse_err(&two("[::1]:9000", "[::]:9000")).contains("would share a port"));
        parse_ok(&two("[::1]:9000", "127.0.0.1:9000"));
        parse_ok(&two("[::ffff:127.0.0.2]:9000", "127.0.0.1:9000"));
        parse_ok(&two("127.0.0.1:9000", "127.0.0.1:9001"));
        parse_ok(&two("127.0.0.1:0", "127.0.0.1:0"));
        parse_ok(&two("127.0.0.1:9000", "[::1]:9000"));
        parse_ok(&two("0.0.0.0:9000", "[::1]:9000"));
        let same_name = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\n";
        assert!(parse_err(same_name).contains("two listeners are named `a`"));
    }

    #[test]
    fn every_setting_is_bounded_and_the_message_names_the_key() {
        let one = |key: &str| {
            parse_err(&format!(
                "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n{key}\n"
            ))
        };
        for (line, key, says) in [
            (
                "timeout_ms = 9223372036854775807",
                "timeout_ms",
                "1 to 60000 milliseconds",
            ),
            ("timeout_ms = 0", "timeout_ms", "1 to 60000"),
            ("workers = 2000", "workers", "1 to 256 workers"),
            ("workers = 0", "workers", "1 to 256"),
            ("batch = 0", "batch", "1 to 1024"),
            ("batch = 5000", "batch", "1 to 1024"),
            ("max_reply_ratio = -1.0", "max_reply_ratio", "≥ 0"),
            ("max_reply_ratio = inf", "max_reply_ratio", "≥ 0"),
            ("max_memory = \"5GiB\"", "max_memory", "over 4GiB"),
        ] {
            let e = one(line);
            assert!(
                e.contains(&format!("listener[0] (a): {key}")) && e.contains(says),
                "{line}: {e}"
            );
        }
        assert_eq!(check_timeout_ms(60_000), Ok(Duration::from_secs(60)));
        assert_eq!(check_workers(MAX_WORKERS), Ok(MAX_WORKERS));
    }

    #[test]
    fn errors_quote_at_most_a_line_of_the_offending_text() {
        let huge = "x".repeat(1 << 20);
        for text in [
            format!("[[listener]]\nname = \"a\"\nlisten = \"{huge}\"\n"),
            format!("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmax_memory = \"{huge}\"\n"),
            format!("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nisolation = \"{huge}\"\n"),
            format!("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n{huge} = 1\n"),
            format!("{huge}\n"),
        ] {
            let e = parse_err(&text);
            assert!(e.len() < 1000, "a {} byte error: {}", e.len(), &e[..200]);
        }
        let e = parse_err("[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nworkers = \"two\"\n");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        for bad in ["", "MiB", "-1", "1.5MiB", "64MB", "5GiB", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
