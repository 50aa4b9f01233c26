//! The cluster actor's occupancy watch: it notes the devices requests name, learns who
//! is on them from every answer, publishes the changes, and sends the batched polls the
//! [`PollGate`] and the scheduler allow. A child module of `cluster`, so it wires the
//! same actor without widening its fields.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::ClusterActor;
use crate::em::code::{DEVICE_DOES_NOT_EXIST, INVALID_APP_USER, POLICY_VALIDATION};
use crate::em::dispatch::{self, CallEnd};
use crate::em::rules::{self, BatchAnswer, CacheEffect, Exchange, Interpretation};
use crate::em::{Answered, CallError, EmRequest};
use crate::events::{Cause, NewEvent, SeenBy};
use crate::operation::{Credentials, DeviceName, OpError, Operation, Outcome, QueueKey};
use crate::shaper::Held;
use crate::watch::poll::{ClusterNow, PollDecision, PollGate};
use crate::watch::set::{Change, WatchSet};
use crate::watch::{WatchAlways, Watching};

/// How often the actor expires devices and looks for due polls, whatever happens.
const WATCH_TICK: Duration = Duration::from_secs(1);

/// CUCM's codes that refuse a poll for its credentials: the application user is not
/// valid, or its policy does not allow the query.
const CREDENTIAL_CODES: [u32; 2] = [INVALID_APP_USER, POLICY_VALIDATION];

/// What one cluster keeps for watching.
pub(super) struct ClusterWatch {
    shared: Watching,
    set: WatchSet,
    gate: PollGate,
    /// The latest credentials CUCM accepted on this cluster (memory only; `Credentials`
    /// masks its secret in `Debug`, and it is never logged).
    accepted: Option<Arc<Credentials>>,
    /// Devices a change was queued for while the poll in flight was out: its answer may
    /// be older than the change, so it does not teach about them.
    changed_during_poll: HashSet<DeviceName>,
    /// The planned look at the polls: when, and its timer.
    wake_up: Option<(Instant, SpawnHandle)>,
}

impl ClusterWatch {
    pub(super) fn new(shared: &Watching, rate: Option<u32>) -> Option<Self> {
        let settings = &shared.settings;
        settings.enabled.then(|| Self {
            set: WatchSet::new(settings.ttl, settings.interval, settings.max_per_cluster),
            gate: PollGate::new(rate, settings.rate_share),
            shared: shared.clone(),
            accepted: None,
            changed_during_poll: HashSet::new(),
            wake_up: None,
        })
    }

    /// Configured credentials win; else the latest a caller had accepted.
    fn credentials(&self) -> Option<Arc<Credentials>> {
        self.shared
            .configured_credentials()
            .or_else(|| self.accepted.clone())
    }
}

impl ClusterActor {
    pub(super) fn start_watch(&mut self, ctx: &mut Context<Self>) {
        if self.watch.is_some() {
            ctx.run_interval(WATCH_TICK, |actor, ctx| {
                let now = Instant::now();
                if let Some(watch) = &mut actor.watch {
                    watch.set.expire(now);
                    actor.metrics.watched_devices.set(watch.set.len() as i64);
                }
                actor.poll_if_due(ctx);
            });
        }
    }

