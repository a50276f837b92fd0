//! `wasmgate replay`: the client datagrams of a capture through a module, in
//! capture order with each one's client address and a clock read off the
//! capture, compared with another module run the same way or with the replies
//! the capture recorded. No socket is opened and nothing is sent.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::capture::{self, Datagram, Hop};
use crate::config::ListenerSpec;
use crate::gateway::{Offline, Outcome};
use crate::sandbox::{Limits, Sandbox};
use crate::verdict::DropReason;

/// How many differences are shown in full.
const SHOWN: usize = 10;

/// What to replay, and through what.
#[derive(Debug, Clone)]
pub struct Options {
    pub capture: PathBuf,
    pub module: PathBuf,
    /// Compare with this module instead of the capture's replies.
    pub against: Option<PathBuf>,
    /// The gateway's port in the capture; by default the one most datagrams went to.
    pub port: Option<u16>,
    /// The listener's settings: pools (never contacted), isolation, ratio, limits.
    pub listener: ListenerSpec,
    pub limits: Limits,
}

/// The result of a replay, as printed (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Report {
    pub capture: String,
    pub port: u16,
    pub module: String,
    /// `recorded` or the other module's path.
    pub against: String,
    pub datagrams: u64,
    pub same: u64,
    pub different: u64,
    pub only_old_answered: u64,
    pub only_new_answered: u64,
    pub new_traps: u64,
    pub new_timeouts: u64,
    /// Whether forwards were compared too (they are when both sides have them).
    pub forwards_compared: bool,
    pub new_guest_ms: f64,
    /// Only with `--against`.
    pub old_guest_ms: Option<f64>,
    pub guest_time_ratio: Option<f64>,
    /// Replayed client datagrams per second of wall time.
    pub datagrams_per_second: f64,
    pub differences: Vec<Difference>,
}

/// One client datagram whose outcome differs.
#[derive(Debug, Serialize)]
pub struct Difference {
    pub client: String,
    /// Seconds since the capture's first datagram.
    pub at: f64,
    pub request: String,
    pub old: String,
    pub new: String,
}

/// One client datagram and both outcomes.
struct Exchange {
    /// Index of the client datagram in the capture.
    index: usize,
    old: Outcome,
    new: Outcome,
}

