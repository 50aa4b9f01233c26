//! `EventHub`: every change of a device's logged-in user, as an event with an id, kept
//! in a bounded ring for resuming subscribers and broadcast to live ones.
//!
//! Publishing never waits: live subscribers read from a bounded broadcast channel, and
//! one that falls more than [`SUBSCRIBER_LAG`] events behind is dropped (and counted)
//! instead of holding the gateway back. Ids grow by one per event and start from the
//! process's start time in microseconds, so ids of a restarted gateway are larger than
//! the last ones a client saw before the restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::broadcast;

use crate::metrics::Metrics;
use crate::operation::{DeviceName, UserId};

/// How far a live subscriber may fall behind before it is dropped.
pub const SUBSCRIBER_LAG: usize = 1024;

/// Why an event happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A login or logout through the gateway, published when CUCM confirmed it.
    Request,
    /// A poll or a query saw another user than the gateway knew: the change was made
    /// at the phone or elsewhere.
    Observed,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Request => "request",
            Cause::Observed => "observed",
        }
    }
}

/// What saw an observed change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeenBy {
    /// A watch poll.
    Poll,
    /// A caller's getloggedinuser.
    Query,
}

impl SeenBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SeenBy::Poll => "poll",
            SeenBy::Query => "query",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    pub time: SystemTime,
    pub cluster: Arc<str>,
    pub device: DeviceName,
    pub before: Option<UserId>,
    pub after: Option<UserId>,
    pub cause: Cause,
    /// For an observed change: what saw it.
    pub seen_by: Option<SeenBy>,
}

/// A change to publish (the hub gives it its id and time).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub cluster: Arc<str>,
    pub device: DeviceName,
    pub before: Option<UserId>,
    pub after: Option<UserId>,
    pub cause: Cause,
    pub seen_by: Option<SeenBy>,
}

/// What a new subscriber gets: the events it missed, then the live ones.
pub struct Subscription {
    /// It asked to resume from an event no longer (or never) in the ring: it missed
    /// events it cannot get back. `missed` then holds the whole ring.
    pub reset: bool,
    pub missed: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
}

type Observer = Box<dyn Fn(&Event) + Send + Sync>;

pub struct EventHub {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Event>>,
    /// Called for every event, on the publisher's thread (the history records
    /// observed changes through it); must not block.
    observer: OnceLock<Observer>,
    requests: IntCounter,
    observed: IntCounter,
    pub subscribers: IntGauge,
    pub subscribers_dropped: IntCounter,
}

struct Ring {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    next_id: u64,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHub")
    }
}

