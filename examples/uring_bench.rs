//! Does io_uring make per-client session sends cheaper? (Issue 30, part 2.)
//!
//! A worker forwarding for clients without a protocol ID sends each forward on
//! the client's own connected session socket: one `send` per datagram, since
//! `sendmmsg` batches only on one socket. io_uring can submit the sends of many
//! sockets in one system call. This measures the two side by side, outside the
//! gateway, on its shape: 64 connected session sockets, the datagrams of one
//! turn (32, a receive batch) spread over them, and the upstream (a thread
//! that reads and counts) pinned to the sender's CPU, as `forward_bench` pins
//! the upstream with the gateway.
//!
//! - `send`: one `send(2)` per datagram (today's loop);
//! - `io_uring`: one `io_uring_enter` per turn submitting the turn's sends
//!   (`IORING_OP_SEND` on each socket), waiting for their completions;
//! - `sendmmsg, one socket`: the turn in one `sendmmsg` on a single socket, the
//!   floor a shared-socket pool can reach (not possible with per-client sockets).
//!
//!     cargo build --release --examples && target/release/examples/uring_bench [--runs 5] [--datagrams 1000000]
//!
//! The loop is closed (at most `--window` datagrams on their way, as clients
//! waiting for answers keep them), so nothing is lost to a full buffer. Sender
//! CPU per datagram is the sending thread's CPU time in its send calls; the
//! rate is datagrams the upstream read per second of wall time (both share a
//! core, so a sender that wakes the upstream less often leaves it more of the
//! core). Runs are interleaved, medians shown. Loopback only, bounded in count.

use std::net::UdpSocket;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "support/inproc.rs"]
mod inproc;
use inproc::{clock, median, pin};

#[derive(Debug, Parser)]
struct Args {
    /// Interleaved runs of each mode.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Datagrams sent per run.
    #[arg(long, default_value_t = 1_000_000)]
    datagrams: usize,
    /// Session sockets the datagrams are spread over.
    #[arg(long, default_value_t = 64)]
    sockets: usize,
    /// Datagrams per turn (a receive batch's worth).
    #[arg(long, default_value_t = 32)]
    turn: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Datagrams on their way at most (sent, not yet read by the upstream).
    #[arg(long, default_value_t = 128)]
    window: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Send,
    Uring,
    Sendmmsg,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Send => "send, per socket",
            Self::Uring => "io_uring, per turn",
            Self::Sendmmsg => "sendmmsg, one socket",
        }
    }
}

struct Outcome {
    /// Datagrams the upstream received per second.
    rate: f64,
    /// Sender CPU per datagram sent, ns.
    cpu_ns: f64,
    /// System calls the sender made per datagram.
    calls: f64,
    /// The process's CPU per datagram, ns: sender, upstream, io_uring workers.
    total_ns: f64,
    /// io_uring worker threads seen (sends the kernel did not do inline).
    workers: usize,
    received: u64,
}

/// CPU time of the whole process: sender, upstream, and any io_uring workers.
fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The upstream's address, its count of datagrams read, its stop flag, and its thread.
type Upstream = (
    std::net::SocketAddr,
    Arc<AtomicU64>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
);

