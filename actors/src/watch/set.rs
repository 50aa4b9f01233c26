//! `WatchSet`: the devices one cluster keeps fresh, when each is next asked, and who
//! was last known to be logged in on each.
//!
//! A device named in a request is watched for `ttl` after its last request; a device of
//! the always-watched list stays watched. At most `cap` devices are watched: beyond it
//! the device whose last request is oldest is dropped (and counted). Times are passed
//! in (`now`), never read here, so every rule is unit-tested with a fake clock.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::operation::{DeviceName, UserId};

/// A position in one of the time-ordered indexes (the sequence number breaks ties).
type Slot = (Instant, u64);

/// Who is logged in on a device, as far as the gateway knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Never asked, or a login/logout whose outcome nobody knows.
    Unknown,
    /// `None`: nobody.
    User(Option<UserId>),
}

#[derive(Debug)]
struct Watched {
    due: Slot,
    /// When it was last named in a request; `None` for an always-watched device never
    /// requested.
    requested: Option<Slot>,
    always: bool,
    known: Known,
}

/// A change of a device's logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: Option<UserId>,
    pub after: Option<UserId>,
}

#[derive(Debug)]
pub struct WatchSet {
    devices: HashMap<DeviceName, Watched>,
    /// Next poll time → device.
    due: BTreeMap<Slot, DeviceName>,
    /// Last request → device, for expiry and the cap (always-watched devices without a
    /// request are not in it: they never expire and are never dropped).
    requested: BTreeMap<Slot, DeviceName>,
    sequence: u64,
    ttl: Duration,
    interval: Duration,
    cap: usize,
}

impl WatchSet {
    pub fn new(ttl: Duration, interval: Duration, cap: usize) -> Self {
        Self {
            devices: HashMap::new(),
            due: BTreeMap::new(),
            requested: BTreeMap::new(),
            sequence: 0,
            ttl,
            interval,
            cap,
        }
    }

    fn slot(&mut self, at: Instant) -> Slot {
        self.sequence += 1;
        (at, self.sequence)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn contains(&self, device: &DeviceName) -> bool {
        self.devices.contains_key(device)
    }

    /// A request named the device: it is watched until `ttl` after now. Returns how
    /// many devices the cap dropped to make room (the oldest requested first).
    pub fn requested(&mut self, device: &DeviceName, now: Instant) -> usize {
        let slot = self.slot(now);
        match self.devices.get_mut(device) {
            Some(watched) => {
                if let Some(old) = watched.requested.replace(slot) {
                    self.requested.remove(&old);
                }
                self.requested.insert(slot, device.clone());
                0
            }
            None => {
                // Its request just told who is on it: the first poll can wait a whole
                // interval.
                let due = self.slot(now + self.interval);
                self.due.insert(due, device.clone());
                self.requested.insert(slot, device.clone());
                self.devices.insert(
                    device.clone(),
                    Watched {
                        due,
                        requested: Some(slot),
                        always: false,
                        known: Known::Unknown,
                    },
                );
                self.enforce_cap()
            }
        }
    }

    /// The always-watched devices are now exactly `devices` (a re-read list replaces
    /// the previous one; a device dropped from it stays watched while its requests
    /// keep it). New ones are due at once. Returns how many of the list did not fit
    /// under the cap (they are not watched).
    pub fn set_always(&mut self, devices: &[DeviceName], now: Instant) -> usize {
        let listed: std::collections::HashSet<&DeviceName> = devices.iter().collect();
        let unlisted: Vec<DeviceName> = self
            .devices
            .iter()
            .filter(|(device, watched)| watched.always && !listed.contains(device))
            .map(|(device, _)| device.clone())
            .collect();
        for device in unlisted {
            let keep = match self.devices.get_mut(&device) {
                Some(watched) => {
                    watched.always = false;
                    watched.requested.is_some()
                }
                None => true,
            };
            if !keep {
                self.remove(&device);
            }
        }
        let mut refused = 0;
        let mut always = self.devices.values().filter(|w| w.always).count();
        for device in devices {
            if let Some(watched) = self.devices.get_mut(device) {
                if !watched.always {
                    watched.always = true;
                    always += 1;
                }
                continue;
            }
            if always >= self.cap {
                refused += 1;
                continue;
            }
            always += 1;
            let due = self.slot(now);
            self.due.insert(due, device.clone());
            self.devices.insert(
                device.clone(),
                Watched {
                    due,
                    requested: None,
                    always: true,
                    known: Known::Unknown,
                },
            );
            self.enforce_cap();
        }
        refused
    }

    /// Drops the oldest requested, not always-watched devices while over the cap.
    fn enforce_cap(&mut self) -> usize {
        let mut dropped = 0;
        while self.devices.len() > self.cap {
            let oldest = self
                .requested
                .values()
                .find(|device| self.devices.get(*device).is_some_and(|w| !w.always))
                .cloned();
            match oldest {
                Some(device) => {
                    self.remove(&device);
                    dropped += 1;
                }
                None => break,
            }
        }
        dropped
    }

    /// The device is no longer watched (CUCM does not know it).
    pub fn remove(&mut self, device: &DeviceName) {
        if let Some(watched) = self.devices.remove(device) {
            self.due.remove(&watched.due);
            if let Some(slot) = watched.requested {
                self.requested.remove(&slot);
            }
        }
    }

    /// Stops watching devices not requested for `ttl` (always-watched ones stay).
    /// Returns how many expired.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = Vec::new();
        for ((at, _), device) in &self.requested {
            if *at + self.ttl > now {
                break;
            }
            expired.push(device.clone());
        }
        let mut count = 0;
        for device in expired {
            let always = match self.devices.get_mut(&device) {
                Some(watched) => {
                    if let Some(slot) = watched.requested.take() {
                        self.requested.remove(&slot);
                    }
                    watched.always
                }
                None => continue,
            };
            if !always {
                self.remove(&device);
                count += 1;
            }
        }
        count
    }

