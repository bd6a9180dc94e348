//! Jittered exponential backoff for reconnect loops (node link, SSH sessions).

use std::time::Duration;

use rand::Rng;

/// Delays that double from `base` up to `max`, each drawn uniformly from the upper half of the
/// current step ("equal jitter"), so many nodes that lost the master at once do not reconnect in
/// lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=step - half)
    }

    /// Called after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_and_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(base, max);
        let mut step = base;
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
        assert_eq!(b.attempts(), 40);
        b.reset();
        assert!(b.next_delay() <= base);
    }
}
