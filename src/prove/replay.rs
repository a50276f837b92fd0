//! `wasmgate replay`: the client datagrams of a capture through a module, in
//! capture order with each one's client address and a clock read off the
//! capture, compared with another module run the same way or with the replies
//! the capture recorded. No socket is opened and nothing is sent.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::config::Limits;
use crate::config::ListenerSpec;
use crate::guest::Env;
use crate::net::proxy_v2::{self, Parsed};
use crate::prove::capture::{self, Hop};
use crate::prove::offline::{Offline, Outcome};
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
    /// Datagrams of a trusted proxy (`--proxy-protocol-from`) without a valid
    /// header: dropped by any gateway, so not replayed.
    pub proxy_header_errors: u64,
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

/// How long, in capture time, replies and upstream answers still count
/// toward a client datagram (unless the client sends another first).
const REPLY_WINDOW: Duration = Duration::from_secs(30);
/// Client datagrams awaiting their replies at most, and their bytes: past
/// either, the oldest is compared early. What a replay holds is bounded by
/// these, never by the capture's size.
const MAX_PENDING: usize = 100_000;
const MAX_PENDING_BYTES: usize = 64 << 20;

/// One client datagram and both outcomes, until it is compared.
struct Exchange {
    seq: u64,
    at: Duration,
    client: SocketAddr,
    request: Vec<u8>,
    old: Outcome,
    new: Outcome,
}

impl Exchange {
    fn bytes(&self) -> usize {
        let outcome = |o: &Outcome| {
            o.replies.iter().map(Vec::len).sum::<usize>() + o.forwards.iter().map(|(_, d)| d.len()).sum::<usize>()
        };
        self.request.len() + outcome(&self.old) + outcome(&self.new)
    }
}

