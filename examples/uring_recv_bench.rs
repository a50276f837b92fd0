//! Would io_uring make reading session sockets cheaper? (Issue 30, part 2.)
//!
//! A worker reads its session sockets as the poller says they are ready: one
//! `recvmmsg` (up to 32 datagrams) per ready socket per turn, and an
//! `epoll_wait` when nothing is ready. io_uring can instead keep one multishot
//! receive armed on every socket, the datagrams landing in buffers the
//! process registered once (a provided-buffer ring), so that one
//! `io_uring_enter` reaps datagrams of every socket. This measures the two
//! side by side, outside the gateway, on its shape: 64 connected session
//! sockets, an upstream (a thread sending a turn's datagrams spread over
//! them, one `send` each) pinned to the reader's CPU as `forward_bench` pins
//! the upstream with the gateway.
//!
//! - `epoll + recvmmsg`: today's loop (mio, edge-triggered, the gateway's own
//!   `RecvBatch`, one batch per ready socket per turn);
//! - `io_uring multishot`: `IORING_OP_RECV` with `IORING_RECV_MULTISHOT` on
//!   every socket, 1,024 provided buffers of 2 KiB, one `io_uring_enter` per
//!   wait, each buffer given back as soon as its datagram is counted.
//!
//!     cargo build --release --examples && target/release/examples/uring_recv_bench [--runs 5] [--size 64]
//!
//! The loop is closed (at most `--window` datagrams on their way), so nothing
//! is lost to a full buffer. The reader's CPU per datagram is its thread's
//! CPU time; the rate is datagrams read per second of wall time. Runs are
//! interleaved, medians shown. Loopback only, bounded in count.

use std::net::UdpSocket;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use io_uring::{IoUring, cqueue, opcode, types};
use wasmgate::net::batch::RecvBatch;

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
    datagrams: u64,
    /// Session sockets the datagrams are spread over.
    #[arg(long, default_value_t = 64)]
    sockets: usize,
    /// Datagrams the upstream sends per turn.
    #[arg(long, default_value_t = 32)]
    turn: usize,
    /// Payload bytes (at most 2,048).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Datagrams on their way at most (sent, not yet read).
    #[arg(long, default_value_t = 256)]
    window: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Epoll,
    Uring,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Epoll => "epoll + recvmmsg",
            Self::Uring => "io_uring multishot",
        }
    }
}

struct Outcome {
    rate: f64,
    reader_ns: f64,
    process_ns: f64,
    calls: f64,
}

/// Provided buffers and their size.
const BUFFERS: u16 = 1024;
const BUFFER: usize = 2048;

/// 64 connected pairs: the session sockets (non-blocking) and the upstream's.
fn pairs(n: usize) -> anyhow::Result<(Vec<UdpSocket>, Vec<UdpSocket>)> {
    let (mut readers, mut senders) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (r, s) = (UdpSocket::bind("127.0.0.1:0")?, UdpSocket::bind("127.0.0.1:0")?);
        r.connect(s.local_addr()?)?;
        s.connect(r.local_addr()?)?;
        r.set_nonblocking(true)?;
        readers.push(r);
        senders.push(s);
    }
    Ok((readers, senders))
}

/// The upstream: sends `total` datagrams a turn at a time over its sockets,
/// never more than `window` ahead of what was read.
fn upstream(
    senders: Vec<UdpSocket>,
    args: &Args,
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (total, turn, window, size) = (args.datagrams, args.turn, args.window, args.size);
    std::thread::spawn(move || {
        pin(0);
        let payload = vec![b'x'; size];
        let mut sent = 0u64;
        let mut next = 0usize;
        while sent < total && !stop.load(Ordering::Relaxed) {
            if sent >= read.load(Ordering::Relaxed) + window {
                std::thread::yield_now();
                continue;
            }
            for _ in 0..turn.min((total - sent) as usize) {
                if senders[next % senders.len()].send(&payload).is_ok() {
                    sent += 1;
                }
                next += 1;
            }
        }
    })
}