    /// A request names a device: it is watched from now on (for `ttl`).
    pub(super) fn watch_requested(&mut self, operation: &Operation) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let Some(device) = operation.device() else {
            return;
        };
        let dropped = watch.set.requested(device, Instant::now());
        self.metrics.watch_dropped.inc_by(dropped as u64);
        if operation.mutates() && watch.gate_in_flight() {
            watch.changed_during_poll.insert(device.clone());
        }
        self.metrics.watched_devices.set(watch.set.len() as i64);
    }

    /// An operation's answer: what it says about who is on the device, and whose
    /// credentials CUCM accepts.
    pub(super) fn watch_concluded(
        &mut self,
        operation: &Operation,
        credentials: &Credentials,
        meaning: &Interpretation,
    ) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        // Replaced only when they differ: no copy per request.
        if meaning.credentials_accepted
            && watch.accepted.as_ref().map(|c| c.fingerprint()) != Some(credentials.fingerprint())
        {
            watch.accepted = Some(Arc::new(credentials.clone()));
        }
        let Some(device) = operation.device() else {
            return;
        };
        if matches!(&meaning.result, Err(OpError::Cucm { code, .. }) if *code == DEVICE_DOES_NOT_EXIST)
        {
            watch.set.remove(device);
            self.metrics.watched_devices.set(watch.set.len() as i64);
            return;
        }
        let change = match &meaning.cache {
            CacheEffect::Set(user) if operation.mutates() && meaning.result.is_ok() => watch
                .set
                .confirmed(device, user.clone())
                .map(|change| (change, Cause::Request, None)),
            CacheEffect::Set(user) => watch
                .set
                .observed(device, user.clone())
                .map(|change| (change, Cause::Observed, Some(SeenBy::Query))),
            CacheEffect::Forget => {
                watch.set.forget_user(device);
                None
            }
            CacheEffect::Unchanged => None,
        };
        if let Some((change, cause, seen_by)) = change {
            self.publish(device.clone(), change, cause, seen_by);
        }
    }

    fn publish(&self, device: DeviceName, change: Change, cause: Cause, seen_by: Option<SeenBy>) {
        if let Some(watch) = &self.watch {
            watch.shared.hub.publish(NewEvent {
                cluster: self.code.clone(),
                device,
                before: change.before,
                after: change.after,
                cause,
                seen_by,
            });
        }
    }

    /// Sends a poll when one is due and allowed; else makes sure the actor looks again
    /// when it may be.
    pub(super) fn poll_if_due(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        // The gateway is stopping (shutdown grace over): nothing more goes to CUCM.
        if self.closed {
            return;
        }
        let Some(watch) = &mut self.watch else {
            return;
        };
        let credentials = watch.credentials();
        let decision = watch.gate.decide(ClusterNow {
            now,
            first_due: watch.set.next_due(),
            operations_waiting: self.scheduler.operations_waiting(),
            credentials: credentials.as_ref().map(|c| c.fingerprint()),
        });
        let wait = match (decision, credentials) {
            (PollDecision::Send, Some(credentials)) => match self.scheduler.try_start_poll(now) {
                Ok(()) => {
                    let scheduler = &self.scheduler;
                    let devices = watch.set.take_batch(now, scheduler.batch_limit(), |d| {
                        scheduler.has_pending(&QueueKey::Device(d.clone()))
                    });
                    if devices.is_empty() {
                        // Every due device is being asked by a request anyway.
                        self.scheduler.poll_ended(CallEnd::NoAnswer, now);
                        None
                    } else {
                        self.send_poll(devices, credentials, ctx);
                        None
                    }
                }
                Err(Held::RateLimited(wait)) => Some(wait),
                // Slots are taken or operations wait: their ends pump, and pumping
                // polls.
                Err(Held::AtCapacity) => None,
            },
            (PollDecision::Wait(wait), _) => Some(wait),
            _ => None,
        };
        if let Some(wait) = wait {
            self.poll_again_after(wait.min(WATCH_TICK), ctx);
        }
    }

    /// Looks again after `wait`, unless a look is already planned before then (a
    /// request storm must not re-arm a timer per request).
    fn poll_again_after(&mut self, wait: Duration, ctx: &mut Context<Self>) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let at = Instant::now() + wait;
        if let Some((planned, handle)) = watch.wake_up {
            if planned <= at {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(wait, |actor, ctx| {
            if let Some(watch) = &mut actor.watch {
                watch.wake_up = None;
            }
            actor.poll_if_due(ctx);
        });
        watch.wake_up = Some((at, handle));
    }

    fn send_poll(
        &mut self,
        devices: Vec<DeviceName>,
        credentials: Arc<Credentials>,
        ctx: &mut Context<Self>,
    ) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let now = Instant::now();
        watch.gate.sent(now);
        watch.changed_during_poll.clear();
        let em = self.em.clone();
        let budget = self.call_timeout;
        let fingerprint = credentials.fingerprint();
        // With [coordination], a poll is a CUCM call like any other: it first gets one of
        // the instances' shared slots (or this instance's share while PostgreSQL is away).
        let gate = self.gate.clone();
        let call = async move {
            let grant = match &gate {
                Some(gate) => match gate.grant(now + budget).await {
                    Some(grant) => Some(grant),
                    None => return (devices, None, None),
                },
                None => None,
            };
            let result = em
                .call(
                    EmRequest::DeviceUserQuery { devices: &devices },
                    &credentials,
                    now + budget,
                )
                .await;
            (devices, Some(result), grant)
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |(devices, result, grant), actor, ctx| {
                    let Some(result) = result else {
                        // No slot of the shared allowance in time: not sent, tried later.
                        actor
                            .scheduler
                            .poll_ended(CallEnd::NoAnswer, Instant::now());
                        if let Some(watch) = &mut actor.watch {
                            watch.gate.ended();
                        }
                        actor.pump(ctx);
                        return;
                    };
                    let poll = EndedPoll {
                        devices,
                        result,
                        took: now.elapsed(),
                        budget,
                        credentials: fingerprint,
                        grant,
                    };
                    actor.finish_poll(poll, ctx);
                }),
        );
    }

    fn finish_poll(&mut self, poll: EndedPoll, ctx: &mut Context<Self>) {
        let EndedPoll {
            devices,
            result,
            took,
            budget,
            credentials,
            grant,
        } = poll;
        let exchange = Exchange::Em(result);
        let end = dispatch::call_end(&exchange, took, budget);
        self.give_back(grant, end);
        self.scheduler.poll_ended(end, Instant::now());
        let Exchange::Em(result) = exchange else {
            return;
        };
        if let Some(watch) = &mut self.watch {
            watch.gate.ended();
        }
        if rules::is_busy(&result) {
            self.metrics.polls_busy.inc();
        } else if refuses_credentials(&result) {
            self.metrics.polls_refused_credentials.inc();
            let first_time = self
                .watch
                .as_mut()
                .is_some_and(|watch| watch.gate.refused(credentials));
            if first_time {
                tracing::warn!(
                    cluster = %self.code,
                    "CUCM refused the watch poll's credentials: no polls on this cluster until other credentials are accepted or configured"
                );
            }
        } else {
            self.learn_from_poll(devices, result);
        }
        self.pump(ctx);
    }

    fn learn_from_poll(&mut self, devices: Vec<DeviceName>, result: Result<Answered, CallError>) {
        match rules::split_batch(&devices, result) {
            BatchAnswer::PerDevice(meanings) => {
                let mut answered = false;
                for (device, meaning) in devices.into_iter().zip(meanings) {
                    match meaning.result {
                        Ok(Outcome::CurrentUser(user)) => {
                            answered = true;
                            self.learn_one(device, user);
                        }
                        // Not (or no longer) a phone of this cluster: stop asking.
                        Err(OpError::Cucm { code, .. }) if code == DEVICE_DOES_NOT_EXIST => {
                            answered = true;
                            if let Some(watch) = &mut self.watch {
                                watch.set.remove(&device);
                                self.metrics.watched_devices.set(watch.set.len() as i64);
                            }
                        }
                        _ => {}
                    }
                }
                if answered {
                    self.metrics.polls_ok.inc();
                } else {
                    self.metrics.polls_failed.inc();
                }
            }
            BatchAnswer::NotBatching(why) => {
                self.metrics.polls_failed.inc();
                self.stop_batching(why);
            }
        }
    }

    /// A poll saw `user` on the device. A change queued or running for the device (or
    /// queued while the poll was out) is newer than this answer: it stands.
    fn learn_one(&mut self, device: DeviceName, user: Option<crate::operation::UserId>) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        if watch.changed_during_poll.contains(&device)
            || self
                .scheduler
                .has_pending(&QueueKey::Device(device.clone()))
        {
            return;
        }
        self.cache.set(&device, user.clone());
        if let Some(change) = watch.set.observed(&device, user) {
            self.publish(device, change, Cause::Observed, Some(SeenBy::Poll));
        }
    }
}

