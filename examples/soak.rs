//! A soak: the release `wasmgate` binary serves for a set time under steady
//! correct traffic from many clients (half answered by the guest, half forwarded
//! to an echoing upstream and back), mixed with hostile datagrams, spoofed
//! sources that open sessions nobody answers, a flooding upstream, and datagrams
//! from the gateway's own port, while its module is swapped every second (a good
//! module, then a broken one, in turn), SIGHUP arrives every few seconds and the
//! metrics are scraped every second.
//!
//!     scripts/soak.sh --minutes 30
//!
//! It fails (exit 1) if any correct datagram was lost or answered wrongly, or if
//! resident memory or open file descriptors grew; it prints their curve. Traffic
//! goes to 127.0.0.1 only, and every loop ends with the set time.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
#[path = "support/procfs.rs"]
mod procfs;
use procfs::rss_kib;

#[derive(Debug, Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Clients sending correct datagrams, one in flight each.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Datagrams per second each correct client sends at most.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// The wasmgate binary.
    #[arg(long, default_value = "target/release/wasmgate")]
    wasmgate: PathBuf,
    /// Seconds between samples of memory and descriptors.
    #[arg(long, default_value_t = 30)]
    sample_every: u64,
    /// Spoofed sources a second, each opening a session nobody answers.
    #[arg(long, default_value_t = 200)]
    spoofed: u64,
    /// Datagrams the flooding upstream sends for each one it gets (once a second).
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// Busy loops beside the gateway, as on a loaded host (each a thread that
    /// only spins), so that workers are preempted mid-call.
    #[arg(long, default_value_t = 0)]
    busy: usize,
    /// Run a candidate beside the active module (a tenth of the datagrams
    /// shadowed) and record a hundredth of the traffic.
    #[arg(long)]
    proving: bool,
    /// Share the state through a redis-server (Debian's, started here on a
    /// loopback port) that, every minute, is blackholed (SIGSTOP) for 10 s and
    /// later killed and restarted.
    #[arg(long)]
    redis: bool,
}

