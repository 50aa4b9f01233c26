//! Coordination: one CUCM allowance shared by every gateway instance.
//!
//! With `[coordination] enabled = true`, a cluster's `max_concurrent` and
//! `max_requests_per_second` are totals across the instances. The local scheduler still
//! decides which operation goes next (its device queues and cluster queue stay per
//! instance); between its decision and the CUCM call, the cluster actor awaits a
//! [`ClusterGate::grant`]: a slot leased in PostgreSQL for the call's timeout + 1 s and a
//! token of the shared rate, or, while PostgreSQL is unreachable, a local grant within
//! this instance's share (see [`gate`]). The grant is given back when the call ends.
//!
//! - `gate.rs`: the decisions (shared, fallback, returning), pure, on a fake clock.
//! - `store.rs`: the PostgreSQL driver, on its own thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use prometheus::{Histogram, IntCounter};

use crate::metrics::Metrics;

pub mod gate;
pub mod store;

pub use gate::{Allowance, Ask, Gate};
pub use store::{Answer, ClusterShape, Lease, StoreClient, StoreError};

/// A grant request the store thread does not answer within this counts as unreachable
/// (a grant takes about a millisecond; a cut network much longer). Not shorter: an
/// instance that falls back while its peers still share can add its share to theirs.
const STORE_PATIENCE: Duration = Duration::from_secs(1);
/// A waiter for a shared slot looks again after this even without a notification: a
/// dead instance's lease expires without one.
const RECHECK: Duration = Duration::from_millis(100);
/// A grant still missing this close to the deadline is given up: the call could hardly
/// finish, and the caller is answered "overloaded" before its own wait ends.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The coordination of one cluster: what its actor awaits before each CUCM call.
#[derive(Clone)]
pub struct ClusterGate {
    code: Arc<str>,
    gate: Arc<Mutex<Gate<DefaultClock>>>,
    store: StoreClient,
    /// Woken when a call of this instance ends (frees local room).
    local_end: Arc<tokio::sync::Notify>,
    next_grant: Arc<AtomicU64>,
    metrics: GateMetrics,
}

impl std::fmt::Debug for ClusterGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterGate")
            .field("code", &self.code)
            .field("gate", &self.gate)
            .finish()
    }
}

#[derive(Clone)]
struct GateMetrics {
    wait: Histogram,
    shared: IntCounter,
    local: IntCounter,
    expired: IntCounter,
}

/// Permission for one CUCM call; give it back with [`ClusterGate::ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Shared(Lease),
    Local,
}