impl EventHub {
    pub fn new(capacity: usize, metrics: &Metrics) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| since.as_micros() as u64);
        Self::starting_at(capacity, start, metrics)
    }

    fn starting_at(capacity: usize, first_id: u64, metrics: &Metrics) -> Self {
        let (live, _) = broadcast::channel(SUBSCRIBER_LAG);
        Self {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(1024)),
                capacity: capacity.max(1),
                next_id: first_id.max(1),
            }),
            live,
            observer: OnceLock::new(),
            requests: metrics.events.with_label_values(&["request"]),
            observed: metrics.events.with_label_values(&["observed"]),
            subscribers: metrics.event_subscribers.clone(),
            subscribers_dropped: metrics.event_subscribers_dropped.clone(),
        }
    }

    /// Sets the function called for every event (once; later calls are ignored).
    pub fn observe_with(&self, observer: impl Fn(&Event) + Send + Sync + 'static) {
        let _ = self.observer.set(Box::new(observer));
    }

    pub fn publish(&self, new: NewEvent) {
        match new.cause {
            Cause::Request => self.requests.inc(),
            Cause::Observed => self.observed.inc(),
        }
        let event = {
            let Ok(mut ring) = self.ring.lock() else {
                return;
            };
            let event = Arc::new(Event {
                id: ring.next_id,
                time: SystemTime::now(),
                cluster: new.cluster,
                device: new.device,
                before: new.before,
                after: new.after,
                cause: new.cause,
                seen_by: new.seen_by,
            });
            ring.next_id += 1;
            if ring.events.len() >= ring.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(event.clone());
            // Under the lock, so a subscriber that snapshots the ring under it sees
            // each event exactly once (in the ring or live). No receiver: fine.
            let _ = self.live.send(event.clone());
            event
        };
        if let Some(observer) = self.observer.get() {
            observer(&event);
        }
    }

    /// Subscribes; with `last_seen` (a client's `Last-Event-ID`), the events after it
    /// come first.
    pub fn subscribe(&self, last_seen: Option<u64>) -> Subscription {
        let ring = match self.ring.lock() {
            Ok(ring) => ring,
            Err(poisoned) => poisoned.into_inner(),
        };
        let live = self.live.subscribe();
        let Some(last_seen) = last_seen else {
            return Subscription {
                reset: false,
                missed: Vec::new(),
                live,
            };
        };
        let oldest = ring.events.front().map_or(ring.next_id, |e| e.id);
        // Resumable when the event after the last seen one is still here (or none came
        // since); an id from the future (another process) is not.
        let resumable = last_seen.saturating_add(1) >= oldest && last_seen < ring.next_id;
        let missed = ring
            .events
            .iter()
            .filter(|event| !resumable || event.id > last_seen)
            .cloned()
            .collect();
        Subscription {
            reset: !resumable,
            missed,
            live,
        }
    }

    /// The newest events, newest last (the dashboard's latest changes).
    pub fn latest(&self, count: usize) -> Vec<Arc<Event>> {
        let Ok(ring) = self.ring.lock() else {
            return Vec::new();
        };
        let skip = ring.events.len().saturating_sub(count);
        ring.events.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(capacity: usize) -> EventHub {
        EventHub::starting_at(capacity, 1, &Metrics::new().unwrap())
    }

    fn change(n: u32) -> NewEvent {
        NewEvent {
            cluster: Arc::from("EU"),
            device: DeviceName::parse(&format!("SEP{n}")).unwrap(),
            before: None,
            after: Some(UserId::parse("alice").unwrap()),
            cause: Cause::Request,
            seen_by: None,
        }
    }

    fn ids(events: &[Arc<Event>]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn resumes_after_the_last_event_seen() {
        let hub = hub(10);
        for n in 0..5 {
            hub.publish(change(n));
        }
        let resumed = hub.subscribe(Some(3));
        assert!(!resumed.reset);
        assert_eq!(ids(&resumed.missed), vec![4, 5]);
        let caught_up = hub.subscribe(Some(5));
        assert!(!caught_up.reset && caught_up.missed.is_empty());
        let fresh = hub.subscribe(None);
        assert!(!fresh.reset && fresh.missed.is_empty());
    }

    #[test]
    fn a_client_behind_the_ring_gets_a_reset_and_what_is_left() {
        let hub = hub(3);
        for n in 0..6 {
            hub.publish(change(n));
        }
        // Events 4, 5, 6 are kept: after 3 nothing is lost, after 2 event 3 is.
        assert!(!hub.subscribe(Some(3)).reset);
        let behind = hub.subscribe(Some(2));
        assert!(behind.reset);
        assert_eq!(ids(&behind.missed), vec![4, 5, 6]);
        // An id this process never gave (a client of another process) is a reset too.
        assert!(hub.subscribe(Some(99)).reset);
    }

    #[tokio::test]
    async fn live_events_follow_the_missed_ones_without_gap_or_repeat() {
        let hub = hub(10);
        hub.publish(change(0));
        let mut subscription = hub.subscribe(Some(0));
        hub.publish(change(1));
        assert_eq!(ids(&subscription.missed), vec![1]);
        assert_eq!(subscription.live.recv().await.unwrap().id, 2);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_and_the_publisher_never_waits() {
        let hub = hub(10);
        let mut slow = hub.subscribe(None);
        for n in 0..(SUBSCRIBER_LAG as u32 + 10) {
            hub.publish(change(n));
        }
        assert!(matches!(
            slow.live.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
