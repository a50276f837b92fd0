//! A closed-loop UDP load generator that checks every reply.
//!
//!     cargo run --release --example loadgen -- --target 127.0.0.1:8008 \
//!         --clients 64 --window 16 --size 64 --seconds 5 [--pid SERVER_PID]
//!
//! Each client has its own socket and keeps `--window` requests in flight: every
//! reply (or loss, after `--loss-timeout-ms`) releases the next request. One thread
//! drives every socket, polling them in turn without blocking and moving datagrams
//! with `recvmmsg`/`sendmmsg` (wasmgate's own `udp` module), so that the generator
//! spends as little as possible per datagram and rarely limits the server. Payloads are
//! lowercase text led by an uppercase hex sequence number, so a reply is checked
//! against the uppercase transform exactly. After a warm-up it measures for a fixed
//! time and prints replies/s, lost and wrong replies, latency percentiles and,
//! given the server's pid, its CPU time per reply (from /proc). Loopback only:
//! it refuses any other target.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use wasmgate::net::batch::{RecvBatch, SendBatch};

#[path = "support/procfs.rs"]
mod procfs;
use procfs::cpu_seconds;

#[derive(Debug, Parser)]
struct Args {
    /// Gateway to load; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:8008")]
    target: SocketAddr,
    /// Client sockets.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Payload bytes per request (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// A request unanswered this long counts as lost and is replaced.
    #[arg(long, default_value_t = 200)]
    loss_timeout_ms: u64,
    /// The server's pid, to report its CPU time per reply.
    #[arg(long)]
    pid: Option<u32>,
    /// Print one machine-readable line instead of the table.
    #[arg(long)]
    csv: bool,
    /// Exit 0 even if some replies were wrong (to measure a server that truncates).
    #[arg(long)]
    allow_wrong: bool,
}

#[derive(Default)]
struct Totals {
    replies: u64,
    lost: u64,
    wrong: u64,
    latencies_us: Vec<u32>,
}

/// One client: its socket, its requests in flight, its batch buffers.
struct Client {
    socket: UdpSocket,
    rx: RecvBatch,
    tx: SendBatch,
    /// (sequence number, send time) of each slot; a request's slot is seq % window.
    sent_at: Vec<(u64, Instant)>,
    next_seq: u64,
    in_flight: usize,
    last_reply: Instant,
}

impl Client {
    fn new(args: &Args, id: usize) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(if args.target.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        })?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            rx: RecvBatch::new(args.window, args.size.max(16) + 1),
            tx: SendBatch::new(args.window, args.size),
            sent_at: vec![(u64::MAX, Instant::now()); args.window],
            next_seq: (id as u64) << 40,
            in_flight: 0,
            last_reply: Instant::now(),
        })
    }

    fn queue(&mut self, args: &Args, scratch: &mut Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent_at[(seq % args.window as u64) as usize] = (seq, Instant::now());
        fill(scratch, seq, args.size);
        self.tx.push(scratch, args.target);
        self.in_flight += 1;
    }

    /// Takes whatever replies are waiting, checks them, and sends one new request
    /// per reply (or a whole new window after a loss).
    fn step(
        &mut self,
        args: &Args,
        measuring: bool,
        totals: &mut Totals,
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let now = Instant::now();
        let received = match self.rx.recv(&self.socket) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => 0,
            Err(e) => return Err(e),
        };
        let mut answered = 0;
        for i in 0..received {
            let Some((reply, from)) = self.rx.get(i) else { continue };
            if from != args.target {
                continue;
            }
            let seq = std::str::from_utf8(reply.get(..16).unwrap_or(b"?"))
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            let Some(seq) = seq else {
                totals.wrong += u64::from(measuring);
                continue;
            };
            let slot = (seq % args.window as u64) as usize;
            if self.sent_at[slot].0 != seq {
                continue; // a late reply to a request already counted lost
            }
            self.sent_at[slot].0 = u64::MAX;
            self.in_flight -= 1;
            answered += 1;
            if measuring {
                fill(scratch, seq, args.size);
                scratch.make_ascii_uppercase();
                if reply == scratch.as_slice() {
                    totals.replies += 1;
                    let us = now.duration_since(self.sent_at[slot].1).as_micros();
                    totals.latencies_us.push(us.min(u128::from(u32::MAX)) as u32);
                } else {
                    totals.wrong += 1;
                }
            }
        }
        if answered > 0 {
            self.last_reply = now;
        } else if self.in_flight > 0
            && now.duration_since(self.last_reply) > Duration::from_millis(args.loss_timeout_ms)
        {
            // Everything in flight is overdue: count it lost and refill the window.
            totals.lost += if measuring { self.in_flight as u64 } else { 0 };
            self.in_flight = 0;
            self.last_reply = now;
        }
        while self.in_flight < args.window {
            self.queue(args, scratch);
        }
        let mut result = Ok(());
        self.tx.flush(&self.socket, |sent| {
            if let wasmgate::net::batch::Sent::Failed { error, .. } = sent
                && error.kind() != std::io::ErrorKind::ConnectionRefused
            {
                result = Err(error);
            }
        });
        result
    }
}

/// The request with sequence number `seq`: 16 uppercase hex digits, then lowercase text.
fn fill(out: &mut Vec<u8>, seq: u64, size: usize) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(out, "{seq:016X}");
    out.extend((0..size.saturating_sub(16)).map(|i| b'a' + (i % 26) as u8));
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.target.ip().is_loopback(),
        "loadgen only targets loopback addresses"
    );
    anyhow::ensure!(args.size >= 16, "--size must be at least 16 (the sequence number)");
    anyhow::ensure!(args.size <= 65_507, "--size must be at most 65,507");
    let mut clients = (0..args.clients)
        .map(|id| Client::new(&args, id))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut totals = Totals::default();
    let mut scratch = Vec::with_capacity(args.size);
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let mut cpu_before = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let measuring = now >= measure_from;
        if measuring && cpu_before.is_none() {
            cpu_before = Some(args.pid.and_then(cpu_seconds));
        }
        for c in &mut clients {
            c.step(&args, measuring, &mut totals, &mut scratch)?;
        }
    }
    let elapsed = end.duration_since(measure_from).as_secs_f64();
    let cpu_after = args.pid.and_then(cpu_seconds);

    totals.latencies_us.sort_unstable();
    let rate = totals.replies as f64 / elapsed;
    let (p50, p99, p999) = (
        percentile(&totals.latencies_us, 0.5),
        percentile(&totals.latencies_us, 0.99),
        percentile(&totals.latencies_us, 0.999),
    );
    let cpu_us = match (cpu_before.flatten(), cpu_after) {
        (Some(a), Some(b)) if totals.replies > 0 => (b - a) * 1e6 / totals.replies as f64,
        _ => f64::NAN,
    };
    if args.csv {
        println!(
            "{rate:.0},{},{},{p50:.0},{p99:.0},{p999:.0},{cpu_us:.2}",
            totals.lost, totals.wrong
        );
    } else {
        println!(
            "clients={} window={} size={} seconds={elapsed:.1}\nreplies/s={rate:.0} lost={} wrong={}\n\
             latency_us p50={p50:.0} p99={p99:.0} p99.9={p999:.0}\nserver_cpu_us_per_reply={cpu_us:.2}",
            args.clients, args.window, args.size, totals.lost, totals.wrong
        );
    }
    anyhow::ensure!(
        totals.wrong == 0 || args.allow_wrong,
        "{} replies did not match the uppercase transform",
        totals.wrong
    );
    Ok(())
}