impl ClusterGate {
    pub fn new(
        code: Arc<str>,
        allowance: Allowance,
        store: StoreClient,
        metrics: &Metrics,
    ) -> Self {
        let c = &[&*code];
        let outcome = |o: &str| metrics.coordination_grants.with_label_values(&[&code, o]);
        Self {
            gate: Arc::new(Mutex::new(Gate::new(allowance, DefaultClock::default()))),
            store,
            local_end: Arc::new(tokio::sync::Notify::new()),
            next_grant: Arc::new(AtomicU64::new(1)),
            metrics: GateMetrics {
                wait: metrics.coordination_wait.with_label_values(c),
                shared: outcome("shared"),
                local: outcome("local"),
                expired: outcome("expired"),
            },
            code,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate<DefaultClock>> {
        // The gate's state stays consistent between calls: a panic elsewhere cannot
        // leave it half-updated, so a poisoned lock is still usable.
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for permission to call CUCM, until shortly before `deadline` at most
    /// (then `None`: the call must not go out). Never fails because the store is down.
    pub async fn grant(&self, deadline: Instant) -> Option<Grant> {
        let started = Instant::now();
        let give_up = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline);
        let grant = self.wait_for_grant(give_up).await;
        self.metrics.wait.observe(started.elapsed().as_secs_f64());
        match grant {
            Some(Grant::Shared(_)) => self.metrics.shared.inc(),
            Some(Grant::Local) => self.metrics.local.inc(),
            None => self.metrics.expired.inc(),
        }
        grant
    }

    async fn wait_for_grant(&self, deadline: Instant) -> Option<Grant> {
        let slot_freed = self.store.slot_freed(&self.code);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Registered before asking, so an end between the answer and the wait is
            // not missed.
            let local_end = self.local_end.notified();
            tokio::pin!(local_end);
            local_end.as_mut().enable();
            let ask = {
                let mut gate = self.lock();
                if gate.probe_due(now) {
                    if self.store.is_up() {
                        gate.reachable(now);
                        tracing::info!(
                            cluster = %self.code,
                            hold_ms = gate.return_hold().as_millis() as u64,
                            "coordination store reachable again: shared grants, within this instance's share for a while"
                        );
                    } else {
                        gate.probe_failed(now);
                    }
                }
                gate.ask(now)
            };
            let pause = match ask {
                Ask::Local => return Some(Grant::Local),
                Ask::Wait(pause) => pause,
                Ask::Store => {
                    let freed = slot_freed.as_ref().map(|n| n.notified());
                    let mut freed = freed.map(Box::pin);
                    if let Some(freed) = freed.as_mut() {
                        freed.as_mut().enable();
                    }
                    let _waiting = self.store.waiting();
                    let grant = self.next_grant.fetch_add(1, Ordering::Relaxed);
                    match self.store.acquire(&self.code, grant, STORE_PATIENCE).await {
                        Answer::Leased(lease) => return Some(Grant::Shared(lease)),
                        Answer::Unreachable => {
                            let mut gate = self.lock();
                            gate.not_leased();
                            if gate.is_shared() {
                                tracing::warn!(
                                    cluster = %self.code,
                                    local_slots = gate.local_slots(),
                                    "coordination store unreachable: granting within this instance's share"
                                );
                            }
                            gate.unreachable(Instant::now());
                            continue;
                        }
                        Answer::RateLimited(wait) => {
                            self.lock().not_leased();
                            sleep_until_earlier(wait, deadline).await;
                            continue;
                        }
                        Answer::Full => {
                            self.lock().not_leased();
                            let bound =
                                RECHECK.min(deadline.saturating_duration_since(Instant::now()));
                            // A slot freed by a peer (its NOTIFY) or by this instance
                            // (its release is queued to the store thread ahead of the
                            // next ask, so asking at once finds it free).
                            let freed = async {
                                match freed {
                                    Some(freed) => freed.await,
                                    None => std::future::pending().await,
                                }
                            };
                            let either = futures_util::future::select(Box::pin(freed), local_end);
                            let _ = tokio::time::timeout(bound, either).await;
                            continue;
                        }
                    }
                }
            };
            let bound = pause
                .unwrap_or(RECHECK)
                .min(deadline.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(bound, local_end).await;
        }
    }

    /// The call is over. A timed-out call's lease is kept until it expires: CUCM may
    /// still be working on it.
    pub fn ended(&self, grant: Grant, timed_out: bool) {
        self.lock().ended(timed_out, Instant::now());
        if let Grant::Shared(lease) = grant {
            if !timed_out {
                self.store.release(&self.code, lease);
            }
        }
        self.local_end.notify_waiters();
    }
}

async fn sleep_until_earlier(wait: Duration, deadline: Instant) {
    let bound = wait.min(deadline.saturating_duration_since(Instant::now()));
    tokio::time::sleep(bound).await;
}

/// `[coordination]` as the actors need it.
#[derive(Clone)]
pub struct Coordination {
    store: StoreClient,
    instances: usize,
}

impl std::fmt::Debug for Coordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordination")
            .field("store", &self.store)
            .field("instances", &self.instances)
            .finish()
    }
}

impl Coordination {
    /// Starts the store thread for these clusters (it connects on its own; until it
    /// does, calls are granted within this instance's share).
    pub fn start(
        url: &str,
        instances: usize,
        clusters: &[crate::ClusterConfig],
        metrics: &Metrics,
    ) -> Result<Self, StoreError> {
        let shapes = clusters
            .iter()
            .map(|c| ClusterShape {
                code: Arc::from(c.normalized_code()),
                max_concurrent: c.max_concurrent.max(1),
                rate: c.rate(),
                lease: lease_for(c.timeout()),
            })
            .collect();
        metrics.coordination_enabled.set(1);
        let store = StoreClient::start(url, shapes, metrics.coordination_up.clone())?;
        Ok(Self {
            store,
            instances: instances.max(1),
        })
    }

    /// The gate one cluster's actor awaits before each CUCM call.
    pub fn gate_for(&self, config: &crate::ClusterConfig, metrics: &Metrics) -> ClusterGate {
        let allowance = Allowance {
            max_concurrent: config.max_concurrent.max(1),
            rate: config.rate(),
            instances: self.instances,
            lease: lease_for(config.timeout()),
        };
        ClusterGate::new(
            Arc::from(config.normalized_code()),
            allowance,
            self.store.clone(),
            metrics,
        )
    }
}

/// A call holds its slot for its timeout and one second more: a lease outlives any call
/// that is still running, and a dead instance's slot is free again soon after.
pub fn lease_for(call_timeout: Duration) -> Duration {
    call_timeout + Duration::from_secs(1)
}
