//! `Shaper`: what may go to CUCM now — at most `max_concurrent` calls in flight and at
//! most `max_requests_per_second` (with `burst`) — and in which order.
//!
//! It is a plain state machine the cluster actor drives: devices whose next operation
//! is ready line up in one FIFO; `try_admit` grants the front one a slot and a rate
//! token, or says why not and for how long. Each device has at most one entry (its
//! own queue keeps the rest), so a device with a hundred queued operations cannot
//! starve the others: that is the fairness across devices.
//!
//! Being synchronous and generic over governor's `Clock`, it is tested with
//! `FakeRelativeClock`: no sleeping, no real time.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::operation::DeviceName;

/// A rate with its burst, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send this device's next operation now; call `release` when it is answered.
    Granted(DeviceName),
    /// Nothing is waiting.
    Idle,
    /// All slots are taken; the next `release` frees one.
    AtCapacity,
    /// The rate limit holds the front device back for this long.
    RateLimited(Duration),
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct Shaper<C: Clock = DefaultClock> {
    max_concurrent: usize,
    in_flight: usize,
    ready: VecDeque<DeviceName>,
    limiter: Option<Limiter<C>>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for Shaper<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper")
            .field("max_concurrent", &self.max_concurrent)
            .field("in_flight", &self.in_flight)
            .field("ready", &self.ready.len())
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
            ready: VecDeque::new(),
            limiter,
            clock,
        }
    }

    /// A device's next operation is ready: it lines up behind the others.
    pub fn enqueue(&mut self, device: DeviceName) {
        self.ready.push_back(device);
    }

    /// A device that already had its turn and must retry (CUCM said busy) goes first.
    pub fn enqueue_front(&mut self, device: DeviceName) {
        self.ready.push_front(device);
    }

    pub fn front(&self) -> Option<&DeviceName> {
        self.ready.front()
    }

    /// Removes the front device without granting it anything (its operation expired).
    pub fn skip_front(&mut self) -> Option<DeviceName> {
        self.ready.pop_front()
    }

    /// Grants the front device a slot and a token, or says why it must wait.
    pub fn try_admit(&mut self) -> Admission {
        if self.ready.is_empty() {
            return Admission::Idle;
        }
        if self.in_flight >= self.max_concurrent {
            return Admission::AtCapacity;
        }
        if let Some(limiter) = &self.limiter {
            if let Err(not_until) = limiter.check() {
                let wait = not_until.wait_time_from(self.clock.now());
                // A zero wait would spin; governor's granularity is nanoseconds.
                return Admission::RateLimited(wait.max(Duration::from_millis(1)));
            }
        }
        match self.ready.pop_front() {
            Some(device) => {
                self.in_flight += 1;
                Admission::Granted(device)
            }
            None => Admission::Idle,
        }
    }

    /// A granted call has finished (answered, failed, or gone to back off).
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Devices waiting for a slot or a token.
    pub fn waiting(&self) -> usize {
        self.ready.len()
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn device(n: u32) -> DeviceName {
        DeviceName::parse(&format!("SEP{n}")).unwrap()
    }

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
    }

    #[test]
    fn caps_concurrency_in_fifo_order() {
        let mut shaper = Shaper::with_clock(2, None, FakeRelativeClock::default());
        assert_eq!(shaper.try_admit(), Admission::Idle);
        for n in 1..=3 {
            shaper.enqueue(device(n));
        }
        assert_eq!(shaper.try_admit(), Admission::Granted(device(1)));
        assert_eq!(shaper.try_admit(), Admission::Granted(device(2)));
        assert_eq!(shaper.try_admit(), Admission::AtCapacity);
        assert_eq!(shaper.in_flight(), 2);
        shaper.release();
        assert_eq!(shaper.try_admit(), Admission::Granted(device(3)));
    }

    #[test]
    fn rate_limit_allows_burst_then_spaces_calls() {
        let clock = FakeRelativeClock::default();
        let mut shaper = Shaper::with_clock(100, rate(10, 3), clock.clone());
        for n in 1..=5 {
            shaper.enqueue(device(n));
        }
        for n in 1..=3 {
            assert_eq!(shaper.try_admit(), Admission::Granted(device(n)));
        }
        // 10/s: the fourth token comes 100 ms after the burst was spent.
        assert_eq!(
            shaper.try_admit(),
            Admission::RateLimited(Duration::from_millis(100))
        );
        clock.advance(Duration::from_millis(60));
        assert_eq!(
            shaper.try_admit(),
            Admission::RateLimited(Duration::from_millis(40))
        );
        clock.advance(Duration::from_millis(40));
        assert_eq!(shaper.try_admit(), Admission::Granted(device(4)));
        assert!(matches!(shaper.try_admit(), Admission::RateLimited(_)));
        clock.advance(Duration::from_millis(100));
        assert_eq!(shaper.try_admit(), Admission::Granted(device(5)));
    }

    #[test]
    fn a_busy_retry_goes_first_and_expired_fronts_can_be_skipped() {
        let mut shaper = Shaper::with_clock(1, None, FakeRelativeClock::default());
        shaper.enqueue(device(1));
        shaper.enqueue(device(2));
        shaper.enqueue_front(device(9));
        assert_eq!(shaper.front(), Some(&device(9)));
        assert_eq!(shaper.skip_front(), Some(device(9)));
        assert_eq!(shaper.try_admit(), Admission::Granted(device(1)));
        assert_eq!(shaper.waiting(), 1);
    }
}
