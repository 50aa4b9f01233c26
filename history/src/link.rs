//! The writer's view of its store: up, or down until the next reconnect attempt.
//!
//! A store that cannot be reached (a PostgreSQL restart, a network cut) is not an error
//! of the records: they wait in the bounded queue while the writer retries with a
//! back-off that doubles from `FIRST_RETRY` to `MAX_RETRY`, and are written once the
//! store answers again. The delay goes back to `FIRST_RETRY` only after a successful
//! write, so a store that accepts connections but refuses writes (a read-only standby)
//! is not hammered.

use std::time::{Duration, Instant};

/// The first reconnect attempt after the store went down.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between reconnect attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct StoreLink {
    /// `Some` while the store is down: since when.
    down_since: Option<Instant>,
    /// While down: the next attempt is not made before this.
    retry_at: Instant,
    /// The wait after the next failed attempt.
    delay: Duration,
}

impl StoreLink {
    /// Down from `now`, with an attempt due at once (the writer's first connect).
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            down_since: Some(now),
            retry_at: now,
            delay: FIRST_RETRY,
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.down_since.is_none()
    }

    /// Down and a reconnect attempt is due.
    pub(crate) fn attempt_due(&self, now: Instant) -> bool {
        !self.is_up() && now >= self.retry_at
    }

    /// While down: when the next attempt is due.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        (!self.is_up()).then_some(self.retry_at)
    }

    /// A connect or write failed because the store is unavailable. Returns true when
    /// this is the transition from up to down.
    pub(crate) fn failed(&mut self, now: Instant) -> bool {
        let went_down = self.down_since.is_none();
        if went_down {
            self.down_since = Some(now);
        }
        self.retry_at = now + self.delay;
        self.delay = (self.delay * 2).min(MAX_RETRY);
        went_down
    }

    /// A connect succeeded; returns how long the store was down.
    pub(crate) fn connected(&mut self, now: Instant) -> Option<Duration> {
        self.down_since
            .take()
            .map(|since| now.saturating_duration_since(since))
    }

    /// A batch was written: the store works, the next outage starts with a short wait.
    pub(crate) fn wrote(&mut self) {
        self.delay = FIRST_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_the_cap_and_resets_after_a_write() {
        let start = Instant::now();
        let mut link = StoreLink::new(start);
        assert!(!link.is_up());
        assert!(link.attempt_due(start), "the first connect is due at once");
        assert!(!link.failed(start), "already down at start");
        let mut waits = Vec::new();
        let mut now = start;
        for _ in 0..8 {
            waits.push(link.retry_at().expect("down") - now);
            now = link.retry_at().expect("down");
            assert!(link.attempt_due(now));
            link.failed(now);
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(Duration::from_millis)
        );
        assert!(link
            .connected(now)
            .is_some_and(|down| down > Duration::ZERO));
        assert!(link.is_up());
        assert_eq!(link.retry_at(), None);
        // Refused again before any write: the wait keeps growing (a read-only standby).
        assert!(link.failed(now), "up -> down");
        assert_eq!(link.retry_at(), Some(now + MAX_RETRY));
        link.connected(now);
        link.wrote();
        link.failed(now);
        assert_eq!(link.retry_at(), Some(now + FIRST_RETRY));
    }
}
