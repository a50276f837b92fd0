//! A guest call's time budget: the CPU time of the thread that runs it, so that
//! a worker preempted on a busy host is not charged for time it did not run
//! (Cloudflare Workers' CPU-time limit is the model), with a wall-time ceiling
//! for a guest that is held up rather than computing.
//!
//! Reading a thread's CPU clock is a system call (0.8 µs on this project's
//! machines), too dear for every datagram. So:
//! - a call's start is taken from a per-thread reading at most [`REFRESH`] old
//!   (a monotonic clock read through the vDSO tells its age), which charges a
//!   call for at most that much CPU time it did not use: the budget has one
//!   tick of slack for it;
//! - the clock is read again only when a call has run for its whole budget in
//!   wall time, since only then can it have spent its budget in CPU time: the
//!   epoch deadline fires, and [`on_deadline`] interrupts the guest or lets it
//!   go on for what it has left.
//!
//! The meter of the running call lives in a thread-local, since a guest runs
//! on the thread that called it from start to end, and the epoch callback is
//! called on that thread.

use std::cell::Cell;
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::ticker::TICK;

/// How stale the per-thread CPU reading a call starts from may be.
pub const REFRESH: Duration = Duration::from_micros(500);

/// What a call may spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// CPU time of the calling thread (`--timeout-ms`).
    pub cpu: Duration,
    /// Wall time, whatever the CPU time (`--wall-timeout-ms`).
    pub wall: Duration,
}

impl Budget {
    /// The CPU time after which a call is stopped: the budget and one tick of
    /// slack for the stale start reading (and the ticker's granularity).
    fn cpu_limit(&self) -> Duration {
        self.cpu + TICK
    }

    /// The epoch deadline of a call, in ticks: one more than the budget, so that
    /// a call that starts just before a tick still gets its whole budget in wall
    /// time before its CPU time is first read.
    pub fn deadline_ticks(&self) -> u64 {
        ticks(self.cpu.min(self.wall)) + 1
    }

    /// Starts metering a call on this thread, `tick` being the epoch ticks now.
    pub fn start(self, tick: u64) -> Meter {
        let now = Instant::now();
        let meter = Meter {
            budget: self,
            tick,
            started: now,
            cpu: cpu_now_cached(now),
        };
        METER.set(Some(meter));
        meter
    }
}

/// A call being metered.
#[derive(Clone, Copy, Debug)]
pub struct Meter {
    budget: Budget,
    /// The epoch ticks when it started.
    tick: u64,
    started: Instant,
    /// The thread's CPU time when it started (at most [`REFRESH`] early).
    cpu: Duration,
}

impl Meter {
    /// Whether the call spent more than its budget, checked after it returned:
    /// the epoch deadline interrupts only wasm code, and time inside host calls
    /// (WASI above all) is judged here. `tick` is the epoch ticks now; the clocks
    /// are read only when the call lasted its budget in wall time.
    pub fn overran(&self, tick: u64) -> bool {
        if tick.saturating_sub(self.tick) < self.budget.deadline_ticks() {
            return false;
        }
        self.verdict().is_err()
    }

    /// Whether the call may go on, and for how long before it is looked at again.
    fn verdict(&self) -> Result<Duration, Overrun> {
        let wall = self.started.elapsed();
        if wall >= self.budget.wall {
            return Err(Overrun::Wall);
        }
        let cpu = thread_cpu().saturating_sub(self.cpu);
        let limit = self.budget.cpu_limit();
        if cpu >= limit {
            return Err(Overrun::Cpu);
        }
        Ok((limit - cpu).min(self.budget.wall - wall))
    }
}

/// Which bound a call ran past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Overrun {
    Cpu,
    Wall,
}

