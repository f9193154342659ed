//! The clock seam: every reading of the wall clock or the monotonic clock in Tollgate goes
//! through this module (clippy's `disallowed-methods` refuses `SystemTime::now` and
//! `Instant::now` everywhere else), so tests can pass a [`ManualClock`] and move time
//! instead of sleeping. Reading a clock is not I/O: no file, socket or lock is touched.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time, in unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> i64;

    /// Unix seconds.
    fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        system_now_ms()
    }
}

/// The wall clock in unix milliseconds, for code that holds no [`Clock`] (the command line).
pub fn system_now_ms() -> i64 {
    #[expect(clippy::disallowed_methods, reason = "the clock module is the one place the wall clock is read")]
    let now = SystemTime::now();
    now.duration_since(UNIX_EPOCH).map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// A clock that only moves when told: for tests of expiry, periods and staleness.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock { now_ms: AtomicI64::new(now_ms) }
    }

    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Measures elapsed time on the monotonic clock (latency histograms, timeouts of blocking
/// work); not for anything a test would need to move.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    started: Instant,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        #[expect(clippy::disallowed_methods, reason = "the clock module is the one place the monotonic clock is read")]
        let started = Instant::now();
        Stopwatch { started }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now(), 1);
        clock.advance(Duration::from_secs(59));
        assert_eq!(clock.now_ms(), 60_000);
        clock.set_ms(-1);
        assert_eq!(clock.now(), -1, "before the epoch rounds down");
    }
}