impl ClusterWatch {
    fn gate_in_flight(&self) -> bool {
        self.gate.in_flight()
    }
}

/// A poll that came back.
struct EndedPoll {
    devices: Vec<DeviceName>,
    result: Result<Answered, CallError>,
    took: Duration,
    budget: Duration,
    credentials: u64,
    /// The shared slot it ran under, with `[coordination]`.
    grant: Option<crate::coordination::Grant>,
}

/// Whether CUCM refused the poll for its credentials (for the whole document).
fn refuses_credentials(result: &Result<Answered, CallError>) -> bool {
    matches!(
        result,
        Ok(Answered {
            response: crate::em::EmResponse::Failure { code: Some(code), .. },
            ..
        }) if CREDENTIAL_CODES.contains(code)
    )
}

impl Handler<WatchAlways> for ClusterActor {
    type Result = ();

    fn handle(&mut self, msg: WatchAlways, ctx: &mut Self::Context) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        let refused = watch.set.set_always(&msg.0, Instant::now());
        if refused > 0 {
            self.metrics.watch_dropped.inc_by(refused as u64);
            tracing::warn!(
                cluster = %self.code,
                refused,
                "more always-watched devices than the cap on watched devices: the rest are not watched"
            );
        }
        self.metrics.watched_devices.set(watch.set.len() as i64);
        self.poll_if_due(ctx);
    }
}
