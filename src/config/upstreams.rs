//! The `[upstreams.NAME]` tables of the TOML file: their schema, and the
//! checked [`PoolSpec`]s they become.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::Deserialize;

use super::bounds::parse_duration;
use super::pool::{
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_EJECT_AFTER, DEFAULT_EJECT_FOR, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_PREFIX, DEFAULT_RESOLVE_EVERY, DEFAULT_UNANSWERED_TIMEOUT, HealthSpec, MAX_EJECT_AFTER,
    MAX_HEALTH_STREAK, MAX_SESSIONS, MAX_SHARED_SOCKETS, PoolSpec, SharedSpec, check_endpoint, check_pool_name,
};
use crate::text::{cut, quote};
use crate::upstream::pool::Policy;

/// `[upstreams.NAME]`: a pool of endpoints a guest forwards to by `NAME`.
/// Durations are written `500ms`, `60s`, `5m` or `1h`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamSection {
    /// The endpoints, each `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (a name
    /// is looked up at start and every `resolve_every`).
    endpoints: Vec<String>,
    /// How `forward` picks an endpoint: `hash` (of the client, the default),
    /// `round-robin`, `random` or `least-sessions`; `forward_key` always hashes its key.
    policy: Option<String>,
    /// A session without traffic for this long ends (default `60s`).
    idle_timeout: Option<String>,
    /// Sessions open at once in this pool, across workers (default 10000).
    max_sessions: Option<usize>,
    /// How long an endpoint that failed `eject_after` times in a row is left
    /// out (default `10s`).
    eject_for: Option<String>,
    /// Failures in a row (ICMP refusals or unanswered datagrams) that eject an
    /// endpoint (default 3).
    eject_after: Option<u32>,
    /// A forwarded datagram with no answer after this long counts as a
    /// failure of its endpoint (default `5s`).
    unanswered_timeout: Option<String>,
    /// Sessions to an endpoint a reload removed end this long after the
    /// reload (default `30s`).
    drain_timeout: Option<String>,
    /// Sessions from one client network (IPv4 /24, IPv6 /48) open at once
    /// (default 1000).
    max_sessions_per_prefix: Option<usize>,
    /// How often host names among the endpoints are looked up again (default `30s`).
    resolve_every: Option<String>,
    /// `"v2"`: each forwarded datagram starts with a PROXY protocol v2 header
    /// naming the client; `"none"` (the default): datagrams go as the guest
    /// forwards them.
    proxy_protocol: Option<String>,
    /// Active health checks of every endpoint; without this table endpoints
    /// are ejected by ICMP refusals alone (`eject_after`).
    health: Option<HealthSection>,
    /// Endpoints, as written in `endpoints`, that take no new sessions while
    /// their sessions finish (until idle, at most `drain_timeout`): taking one
    /// out of service without cutting its clients off.
    drain: Option<Vec<String>>,
    /// `"per-client"` (the default): a session (a socket) per client and
    /// endpoint. `"shared"`: for protocols whose datagrams carry an ID (DNS):
    /// a few sockets per endpoint carry every client's datagrams, and the
    /// guest's `on_reply` names the client each answer is for.
    sessions: Option<String>,
    /// A shared pool's sockets per endpoint, in each worker (default 4, at most 64).
    sockets_per_endpoint: Option<usize>,
    /// How often each socket of a shared pool is replaced by one on a new
    /// random port (default `60s`).
    reroll_every: Option<String>,
}

/// `[upstreams.NAME.health]`: a probe to every endpoint on its own schedule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    /// Time between two probes of an endpoint (default `5s`; a tenth of it
    /// is added or taken at random, so probes spread out).
    interval: Option<String>,
    /// A probe not answered within this is failed (default `1s`).
    timeout: Option<String>,
    /// Probes passed in a row that bring an unhealthy endpoint back (default 2).
    healthy_after: Option<u32>,
    /// Probes failed in a row that take a healthy endpoint out (default 3).
    unhealthy_after: Option<u32>,
    /// The probe datagram, as text (default: empty).
    send: Option<String>,
    /// The probe datagram, as hex (`"00 01 ab"`); instead of `send`.
    send_hex: Option<String>,
    /// What an answer must start with to pass, as text (default: any answer passes).
    expect: Option<String>,
    /// The same as hex; instead of `expect`.
    expect_hex: Option<String>,
    /// `"guest"`: the module writes each probe and judges its answer (its
    /// `probe` and `probe_reply` exports); `send`/`expect` serve while it has
    /// none. `"send"` (the default): `send` and `expect`.
    probe: Option<String>,
    /// How long an endpoint that passed its checks again takes to get its full
    /// share of new clients, growing from none (default: at once).
    slow_start: Option<String>,
}

