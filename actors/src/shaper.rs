//! `Shaper`: may a CUCM call start now? At most `max_concurrent` calls in flight and at
//! most `max_requests_per_second` (with `burst`).
//!
//! It only counts slots and tokens; which device goes next is the
//! [`Scheduler`](crate::scheduler::Scheduler)'s business. Generic over governor's
//! `Clock`, so it is tested with `FakeRelativeClock`: no sleeping, no real time.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A rate with its burst, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// Why a call may not start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// All slots are taken; the next `release` frees one.
    AtCapacity,
    /// The rate limit allows the next call after this long.
    RateLimited(Duration),
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct Shaper<C: Clock = DefaultClock> {
    max_concurrent: usize,
    in_flight: usize,
    rate: Option<Rate>,
    limiter: Option<Limiter<C>>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for Shaper<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper")
            .field("max_concurrent", &self.max_concurrent)
            .field("in_flight", &self.in_flight)
            .field("rate", &self.rate)
            .finish()
    }
}

impl Shaper<DefaultClock> {
    pub fn new(max_concurrent: usize, rate: Option<Rate>) -> Self {
        Self::with_clock(max_concurrent, rate, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Shaper<C> {
    pub fn with_clock(max_concurrent: usize, rate: Option<Rate>, clock: C) -> Self {
        let limiter = rate.map(|rate| {
            let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
            RateLimiter::direct_with_clock(quota, clock.clone())
        });
        Self {
            max_concurrent: max_concurrent.max(1),
            in_flight: 0,
            rate,
            limiter,
            clock,
        }
    }

    /// Takes a slot and a rate token, or says why not. A refused call takes nothing.
    pub fn try_acquire(&mut self) -> Result<(), Held> {
        if self.in_flight >= self.max_concurrent {
            return Err(Held::AtCapacity);
        }
        if let Some(limiter) = &self.limiter {
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(self.clock.now());
                // A zero wait would spin; governor's granularity is nanoseconds.
                return Err(Held::RateLimited(wait.max(Duration::from_millis(1))));
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A call that had a slot is over (answered, failed, or gone to back off).
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    pub fn rate(&self) -> Option<Rate> {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
    }

    #[test]
    fn caps_concurrency() {
        let mut shaper = Shaper::with_clock(2, None, FakeRelativeClock::default());
        assert_eq!(shaper.try_acquire(), Ok(()));
        assert_eq!(shaper.try_acquire(), Ok(()));
        assert_eq!(shaper.try_acquire(), Err(Held::AtCapacity));
        assert_eq!(shaper.in_flight(), 2);
        shaper.release();
        assert_eq!(shaper.try_acquire(), Ok(()));
    }

    #[test]
    fn rate_limit_allows_burst_then_spaces_calls() {
        let clock = FakeRelativeClock::default();
        let mut shaper = Shaper::with_clock(100, rate(10, 3), clock.clone());
        for _ in 0..3 {
            assert_eq!(shaper.try_acquire(), Ok(()));
        }
        // 10/s: the fourth token comes 100 ms after the burst was spent.
        assert_eq!(
            shaper.try_acquire(),
            Err(Held::RateLimited(Duration::from_millis(100)))
        );
        clock.advance(Duration::from_millis(60));
        assert_eq!(
            shaper.try_acquire(),
            Err(Held::RateLimited(Duration::from_millis(40)))
        );
        clock.advance(Duration::from_millis(40));
        assert_eq!(shaper.try_acquire(), Ok(()));
        assert!(matches!(shaper.try_acquire(), Err(Held::RateLimited(_))));
    }

    #[test]
    fn a_call_held_at_capacity_spends_no_token() {
        let clock = FakeRelativeClock::default();
        let mut shaper = Shaper::with_clock(1, rate(1, 1), clock.clone());
        assert_eq!(shaper.try_acquire(), Ok(()));
        assert_eq!(shaper.try_acquire(), Err(Held::AtCapacity));
        shaper.release();
        clock.advance(Duration::from_secs(1));
        assert_eq!(shaper.try_acquire(), Ok(()));
    }
}