/// The client datagrams still collecting replies, oldest first, and each
/// client's latest, which its replies and answers belong to.
#[derive(Default)]
struct Pending {
    queue: VecDeque<Exchange>,
    open: HashMap<SocketAddr, u64>,
    next_seq: u64,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, at: Duration, client: SocketAddr, request: &[u8], old: Outcome, new: Outcome) {
        let x = Exchange {
            seq: self.next_seq,
            at,
            client,
            request: request.to_vec(),
            old,
            new,
        };
        self.next_seq += 1;
        self.bytes += x.bytes();
        self.open.insert(client, x.seq);
        self.queue.push_back(x);
    }

    /// The latest exchange of `client`, if it is still open.
    fn of(&mut self, client: &SocketAddr) -> Option<&mut Exchange> {
        let seq = *self.open.get(client)?;
        let first = self.queue.front()?.seq;
        self.queue.get_mut(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    fn add_reply(&mut self, client: &SocketAddr, reply: &[u8]) {
        if let Some(x) = self.of(client) {
            x.old.replies.push(reply.to_vec());
            self.bytes += reply.len();
        }
    }

    fn add_forward(&mut self, client: &SocketAddr, to: SocketAddr, forward: &[u8]) {
        if let Some(x) = self.of(client) {
            x.old.forwards.push((to, forward.to_vec()));
            self.bytes += forward.len();
        }
    }

    /// Compares and lets go of the exchanges whose window has passed at
    /// `now`, and the oldest while there are too many (all with `now` None).
    fn settle(&mut self, now: Option<Duration>, tally: &mut Tally) {
        while let Some(front) = self.queue.front() {
            let due = now.is_none_or(|now| front.at.saturating_add(REPLY_WINDOW) <= now)
                || self.queue.len() > MAX_PENDING
                || self.bytes > MAX_PENDING_BYTES;
            if !due {
                break;
            }
            let Some(x) = self.queue.pop_front() else { break };
            self.bytes = self.bytes.saturating_sub(x.bytes());
            if self.open.get(&x.client) == Some(&x.seq) {
                self.open.remove(&x.client);
            }
            tally.add(&x);
        }
    }
}

/// The report's counts, built one exchange at a time.
struct Tally {
    report: Report,
    first: Duration,
    new_time: Duration,
    old_time: Duration,
}

impl Tally {
    fn add(&mut self, x: &Exchange) {
        let report = &mut self.report;
        report.datagrams += 1;
        self.new_time += x.new.guest_time;
        self.old_time += x.old.guest_time;
        for (reason, count) in [
            (DropReason::Trap, &mut report.new_traps),
            (DropReason::Timeout, &mut report.new_timeouts),
        ] {
            if x.new.dropped == Some(reason) && x.old.dropped != Some(reason) {
                *count += 1;
            }
        }
        let forwards_compared = report.forwards_compared;
        let same = x.old.replies == x.new.replies && (!forwards_compared || x.old.forwards == x.new.forwards);
        if same {
            report.same += 1;
            return;
        }
        report.different += 1;
        match (x.old.replies.is_empty(), x.new.replies.is_empty()) {
            (false, true) => report.only_old_answered += 1,
            (true, false) => report.only_new_answered += 1,
            _ => {}
        }
        if report.differences.len() < SHOWN {
            report.differences.push(Difference {
                client: x.client.to_string(),
                at: x.at.saturating_sub(self.first).as_secs_f64(),
                request: escaped(&x.request),
                old: describe(&x.old, forwards_compared),
                new: describe(&x.new, forwards_compared),
            });
        }
    }
}

/// What a first pass over the capture learns: the gateway's port and
/// address, and whether it is a `--record` capture.
struct Survey {
    /// Port → (client datagrams received, index of the first, its address).
    ports: HashMap<u16, (u64, u64, SocketAddr)>,
    recording: bool,
    first: Duration,
}

impl Survey {
    fn of(path: &std::path::Path) -> anyhow::Result<Self> {
        let mut reader = open(path)?;
        let mut survey = Self {
            ports: HashMap::new(),
            recording: false,
            first: Duration::ZERO,
        };
        let mut n = 0u64;
        while let Some(d) = reader.next() {
            let d = d.with_context(|| format!("{}", path.display()))?;
            if n == 0 {
                survey.first = d.at;
            }
            survey.recording |= d.hop.is_some();
            if matches!(d.hop, None | Some(Hop::Client)) {
                survey.ports.entry(d.dst.port()).or_insert((0, n, d.dst)).0 += 1;
            }
            n += 1;
        }
        if n == 0 {
            anyhow::bail!("{}: {}", path.display(), reader.nothing_in_it());
        }
        Ok(survey)
    }

    /// The port that received most datagrams (client hops, in a recording);
    /// on a tie, the one that received first, since a capture usually starts
    /// with a request.
    fn busiest_port(&self) -> Option<u16> {
        self.ports
            .iter()
            .max_by_key(|&(_, &(n, first, _))| (n, std::cmp::Reverse(first)))
            .map(|(&port, _)| port)
    }
}

fn open(path: &std::path::Path) -> anyhow::Result<capture::Reader<std::fs::File>> {
    let file =
        crate::engine::compile::open_regular(path).with_context(|| format!("{}: cannot read", path.display()))?;
    capture::Reader::new(file).with_context(|| format!("{}", path.display()))
}

/// Runs the replay, reading the capture twice (once to learn its port) and
/// holding only the datagrams still collecting replies. An error is bad
/// input (exit 2): its message names the file and why.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    let survey = Survey::of(&options.capture)?;
    let port = match options.port {
        Some(p) => p,
        None => survey.busiest_port().with_context(|| {
            format!(
                "{}: no datagram is addressed to a gateway port",
                options.capture.display()
            )
        })?,
    };
    let local = survey.ports.get(&port).map_or(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        |&(_, _, dst)| dst,
    );
    let env = Env::new(options.limits)?;
    // Each module gets a fresh state of its own: with one between them, the
    // second to run a datagram saw the first's writes (every `--against`
    // count differed by one).
    let load = |path: &PathBuf| -> anyhow::Result<Offline> {
        let env = env.with_own_state();
        let program = env.load_file(Some(path))?;
        Offline::new(&env, program, &options.listener, local)
    };
    let mut new = load(&options.module)?;
    let mut old = options.against.as_ref().map(load).transpose()?;

    let mut tally = Tally {
        report: Report {
            capture: options.capture.display().to_string(),
            port,
            module: options.module.display().to_string(),
            against: options
                .against
                .as_ref()
                .map_or_else(|| "recorded".to_string(), |p| p.display().to_string()),
            datagrams: 0,
            same: 0,
            different: 0,
            only_old_answered: 0,
            only_new_answered: 0,
            new_traps: 0,
            new_timeouts: 0,
            proxy_header_errors: 0,
            forwards_compared: old.is_some() || survey.recording,
            new_guest_ms: 0.0,
            old_guest_ms: old.as_ref().map(|_| 0.0),
            guest_time_ratio: None,
            datagrams_per_second: 0.0,
            differences: Vec::new(),
        },
        first: survey.first,
        new_time: Duration::ZERO,
        old_time: Duration::ZERO,
    };
    let started = Instant::now();
    let mut pending = Pending::default();
    let mut reader = open(&options.capture)?;
    while let Some(d) = reader.next() {
        let d = d.with_context(|| format!("{}", options.capture.display()))?;
        pending.settle(Some(d.at), &mut tally);
        let hop = match d.hop {
            Some(hop) => hop,
            None if d.dst.port() == port => Hop::Client,
            None if d.src.port() == port => Hop::Reply,
            None => continue,
        };
        // A recording holds each client as the gateway saw it; a raw capture
        // in front of it holds the proxies' headers, as the wire did.
        let trusted = &options.listener.proxy_protocol_from;
        let (client, payload) = match hop {
            Hop::Client if d.hop.is_none() && trusted.contains(d.src.ip()) => match proxy_v2::parse(&d.payload) {
                Ok(Parsed::Proxied { source, payload, .. }) => (source, payload),
                Ok(Parsed::Local { payload }) => (d.src, payload),
                Err(_) => {
                    tally.report.proxy_header_errors += 1;
                    continue;
                }
            },
            // An answer through a proxy names its client as the destination.
            Hop::Reply if d.hop.is_none() && trusted.contains(d.dst.ip()) => match proxy_v2::parse(&d.payload) {
                Ok(Parsed::Proxied {
                    destination, payload, ..
                }) => (destination, payload),
                Ok(Parsed::Local { payload }) => (d.dst, payload),
                Err(_) => continue,
            },
            // A reply's client is where it went.
            Hop::Reply => (d.dst, d.payload.as_slice()),
            _ => (d.src, d.payload.as_slice()),
        };
        match hop {
            Hop::Client => {
                let new_outcome = new.client(d.at, payload, client);
                let old_outcome = match &mut old {
                    Some(old) => old.client(d.at, payload, client),
                    None => Outcome {
                        dropped: d.verdict.as_deref().and_then(drop_reason),
                        ..Outcome::default()
                    },
                };
                pending.push(d.at, client, payload, old_outcome, new_outcome);
            }
            Hop::Reply if old.is_none() => pending.add_reply(&client, payload),
            Hop::Forward if old.is_none() => {
                if let Some(client) = &d.client {
                    pending.add_forward(client, d.dst, &d.payload);
                }
            }
            Hop::Upstream => {
                let Some(client) = d.client else { continue };
                let Some(x) = pending.of(&client) else { continue };
                let before = x.bytes();
                if let Some(answer) = new.upstream(d.at, d.src, client, &d.payload) {
                    merge(&mut x.new, answer);
                }
                if let Some(old) = &mut old
                    && let Some(answer) = old.upstream(d.at, d.src, client, &d.payload)
                {
                    merge(&mut x.old, answer);
                }
                let grown = x.bytes() - before;
                pending.bytes += grown;
            }
            Hop::Reply | Hop::Forward => {}
        }
    }
    pending.settle(None, &mut tally);
    let elapsed = started.elapsed();

    let Tally {
        mut report,
        new_time,
        old_time,
        ..
    } = tally;
    report.datagrams_per_second = report.datagrams as f64 / elapsed.as_secs_f64().max(1e-9);
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
        if self.proxy_header_errors > 0 {
            let _ = writeln!(
                s,
                "  not replayed: {} datagrams of a --proxy-protocol-from proxy without a valid PROXY v2 header (a gateway drops them)",
                self.proxy_header_errors
            );
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

    fn survey(datagrams: &[(&str, &str)]) -> Survey {
        let mut survey = Survey {
            ports: HashMap::new(),
            recording: false,
            first: Duration::ZERO,
        };
        for (n, (_, dst)) in datagrams.iter().enumerate() {
            let dst: SocketAddr = dst.parse().unwrap();
            survey.ports.entry(dst.port()).or_insert((0, n as u64, dst)).0 += 1;
        }
        survey
    }

    #[test]
    fn the_gateway_port_is_the_one_most_datagrams_went_to() {
        let mut capture = vec![("127.0.0.1:4000", "127.0.0.1:8008"); 3];
        capture.push(("127.0.0.1:8008", "127.0.0.1:4000"));
        capture.push(("127.0.0.1:5000", "127.0.0.1:53"));
        assert_eq!(survey(&capture).busiest_port(), Some(8008));
        // One reply per request: a tie, won by the port that received first.
        let exchange = [
            ("127.0.0.1:9000", "127.0.0.1:40000"),
            ("127.0.0.1:40000", "127.0.0.1:9000"),
        ];
        assert_eq!(survey(&exchange).busiest_port(), Some(40000));
    }

    fn tally() -> Tally {
        Tally {
            report: Report {
                capture: String::new(),
                port: 0,
                module: String::new(),
                against: String::new(),
                datagrams: 0,
                same: 0,
                different: 0,
                only_old_answered: 0,
                only_new_answered: 0,
                new_traps: 0,
                new_timeouts: 0,
                proxy_header_errors: 0,
                forwards_compared: false,
                new_guest_ms: 0.0,
                old_guest_ms: None,
                guest_time_ratio: None,
                datagrams_per_second: 0.0,
                differences: Vec::new(),
            },
            first: Duration::ZERO,
            new_time: Duration::ZERO,
            old_time: Duration::ZERO,
        }
    }

    fn answered(reply: &[u8]) -> Outcome {
        Outcome {
            replies: vec![reply.to_vec()],
            ..Outcome::default()
        }
    }

    #[test]
    fn a_datagram_is_compared_once_its_window_passes_or_the_pending_bytes_overflow() {
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        let mut pending = Pending::default();
        let mut tally = tally();
        pending.push(Duration::ZERO, a, b"q1", Outcome::default(), answered(b"Q1"));
        // A reply inside the window belongs to it: the same.
        pending.add_reply(&a, b"Q1");
        pending.settle(Some(REPLY_WINDOW - Duration::from_millis(1)), &mut tally);
        assert_eq!(tally.report.datagrams, 0);
        pending.settle(Some(REPLY_WINDOW), &mut tally);
        assert_eq!((tally.report.datagrams, tally.report.same), (1, 1));
        // Past its window, a late reply finds nothing open.
        pending.add_reply(&a, b"late");
        assert!(pending.queue.is_empty() && pending.open.is_empty() && pending.bytes == 0);
        // A client's replies go to its latest datagram.
        let at = REPLY_WINDOW * 2;
        pending.push(at, b, b"x", Outcome::default(), answered(b"X"));
        pending.push(at, b, b"y", Outcome::default(), answered(b"Y"));
        pending.add_reply(&b, b"Y");
        // Too many bytes pending: the oldest is compared early.
        let big = vec![0u8; MAX_PENDING_BYTES + 1];
        pending.push(at, a, &big, Outcome::default(), Outcome::default());
        pending.settle(Some(at), &mut tally);
        assert_eq!(tally.report.datagrams, 4, "all three early, by bytes");
        assert_eq!((tally.report.same, tally.report.different), (3, 1));
        assert_eq!(tally.report.differences[0].request, "\"x\"");
        assert!(pending.bytes == 0 && pending.open.is_empty());
    }

    #[test]
    fn bytes_are_shown_escaped_and_cut() {
        assert_eq!(escaped(b"a\"b\\\x00\xff"), r#""a\"b\\\x00\xff""#);
        assert!(escaped(&[b'x'; 300]).ends_with("… (300 bytes)"));
    }
}
