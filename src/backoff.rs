//! Exponential backoff with "equal jitter", the one retry pace of the service: the
//! replication link, the sink runners and the write-back task all wait this way between
//! attempts. Half of each delay is fixed and half random, so that many processes restarting
//! together do not retry in lockstep; the delay doubles with every failure up to a cap and
//! starts over after a success.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay before the next attempt, counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// The longest the next delay can be.
    fn ceiling(&self) -> Duration {
        self.min
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// An attempt succeeded: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_start_over_after_a_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
        let mut backoff = Backoff::new(min, max);
        for failures in 0..40u32 {
            let ceiling = min.saturating_mul(1 << failures.min(16)).min(max);
            let d = backoff.next_delay();
            assert!(d <= ceiling && d >= ceiling / 2, "{failures}: {d:?}");
        }
        assert_eq!(backoff.failures(), 40);
        backoff.reset();
        let d = backoff.next_delay();
        assert!(d <= min && d >= min / 2, "{d:?}");
    }
}
