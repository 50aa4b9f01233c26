//! `LoggedInCache`: who is logged in on which device, for `cache_ttl_ms`.
//!
//! Set by successful logins, logouts and queries; read by getloggedinuser while fresh.
//! The HTTP handlers read it directly (no actor hop for a hit); the cluster actor
//! writes it, and removes a device's entry the moment a login or logout for that
//! device is accepted, so a hit never jumps ahead of a queued change.
//!
//! A hit is only served to credentials CUCM has accepted recently: the cache must not
//! become a way around CUCM's own authentication of the application user.
//!
//! No dashmap guard is ever held across an `.await`, or while touching another map.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus::IntGauge;

use crate::operation::{DeviceName, UserId};

/// More distinct application users than this in one TTL is not a real deployment;
/// the set is pruned to its fresh entries when it grows past it.
const MAX_VERIFIED_CREDENTIALS: usize = 1024;

#[derive(Debug, Clone)]
struct Entry {
    user: Option<UserId>,
    expires: Instant,
}

#[derive(Debug)]
pub struct LoggedInCache {
    ttl: Duration,
    entries: DashMap<DeviceName, Entry>,
    /// The device each user was last seen on: with Multiple Login Behavior "auto
    /// logout", a login elsewhere silently ends that session, so its entry must go.
    last_device_of: DashMap<UserId, DeviceName>,
    /// Credential fingerprints CUCM accepted, and until when that counts.
    verified: DashMap<u64, Instant>,
    entries_gauge: IntGauge,
}

impl LoggedInCache {
    /// `ttl` zero turns the cache off (coalescing still happens in the device queue).
    pub fn new(ttl: Duration, entries_gauge: IntGauge) -> Self {
        Self {
            ttl,
            entries: DashMap::new(),
            last_device_of: DashMap::new(),
            verified: DashMap::new(),
            entries_gauge,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// A fresh answer for this device, if these credentials may see it.
    /// `Some(None)` means "fresh: nobody is logged in".
    pub fn get(&self, device: &DeviceName, credentials: u64) -> Option<Option<UserId>> {
        if !self.enabled() {
            return None;
        }
        let now = Instant::now();
        let allowed = self
            .verified
            .get(&credentials)
            .is_some_and(|until| *until > now);
        if !allowed {
            return None;
        }
        let entry = self.entries.get(device)?;
        (entry.expires > now).then(|| entry.user.clone())
    }

    /// Records who is logged in on a device (`None`: nobody), as CUCM just said.
    pub fn set(&self, device: &DeviceName, user: Option<UserId>) {
        if !self.enabled() {
            return;
        }
        if let Some(user) = &user {
            let previous = self.last_device_of.insert(user.clone(), device.clone());
            if let Some(previous) = previous.filter(|p| p != device) {
                self.entries
                    .remove_if(&previous, |_, e| e.user.as_ref() == Some(user));
            }
        }
        let expires = Instant::now() + self.ttl;
        self.entries.insert(device.clone(), Entry { user, expires });
        self.entries_gauge.set(self.entries.len() as i64);
    }

    /// Forgets a device: a change is pending or its state is unknown.
    pub fn invalidate(&self, device: &DeviceName) {
        if self.entries.remove(device).is_some() {
            self.entries_gauge.set(self.entries.len() as i64);
        }
    }

    /// CUCM accepted these credentials just now.
    pub fn mark_verified(&self, credentials: u64) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        if self.verified.len() >= MAX_VERIFIED_CREDENTIALS {
            self.verified.retain(|_, until| *until > now);
        }
        self.verified.insert(credentials, now + self.ttl);
    }

    /// Drops expired entries so memory follows the live working set.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, e| e.expires > now);
        self.verified.retain(|_, until| *until > now);
        // Collected first: never touch one map while holding a guard of another.
        let stale: Vec<UserId> = self
            .last_device_of
            .iter()
            .filter(|pair| !self.entries.contains_key(pair.value()))
            .map(|pair| pair.key().clone())
            .collect();
        for user in stale {
            self.last_device_of.remove(&user);
        }
        self.entries_gauge.set(self.entries.len() as i64);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl_ms: u64) -> LoggedInCache {
        LoggedInCache::new(
            Duration::from_millis(ttl_ms),
            IntGauge::new("entries", "test").unwrap(),
        )
    }

    fn device(name: &str) -> DeviceName {
        DeviceName::parse(name).unwrap()
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    #[test]
    fn hits_only_for_verified_credentials() {
        let cache = cache(10_000);
        cache.set(&device("SEP1"), Some(user("alice")));
        assert_eq!(cache.get(&device("SEP1"), 7), None);
        cache.mark_verified(7);
        assert_eq!(cache.get(&device("sep1"), 7), Some(Some(user("alice"))));
        assert_eq!(cache.get(&device("SEP1"), 8), None);
        assert_eq!(cache.get(&device("SEP2"), 7), None);
    }

    #[test]
    fn nobody_is_a_cached_answer_and_invalidate_removes_it() {
        let cache = cache(10_000);
        cache.mark_verified(1);
        cache.set(&device("SEP1"), None);
        assert_eq!(cache.get(&device("SEP1"), 1), Some(None));
        cache.invalidate(&device("SEP1"));
        assert_eq!(cache.get(&device("SEP1"), 1), None);
    }

    #[test]
    fn login_elsewhere_drops_the_users_old_device() {
        let cache = cache(10_000);
        cache.mark_verified(1);
        cache.set(&device("SEPA"), Some(user("alice")));
        cache.set(&device("SEPB"), Some(user("alice")));
        assert_eq!(cache.get(&device("SEPA"), 1), None);
        assert_eq!(cache.get(&device("SEPB"), 1), Some(Some(user("alice"))));
    }

    #[test]
    fn expired_entries_miss_and_are_swept() {
        let cache = cache(1);
        cache.mark_verified(1);
        cache.set(&device("SEP1"), Some(user("alice")));
        let later = Instant::now() + Duration::from_millis(5);
        while Instant::now() < later {
            std::hint::spin_loop();
        }
        assert_eq!(cache.get(&device("SEP1"), 1), None);
        cache.sweep();
        assert!(cache.is_empty());
    }

    #[test]
    fn ttl_zero_turns_it_off() {
        let cache = cache(0);
        cache.mark_verified(1);
        cache.set(&device("SEP1"), Some(user("alice")));
        assert_eq!(cache.get(&device("SEP1"), 1), None);
        assert!(cache.is_empty());
    }
}