fn run(mode: Mode, args: &Args) -> anyhow::Result<Outcome> {
    let (readers, senders) = pairs(args.sockets)?;
    let read = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (wall0, process0, thread0) = (
        Instant::now(),
        clock(libc::CLOCK_PROCESS_CPUTIME_ID),
        clock(libc::CLOCK_THREAD_CPUTIME_ID),
    );
    let handle = upstream(senders, args, Arc::clone(&read), Arc::clone(&stop));
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = match mode {
        Mode::Epoll => read_epoll(&readers, args.datagrams, &read, deadline),
        Mode::Uring => read_uring(&readers, args.datagrams, &read, deadline),
    };
    let (wall, reader) = (wall0.elapsed(), clock(libc::CLOCK_THREAD_CPUTIME_ID) - thread0);
    stop.store(true, Ordering::Relaxed);
    let _ = handle.join();
    let process = clock(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
    let calls = result?;
    let n = read.load(Ordering::Relaxed) as f64;
    Ok(Outcome {
        rate: n / wall.as_secs_f64(),
        reader_ns: reader.as_nanos() as f64 / n,
        process_ns: process.as_nanos() as f64 / n,
        calls: calls as f64 / n,
    })
}

/// Today's loop; the system calls it made.
fn read_epoll(readers: &[UdpSocket], total: u64, read: &AtomicU64, deadline: Instant) -> anyhow::Result<u64> {
    let mut poll = mio::Poll::new()?;
    let fds: Vec<i32> = readers.iter().map(|r| r.as_raw_fd()).collect();
    for (i, fd) in fds.iter().enumerate() {
        poll.registry()
            .register(&mut mio::unix::SourceFd(fd), mio::Token(i), mio::Interest::READABLE)?;
    }
    let mut events = mio::Events::with_capacity(256);
    let mut rx = RecvBatch::new(32, BUFFER);
    let mut ready = std::collections::VecDeque::new();
    let mut queued = vec![false; readers.len()];
    let mut calls = 0u64;
    let mut count = 0u64;
    while count < total && Instant::now() < deadline {
        let timeout = if ready.is_empty() {
            Some(Duration::from_millis(100))
        } else {
            Some(Duration::ZERO)
        };
        poll.poll(&mut events, timeout)?;
        calls += 1;
        for e in &events {
            let i = e.token().0;
            if !queued[i] {
                queued[i] = true;
                ready.push_back(i);
            }
        }
        for _ in 0..ready.len() {
            let Some(i) = ready.pop_front() else { break };
            calls += 1;
            match rx.try_recv(&readers[i]) {
                Ok(n) => {
                    count += n as u64;
                    read.fetch_add(n as u64, Ordering::Relaxed);
                    if n == rx.capacity() {
                        ready.push_back(i);
                    } else {
                        queued[i] = false;
                    }
                }
                Err(_) => queued[i] = false,
            }
        }
    }
    Ok(calls)
}

/// Multishot receives on every socket into provided buffers.
fn read_uring(readers: &[UdpSocket], total: u64, read: &AtomicU64, deadline: Instant) -> anyhow::Result<u64> {
    let mut ring: IoUring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(256)?;
    // The buffer ring: page-aligned entries, and the buffers they point at.
    let layout = std::alloc::Layout::from_size_align(BUFFERS as usize * 16, 4096)?;
    // SAFETY: a non-zero size; zeroed memory is a valid array of entries.
    let base = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
    anyhow::ensure!(!base.is_null(), "no memory for the buffer ring");
    // The kernel writes datagrams here, through the address alone.
    let mut buffers = vec![0u8; BUFFERS as usize * BUFFER];
    let buffers_at = buffers.as_mut_ptr() as u64;
    let give = |bid: u16, slot: u16| {
        // SAFETY: `slot` < BUFFERS, inside the ring; the kernel reads only
        // entries the tail has passed, and this one is past the head.
        let entry = unsafe { &mut *base.add(slot as usize) };
        entry.set_addr(buffers_at + u64::from(bid) * BUFFER as u64);
        entry.set_len(BUFFER as u32);
        entry.set_bid(bid);
    };
    for bid in 0..BUFFERS {
        give(bid, bid);
    }
    // SAFETY: the tail field overlays the first entry's reserved field.
    let tail = unsafe { &*types::BufRingEntry::tail(base).cast::<AtomicU16>() };
    let mut next_tail = BUFFERS;
    tail.store(next_tail, Ordering::Release);
    // SAFETY: the ring memory stays allocated and in place until unregistered below.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(base as u64, BUFFERS, 0, 0)
    }?;
    let arm = |ring: &mut IoUring, i: usize| -> anyhow::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(readers[i].as_raw_fd()), 0)
            .build()
            .user_data(i as u64);
        // SAFETY: the receive writes only into provided buffers.
        unsafe { ring.submission().push(&entry) }.map_err(|_| anyhow::anyhow!("the submission queue is full"))
    };
    for i in 0..readers.len() {
        arm(&mut ring, i)?;
    }
    let mut calls = 0u64;
    let mut count = 0u64;
    let mut rearm = Vec::new();
    while count < total && Instant::now() < deadline {
        match ring.submitter().submit_with_args(
            1,
            &types::SubmitArgs::new().timespec(&types::Timespec::new().nsec(100_000_000)),
        ) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e.into()),
        }
        calls += 1;
        for cqe in ring.completion() {
            let flags = cqe.flags();
            if cqe.result() >= 0 {
                count += 1;
                read.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(bid) = cqueue::buffer_select(flags) {
                // The datagram is counted: its buffer goes back at once.
                give(bid, next_tail % BUFFERS);
                next_tail = next_tail.wrapping_add(1);
                tail.store(next_tail, Ordering::Release);
            }
            if !cqueue::more(flags) {
                rearm.push(cqe.user_data() as usize);
            }
        }
        for i in rearm.drain(..) {
            arm(&mut ring, i)?;
        }
    }
    let _ = ring.submitter().unregister_buf_ring(0);
    drop(ring);
    drop(buffers);
    // SAFETY: allocated above with this layout; the ring that used it is gone.
    unsafe { std::alloc::dealloc(base.cast(), layout) };
    Ok(calls)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.size <= BUFFER, "--size is at most {BUFFER}");
    pin(0);
    let modes = [Mode::Epoll, Mode::Uring];
    let mut results: Vec<Vec<Outcome>> = modes.iter().map(|_| Vec::new()).collect();
    for run_no in 0..args.runs {
        for (i, &mode) in modes.iter().enumerate() {
            results[i].push(run(mode, &args)?);
        }
        eprintln!("  run {} of {}", run_no + 1, args.runs);
    }
    println!(
        "{} datagrams of {} bytes over {} connected sockets, {} a turn, {} on their way; reader and upstream on CPU 0; medians of {}",
        args.datagrams, args.size, args.sockets, args.turn, args.window, args.runs
    );
    println!(
        "  {:<20} {:>12} {:>17} {:>18} {:>12}",
        "reads", "read/s", "reader CPU ns/dg", "process CPU ns/dg", "syscalls/dg"
    );
    for (i, mode) in modes.iter().enumerate() {
        let r = &results[i];
        println!(
            "  {:<20} {:>12.0} {:>17.0} {:>18.0} {:>12.3}",
            mode.name(),
            median(r.iter().map(|o| o.rate).collect()),
            median(r.iter().map(|o| o.reader_ns).collect()),
            median(r.iter().map(|o| o.process_ns).collect()),
            median(r.iter().map(|o| o.calls).collect()),
        );
    }
    Ok(())
}