/// The upstream: reads and counts until told to stop.
fn upstream() -> anyhow::Result<Upstream> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    // Room for the window at any size (the default holds ~100 of 1,400 bytes).
    let size: libc::c_int = 4 << 20;
    // SAFETY: a valid socket and an int option of the given length.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let addr = socket.local_addr()?;
    let (count, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (c, s) = (Arc::clone(&count), Arc::clone(&stop));
    let handle = std::thread::spawn(move || {
        pin(0);
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) {
            if socket.recv(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok((addr, count, stop, handle))
}

fn run(mode: Mode, args: &Args) -> anyhow::Result<Outcome> {
    let (to, count, stop, handle) = upstream()?;
    let sockets: Vec<UdpSocket> = (0..args.sockets)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(to)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()?;
    let payload = vec![b'x'; args.size];
    let mut ring = io_uring::IoUring::new(256)?;
    let turns = args.datagrams / args.turn;
    let mut next = 0usize;
    let mut calls = 0u64;
    let (wall0, process0) = (Instant::now(), process_cpu());
    let mut cpu = Duration::ZERO;
    let mut workers = 0;
    for _ in 0..turns {
        // Closed loop, as clients waiting for answers are: at most `window`
        // datagrams on their way, so none is lost to a full upstream buffer.
        while next as u64 > count.load(Ordering::Relaxed) + args.window as u64 {
            std::thread::yield_now();
        }
        let cpu0 = thread_cpu();
        match mode {
            Mode::Send => {
                for _ in 0..args.turn {
                    let _ = sockets[next % sockets.len()].send(&payload);
                    next += 1;
                    calls += 1;
                }
            }
            Mode::Uring => {
                {
                    let mut sq = ring.submission();
                    for _ in 0..args.turn {
                        let fd = io_uring::types::Fd(sockets[next % sockets.len()].as_raw_fd());
                        let entry = io_uring::opcode::Send::new(fd, payload.as_ptr(), payload.len() as u32).build();
                        // SAFETY: the payload outlives the submission: it is
                        // waited for below, before the next turn.
                        if unsafe { sq.push(&entry) }.is_err() {
                            anyhow::bail!("the submission queue is full");
                        }
                        next += 1;
                    }
                }
                ring.submit_and_wait(args.turn)?;
                calls += 1;
                for cqe in ring.completion() {
                    if cqe.result() < 0 {
                        anyhow::bail!(
                            "an io_uring send failed: {}",
                            std::io::Error::from_raw_os_error(-cqe.result())
                        );
                    }
                }
            }
            Mode::Sendmmsg => {
                let socket = &sockets[0];
                let mut iov: Vec<libc::iovec> = (0..args.turn)
                    .map(|_| libc::iovec {
                        iov_base: payload.as_ptr() as *mut _,
                        iov_len: payload.len(),
                    })
                    .collect();
                // SAFETY: zeroed mmsghdrs are valid; each points at one iovec above.
                let mut msgs: Vec<libc::mmsghdr> = iov
                    .iter_mut()
                    .map(|v| {
                        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                        m.msg_hdr.msg_iov = v;
                        m.msg_hdr.msg_iovlen = 1;
                        m
                    })
                    .collect();
                // SAFETY: `msgs` holds `turn` valid headers on a connected socket.
                unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
                calls += 1;
                next += args.turn;
            }
        }
        cpu += thread_cpu() - cpu0;
        if mode == Mode::Uring && workers == 0 {
            workers = io_workers();
        }
    }
    let sent = next as f64;
    // What is on its way reaches the upstream before the clock stops.
    std::thread::sleep(Duration::from_millis(100));
    let wall = wall0.elapsed() - Duration::from_millis(100);
    let total = process_cpu() - process0;
    stop.store(true, Ordering::Relaxed);
    let _ = handle.join();
    let received = count.load(Ordering::Relaxed);
    Ok(Outcome {
        rate: received as f64 / wall.as_secs_f64(),
        cpu_ns: cpu.as_nanos() as f64 / sent,
        calls: calls as f64 / sent,
        total_ns: total.as_nanos() as f64 / sent,
        workers,
        received,
    })
}

/// The process's io_uring worker threads (`iou-wrk-…`) now.
fn io_workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("iou-")))
                .count()
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pin(0);
    let modes = [Mode::Send, Mode::Uring, Mode::Sendmmsg];
    let mut results: Vec<Vec<Outcome>> = modes.iter().map(|_| Vec::new()).collect();
    for run_no in 0..args.runs {
        for (i, &mode) in modes.iter().enumerate() {
            results[i].push(run(mode, &args)?);
        }
        eprintln!("  run {} of {}", run_no + 1, args.runs);
    }
    println!(
        "{} datagrams of {} bytes over {} connected sockets, {} a turn; sender and upstream on CPU 0; medians of {}",
        args.datagrams, args.size, args.sockets, args.turn, args.runs
    );
    println!(
        "  {:<22} {:>12} {:>17} {:>18} {:>12} {:>8} {:>12}",
        "sends", "received/s", "sender CPU ns/dg", "process CPU ns/dg", "syscalls/dg", "lost", "io workers"
    );
    for (i, mode) in modes.iter().enumerate() {
        let r = &results[i];
        let lost: Vec<f64> = r
            .iter()
            .map(|o| (args.datagrams / args.turn * args.turn) as f64 - o.received as f64)
            .collect();
        println!(
            "  {:<22} {:>12.0} {:>17.0} {:>18.0} {:>12.3} {:>8.0} {:>12}",
            mode.name(),
            median(r.iter().map(|o| o.rate).collect()),
            median(r.iter().map(|o| o.cpu_ns).collect()),
            median(r.iter().map(|o| o.total_ns).collect()),
            median(r.iter().map(|o| o.calls).collect()),
            median(lost),
            r.iter().map(|o| o.workers).max().unwrap_or(0)
        );
    }
    Ok(())
}