/// Runs the replay. An error is bad input (exit 2): its message names the file and why.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    let capture = capture::read(&options.capture)?;
    let port = match options.port {
        Some(p) => p,
        None => busiest_port(&capture.datagrams).with_context(|| {
            format!(
                "{}: no datagram is addressed to a gateway port",
                options.capture.display()
            )
        })?,
    };
    let recording = capture.datagrams.iter().any(|d| d.hop.is_some());
    let local = capture
        .datagrams
        .iter()
        .find(|d| d.dst.port() == port)
        .map_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port), |d| d.dst);
    let sandbox = Sandbox::new(options.limits)?;
    // Each module gets a fresh state of its own: with one between them, the
    // second to run a datagram saw the first's writes (every `--against`
    // count differed by one).
    let load = |path: &PathBuf| -> anyhow::Result<Offline> {
        let sandbox = sandbox.with_own_state();
        let program = sandbox.load_file(Some(path))?;
        Offline::new(&sandbox, program, &options.listener, local)
    };
    let mut new = load(&options.module)?;
    let mut old = options.against.as_ref().map(load).transpose()?;

    let started = Instant::now();
    let mut exchanges: Vec<Exchange> = Vec::new();
    // Each client's latest exchange, which its replies and answers belong to.
    let mut open: HashMap<SocketAddr, usize> = HashMap::new();
    for (index, d) in capture.datagrams.iter().enumerate() {
        let hop = match d.hop {
            Some(hop) => hop,
            None if d.dst.port() == port => Hop::Client,
            None if d.src.port() == port => Hop::Reply,
            None => continue,
        };
        match hop {
            Hop::Client => {
                let new_outcome = new.client(d.at, &d.payload, d.src);
                let old_outcome = match &mut old {
                    Some(old) => old.client(d.at, &d.payload, d.src),
                    None => Outcome {
                        dropped: d.verdict.as_deref().and_then(drop_reason),
                        ..Outcome::default()
                    },
                };
                open.insert(d.src, exchanges.len());
                exchanges.push(Exchange {
                    index,
                    old: old_outcome,
                    new: new_outcome,
                });
            }
            Hop::Reply if old.is_none() => {
                if let Some(&x) = open.get(&d.dst) {
                    exchanges[x].old.replies.push(d.payload.clone());
                }
            }
            Hop::Forward if old.is_none() => {
                if let Some(&x) = d.client.as_ref().and_then(|c| open.get(c)) {
                    exchanges[x].old.forwards.push((d.dst, d.payload.clone()));
                }
            }
            Hop::Upstream => {
                let (Some(client), Some(&x)) = (d.client, d.client.as_ref().and_then(|c| open.get(c))) else {
                    continue;
                };
                if let Some(answer) = new.upstream(d.at, d.src, client, &d.payload) {
                    merge(&mut exchanges[x].new, answer);
                }
                if let Some(old) = &mut old
                    && let Some(answer) = old.upstream(d.at, d.src, client, &d.payload)
                {
                    merge(&mut exchanges[x].old, answer);
                }
            }
            Hop::Reply | Hop::Forward => {}
        }
    }
    let elapsed = started.elapsed();

    let forwards_compared = old.is_some() || recording;
    let first = capture.datagrams.first().map_or(Duration::ZERO, |d| d.at);
    let mut report = Report {
        capture: options.capture.display().to_string(),
        port,
        module: options.module.display().to_string(),
        against: options
            .against
            .as_ref()
            .map_or_else(|| "recorded".to_string(), |p| p.display().to_string()),
        datagrams: exchanges.len() as u64,
        same: 0,
        different: 0,
        only_old_answered: 0,
        only_new_answered: 0,
        new_traps: 0,
        new_timeouts: 0,
        forwards_compared,
        new_guest_ms: 0.0,
        old_guest_ms: old.as_ref().map(|_| 0.0),
        guest_time_ratio: None,
        datagrams_per_second: exchanges.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        differences: Vec::new(),
    };
    let (mut new_time, mut old_time) = (Duration::ZERO, Duration::ZERO);
    for x in &exchanges {
        new_time += x.new.guest_time;
        old_time += x.old.guest_time;
        for (reason, count) in [
            (DropReason::Trap, &mut report.new_traps),
            (DropReason::Timeout, &mut report.new_timeouts),
        ] {
            if x.new.dropped == Some(reason) && x.old.dropped != Some(reason) {
                *count += 1;
            }
        }
        let same = x.old.replies == x.new.replies && (!forwards_compared || x.old.forwards == x.new.forwards);
        if same {
            report.same += 1;
            continue;
        }
        report.different += 1;
        match (x.old.replies.is_empty(), x.new.replies.is_empty()) {
            (false, true) => report.only_old_answered += 1,
            (true, false) => report.only_new_answered += 1,
            _ => {}
        }
        if report.differences.len() < SHOWN {
            let d = &capture.datagrams[x.index];
            report.differences.push(Difference {
                client: d.src.to_string(),
                at: d.at.saturating_sub(first).as_secs_f64(),
                request: escaped(&d.payload),
                old: describe(&x.old, forwards_compared),
                new: describe(&x.new, forwards_compared),
            });
        }
    }
    report.new_guest_ms = new_time.as_secs_f64() * 1e3;
    if old.is_some() {
        report.old_guest_ms = Some(old_time.as_secs_f64() * 1e3);
        if !old_time.is_zero() {
            report.guest_time_ratio = Some(new_time.as_secs_f64() / old_time.as_secs_f64());
        }
    }
    Ok(report)
}

impl Report {
    /// Whether anything differed (exit 1).
    pub fn differs(&self) -> bool {
        self.different > 0 || self.new_traps > 0 || self.new_timeouts > 0
    }

