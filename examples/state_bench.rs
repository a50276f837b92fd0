//! What the shared state's `limit` costs, beside a native baseline in the same
//! run: a token bucket in a plain `HashMap` owned by each thread (no lock, no
//! sharing, no guest; the same coarse clock), what a hand-written server
//! that shares nothing would do.
//!
//!     cargo build --release --examples && target/release/examples/state_bench [--calls 2000000] [--runs 5]
//!
//! Each figure is the median of `--runs` runs, in nanoseconds per call:
//! - `store, 1 thread` and `store, 2 threads`: `State::limit` called directly,
//!   each thread on its own 1,000 keys (uncontended: the sharding keeps the
//!   threads apart), and `2 threads, one key` (contended: both on one key);
//! - `guest, 2 workers`: what a `limit` host call adds to a datagram, through
//!   ABI v1 guests on two threads (the worker pattern: one instance each, one
//!   shared state): a guest making 60 `limit` calls per datagram against one
//!   making none, the difference divided by 60.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use wasmgate::config::{Isolation, Limits};
use wasmgate::guest::{Env, Guest};
use wasmgate::state::{State, StateLimits};

#[derive(Debug, Parser)]
struct Args {
    /// `limit` calls per thread per run.
    #[arg(long, default_value_t = 2_000_000)]
    calls: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

const KEYS: usize = 1000;
/// Calls per datagram in the guest (the datagram's allowance is 64).
const CALLS_PER_DATAGRAM: usize = 60;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("native HashMap bucket, 1 thread", Vec::new()),
        ("native HashMap bucket, 2 threads", Vec::new()),
        ("store, 1 thread", Vec::new()),
        ("store, 2 threads", Vec::new()),
        ("store, 2 threads, one key", Vec::new()),
        ("guest, 2 workers (per limit call)", Vec::new()),
    ];
    for _ in 0..args.runs {
        rows[0].1.push(native(1, args.calls));
        rows[1].1.push(native(2, args.calls));
        rows[2].1.push(store(1, args.calls, false));
        rows[3].1.push(store(2, args.calls, false));
        rows[4].1.push(store(2, args.calls, true));
        rows[5].1.push(guest(args.calls)?);
    }
    println!(
        "limit(key, rate, burst): nanoseconds per call, median of {} runs",
        args.runs
    );
    for (name, mut figures) in rows {
        figures.sort_by(f64::total_cmp);
        let all: Vec<String> = figures.iter().map(|f| format!("{f:.1}")).collect();
        println!(
            "  {name:<36} {:>7.1}   (runs: {})",
            figures[figures.len() / 2],
            all.join(", ")
        );
    }
    Ok(())
}

fn keys(thread: usize) -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| format!("10.{thread}.{}.{}", i / 256, i % 256).into_bytes())
        .collect()
}

/// The floor: GCRA in a `HashMap` each thread owns.
fn native(threads: usize, calls: usize) -> f64 {
    let handles: Vec<_> = (0..threads)
        .map(|t| std::thread::spawn(move || native_thread(t, calls)))
        .collect();
    per_call(slowest(handles), calls)
}

fn native_thread(thread: usize, calls: usize) -> Duration {
    let keys = keys(thread);
    let mut buckets: HashMap<Vec<u8>, u64> = HashMap::new();
    let (interval, tolerance) = (1_000_000u64, 100_000_000u64); // 1,000/s, burst 100
    let mut allowed = 0u64;
    let started = Instant::now();
    for i in 0..calls {
        let now = coarse_now();
        let key = &keys[i % KEYS];
        let tat = match buckets.get_mut(key) {
            Some(tat) => tat,
            None => buckets.entry(key.clone()).or_insert(now),
        };
        let t = (*tat).max(now);
        if t + interval - now <= tolerance {
            *tat = t + interval;
            allowed += 1;
        }
    }
    std::hint::black_box(allowed);
    started.elapsed()
}

/// The clock the store reads (CLOCK_MONOTONIC_COARSE), in nanoseconds.
fn coarse_now() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `threads` threads calling `State::limit`, each on its own keys or all on one.
fn store(threads: usize, calls: usize, one_key: bool) -> f64 {
    let state = Arc::new(State::new(StateLimits::default()));
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (state, barrier) = (Arc::clone(&state), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let keys = if one_key { vec![b"one".to_vec(); KEYS] } else { keys(t) };
                barrier.wait();
                let started = Instant::now();
                let mut allowed = 0u64;
                for i in 0..calls {
                    let now = state.now();
                    allowed += u64::from(state.limit(&keys[i % KEYS], 1000, 100, now) == Ok(true));
                }
                std::hint::black_box(allowed);
                started.elapsed()
            })
        })
        .collect();
    per_call(slowest(handles), calls)
}

/// The longest any of the threads took.
fn slowest(handles: Vec<std::thread::JoinHandle<Duration>>) -> Duration {
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .max()
        .unwrap_or_default()
}

/// A guest calling `limit` `n` times per datagram on a key made of the
/// datagram's first 8 bytes and a counter.
fn limiter(n: usize) -> String {
    format!(
        r#"(module
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (local $i i32) (local $sum i32)
    (block $done
      (loop $again
        (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
        (i32.store8 (i32.const 8) (local.get $i))
        (local.set $sum (i32.add (local.get $sum) (call $limit (i32.const 0) (i32.const 9) (i32.const 1000) (i32.const 100))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $again)))
    (i32.store (i32.const 100) (local.get $sum))
    (i64.const 0x0000006400000001)))"#
    )
}

/// Nanoseconds a `limit` host call adds, with two threads each running a guest.
fn guest(calls: usize) -> anyhow::Result<f64> {
    let env = Env::new(Limits::default())?;
    let with = Arc::new(env.load("60 limits", limiter(CALLS_PER_DATAGRAM).as_bytes())?);
    let without = Arc::new(env.load("no limit", limiter(0).as_bytes())?);
    let datagrams = calls / CALLS_PER_DATAGRAM;
    let time = |program: &Arc<wasmgate::guest::Program>| -> anyhow::Result<Duration> {
        let handles: Vec<_> = (0..2u8)
            .map(|t| {
                let mut guest = Guest::new(env.clone(), Arc::clone(program), Isolation::Reuse, 0.0);
                std::thread::spawn(move || -> anyhow::Result<Duration> {
                    let peer = format!("127.0.0.{}:4000", t + 1).parse()?;
                    let started = Instant::now();
                    for i in 0..datagrams {
                        // Each thread's own keys: 8 bytes of thread and datagram.
                        let mut d = [0u8; 8];
                        d[0] = t;
                        d[4..].copy_from_slice(&((i % 16) as u32).to_le_bytes());
                        guest.handle(&d, peer)?;
                    }
                    Ok(started.elapsed())
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for h in handles {
            let elapsed = h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
            slowest = slowest.max(elapsed);
        }
        Ok(slowest)
    };
    let (base, limited) = (time(&without)?, time(&with)?);
    Ok(per_call(limited.saturating_sub(base), datagrams * CALLS_PER_DATAGRAM))
}

fn per_call(elapsed: Duration, calls: usize) -> f64 {
    elapsed.as_nanos() as f64 / calls.max(1) as f64
}
