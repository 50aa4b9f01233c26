//! `LoggedInCache`: who is logged in on which device, for `cache_ttl_ms`.
//!
//! Set by successful logins, logouts and queries; read by getloggedinuser while fresh.
//! The HTTP handlers read it directly (no actor hop for a hit); the cluster actor
//! writes it. While a login or logout for a device is pending, the device is *held*:
//! its entry answers nobody (a hit never jumps ahead of a queued change) but is kept,
//! so a change CUCM refuses (bad credentials, say) costs the device nothing — an
//! unauthenticated caller cannot empty the cache and force CUCM queries.
//!
//! Credentials CUCM just refused (code 3) are remembered for a few seconds, so a flood
//! of requests with a wrong password is answered without spending the cluster's rate.
//!
//! A hit is only served to credentials CUCM has accepted recently: the cache must not
//! become a way around CUCM's own authentication of the application user.
//!
//! No dashmap guard is ever held across an `.await`, or while touching another map.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus::IntGauge;

use crate::operation::{Credentials, DeviceName, Operation, Reply, UserId};

/// More distinct application users than this in one TTL is not a real deployment;
/// the set is pruned to its fresh entries when it grows past it.
const MAX_VERIFIED_CREDENTIALS: usize = 1024;
/// How long credentials CUCM refused are answered 3 without asking CUCM again.
pub const REJECTED_CREDENTIALS_TTL: Duration = Duration::from_secs(5);

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
    /// Credential fingerprints CUCM refused (code 3), and until when that counts.
    rejected: DashMap<u64, Instant>,
    /// Devices with a login or logout pending, and how many.
    held: DashMap<DeviceName, u32>,
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
            rejected: DashMap::new(),
            held: DashMap::new(),
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
        if !allowed || self.held.contains_key(device) {
            return None;
        }
        let entry = self.entries.get(device)?;
        (entry.expires > now).then(|| entry.user.clone())
    }

    /// A device query answered from a fresh entry these credentials may see.
    pub fn cached_answer(&self, operation: &Operation, credentials: &Credentials) -> Option<Reply> {
        let Operation::Query { device } = operation else {
            return None;
        };
        let user = self.get(device, credentials.fingerprint())?;
        Some(Reply::cached(user))
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

    /// A login or logout for the device is queued: no answers for it until it is over.
    pub fn hold(&self, device: &DeviceName) {
        *self.held.entry(device.clone()).or_insert(0) += 1;
    }

    /// A login or logout for the device is over (whatever its outcome).
    pub fn release(&self, device: &DeviceName) {
        self.held.remove_if_mut(device, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }

    /// An operation is over, or was given up after it was queued: when it was a
    /// login or logout, its device's hold ends.
    pub fn release_after(&self, operation: &Operation) {
        if let (true, Some(device)) = (operation.mutates(), operation.device()) {
            self.release(device);
        }
    }

    /// CUCM refused these credentials just now (code 3).
    pub fn mark_rejected(&self, credentials: u64) {
        let now = Instant::now();
        if self.rejected.len() >= MAX_VERIFIED_CREDENTIALS {
            self.rejected.retain(|_, until| *until > now);
            if self.rejected.len() >= MAX_VERIFIED_CREDENTIALS {
                return;
            }
        }
        self.verified.remove(&credentials);
        self.rejected
            .insert(credentials, now + REJECTED_CREDENTIALS_TTL);
    }

    /// Whether CUCM refused these credentials within the last few seconds.
    pub fn recently_rejected(&self, credentials: u64) -> bool {
        self.rejected
            .get(&credentials)
            .is_some_and(|until| *until > Instant::now())
    }

    /// CUCM accepted these credentials just now.
    pub fn mark_verified(&self, credentials: u64) {
        self.rejected.remove(&credentials);
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
        self.rejected.retain(|_, until| *until > now);
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
    fn only_a_device_query_is_answered_and_a_change_releases_its_hold() {
        let cache = cache(10_000);
        let credentials = Credentials::new("app", "pw");
        cache.mark_verified(credentials.fingerprint());
        cache.set(&device("SEP1"), Some(user("alice")));
        let query = Operation::Query {
            device: device("SEP1"),
        };
        let reply = cache.cached_answer(&query, &credentials).unwrap();
        assert_eq!(
            (reply.result, reply.from_cache),
            (Ok(crate::Outcome::CurrentUser(Some(user("alice")))), true)
        );
        let logout = Operation::Logout {
            device: device("SEP1"),
        };
        assert!(cache.cached_answer(&logout, &credentials).is_none());
        cache.hold(&device("SEP1"));
        assert!(cache.cached_answer(&query, &credentials).is_none(), "held");
        cache.release_after(&query);
        assert!(
            cache.cached_answer(&query, &credentials).is_none(),
            "a query holds nothing"
        );
        cache.release_after(&logout);
        assert!(cache.cached_answer(&query, &credentials).is_some());
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
    fn a_held_device_answers_nothing_but_keeps_its_entry() {
        let cache = cache(10_000);
        cache.mark_verified(1);
        cache.set(&device("SEP1"), Some(user("alice")));
        cache.hold(&device("SEP1"));
        cache.hold(&device("SEP1"));
        assert_eq!(cache.get(&device("SEP1"), 1), None);
        cache.release(&device("SEP1"));
        assert_eq!(
            cache.get(&device("SEP1"), 1),
            None,
            "one change still pending"
        );
        cache.release(&device("SEP1"));
        assert_eq!(cache.get(&device("SEP1"), 1), Some(Some(user("alice"))));
        cache.release(&device("SEP1"));
        assert_eq!(cache.get(&device("SEP1"), 1), Some(Some(user("alice"))));
    }

    #[test]
    fn refused_credentials_are_remembered_until_accepted() {
        let cache = cache(10_000);
        cache.mark_verified(7);
        cache.mark_rejected(7);
        assert!(cache.recently_rejected(7));
        assert!(!cache.recently_rejected(8));
        cache.set(&device("SEP1"), None);
        assert_eq!(cache.get(&device("SEP1"), 7), None, "no longer verified");
        cache.mark_verified(7);
        assert!(!cache.recently_rejected(7));
        // Also with the cache off: it protects CUCM's rate, not the cache.
        let off = super::tests::cache(0);
        off.mark_rejected(3);
        assert!(off.recently_rejected(3));
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