/// A redis-server on a loopback port, killed when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(port: u16) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("--redis needs redis-server (Debian: apt install redis-server): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port })
    }

    fn signal(&self, name: &str) {
        // Quiet: the drop of a restarted server's old handle signals a process already gone.
        let _ = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start(self.port)?;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uppercases (counting each datagram's first three bytes in the state), and misbehaves on datagrams starting with `!`: `!L` loops, `!T`
/// traps, `!M` grows memory without end, `!A` replies 4× too much. Forwards
/// datagrams starting with `F` to the pool `backend` (an echo), `S` to `silent`
/// (never answers) and `X` to `flood` (answers each with a burst). `{variant}`
/// makes two good modules with different bytes (so that each swap recompiles).
fn good_module(variant: u32) -> String {
    format!(
        r#"(module
        (import "wasmgate" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
        (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
        (memory (export "memory") 1)
        (data (i32.const 0) "backend")
        (data (i32.const 16) "silent")
        (data (i32.const 32) "flood")
        (global $variant i32 (i32.const {variant}))
        (func (export "alloc") (param i32) (result i32) i32.const 1024)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (local $i i32) (local $c i32)
            (if (i32.ge_u (local.get $len) (i32.const 1))
                (then
                    (local.set $c (i32.load8_u (local.get $p)))
                    (if (i32.eq (local.get $c) (i32.const 70))
                        (then (drop (call $forward (i32.const 0) (i32.const 7) (local.get $p) (local.get $len)))
                              (return (i64.const -1))))
                    (if (i32.eq (local.get $c) (i32.const 83))
                        (then (drop (call $forward (i32.const 16) (i32.const 6) (local.get $p) (local.get $len)))
                              (return (i64.const -1))))
                    (if (i32.eq (local.get $c) (i32.const 88))
                        (then (drop (call $forward (i32.const 32) (i32.const 5) (local.get $p) (local.get $len)))
                              (return (i64.const -1))))))
            (if (i32.and (i32.ge_u (local.get $len) (i32.const 2))
                         (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)))
                (then
                    (local.set $c (i32.load8_u offset=1 (local.get $p)))
                    (if (i32.eq (local.get $c) (i32.const 76)) (then (loop $l (br $l))))
                    (if (i32.eq (local.get $c) (i32.const 84)) (then unreachable))
                    (if (i32.eq (local.get $c) (i32.const 77))
                        (then (loop $g (br_if $g (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))
                    (if (i32.eq (local.get $c) (i32.const 65))
                        (then (return (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32))
                                              (i64.extend_i32_u (i32.mul (local.get $len) (i32.const 4)))))))))
            ;; A counter per first three bytes (shared through Redis with --redis).
            (drop (call $incr (local.get $p)
                (select (local.get $len) (i32.const 3) (i32.lt_u (local.get $len) (i32.const 3)))
                (i64.const 1) (i64.const 60000)))
            (block $done (loop $next
                (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
                (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
                (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
                    (then (i32.store8 (i32.add (local.get $p) (local.get $i)) (i32.sub (local.get $c) (i32.const 32)))))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $next)))
            (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $len)))))"#
    )
}

/// Modules a reload must refuse, in turn.
const BROKEN: [&str; 4] = [
    "this is not WebAssembly",
    "(module (memory (export \"memory\") 1))",
    "(module (memory (export \"memory\") 1) (func $s unreachable) (start $s)
        (func (export \"alloc\") (param i32) (result i32) i32.const 0)
        (func (export \"handle\") (param i32 i32) (result i64) i64.const -1))",
    "(module (import \"wasi_snapshot_preview1\" \"fd_write\" (func (param i32 i32 i32 i32) (result i32)))
        (memory (export \"memory\") 1)
        (func (export \"alloc\") (param i32) (result i32) i32.const 0)
        (func (export \"handle\") (param i32 i32) (result i64) i64.const -1))",
];

/// Writes `contents` beside `path` and renames it over, as a deploy would.
fn swap(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, contents).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    lost: AtomicU64,
    wrong: AtomicU64,
    hostile: AtomicU64,
    spoofed: AtomicU64,
    redis_restarts: AtomicU64,
    floods: AtomicU64,
    scrapes: AtomicU64,
    scrape_failures: AtomicU64,
}

fn correct_client(addr: SocketAddr, seed: u64, rate: u64, stop: &AtomicBool, tally: &Tally) {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let mut state = seed | 1;
    let mut buf = vec![0u8; 2048];
    let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 1 + (state % 1200) as usize;
        // A numbered payload of letters and other bytes, never starting with `!`;
        // every other one starts with `F`, is forwarded, and comes back unchanged.
        let forwarded = n % 2 == 1;
        let mut payload = format!("{}{seed}:{n}:", if forwarded { "F" } else { "" }).into_bytes();
        const BYTES: &[u8] = b"abcXYZ 09-_\xc3\xa9";
        payload.extend((0..len).map(|i| BYTES[(state as usize + i) % BYTES.len()]));
        let expected = if forwarded {
            payload.clone()
        } else {
            payload.to_ascii_uppercase()
        };
        n += 1;
        tally.sent.fetch_add(1, Ordering::Relaxed);
        if socket.send_to(&payload, addr).is_err() {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // Replies to this client come in order; an earlier one that arrives late
        // would show as wrong, so one timeout is one loss and nothing else.
        match socket.recv_from(&mut buf) {
            Ok((got, _)) if buf[..got] == expected[..] => {
                tally.answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                tally.wrong.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                tally.lost.fetch_add(1, Ordering::Relaxed);
                if let Ok(local) = socket.local_addr() {
                    println!("soak: lost a datagram from {local} (payload {} bytes)", payload.len());
                }
            }
        }
        if let Some(rest) = gap.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn hostile_client(addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    let kinds: [&[u8]; 5] = [b"!L", b"!T", b"!M", b"!Aabc", &[0xff; 3000]];
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let _ = socket.send_to(kinds[i % kinds.len()], addr);
        tally.hostile.fetch_add(1, Ordering::Relaxed);
        i += 1;
        // Ten a second: each kind of drop stays under the 5-a-second warning
        // limit, so every drop warning is logged and a loss can be explained.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spoofed sources, as far as a process without raw sockets can make them: a new
/// source port for every datagram, sent in turn to the silent pool (a session
/// nobody answers) and to the echo (a session the upstream answers, as a
/// resolver would, though the source never reads it), never read and never
/// sent again; and a socket on the gateway's own port (127.0.0.2), as a
/// datagram spoofed from the gateway itself would arrive. `rate` a second.
fn spoofer(addr: SocketAddr, rate: u64, stop: &AtomicBool, tally: &Tally) {
    let own = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 2], addr.port()))).ok();
    let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(socket) = UdpSocket::bind("127.0.0.1:0") {
            let pool = if i.is_multiple_of(2) { 'S' } else { 'F' };
            let _ = socket.send_to(format!("{pool} spoofed {i}").as_bytes(), addr);
            tally.spoofed.fetch_add(1, Ordering::Relaxed);
        }
        if i.is_multiple_of(100)
            && let Some(own) = &own
        {
            let _ = own.send_to(b"loop?", addr);
            tally.spoofed.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
        std::thread::sleep(gap);
    }
}

/// Sessions on loopback: an echo, a silent one, and one that answers every
/// datagram with `burst` datagrams of 1,200 bytes. Their addresses.
fn upstreams(stop: &Arc<AtomicBool>, burst: usize, threads: &mut Vec<std::thread::JoinHandle<()>>) -> [SocketAddr; 3] {
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 3];
    for (kind, addr) in addrs.iter_mut().enumerate() {
        let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
        if let Ok(a) = socket.local_addr() {
            *addr = a;
        }
        let stop = Arc::clone(stop);
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let flood = [b'f'; 1200];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                match kind {
                    0 => {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                    2 => {
                        for _ in 0..burst {
                            let _ = socket.send_to(&flood, from);
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    addrs
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The gateway process; killed if the soak ends early.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let module = dir.path().join("guest.wat");
    std::fs::write(&module, good_module(0))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let [echo, silent, flood] = upstreams(&stop, args.burst, &mut threads);
    for _ in 0..args.busy {
        let stop = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        }));
    }
    let mut proving = Vec::new();
    if args.proving {
        let candidate = dir.path().join("candidate.wat");
        std::fs::write(&candidate, good_module(7))?;
        proving.push("--candidate".into());
        proving.push(candidate.display().to_string());
        proving.extend(
            [
                "--shadow-sample",
                "0.1",
                "--record-sample",
                "0.01",
                "--record-max-bytes",
                "50MiB",
            ]
            .map(String::from),
        );
        proving.push("--record".into());
        proving.push(dir.path().join("record.pcapng").display().to_string());
    }
    let mut redis = None;
    if args.redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let server = RedisServer::start(port)?;
        proving.push("--state-redis".into());
        proving.push(format!("redis://127.0.0.1:{port}"));
        proving.push("--state-redis-namespace".into());
        proving.push(format!("soak-{}", std::process::id()));
        redis = Some(server);
    }
    let mut child = Command::new(&args.wasmgate)
        .args(&proving)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--no-cache",
            "--upstream",
            &format!("backend={echo}"),
            "--upstream",
            &format!("silent={silent}"),
            "--upstream",
            &format!("flood={flood}"),
            "--module",
        ])
        .arg(&module)
        .env("RUST_LOG", "warn,wasmgate::service=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let gateway = Gateway(child);
    let pid = gateway.0.id();
    // Read the addresses from the log; count the rest of the lines (they must stay
    // few: failures are reported once, drops are rate-limited).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let log_lines = Arc::new(AtomicU64::new(0));
    {
        let log_lines = Arc::clone(&log_lines);
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                log_lines.fetch_add(1, Ordering::Relaxed);
                // Keep what explains a loss: drops of datagrams that were not hostile.
                if line.contains("dropped a datagram")
                    && !line.contains("reason=trap")
                    && !line.contains("reason=amplification")
                    && !line.contains("reason=denied_source")
                {
                    println!("soak: gateway said: {line}");
                }
                let _ = tx.send(line);
            }
        });
    }
    let (mut udp, mut metrics) = (None, None);
    while udp.is_none() || metrics.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(30))?;
        if let Some(url) = line.split("metrics=http://").nth(1) {
            metrics = url.split('/').next().and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if let Some(rest) = line.split("listen=").nth(1) {
            udp = rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse::<SocketAddr>().ok());
        }
    }
    let (Some(udp), Some(metrics)) = (udp, metrics) else {
        anyhow::bail!("wasmgate did not say where it serves");
    };
    println!(
        "soak: wasmgate pid {pid} on {udp}, metrics {metrics}, {} min, {} clients × {}/s, {} busy loops{}{}",
        args.minutes,
        args.clients,
        args.rate,
        args.busy,
        if args.proving {
            ", candidate and recording on"
        } else {
            ""
        },
        if args.redis {
            ", Redis blackholed and restarted every minute"
        } else {
            ""
        }
    );

    let tally = Arc::new(Tally::default());
    for i in 0..args.clients {
        let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
        let rate = args.rate;
        threads.push(std::thread::spawn(move || {
            correct_client(udp, 0x5eed + i as u64 * 7919, rate, &stop, &tally)
        }));
    }
    {
        let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
        threads.push(std::thread::spawn(move || hostile_client(udp, &stop, &tally)));
    }
    {
        let (stop, tally, rate) = (Arc::clone(&stop), Arc::clone(&tally), args.spoofed);
        threads.push(std::thread::spawn(move || spoofer(udp, rate, &stop, &tally)));
    }
    // The flooding upstream's victim: asks once a second, reads what it can.
    let flooded = UdpSocket::bind("127.0.0.1:0")?;
    flooded.set_nonblocking(true)?;

    let started = Instant::now();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let mut swaps = 0u64;
    let mut next_sample = Duration::ZERO;
    let mut second = 0u64;
    let mut slowest_scrape = Duration::ZERO;
    while started.elapsed() < run_for {
        if started.elapsed() >= next_sample {
            samples.push((started.elapsed().as_secs(), rss_kib(pid), open_fds(pid)));
            let (s, rss, fds) = samples[samples.len() - 1];
            println!(
                "t={s:>5}s rss={rss} KiB fds={fds} sent={} answered={} lost={} wrong={} hostile={} swaps={swaps}",
                tally.sent.load(Ordering::Relaxed),
                tally.answered.load(Ordering::Relaxed),
                tally.lost.load(Ordering::Relaxed),
                tally.wrong.load(Ordering::Relaxed),
                tally.hostile.load(Ordering::Relaxed),
            );
            next_sample += Duration::from_secs(args.sample_every);
        }
        // Every second: a swap, good and broken in turn; a scrape; every 5 s a SIGHUP.
        let contents = if second.is_multiple_of(2) {
            BROKEN[(second / 2) as usize % BROKEN.len()].to_string()
        } else {
            good_module((second / 2 % 2) as u32)
        };
        swap(&module, &contents);
        swaps += 1;
        let scraping = Instant::now();
        match scrape(metrics) {
            Some(_) => tally.scrapes.fetch_add(1, Ordering::Relaxed),
            None => tally.scrape_failures.fetch_add(1, Ordering::Relaxed),
        };
        slowest_scrape = slowest_scrape.max(scraping.elapsed());
        if second % 5 == 4 {
            let _ = Command::new("kill").args(["-HUP", &pid.to_string()]).status();
        }
        // Each minute: up for 40 s, silent for 10 s, back, and restarted at 55 s.
        if let Some(redis) = &mut redis {
            match second % 60 {
                40 => redis.signal("-STOP"),
                50 => redis.signal("-CONT"),
                55 => {
                    redis.restart()?;
                    tally.redis_restarts.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let mut drain = [0u8; 2048];
        while flooded.recv_from(&mut drain).is_ok() {}
        if flooded.send_to(b"X flood me", udp).is_ok() {
            tally.floods.fetch_add(1, Ordering::Relaxed);
        }
        second += 1;
        // On the second, whatever the scrape and the swap took.
        let next = Duration::from_secs(second);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    samples.push((started.elapsed().as_secs(), rss_kib(pid), open_fds(pid)));
    let body = scrape(metrics).unwrap_or_default();
    let metric = |name: &str| -> String {
        body.lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    println!("{}", metric("wasmgate_reload"));
    println!("{}", metric("wasmgate_datagrams_dropped_total"));
    println!("{}", metric("wasmgate_upstream_datagrams"));
    println!("{}", metric("wasmgate_endpoint_sessions_evicted_total"));
    println!("{}", metric("wasmgate_endpoint_session_idle_timeouts_total"));
    if redis.is_some() {
        println!("{}", metric("wasmgate_state_redis"));
        println!(
            "soak: redis restarted {} times",
            tally.redis_restarts.load(Ordering::Relaxed)
        );
    }

    let (sent, answered, lost, wrong) = (
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
        tally.lost.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
    );
    // Flat: after the first sample (start-up), memory stays within 25% (and 8 MiB)
    // of its first steady value. Descriptors are mostly the spoofed sources'
    // sessions, each living `unanswered_timeout`: their number settles in the
    // first two minutes and then wanders with the traffic's timing, so the
    // highest count of those minutes is the steady level, and the rest of the
    // run stays within 5% (and 8) of it.
    let steady = samples.get(1).copied().unwrap_or(samples[0]);
    let warm = samples
        .iter()
        .skip(1)
        .take_while(|s| s.0 <= 120)
        .map(|s| s.2)
        .max()
        .unwrap_or(steady.2);
    let max_rss = samples.iter().skip(1).map(|s| s.1).max().unwrap_or(0);
    let max_fds = samples.iter().skip(1).map(|s| s.2).max().unwrap_or(0);
    let max_later = samples.iter().filter(|s| s.0 > 120).map(|s| s.2).max().unwrap_or(warm);
    let last = samples[samples.len() - 1];
    let rss_flat = max_rss <= steady.1 + (steady.1 / 4).max(8 << 10);
    let fds_flat = max_later <= warm + (warm / 20).max(8);
    println!(
        "soak: {:.1} min, correct sent={sent} answered={answered} lost={lost} wrong={wrong}, hostile={}, spoofed={}, flood requests={} (× {} back), swaps={swaps}, scrapes={} (failed {}, slowest {slowest_scrape:?}), log lines={}",
        started.elapsed().as_secs_f64() / 60.0,
        tally.hostile.load(Ordering::Relaxed),
        tally.spoofed.load(Ordering::Relaxed),
        tally.floods.load(Ordering::Relaxed),
        args.burst,
        tally.scrapes.load(Ordering::Relaxed),
        tally.scrape_failures.load(Ordering::Relaxed),
        log_lines.load(Ordering::Relaxed),
    );
    println!(
        "soak: rss {} → max {} → {} KiB ({}); fds {} → max {} → {} ({})",
        steady.1,
        max_rss,
        last.1,
        if rss_flat { "flat" } else { "GREW" },
        warm,
        max_fds,
        last.2,
        if fds_flat { "flat" } else { "GREW" }
    );
    drop(gateway);
    let ok = lost == 0
        && wrong == 0
        && answered == sent
        && rss_flat
        && fds_flat
        && tally.scrape_failures.load(Ordering::Relaxed) == 0;
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