/// The pools of the file's `[upstreams.NAME]` tables, checked.
pub(super) fn pools(upstreams: &BTreeMap<String, UpstreamSection>) -> anyhow::Result<Vec<PoolSpec>> {
    let mut pools = Vec::new();
    for (name, u) in upstreams {
        let at = |key: &str| format!("upstreams.{name}: {key}");
        check_pool_name(name)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("upstreams.{}", quote(name)))?;
        if u.endpoints.is_empty() {
            bail!("{}: the pool is empty: give at least one endpoint", at("endpoints"));
        }
        for e in &u.endpoints {
            check_endpoint(e)
                .map_err(anyhow::Error::msg)
                .with_context(|| at("endpoints"))?;
        }
        let duration = |value: &Option<String>, key: &str, default: Duration| match value {
            Some(v) => parse_duration(v).map_err(anyhow::Error::msg).with_context(|| at(key)),
            None => Ok(default),
        };
        pools.push(PoolSpec {
            name: name.clone(),
            endpoints: u.endpoints.clone(),
            policy: match &u.policy {
                Some(p) => p.parse().map_err(anyhow::Error::msg).with_context(|| at("policy"))?,
                None => Policy::default(),
            },
            idle_timeout: duration(&u.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?,
            max_sessions: match u.max_sessions {
                Some(n) if (1..=MAX_SESSIONS).contains(&n) => n,
                Some(n) => bail!("{}: {n} is out of range: give 1 to {MAX_SESSIONS}", at("max_sessions")),
                None => DEFAULT_MAX_SESSIONS,
            },
            eject_for: duration(&u.eject_for, "eject_for", DEFAULT_EJECT_FOR)?,
            eject_after: match u.eject_after {
                Some(n) if (1..=MAX_EJECT_AFTER).contains(&n) => n,
                Some(n) => bail!(
                    "{}: {n} is out of range: give 1 to {MAX_EJECT_AFTER}",
                    at("eject_after")
                ),
                None => DEFAULT_EJECT_AFTER,
            },
            unanswered_timeout: duration(&u.unanswered_timeout, "unanswered_timeout", DEFAULT_UNANSWERED_TIMEOUT)?,
            drain_timeout: duration(&u.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?,
            max_sessions_per_prefix: match u.max_sessions_per_prefix {
                Some(n) if (1..=MAX_SESSIONS).contains(&n) => n,
                Some(n) => bail!(
                    "{}: {n} is out of range: give 1 to {MAX_SESSIONS}",
                    at("max_sessions_per_prefix")
                ),
                None => DEFAULT_MAX_SESSIONS_PER_PREFIX,
            },
            resolve_every: duration(&u.resolve_every, "resolve_every", DEFAULT_RESOLVE_EVERY)?,
            drain: u.drain.clone().unwrap_or_default(),
            health: match &u.health {
                Some(h) => Some(health_spec(h, &|key| at(&format!("health.{key}")))?),
                None => None,
            },
            shared: shared_spec(u, &at)?,
            proxy_protocol: match u.proxy_protocol.as_deref() {
                None | Some("none") => false,
                Some("v2") => true,
                Some(other) => bail!(
                    "{}: {} is not a PROXY protocol version: give \"v2\" or \"none\"",
                    at("proxy_protocol"),
                    quote(other)
                ),
            },
        });
    }
    super::pool::check_pools(&pools)?;
    Ok(pools)
}

/// A pool's `sessions = "shared"` and its settings, checked; `at` names a key in errors.
fn shared_spec(u: &UpstreamSection, at: &dyn Fn(&str) -> String) -> anyhow::Result<Option<SharedSpec>> {
    let shared = match u.sessions.as_deref() {
        None | Some("per-client") => false,
        Some("shared") => true,
        Some(other) => bail!(
            "{}: {} is not a session mode: give \"per-client\" or \"shared\"",
            at("sessions"),
            quote(other)
        ),
    };
    if !shared {
        for (key, set) in [
            ("sockets_per_endpoint", u.sockets_per_endpoint.is_some()),
            ("reroll_every", u.reroll_every.is_some()),
        ] {
            if set {
                bail!("{}: only a pool with sessions = \"shared\" has it", at(key));
            }
        }
        return Ok(None);
    }
    let d = SharedSpec::default();
    Ok(Some(SharedSpec {
        sockets: match u.sockets_per_endpoint {
            None => d.sockets,
            Some(n) if (1..=MAX_SHARED_SOCKETS).contains(&n) => n,
            Some(n) => bail!(
                "{}: {n} is out of range: give 1 to {MAX_SHARED_SOCKETS}",
                at("sockets_per_endpoint")
            ),
        },
        reroll_every: match &u.reroll_every {
            Some(v) => parse_duration(v)
                .map_err(anyhow::Error::msg)
                .with_context(|| at("reroll_every"))?,
            None => d.reroll_every,
        },
    }))
}

/// A pool's `health` table, checked; `at` names a key in errors.
fn health_spec(h: &HealthSection, at: &dyn Fn(&str) -> String) -> anyhow::Result<HealthSpec> {
    let d = HealthSpec::default();
    let duration = |value: &Option<String>, key: &str, default: Duration| -> anyhow::Result<Duration> {
        // parse_duration refuses 0 and anything past a day.
        match value {
            Some(v) => parse_duration(v).map_err(anyhow::Error::msg).with_context(|| at(key)),
            None => Ok(default),
        }
    };
    let streak = |value: Option<u32>, key: &str, default: u32| match value {
        None => Ok(default),
        Some(n) if (1..=MAX_HEALTH_STREAK).contains(&n) => Ok(n),
        Some(n) => Err(anyhow::anyhow!(
            "{}: {n} is out of range: give 1 to {MAX_HEALTH_STREAK}",
            at(key)
        )),
    };
    let bytes = |text: &Option<String>, hex: &Option<String>, key: &str| -> anyhow::Result<Vec<u8>> {
        match (text, hex) {
            (Some(_), Some(_)) => bail!("{}: give {key} or {key}_hex, not both", at(key)),
            (Some(t), None) => Ok(t.as_bytes().to_vec()),
            (None, Some(h)) => parse_hex(h).with_context(|| at(&format!("{key}_hex"))),
            (None, None) => Ok(Vec::new()),
        }
    };
    let spec = HealthSpec {
        interval: duration(&h.interval, "interval", d.interval)?,
        timeout: duration(&h.timeout, "timeout", d.timeout)?,
        healthy_after: streak(h.healthy_after, "healthy_after", d.healthy_after)?,
        unhealthy_after: streak(h.unhealthy_after, "unhealthy_after", d.unhealthy_after)?,
        send: bytes(&h.send, &h.send_hex, "send")?,
        expect: bytes(&h.expect, &h.expect_hex, "expect")?,
        guest: match h.probe.as_deref() {
            None | Some("send") => false,
            Some("guest") => true,
            Some(other) => bail!(
                "{}: {} is not a probe: give \"guest\" or \"send\"",
                at("probe"),
                quote(other)
            ),
        },
        slow_start: duration(&h.slow_start, "slow_start", d.slow_start)?,
    };
    if spec.send.len() > crate::verdict::MAX_DATAGRAM {
        bail!("{}: {} bytes do not fit a datagram", at("send"), spec.send.len());
    }
    Ok(spec)
}

/// Bytes written as hex digits, pairs optionally apart by spaces.
fn parse_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        bail!("`{}` has an odd number of hex digits", cut(text, 40));
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).unwrap_or("?");
            u8::from_str_radix(pair, 16).map_err(|_| anyhow::anyhow!("`{}` is not hex: `{pair}`", cut(text, 40)))
        })
        .collect()
}
