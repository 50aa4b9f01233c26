//! `PollGate`: may the cluster send a watch poll now, and if not, when to look again.
//!
//! Polls must cost the cluster's callers nothing: one poll at most is in flight (one
//! of the `max_concurrent` slots), polls leave only when no operation waits, and they
//! are spaced so that they use at most `rate_share` of `max_requests_per_second`.
//! Whether a slot and a token of the cluster's own shaper are free is the scheduler's
//! answer (`Scheduler::try_start_poll`), asked after this one says `Send`.
//! Times are passed in, so the rules are unit-tested with a fake clock.

use std::time::{Duration, Instant};

/// Why no poll leaves now, with nothing to wait for (the next event will tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// A poll is in flight: one slot at most.
    InFlight,
    /// No credentials yet (none configured, and CUCM accepted none of a caller's).
    NoCredentials,
    /// CUCM refused the poll's credentials; new ones must arrive first.
    CredentialsRefused,
    /// Nothing watched.
    NothingWatched,
    /// Operations are waiting: they go first.
    ClusterBusy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollDecision {
    /// Send a poll now (if the scheduler gives a slot and a token).
    Send,
    /// Look again after this long (the first device is not due yet, or the poll rate
    /// holds it back).
    Wait(Duration),
    Idle(Idle),
}

/// What the gate needs to know of the cluster at the moment of deciding.
#[derive(Debug, Clone, Copy)]
pub struct ClusterNow {
    pub now: Instant,
    /// When the first watched device is due (`None`: nothing watched).
    pub first_due: Option<Instant>,
    /// Operations are waiting to go to CUCM.
    pub operations_waiting: bool,
    /// The fingerprint of the credentials a poll would use.
    pub credentials: Option<u64>,
}

#[derive(Debug)]
pub struct PollGate {
    /// Shortest time between two polls: 1 / (rate_share × max_requests_per_second).
    spacing: Duration,
    last_sent: Option<Instant>,
    in_flight: bool,
    /// Credentials CUCM refused for a poll: no poll with them again.
    refused: Option<u64>,
}

impl PollGate {
    /// `rate`: the cluster's `max_requests_per_second` (`None`: unlimited, then polls
    /// are spaced only by the one slot they may use).
    pub fn new(rate: Option<u32>, rate_share: f64) -> Self {
        let spacing = match rate {
            Some(per_second) if per_second > 0 && rate_share > 0.0 => {
                Duration::from_secs_f64(1.0 / (f64::from(per_second) * rate_share))
            }
            _ => Duration::ZERO,
        };
        Self {
            spacing,
            last_sent: None,
            in_flight: false,
            refused: None,
        }
    }

    pub fn spacing(&self) -> Duration {
        self.spacing
    }

    pub fn decide(&self, cluster: ClusterNow) -> PollDecision {
        if self.in_flight {
            return PollDecision::Idle(Idle::InFlight);
        }
        let Some(credentials) = cluster.credentials else {
            return PollDecision::Idle(Idle::NoCredentials);
        };
        if self.refused == Some(credentials) {
            return PollDecision::Idle(Idle::CredentialsRefused);
        }
        let Some(first_due) = cluster.first_due else {
            return PollDecision::Idle(Idle::NothingWatched);
        };
        if cluster.operations_waiting {
            return PollDecision::Idle(Idle::ClusterBusy);
        }
        let allowed_at = self
            .last_sent
            .map_or(cluster.now, |sent| sent + self.spacing);
        let at = first_due.max(allowed_at);
        if at > cluster.now {
            return PollDecision::Wait(at - cluster.now);
        }
        PollDecision::Send
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// A poll left.
    pub fn sent(&mut self, now: Instant) {
        self.in_flight = true;
        self.last_sent = Some(now);
    }

    /// The poll in flight ended.
    pub fn ended(&mut self) {
        self.in_flight = false;
    }

    /// CUCM refused the poll's credentials. Returns true the first time for these
    /// credentials (log and count once).
    pub fn refused(&mut self, credentials: u64) -> bool {
        self.refused.replace(credentials) != Some(credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(now: Instant, first_due: Option<Instant>) -> ClusterNow {
        ClusterNow {
            now,
            first_due,
            operations_waiting: false,
            credentials: Some(7),
        }
    }

    #[test]
    fn polls_use_at_most_their_share_of_the_rate() {
        // 20/s with a 0.25 share: one poll every 200 ms at most.
        let mut gate = PollGate::new(Some(20), 0.25);
        let start = Instant::now();
        assert_eq!(gate.decide(cluster(start, Some(start))), PollDecision::Send);
        gate.sent(start);
        gate.ended();
        let later = start + Duration::from_millis(50);
        assert_eq!(
            gate.decide(cluster(later, Some(start))),
            PollDecision::Wait(Duration::from_millis(150))
        );
        let then = start + Duration::from_millis(200);
        assert_eq!(gate.decide(cluster(then, Some(start))), PollDecision::Send);
    }

    #[test]
    fn nothing_due_waits_for_the_first_device() {
        let gate = PollGate::new(Some(20), 0.25);
        let start = Instant::now();
        let due = start + Duration::from_secs(3);
        assert_eq!(
            gate.decide(cluster(start, Some(due))),
            PollDecision::Wait(Duration::from_secs(3))
        );
        assert_eq!(
            gate.decide(cluster(start, None)),
            PollDecision::Idle(Idle::NothingWatched)
        );
    }

    #[test]
    fn one_poll_at_a_time_and_never_while_operations_wait() {
        let mut gate = PollGate::new(None, 0.25);
        let start = Instant::now();
        let busy = ClusterNow {
            operations_waiting: true,
            ..cluster(start, Some(start))
        };
        assert_eq!(gate.decide(busy), PollDecision::Idle(Idle::ClusterBusy));
        gate.sent(start);
        assert_eq!(
            gate.decide(cluster(start, Some(start))),
            PollDecision::Idle(Idle::InFlight)
        );
        gate.ended();
        assert_eq!(gate.decide(cluster(start, Some(start))), PollDecision::Send);
    }

    #[test]
    fn refused_credentials_stop_polls_until_others_arrive() {
        let mut gate = PollGate::new(Some(20), 0.25);
        let start = Instant::now();
        let none = ClusterNow {
            credentials: None,
            ..cluster(start, Some(start))
        };
        assert_eq!(gate.decide(none), PollDecision::Idle(Idle::NoCredentials));
        assert!(gate.refused(7));
        assert!(!gate.refused(7), "counted and logged once");
        assert_eq!(
            gate.decide(cluster(start, Some(start))),
            PollDecision::Idle(Idle::CredentialsRefused)
        );
        let other = ClusterNow {
            credentials: Some(8),
            ..cluster(start, Some(start))
        };
        assert_eq!(gate.decide(other), PollDecision::Send);
    }
}