    /// The summary and the first differences, for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "replayed {} client datagrams to port {} from {} through {}, against {}",
            self.datagrams,
            self.port,
            self.capture,
            self.module,
            if self.against == "recorded" {
                "the recorded replies"
            } else {
                &self.against
            }
        );
        let _ = writeln!(
            s,
            "  same: {}  different: {} (only old answered: {}, only new answered: {})  new traps: {}  new timeouts: {}",
            self.same,
            self.different,
            self.only_old_answered,
            self.only_new_answered,
            self.new_traps,
            self.new_timeouts
        );
        match (self.old_guest_ms, self.guest_time_ratio) {
            (Some(old), Some(ratio)) => {
                let _ = writeln!(
                    s,
                    "  guest time: new {:.3} ms, old {old:.3} ms (ratio {ratio:.2})",
                    self.new_guest_ms
                );
            }
            _ => {
                let _ = writeln!(s, "  guest time: new {:.3} ms", self.new_guest_ms);
            }
        }
        if !self.forwards_compared {
            let _ = writeln!(
                s,
                "  forwards were not compared: the capture does not say which client they were for (a --record capture does)"
            );
        }
        for (i, d) in self.differences.iter().enumerate() {
            let _ = writeln!(s, "difference {}: client {} at +{:.6} s", i + 1, d.client, d.at);
            let _ = writeln!(s, "  request: {}", d.request);
            let _ = writeln!(s, "  old: {}", d.old);
            let _ = writeln!(s, "  new: {}", d.new);
        }
        if self.different as usize > self.differences.len() {
            let _ = writeln!(
                s,
                "({} more differences not shown)",
                self.different as usize - self.differences.len()
            );
        }
        s
    }
}

/// The port that received most datagrams (client hops, in a recording); on a
/// tie, the one that received first, since a capture usually starts with a
/// request.
fn busiest_port(datagrams: &[Datagram]) -> Option<u16> {
    // Port → (datagrams received, index of the first).
    let mut counts: HashMap<u16, (u64, usize)> = HashMap::new();
    for (i, d) in datagrams.iter().enumerate() {
        if matches!(d.hop, None | Some(Hop::Client)) {
            counts.entry(d.dst.port()).or_insert((0, i)).0 += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(_, (n, first))| (n, std::cmp::Reverse(first)))
        .map(|(port, _)| port)
}

fn merge(into: &mut Outcome, more: Outcome) {
    into.replies.extend(more.replies);
    into.forwards.extend(more.forwards);
    into.guest_time += more.guest_time;
}

/// A recorder's verdict as a drop reason (`reply` and `forward` are none).
fn drop_reason(verdict: &str) -> Option<DropReason> {
    DropReason::ALL.into_iter().find(|r| r.as_str() == verdict)
}

/// What one side did, in one line.
fn describe(outcome: &Outcome, forwards: bool) -> String {
    let mut parts: Vec<String> = outcome
        .replies
        .iter()
        .map(|r| format!("reply {}", escaped(r)))
        .collect();
    if forwards {
        parts.extend(
            outcome
                .forwards
                .iter()
                .map(|(to, d)| format!("forward to {to} {}", escaped(d))),
        );
    }
    if parts.is_empty() {
        return match outcome.dropped {
            Some(reason) => format!("no reply ({reason})"),
            None => "no reply".to_string(),
        };
    }
    parts.join(", ")
}

/// Bytes as a quoted string: printable ASCII as is, the rest `\xNN`, cut after 200 bytes.
fn escaped(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in bytes.iter().take(200) {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    if bytes.len() > 200 {
        let _ = write!(s, "… ({} bytes)", bytes.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(src: &str, dst: &str) -> Datagram {
        Datagram {
            at: Duration::ZERO,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload: Vec::new(),
            hop: None,
            verdict: None,
            client: None,
        }
    }

    #[test]
    fn the_gateway_port_is_the_one_most_datagrams_went_to() {
        let mut capture = vec![datagram("127.0.0.1:4000", "127.0.0.1:8008"); 3];
        capture.push(datagram("127.0.0.1:8008", "127.0.0.1:4000"));
        capture.push(datagram("127.0.0.1:5000", "127.0.0.1:53"));
        assert_eq!(busiest_port(&capture), Some(8008));
        // One reply per request: a tie, won by the port that received first.
        let exchange = [
            datagram("127.0.0.1:9000", "127.0.0.1:40000"),
            datagram("127.0.0.1:40000", "127.0.0.1:9000"),
        ];
        assert_eq!(busiest_port(&exchange), Some(40000));
    }

    #[test]
    fn bytes_are_shown_escaped_and_cut() {
        assert_eq!(escaped(b"a\"b\\\x00\xff"), r#""a\"b\\\x00\xff""#);
        assert!(escaped(&[b'x'; 300]).ends_with("… (300 bytes)"));
    }
}
