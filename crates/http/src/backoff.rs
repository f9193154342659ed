//! Retry delays: exponential growth to a ceiling with random jitter, so that many clients
//! that failed together (sidecars losing the control plane, webhook retries) do not come back
//! in step. One implementation for the subscription, the usage shipper and webhooks.

use std::time::Duration;

/// A uniformly random fraction in `[0, 1)`; 1.0 when the system has no randomness to give,
/// which only makes a retry wait its full ceiling.
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1.0;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// A random duration in `[0, ceiling]`: "full jitter".
pub fn full_jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(random_fraction())
}

/// A random duration in `[ceiling / 2, ceiling]`: "equal jitter", for retries that must not
/// come back too soon (webhook receivers).
pub fn equal_jitter(ceiling: Duration) -> Duration {
    ceiling / 2 + (ceiling / 2).mul_f64(random_fraction())
}

/// The ceiling after `failures` consecutive failures (1-based): `start` doubling up to `max`.
pub fn ceiling(start: Duration, max: Duration, failures: u32) -> Duration {
    start.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(max)
}

/// Consecutive-failure state of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub const fn new(start: Duration, max: Duration) -> Backoff {
        Backoff { start, max, failures: 0 }
    }

    /// Records a failure and returns how long to wait before the next try (full jitter).
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        full_jitter(ceiling(self.start, self.max, self.failures))
    }

    /// A success: the next failure starts from `start` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_to_the_maximum_and_jitter_stays_under_it() {
        let (start, max) = (Duration::from_millis(200), Duration::from_secs(30));
        assert_eq!(ceiling(start, max, 1), start);
        assert_eq!(ceiling(start, max, 4), Duration::from_millis(1600));
        assert_eq!(ceiling(start, max, 100), max);
        let mut backoff = Backoff::new(start, max);
        for failure in 1..=12 {
            let delay = backoff.fail();
            assert!(delay <= ceiling(start, max, failure), "{failure}: {delay:?}");
        }
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        for _ in 0..100 {
            let delay = equal_jitter(Duration::from_secs(8));
            assert!(delay >= Duration::from_secs(4) && delay <= Duration::from_secs(8));
        }
    }
}