thread_local! {
    /// The call running on this thread.
    static METER: Cell<Option<Meter>> = const { Cell::new(None) };
    /// This thread's CPU time, and when it was read.
    static CPU: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// The epoch callback of every store: the running call has used its budget in
/// wall time; it is interrupted if it has also used it in CPU time (or reached
/// the wall ceiling), else it goes on for what it has left. A store used with
/// no call started on this thread is interrupted.
pub fn on_deadline() -> wasmtime::Result<UpdateDeadline> {
    let Some(meter) = METER.get() else {
        return Ok(UpdateDeadline::Interrupt);
    };
    Ok(match meter.verdict() {
        Ok(left) => UpdateDeadline::Continue(ticks(left).max(1)),
        Err(_) => UpdateDeadline::Interrupt,
    })
}

/// `d` in epoch ticks, rounded up.
fn ticks(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(TICK.as_nanos())).unwrap_or(u64::MAX)
}

/// This thread's CPU time from a reading at most [`REFRESH`] old at `now`.
fn cpu_now_cached(now: Instant) -> Duration {
    match CPU.get() {
        Some((at, cpu)) if now.saturating_duration_since(at) < REFRESH => cpu,
        _ => {
            let cpu = thread_cpu();
            CPU.set(Some((now, cpu)));
            cpu
        }
    }
}

/// The CPU time this thread has used (user and system).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call, and
    // CLOCK_THREAD_CPUTIME_ID is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        // Cannot happen on Linux; counting nothing would never stop a guest,
        // so count the wall time instead (the old, stricter budget).
        return Instant::now().saturating_duration_since(*PROCESS_START);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

static PROCESS_START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

#[cfg(test)]
mod tests {
    use super::*;

    fn spin_cpu(d: Duration) {
        let start = thread_cpu();
        while thread_cpu().saturating_sub(start) < d {
            std::hint::spin_loop();
        }
    }

    const BUDGET: Budget = Budget {
        cpu: Duration::from_millis(5),
        wall: Duration::from_millis(500),
    };

    #[test]
    fn a_call_that_sleeps_past_its_cpu_budget_has_not_spent_it() {
        let meter = BUDGET.start(0);
        std::thread::sleep(Duration::from_millis(20));
        // Waiting is not computing: the call has CPU time left.
        let left = meter.verdict().expect("still within its CPU budget");
        assert!(left > Duration::from_millis(4), "{left:?}");
        assert!(!meter.overran(100));
    }

    #[test]
    fn a_call_that_computes_past_its_cpu_budget_has_overrun() {
        let meter = BUDGET.start(0);
        spin_cpu(Duration::from_millis(8));
        assert_eq!(meter.verdict(), Err(Overrun::Cpu));
        assert!(meter.overran(100));
        // Before the wall deadline in ticks the clocks are not even read.
        assert!(!meter.overran(1));
    }

    #[test]
    fn a_call_held_up_past_the_wall_ceiling_has_overrun() {
        let budget = Budget {
            cpu: Duration::from_millis(5),
            wall: Duration::from_millis(30),
        };
        let meter = budget.start(0);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(meter.verdict(), Err(Overrun::Wall));
    }

    #[test]
    fn the_deadline_callback_lets_a_waiting_call_go_on_and_stops_a_computing_one() {
        let _meter = BUDGET.start(0);
        std::thread::sleep(Duration::from_millis(10));
        assert!(matches!(on_deadline(), Ok(UpdateDeadline::Continue(n)) if n >= 1));
        spin_cpu(Duration::from_millis(8));
        assert!(matches!(on_deadline(), Ok(UpdateDeadline::Interrupt)));
    }

    #[test]
    fn a_store_with_no_call_started_on_its_thread_is_interrupted() {
        std::thread::spawn(|| assert!(matches!(on_deadline(), Ok(UpdateDeadline::Interrupt))))
            .join()
            .unwrap();
    }

    #[test]
    fn the_start_reading_is_at_most_refresh_old() {
        let before = thread_cpu();
        let _ = BUDGET.start(0);
        spin_cpu(Duration::from_millis(2));
        // Far more than REFRESH of wall time has passed: a fresh reading.
        let meter = BUDGET.start(0);
        assert!(meter.cpu >= before + Duration::from_millis(2));
        assert_eq!(BUDGET.deadline_ticks(), 6);
    }
}
