//! `Gate`: how one instance gets permission for one CUCM call when the instances share
//! a cluster's allowance, and what it does while the shared store is unreachable.
//!
//! Pure: the caller passes `now`, tells it what the store answered, and carries out
//! what it asks; the rate clock is governor's, so tests use `FakeRelativeClock`.
//!
//! Three modes:
//! - `Shared`: every call asks the store for a slot lease and a rate token.
//! - `Fallback` (the store did not answer): calls are granted locally, at most
//!   `max_concurrent / instances` at once (at least 1) and at
//!   `max_requests_per_second / instances`. `active` counts every call of this instance
//!   talking to CUCM however it was granted, so calls that got shared leases before
//!   the fall are counted against the local cap: nothing new starts until they are
//!   below it.
//! - `Returning` (the store answers again): calls go through the store again but stay
//!   within the local cap for [`Gate::return_hold`]. Peers still in fallback (they find
//!   the store again within one probe interval) run calls the store does not know of;
//!   those end within one call timeout. Staying within the local share until then
//!   keeps the instances together within the allowance.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::shaper::Rate;

/// How often an instance in fallback looks for the store again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A call that timed out still counts this long: CUCM may still be working on it, and
/// its lease (the call's timeout + 1 s) runs about this much longer.
pub const TIMED_OUT_HOLD: Duration = Duration::from_secs(1);

/// One cluster's allowance and how it is split when the store is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Across all instances.
    pub max_concurrent: usize,
    /// Across all instances.
    pub rate: Option<Rate>,
    /// How many instances share it (≥ 1).
    pub instances: usize,
    /// A lease lasts this long: the call's timeout + 1 s.
    pub lease: Duration,
}

impl Allowance {
    /// This instance's share while the store is unreachable: never more than its part.
    pub fn local_slots(&self) -> usize {
        (self.max_concurrent / self.instances.max(1)).max(1)
    }

