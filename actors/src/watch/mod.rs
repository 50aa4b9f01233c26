//! The occupancy watch: each cluster keeps the logged-in state of the devices it knows
//! fresh with batched polls that cost its callers nothing, and publishes every change
//! to the [`EventHub`](crate::events::EventHub).
//!
//! [`set`] says which devices are watched and which are due; [`poll`] says when a poll
//! may leave. The cluster actor wires them (`cluster/watch.rs`).

pub mod poll;
pub mod set;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::events::EventHub;
use crate::operation::{Credentials, DeviceName};

/// Most devices one cluster watches: beyond it the oldest requested is dropped.
pub const MAX_WATCHED_PER_CLUSTER: usize = 100_000;

/// How the clusters watch (from `[watch]`).
#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub enabled: bool,
    /// A requested device stays watched this long after its last request.
    pub ttl: Duration,
    /// Each watched device is asked at least this often.
    pub interval: Duration,
    /// The part of a cluster's `max_requests_per_second` polls may use.
    pub rate_share: f64,
    pub max_per_cluster: usize,
}

impl WatchSettings {
    pub fn off() -> Self {
        Self {
            enabled: false,
            ttl: Duration::ZERO,
            interval: Duration::from_secs(60),
            rate_share: 0.25,
            max_per_cluster: 0,
        }
    }
}

/// What every cluster shares for watching: the settings, where changes go, and the
/// credentials configured for polls (re-read on SIGHUP, hence shared and writable).
#[derive(Clone)]
pub struct Watching {
    pub settings: WatchSettings,
    pub hub: Arc<EventHub>,
    credentials: Arc<RwLock<Option<Arc<Credentials>>>>,
}

impl std::fmt::Debug for Watching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watching")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Watching {
    pub fn new(settings: WatchSettings, hub: Arc<EventHub>) -> Self {
        Self {
            settings,
            hub,
            credentials: Arc::new(RwLock::new(None)),
        }
    }

    /// The configured poll credentials, if any.
    pub fn configured_credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.read().ok().and_then(|c| c.clone())
    }

    pub fn set_credentials(&self, credentials: Option<Credentials>) {
        if let Ok(mut slot) = self.credentials.write() {
            *slot = credentials.map(Arc::new);
        }
    }
}

/// The always-watched devices of one cluster (a re-read list replaces the last).
#[derive(Debug, Clone)]
pub struct WatchAlways(pub Vec<DeviceName>);

impl actix::Message for WatchAlways {
    type Result = ();
}