    /// When the first device is due (`None`: nothing watched).
    pub fn next_due(&self) -> Option<Instant> {
        self.due.keys().next().map(|(at, _)| *at)
    }

    /// When the first device is due, a batch of up to `max` devices: it and the next
    /// ones due (even if not yet due), so batches leave full. Every device taken is
    /// next due `interval` from now. Devices for which `skip` is true (a request is
    /// asking CUCM about them anyway) are rescheduled without being taken. Empty when
    /// nothing is due.
    pub fn take_batch(
        &mut self,
        now: Instant,
        max: usize,
        skip: impl Fn(&DeviceName) -> bool,
    ) -> Vec<DeviceName> {
        if self.next_due().is_none_or(|first| first > now) {
            return Vec::new();
        }
        let max = max.max(1);
        // Bounded work per decision, however many devices are skipped.
        let mut taken = Vec::with_capacity(max);
        let mut batch = Vec::with_capacity(max);
        while batch.len() < max && taken.len() < max * 4 {
            let Some((_, device)) = self.due.pop_first() else {
                break;
            };
            if !skip(&device) {
                batch.push(device.clone());
            }
            taken.push(device);
        }
        // Rescheduled only now, so no device is taken twice in one batch.
        for device in taken {
            let next = self.slot(now + self.interval);
            self.due.insert(next, device.clone());
            if let Some(watched) = self.devices.get_mut(&device) {
                watched.due = next;
            }
        }
        batch
    }

    /// A poll or a query saw `user` on the device. Returns the change when the gateway
    /// knew someone else (a first sighting is no change: nothing was known).
    pub fn observed(&mut self, device: &DeviceName, user: Option<UserId>) -> Option<Change> {
        let watched = self.devices.get_mut(device)?;
        let previous = std::mem::replace(&mut watched.known, Known::User(user.clone()));
        match previous {
            Known::User(before) if before != user => Some(Change {
                before,
                after: user,
            }),
            _ => None,
        }
    }

    /// CUCM confirmed a login or logout through the gateway: `user` is on the device
    /// now. Returns the change unless the gateway already knew exactly that (`before`
    /// is `None` when nobody was on it, or when the gateway did not know).
    pub fn confirmed(&mut self, device: &DeviceName, user: Option<UserId>) -> Option<Change> {
        let watched = self.devices.get_mut(device)?;
        let previous = std::mem::replace(&mut watched.known, Known::User(user.clone()));
        match previous {
            Known::User(before) if before == user => None,
            Known::User(before) => Some(Change {
                before,
                after: user,
            }),
            Known::Unknown => Some(Change {
                before: None,
                after: user,
            }),
        }
    }