    /// This instance's part of the rate (and burst), at least one per second.
    pub fn local_rate(&self) -> Option<Rate> {
        let instances = u32::try_from(self.instances.max(1)).unwrap_or(u32::MAX);
        self.rate.map(|rate| Rate {
            per_second: NonZeroU32::new(rate.per_second.get() / instances)
                .unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(rate.burst.get() / instances).unwrap_or(NonZeroU32::MIN),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Fallback { since: Instant },
    Returning { until: Instant },
}

/// What the caller should do to get a call started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Ask the store for a lease (and a rate token). The call already counts as
    /// active (concurrent asks must not all pass the local cap while the store
    /// answers): if no lease comes, report [`Gate::not_leased`] (and
    /// [`Gate::unreachable`] when the store did not answer).
    Store,
    /// Granted locally: the call may start; report its end with [`Gate::ended`].
    Local,
    /// Nothing may start before this long (the local rate), or before a call of this
    /// instance ends (`None`).
    Wait(Option<Duration>),
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct Gate<C: Clock> {
    allowance: Allowance,
    mode: Mode,
    /// Calls of this instance from their ask (store asks included) to their end.
    active: usize,
    /// Until when calls that timed out still count in `active`.
    timed_out: Vec<Instant>,
    local_limiter: Option<Limiter<C>>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for Gate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("allowance", &self.allowance)
            .field("mode", &self.mode)
            .field("active", &self.active)
            .finish()
    }
}

impl<C: Clock + Clone> Gate<C> {
    /// Starts shared: the first call finds out whether the store answers.
    pub fn new(allowance: Allowance, clock: C) -> Self {
        let local_limiter = allowance.local_rate().map(|rate| {
            let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
            RateLimiter::direct_with_clock(quota, clock.clone())
        });
        Self {
            allowance,
            mode: Mode::Shared,
            active: 0,
            timed_out: Vec::new(),
            local_limiter,
            clock,
        }
    }

    /// How long after the store answers again an instance stays within its local
    /// share: long enough for peers to notice (one probe interval) and for calls
    /// they granted locally meanwhile to end (one lease).
    pub fn return_hold(&self) -> Duration {
        PROBE_INTERVAL + self.allowance.lease
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// This instance's share of the slots while the store is unreachable.
    pub fn local_slots(&self) -> usize {
        self.allowance.local_slots()
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// Whether the store is the one granting (shared or returning).
    pub fn is_shared(&self) -> bool {
        !matches!(self.mode, Mode::Fallback { .. })
    }

    /// In fallback: whether it is time to look for the store again.
    pub fn probe_due(&self, now: Instant) -> bool {
        matches!(self.mode, Mode::Fallback { since } if now >= since + PROBE_INTERVAL)
    }

    /// What to do for the next call.
    pub fn ask(&mut self, now: Instant) -> Ask {
        let before = self.timed_out.len();
        self.timed_out.retain(|until| *until > now);
        self.active = self.active.saturating_sub(before - self.timed_out.len());
        match self.mode {
            Mode::Shared => self.ask_store(),
            Mode::Returning { until } if now >= until => {
                self.mode = Mode::Shared;
                self.ask_store()
            }
            Mode::Returning { .. } => match self.within_local_slots() {
                true => self.ask_store(),
                false => Ask::Wait(None),
            },
            Mode::Fallback { .. } => {
                if !self.within_local_slots() {
                    return Ask::Wait(None);
                }
                if let Some(limiter) = &self.local_limiter {
                    if let Err(not_until) = limiter.check() {
                        let wait = not_until.wait_time_from(self.clock.now());
                        return Ask::Wait(Some(wait.max(Duration::from_millis(1))));
                    }
                }
                self.active += 1;
                Ask::Local
            }
        }
    }

    fn within_local_slots(&self) -> bool {
        self.active < self.allowance.local_slots()
    }

    fn ask_store(&mut self) -> Ask {
        self.active += 1;
        Ask::Store
    }

    /// A store ask ended without a lease (full, rate-limited, or unreachable).
    pub fn not_leased(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// The store did not answer: fall back at once (the caller asks again).
    pub fn unreachable(&mut self, now: Instant) {
        if self.is_shared() {
            self.mode = Mode::Fallback { since: now };
        }
    }

    /// A probe found the store again while in fallback.
    pub fn reachable(&mut self, now: Instant) {
        if let Mode::Fallback { .. } = self.mode {
            self.mode = Mode::Returning {
                until: now + self.return_hold(),
            };
        }
    }

    /// A probe failed: the next is due one interval from now.
    pub fn probe_failed(&mut self, now: Instant) {
        if let Mode::Fallback { .. } = self.mode {
            self.mode = Mode::Fallback { since: now };
        }
    }

    /// A granted call is over (however it was granted). One that timed out still
    /// counts for [`TIMED_OUT_HOLD`].
    pub fn ended(&mut self, timed_out: bool, now: Instant) {
        if timed_out {
            self.timed_out.push(now + TIMED_OUT_HOLD);
        } else {
            self.active = self.active.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    const LEASE: Duration = Duration::from_secs(6);

    fn allowance(max_concurrent: usize, rate: Option<(u32, u32)>, instances: usize) -> Allowance {
        Allowance {
            max_concurrent,
            rate: rate.map(|(per_second, burst)| Rate {
                per_second: NonZeroU32::new(per_second).unwrap(),
                burst: NonZeroU32::new(burst).unwrap(),
            }),
            instances,
            lease: LEASE,
        }
    }

    fn gate(a: Allowance) -> (Gate<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Gate::new(a, clock.clone()), clock)
    }

    #[test]
    fn the_local_share_is_a_part_never_more_and_at_least_one() {
        assert_eq!(allowance(5, None, 2).local_slots(), 2);
        assert_eq!(allowance(5, None, 1).local_slots(), 5);
        assert_eq!(allowance(2, None, 3).local_slots(), 1);
        let rate = allowance(5, Some((20, 5)), 2).local_rate().unwrap();
        assert_eq!((rate.per_second.get(), rate.burst.get()), (10, 2));
        let rate = allowance(5, Some((1, 1)), 4).local_rate().unwrap();
        assert_eq!((rate.per_second.get(), rate.burst.get()), (1, 1));
    }

    #[test]
    fn shared_asks_the_store_for_every_call() {
        let (mut g, _) = gate(allowance(5, Some((1, 1)), 2));
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(g.ask(now), Ask::Store);
        }
        assert_eq!(g.active(), 10, "the store, not the gate, caps shared calls");
        g.not_leased();
        assert_eq!(g.active(), 9, "a refused ask does not count");
    }

    #[test]
    fn falls_back_at_once_to_the_local_share() {
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        assert_eq!(g.ask(now), Ask::Store);
        // The store did not answer this ask.
        g.not_leased();
        g.unreachable(now);
        assert_eq!(g.ask(now), Ask::Local);
        assert_eq!(g.ask(now), Ask::Local);
        assert_eq!(g.ask(now), Ask::Wait(None), "5 / 2 instances = 2 slots");
        g.ended(false, now);
        assert_eq!(g.ask(now), Ask::Local);
    }

    #[test]
    fn calls_leased_before_the_fall_count_against_the_local_share() {
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(g.ask(now), Ask::Store);
        }
        g.unreachable(now);
        assert_eq!(g.ask(now), Ask::Wait(None));
        g.ended(false, now);
        g.ended(false, now);
        assert_eq!(
            g.ask(now),
            Ask::Wait(None),
            "still 2 running: the share is full"
        );
        g.ended(false, now);
        assert_eq!(g.ask(now), Ask::Local);
        assert_eq!(g.ask(now), Ask::Wait(None));
    }

    #[test]
    fn the_local_rate_is_the_instances_part() {
        // 10/s over two instances: 5/s with a burst of 1 locally.
        let (mut g, clock) = gate(allowance(100, Some((10, 2)), 2));
        let now = Instant::now();
        g.unreachable(now);
        assert_eq!(g.ask(now), Ask::Local);
        assert_eq!(g.ask(now), Ask::Wait(Some(Duration::from_millis(200))));
        clock.advance(Duration::from_millis(200));
        assert_eq!(g.ask(now), Ask::Local);
    }

    #[test]
    fn probes_once_an_interval_while_in_fallback() {
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        g.unreachable(now);
        assert!(!g.probe_due(now));
        let later = now + PROBE_INTERVAL;
        assert!(g.probe_due(later));
        g.probe_failed(later);
        assert!(!g.probe_due(later + Duration::from_millis(999)));
        assert!(g.probe_due(later + PROBE_INTERVAL));
    }

    #[test]
    fn returns_to_shared_within_the_local_share_for_a_probe_and_a_lease() {
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        g.unreachable(now);
        assert_eq!(g.ask(now), Ask::Local);
        assert_eq!(g.ask(now), Ask::Local);
        let back = now + Duration::from_secs(3);
        g.reachable(back);
        assert!(g.is_shared());
        // The two local calls still run: nothing more until one ends.
        assert_eq!(g.ask(back), Ask::Wait(None));
        g.ended(false, now);
        assert_eq!(g.ask(back), Ask::Store);
        assert_eq!(g.ask(back), Ask::Wait(None), "still within the local share");
        let after_hold = back + PROBE_INTERVAL + LEASE;
        assert_eq!(g.ask(after_hold), Ask::Store);
        assert_eq!(g.mode(), Mode::Shared);
        assert_eq!(g.ask(after_hold), Ask::Store, "the whole allowance again");
    }

    #[test]
    fn concurrent_store_asks_while_returning_stay_within_the_local_share() {
        // Asks answered later by the store: each counts from the ask, so a third
        // cannot pass the cap while the first two are still waiting for their lease.
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        g.unreachable(now);
        g.reachable(now);
        assert_eq!(g.ask(now), Ask::Store);
        assert_eq!(g.ask(now), Ask::Store);
        assert_eq!(g.ask(now), Ask::Wait(None));
        g.not_leased();
        assert_eq!(g.ask(now), Ask::Store);
    }

    #[test]
    fn a_store_failure_while_returning_falls_back_again() {
        let (mut g, _) = gate(allowance(5, None, 2));
        let now = Instant::now();
        g.unreachable(now);
        g.reachable(now);
        g.unreachable(now + Duration::from_millis(10));
        assert!(matches!(g.mode(), Mode::Fallback { .. }));
        assert_eq!(g.ask(now), Ask::Local);
    }

    #[test]
    fn a_timed_out_call_still_counts_a_while() {
        let (mut g, _) = gate(allowance(2, None, 2));
        let now = Instant::now();
        g.unreachable(now);
        assert_eq!(g.ask(now), Ask::Local);
        g.ended(true, now);
        assert_eq!(g.ask(now), Ask::Wait(None), "CUCM may still be on it");
        let later = now + TIMED_OUT_HOLD;
        assert_eq!(g.ask(later), Ask::Local);
    }

    #[test]
    fn one_instance_falls_back_to_the_whole_allowance() {
        let (mut g, _) = gate(allowance(5, None, 1));
        let now = Instant::now();
        g.unreachable(now);
        for _ in 0..5 {
            assert_eq!(g.ask(now), Ask::Local);
        }
        assert_eq!(g.ask(now), Ask::Wait(None));
    }
}
