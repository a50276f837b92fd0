//! Warnings held to a rate, so that a flood of bad datagrams is a few log
//! lines that say how many were held back.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Lets through at most `per_second` events each second and counts the rest, so a
/// flood of bad datagrams becomes a few log lines that say how many were held back.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    start: Instant,
    window: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            start: Instant::now(),
            window: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this event may be logged, where `n` events were held back since
    /// the last one that was; `None` if it must not be.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(self.start.elapsed().as_secs())
    }

    fn allow_at(&self, second: u64) -> Option<u64> {
        let window = self.window.load(Relaxed);
        if second != window && self.window.compare_exchange(window, second, Relaxed, Relaxed).is_ok() {
            self.in_window.store(0, Relaxed);
        }
        if self.in_window.fetch_add(1, Relaxed) < self.per_second {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_holds_back_and_reports_the_excess() {
        let limit = RateLimit::new(2);
        assert_eq!(limit.allow_at(0), Some(0));
        assert_eq!(limit.allow_at(0), Some(0));
        assert_eq!(limit.allow_at(0), None);
        assert_eq!(limit.allow_at(0), None);
        // A new second: the first event through reports the two held back.
        assert_eq!(limit.allow_at(1), Some(2));
        assert_eq!(limit.allow_at(1), Some(0));
        assert_eq!(limit.allow_at(1), None);
    }
}