    /// Nobody knows who is on the device now (a login or logout that may or may not
    /// have happened).
    pub fn forget_user(&mut self, device: &DeviceName) {
        if let Some(watched) = self.devices.get_mut(device) {
            watched.known = Known::Unknown;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);
    const INTERVAL: Duration = Duration::from_secs(60);

    fn device(n: u32) -> DeviceName {
        DeviceName::parse(&format!("SEP{n:012}")).unwrap()
    }

    fn user(name: &str) -> Option<UserId> {
        Some(UserId::parse(name).unwrap())
    }

    #[test]
    fn a_requested_device_is_watched_until_its_ttl_after_the_last_request() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 100);
        set.requested(&device(1), start);
        set.requested(&device(2), start);
        set.requested(&device(1), start + Duration::from_secs(1800));
        assert_eq!(set.expire(start + TTL - Duration::from_millis(1)), 0);
        assert_eq!(set.expire(start + TTL), 1);
        assert!(set.contains(&device(1)));
        assert!(!set.contains(&device(2)));
        assert_eq!(set.expire(start + Duration::from_secs(1800) + TTL), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn over_the_cap_the_oldest_requested_is_dropped_and_counted() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 3);
        set.set_always(&[device(100)], start);
        set.requested(&device(1), start);
        set.requested(&device(2), start + Duration::from_secs(1));
        // Device 1 asked again: now device 2 is the oldest.
        set.requested(&device(1), start + Duration::from_secs(2));
        assert_eq!(set.requested(&device(3), start + Duration::from_secs(3)), 1);
        assert_eq!(set.len(), 3);
        assert!(!set.contains(&device(2)));
        assert!(set.contains(&device(1)) && set.contains(&device(3)));
        // The always-watched device is never the one dropped.
        assert!(set.contains(&device(100)));
    }

    #[test]
    fn always_watched_devices_never_expire_and_a_new_list_replaces_the_old() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 10);
        assert_eq!(set.set_always(&[device(1), device(2)], start), 0);
        set.requested(&device(2), start);
        assert_eq!(set.expire(start + TTL * 2), 0);
        assert_eq!(set.len(), 2);
        // Device 1 leaves the list and goes; device 2 too, but a request keeps it.
        set.requested(&device(2), start + TTL * 2);
        set.set_always(&[device(3)], start + TTL * 2);
        assert!(!set.contains(&device(1)));
        assert!(set.contains(&device(2)) && set.contains(&device(3)));
        // A list longer than the cap: the rest is refused and counted.
        let mut small = WatchSet::new(TTL, INTERVAL, 2);
        assert_eq!(
            small.set_always(&[device(1), device(2), device(3)], start),
            1
        );
        assert_eq!(small.len(), 2);
    }

    #[test]
    fn the_first_due_device_fills_its_batch_with_the_next_ones_due() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 1000);
        for n in 0..120 {
            set.requested(
                &device(n),
                start + Duration::from_millis(u64::from(n) * 100),
            );
        }
        // Nothing due before the first device's interval is over.
        assert!(set
            .take_batch(start + INTERVAL - Duration::from_millis(1), 50, |_| false)
            .is_empty());
        let now = start + INTERVAL;
        let batch = set.take_batch(now, 50, |_| false);
        assert_eq!(batch, (0..50).map(device).collect::<Vec<_>>());
        let mut asked: std::collections::HashSet<DeviceName> = batch.into_iter().collect();
        // The next batch is not due yet: device 50 is due 5 s later.
        assert!(set.take_batch(now, 50, |_| false).is_empty());
        assert_eq!(
            set.next_due(),
            Some(start + INTERVAL + Duration::from_millis(5000))
        );
        // Every device is asked at least every interval: in one interval's time the
        // batches cover all 120 devices, in three calls (the last one filled up with
        // devices due next).
        let mut calls = 1;
        let mut t = now;
        while t < now + INTERVAL {
            let batch = set.take_batch(t, 50, |_| false);
            if !batch.is_empty() {
                calls += 1;
                asked.extend(batch);
            }
            t += Duration::from_millis(100);
        }
        assert_eq!(calls, 3);
        assert_eq!(asked.len(), 120);
    }

    #[test]
    fn a_device_with_a_request_under_way_is_rescheduled_not_polled() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 10);
        set.set_always(&[device(1), device(2), device(3)], start);
        let batch = set.take_batch(start, 50, |d| *d == device(2));
        assert_eq!(batch, vec![device(1), device(3)]);
        assert_eq!(set.next_due(), Some(start + INTERVAL));
    }

    #[test]
    fn changes_are_told_from_first_sightings_and_repeats() {
        let start = Instant::now();
        let mut set = WatchSet::new(TTL, INTERVAL, 10);
        set.requested(&device(1), start);
        // A first sighting tells nothing changed.
        assert_eq!(set.observed(&device(1), user("alice")), None);
        assert_eq!(set.observed(&device(1), user("alice")), None);
        assert_eq!(
            set.observed(&device(1), None),
            Some(Change {
                before: user("alice"),
                after: None
            })
        );
        // A confirmed login is a change even when nothing was known before it.
        set.forget_user(&device(1));
        assert_eq!(
            set.confirmed(&device(1), user("bob")),
            Some(Change {
                before: None,
                after: user("bob")
            })
        );
        assert_eq!(set.confirmed(&device(1), user("bob")), None);
        // A device not watched tells nothing.
        assert_eq!(set.observed(&device(9), user("bob")), None);
    }
}
