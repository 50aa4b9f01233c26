//! Exponential back-off: a delay that doubles with each consecutive failure, from
//! `first` up to `max`. One formula for every place that waits after a failure (a node
//! that failed, CUCM saying busy), so they cannot drift apart.

use std::time::Duration;

/// The doubling stops after this many steps (2^5 = 32×), whatever `max` says.
const MAX_DOUBLINGS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpBackoff {
    first: Duration,
    max: Duration,
}

impl ExpBackoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The wait after `failures` consecutive failures (1 = the first one).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(MAX_DOUBLINGS);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

/// `delay` scaled into 75 %…125 % by `unit` (a sample in 0..1), so callers refused
/// together do not come back together.
pub fn jittered(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.75 + 0.5 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_first_and_stops_at_max() {
        let backoff = ExpBackoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<u128> = (0..=7).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn the_doubling_is_bounded_even_with_a_large_max() {
        let backoff = ExpBackoff::new(Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(32));
    }

    #[test]
    fn jitter_spans_three_quarters_to_five_quarters() {
        let base = Duration::from_millis(400);
        assert_eq!(jittered(base, 0.0), Duration::from_millis(300));
        assert_eq!(jittered(base, 0.5), Duration::from_millis(400));
        assert_eq!(jittered(base, 1.0), Duration::from_millis(500));
        assert_eq!(jittered(base, 7.0), Duration::from_millis(500));
    }
}
