//! `ClusterActor`: one per CUCM cluster; owns its device queues and shaper.
//!
//! The handler of `Submit` is synchronous: it answers from the cache, sheds load, or
//! queues the operation and hands back a receiver for the answer. CUCM calls run as
//! futures spawned in the actor's context; their completions come back to the actor
//! (`finish`), which updates the cache, answers every waiter and starts the device's
//! next operation. Because those futures interleave, per-device order comes from the
//! `DeviceQueue`s, never from the mailbox.
//!
//! `ClusterHandle` is what the HTTP layer holds: cache fast path, `send` (which
//! respects the bounded mailbox) and a deadline on the whole wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::Rng;
use tokio::sync::oneshot;

use crate::cache::LoggedInCache;
use crate::config::ClusterConfig;
use crate::device_queue::{DeviceQueue, PendingOp, Pushed, Turn};
use crate::em::{Answered, CallError, DeviceState, EmClient, EmClientError, EmRequest, EmResponse};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::operation::{Credentials, DeviceName, OpError, Operation, Outcome, Reply, UserId};
use crate::shaper::{Admission, Rate, Shaper};

/// Mailbox bound: `Submit` handling is quick, so this only fills under a pathological
/// burst, and then `send` makes callers wait rather than grow memory.
const MAILBOX_CAPACITY: usize = 4096;
const FIRST_BUSY_BACK_OFF: Duration = Duration::from_millis(100);
const MAX_BUSY_BACK_OFF: Duration = Duration::from_secs(2);
/// Shortest time worth a retry after CUCM said busy.
const MIN_RETRY_WINDOW: Duration = Duration::from_millis(50);
/// The caller's wait outlives the deadline by this much, so the actor's own deadline
/// handling (which answers precisely) always wins the race.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// CUCM's code for "busy": Maximum Concurrent Requests reached.
pub const CUCM_BUSY: u32 = 26;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster {code}: {source}")]
    Client { code: String, source: EmClientError },
}

/// Ask the cluster to carry out one operation before `deadline`.
#[derive(Debug)]
pub struct Submit {
    pub operation: Operation,
    pub credentials: Credentials,
    pub deadline: Instant,
}

impl Message for Submit {
    type Result = oneshot::Receiver<Reply>;
}

/// What one cluster needs to run.
pub struct ClusterActor {
    code: Arc<str>,
    em: Arc<EmClient>,
    cache: Arc<LoggedInCache>,
    shaper: Shaper,
    rate: Option<Rate>,
    devices: HashMap<DeviceName, DeviceQueue>,
    /// Accepted operations not yet sent to CUCM (waiting behind their device or for
    /// a slot): what `queue_limit` bounds.
    queued: usize,
    queue_limit: usize,
    /// A wake-up is scheduled for when the rate limiter allows the next call.
    rate_wake_up: Option<SpawnHandle>,
    /// Recent CUCM call time (exponentially weighted), to foresee a missed deadline.
    call_time: Option<Duration>,
    metrics: ClusterMetrics,
}

impl ClusterActor {
    /// Starts the actor on the current arbiter and returns the handle callers use.
    pub fn launch(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ClusterHandle, ClusterError> {
        let code: Arc<str> = Arc::from(config.normalized_code());
        let em = EmClient::new(
            &code,
            &config.nodes,
            &config.client_settings(),
            metrics.clone(),
        )
        .map_err(|source| ClusterError::Client {
            code: code.to_string(),
            source,
        })?;
        let em = Arc::new(em);
        let cluster_metrics = ClusterMetrics::new(&metrics, &code, config.max_concurrent);
        let cache = Arc::new(LoggedInCache::new(
            config.cache_ttl(),
            cluster_metrics.cache_entries.clone(),
        ));
        let actor = ClusterActor {
            code: code.clone(),
            em: em.clone(),
            cache: cache.clone(),
            shaper: Shaper::new(config.max_concurrent, config.rate()),
            rate: config.rate(),
            devices: HashMap::new(),
            queued: 0,
            queue_limit: config.queue_limit,
            rate_wake_up: None,
            call_time: None,
            metrics: cluster_metrics.clone(),
        };
        let addr = actor.start();
        Ok(ClusterHandle {
            code,
            addr,
            cache,
            em,
            metrics: cluster_metrics,
        })
    }

    fn accept(&mut self, msg: Submit, ctx: &mut Context<Self>) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        let Submit {
            operation,
            credentials,
            deadline,
        } = msg;
        let device = operation.device().clone();

        if let Operation::Query { .. } = operation {
            // Nothing pending on the device: a fresh cache entry is the current truth.
            if !self.devices.contains_key(&device) {
                if let Some(user) = self.cache.get(&device, credentials.fingerprint()) {
                    self.metrics.cache_hits.inc();
                    let _ = tx.send(Reply {
                        result: Ok(Outcome::CurrentUser(user)),
                        node: None,
                        from_cache: true,
                    });
                    return rx;
                }
            }
            self.metrics.cache_misses.inc();
        }

        let pending = PendingOp::new(operation, credentials, deadline, tx);
        // A query that can share an identical one costs nothing: no admission check.
        if !self.would_join(&device, &pending) {
            if let Err(error) = self.admit(deadline) {
                answer_all(
                    pending.waiters,
                    Reply {
                        result: Err(error),
                        node: None,
                        from_cache: false,
                    },
                );
                return rx;
            }
        }
        if matches!(
            pending.operation,
            Operation::Login { .. } | Operation::Logout { .. }
        ) {
            // From now on the cached state of this device is about to change.
            self.cache.invalidate(&device);
        }
        match self
            .devices
            .entry(device.clone())
            .or_default()
            .push(pending)
        {
            Pushed::Joined => self.metrics.cache_coalesced.inc(),
            Pushed::Queued { needs_turn } => {
                self.queued += 1;
                if needs_turn {
                    self.shaper.enqueue(device);
                }
            }
        }
        self.pump(ctx);
        rx
    }

    fn would_join(&self, device: &DeviceName, pending: &PendingOp) -> bool {
        self.devices
            .get(device)
            .is_some_and(|queue| queue.would_join(pending))
    }

    /// Load shedding: a full queue, or a wait that cannot end before the deadline.
    fn admit(&mut self, deadline: Instant) -> Result<(), OpError> {
        if self.queued >= self.queue_limit {
            self.metrics.shed_queue_full.inc();
            return Err(OpError::Overloaded {
                reason: "the cluster's queue is full",
                retry_after: self.expected_wait().max(Duration::from_secs(1)),
            });
        }
        let expected = self.expected_wait();
        if Instant::now() + expected > deadline {
            self.metrics.shed_deadline.inc();
            return Err(OpError::Overloaded {
                reason: "the wait for CUCM would exceed the deadline",
                retry_after: expected.max(Duration::from_secs(1)),
            });
        }
        Ok(())
    }

    /// How long a new operation would likely wait: the work ahead divided by what the
    /// cap and the rate let through.
    fn expected_wait(&self) -> Duration {
        let ahead = self.queued as f64;
        let by_concurrency = self.call_time.map_or(0.0, |t| {
            t.as_secs_f64() * ahead / self.shaper.max_concurrent() as f64
        });
        let by_rate = self.rate.map_or(0.0, |rate| {
            (ahead - f64::from(rate.burst.get())).max(0.0) / f64::from(rate.per_second.get())
        });
        Duration::from_secs_f64(by_concurrency.max(by_rate))
    }

    /// Starts every operation the shaper allows now; schedules a wake-up for the rate
    /// limiter if it holds one back.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        loop {
            if let Some(device) = self.shaper.front().cloned() {
                if self.expire_if_late(&device) {
                    continue;
                }
            }
            match self.shaper.try_admit() {
                Admission::Granted(device) => self.start(device, ctx),
                Admission::Idle | Admission::AtCapacity => break,
                Admission::RateLimited(wait) => {
                    if self.rate_wake_up.is_none() {
                        self.metrics.rate_limiter_waits.inc();
                        self.rate_wake_up = Some(ctx.run_later(wait, |actor, ctx| {
                            actor.rate_wake_up = None;
                            actor.pump(ctx);
                        }));
                    }
                    break;
                }
            }
        }
        self.metrics.queue_depth.set(self.queued as i64);
        self.metrics.in_flight.set(self.shaper.in_flight() as i64);
    }

    /// The shaper's front device has an operation past its deadline: answer 1004
    /// without calling CUCM, and let the device line up for its next one.
    fn expire_if_late(&mut self, device: &DeviceName) -> bool {
        // Late means: it cannot finish before its deadline. Starting it anyway would
        // risk a login that CUCM executes after the caller was told it failed.
        let latest_start = Instant::now() + self.call_time.unwrap_or_default();
        let Some(queue) = self.devices.get_mut(device) else {
            // Cannot happen (a lined-up device has a queue); drop the stale entry.
            self.shaper.skip_front();
            return true;
        };
        if queue.next().is_none_or(|op| op.deadline > latest_start) {
            return false;
        }
        self.shaper.skip_front();
        if let Some((op, never_started)) = queue.drop_next() {
            if never_started {
                self.queued = self.queued.saturating_sub(1);
            }
            self.metrics.shed_deadline.inc();
            answer_all(
                op.waiters,
                Reply {
                    result: Err(OpError::Overloaded {
                        reason: "the deadline would pass before CUCM could answer",
                        retry_after: self.expected_wait().max(Duration::from_secs(1)),
                    }),
                    node: None,
                    from_cache: false,
                },
            );
        }
        self.after_turn(device.clone());
        true
    }

    fn start(&mut self, device: DeviceName, ctx: &mut Context<Self>) {
        let Some(queue) = self.devices.get_mut(&device) else {
            self.shaper.release();
            return;
        };
        let Some((op, first_time)) = queue.start() else {
            self.shaper.release();
            return;
        };
        if first_time {
            self.queued = self.queued.saturating_sub(1);
            self.metrics
                .queue_wait
                .observe(op.accepted_at.elapsed().as_secs_f64());
        }
        let em = self.em.clone();
        let operation = op.operation.clone();
        let credentials = op.credentials.clone();
        let deadline = op.deadline;
        let started = Instant::now();
        let call = async move {
            let devices = [operation.device().clone()];
            let request = match &operation {
                Operation::Login { device, user } => EmRequest::Login { device, user },
                Operation::Logout { device } => EmRequest::Logout { device },
                Operation::Query { .. } => EmRequest::DeviceUserQuery { devices: &devices },
            };
            em.call(request, &credentials, deadline).await
        };
        ctx.spawn(call.into_actor(self).map(move |result, actor, ctx| {
            actor.finish(device, result, started.elapsed(), ctx);
        }));
    }

    fn finish(
        &mut self,
        device: DeviceName,
        result: Result<Answered, CallError>,
        took: Duration,
        ctx: &mut Context<Self>,
    ) {
        self.shaper.release();
        if result.is_ok() {
            // Only real answers teach how long CUCM takes; a timeout says nothing.
            self.call_time = Some(match self.call_time {
                Some(previous) => previous.mul_f64(0.8) + took.mul_f64(0.2),
                None => took,
            });
        }
        let Some(queue) = self.devices.get_mut(&device) else {
            self.pump(ctx);
            return;
        };
        if is_busy(&result) {
            if let Some(op) = queue.current_mut() {
                op.busy_answers += 1;
                let back_off = busy_back_off(op.busy_answers);
                if Instant::now() + back_off + MIN_RETRY_WINDOW < op.deadline {
                    // CUCM is at its own limit: wait, then retry ahead of newcomers.
                    queue.back_off();
                    self.metrics.busy_retries.inc();
                    ctx.run_later(back_off, move |actor, ctx| {
                        if let Some(queue) = actor.devices.get_mut(&device) {
                            if queue.turn() == Turn::BackingOff {
                                queue.line_up();
                                actor.shaper.enqueue_front(device);
                            }
                        }
                        actor.pump(ctx);
                    });
                    self.pump(ctx);
                    return;
                }
            }
        }
        if let Some(op) = queue.finish() {
            let reply = self.interpret(&op, result);
            answer_all(op.waiters, reply);
        }
        self.after_turn(device);
        self.pump(ctx);
    }

    /// A device's turn is over: it lines up for its next operation or goes idle.
    fn after_turn(&mut self, device: DeviceName) {
        match self.devices.get(&device).map(DeviceQueue::turn) {
            Some(Turn::Lined) => self.shaper.enqueue(device),
            Some(Turn::Idle) => {
                self.devices.remove(&device);
            }
            _ => {}
        }
    }

    /// CUCM's answer → the caller's reply, and what it teaches the cache.
    fn interpret(&self, op: &PendingOp, result: Result<Answered, CallError>) -> Reply {
        let answered = match result {
            Ok(answered) => answered,
            Err(CallError::Unavailable(reason)) => {
                return Reply {
                    result: Err(OpError::Unavailable { reason }),
                    node: None,
                    from_cache: false,
                }
            }
            Err(CallError::InvalidResponse(detail)) => {
                return Reply {
                    result: Err(OpError::InvalidResponse { detail }),
                    node: None,
                    from_cache: false,
                }
            }
        };
        let device = op.operation.device();
        let result = match (&op.operation, answered.response) {
            (_, EmResponse::Failure { code, text }) => {
                if code == Some(19) {
                    // "No user logged in" is knowledge too.
                    self.cache.set(device, None);
                }
                Err(failure(code, text))
            }
            (Operation::Login { user, .. }, EmResponse::Success) => {
                self.cache.mark_verified(op.credentials.fingerprint());
                self.cache.set(device, Some(user.clone()));
                Ok(Outcome::LoggedIn)
            }
            (Operation::Logout { .. }, EmResponse::Success) => {
                self.cache.mark_verified(op.credentials.fingerprint());
                self.cache.set(device, None);
                Ok(Outcome::LoggedOut)
            }
            (Operation::Query { .. }, EmResponse::DeviceUsers(devices)) => {
                let entry = match devices.len() {
                    // One device asked, one answered: take it even if CUCM spelled
                    // the name differently.
                    1 => devices.into_iter().next(),
                    _ => devices.into_iter().find(|d| d.device == device.as_str()),
                };
                match entry.map(|d| d.state) {
                    Some(DeviceState::LoggedIn(user)) => match UserId::parse(&user) {
                        Ok(user) => {
                            self.cache.mark_verified(op.credentials.fingerprint());
                            self.cache.set(device, Some(user.clone()));
                            Ok(Outcome::CurrentUser(Some(user)))
                        }
                        Err(_) => Err(OpError::InvalidResponse {
                            detail: "CUCM named a user ID that is not valid".into(),
                        }),
                    },
                    Some(DeviceState::Nobody) => {
                        self.cache.mark_verified(op.credentials.fingerprint());
                        self.cache.set(device, None);
                        Ok(Outcome::CurrentUser(None))
                    }
                    Some(DeviceState::DoesNotExist) => Err(OpError::Cucm {
                        code: 11,
                        text: "Device does not exist".into(),
                    }),
                    Some(DeviceState::Failure { code, text }) => Err(failure(code, text)),
                    None => Err(OpError::InvalidResponse {
                        detail: "deviceUserResults without the device asked for".into(),
                    }),
                }
            }
            (_, response) => Err(OpError::InvalidResponse {
                detail: format!("an answer of the wrong kind: {}", response_kind(&response)),
            }),
        };
        Reply {
            result,
            node: Some(answered.node),
            from_cache: false,
        }
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        if self.cache.enabled() {
            let cache = self.cache.clone();
            ctx.run_interval(Duration::from_secs(5), move |_, _| cache.sweep());
        }
        tracing::debug!(cluster = %self.code, "cluster actor started");
    }
}

impl Handler<Submit> for ClusterActor {
    type Result = MessageResult<Submit>;

    fn handle(&mut self, msg: Submit, ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.accept(msg, ctx))
    }
}

/// What the HTTP layer holds for one cluster.
#[derive(Clone)]
pub struct ClusterHandle {
    pub code: Arc<str>,
    addr: Addr<ClusterActor>,
    cache: Arc<LoggedInCache>,
    em: Arc<EmClient>,
    metrics: ClusterMetrics,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("code", &self.code)
            .finish()
    }
}

impl ClusterHandle {
    /// Carries out one operation; always answers, by the deadline (plus a grace).
    pub async fn submit(
        &self,
        operation: Operation,
        credentials: Credentials,
        deadline: Instant,
    ) -> Reply {
        if let Operation::Query { device } = &operation {
            // Fast path: a fresh hit needs no actor hop. The actor removes a device's
            // entry when a change for it is queued, so this never jumps a change.
            if let Some(user) = self.cache.get(device, credentials.fingerprint()) {
                self.metrics.cache_hits.inc();
                return Reply {
                    result: Ok(Outcome::CurrentUser(user)),
                    node: None,
                    from_cache: true,
                };
            }
        }
        let wait_until = deadline + ANSWER_GRACE;
        let submit = Submit {
            operation,
            credentials,
            deadline,
        };
        let answer = async {
            let receiver = self.addr.send(submit).await.ok()?;
            receiver.await.ok()
        };
        match tokio::time::timeout_at(wait_until.into(), answer).await {
            Ok(Some(reply)) => reply,
            Ok(None) => Reply {
                result: Err(OpError::Unavailable {
                    reason: "the cluster is shutting down".into(),
                }),
                node: None,
                from_cache: false,
            },
            Err(_) => Reply {
                result: Err(OpError::Unavailable {
                    reason: "no answer before the deadline".into(),
                }),
                node: None,
                from_cache: false,
            },
        }
    }

    /// Readiness: at least one node is not being skipped and accepts connections.
    pub async fn ready(&self) -> bool {
        self.em.any_node_reachable().await
    }
}

fn answer_all(waiters: Vec<oneshot::Sender<Reply>>, reply: Reply) {
    for waiter in waiters {
        // A caller that gave up has dropped its receiver: nothing to do.
        let _ = waiter.send(reply.clone());
    }
}

fn is_busy(result: &Result<Answered, CallError>) -> bool {
    matches!(
        result,
        Ok(Answered {
            response: EmResponse::Failure {
                code: Some(CUCM_BUSY),
                ..
            },
            ..
        })
    )
}

fn busy_back_off(busy_answers: u32) -> Duration {
    let exponential = FIRST_BUSY_BACK_OFF
        .saturating_mul(1 << busy_answers.saturating_sub(1).min(5))
        .min(MAX_BUSY_BACK_OFF);
    // Jitter, so callers who were refused together do not return together.
    exponential.mul_f64(rand::rng().random_range(0.75..1.25))
}

fn failure(code: Option<u32>, text: String) -> OpError {
    match code {
        Some(code) if code != 0 => OpError::Cucm {
            code,
            text: if text.is_empty() {
                cucm_message(code).to_string()
            } else {
                text
            },
        },
        _ => OpError::CucmUnknown { text },
    }
}

fn response_kind(response: &EmResponse) -> &'static str {
    match response {
        EmResponse::Success => "success",
        EmResponse::Failure { .. } => "failure",
        EmResponse::DeviceUsers(_) => "deviceUserResults",
    }
}

/// CUCM's message for a code (EM-API.md §3.1), when it sent no text.
pub fn cucm_message(code: u32) -> &'static str {
    match code {
        1 => "Error on Parsing",
        2 => "Cannot authorize App user",
        3 => "Invalid App User",
        4 => "Policy Validation error",
        5 => "Device logon disabled",
        6 => "Database Error",
        7 => "Logout Request Error",
        8 => "Query type undetermined",
        9 => "Dir. User Info Error",
        10 => "User lacks app proxy rights",
        11 => "Device does not exist",
        12 => "Dev. Profile not found",
        18 => "Another user logged in",
        19 => "No user logged in",
        20 => "Hoteling flag error",
        21 => "Hoteling Status error",
        22 => "Device logon disabled",
        23 => "User not found",
        25 => "User logged in elsewhere",
        26 => "Busy, please try again",
        27 => "Change Password",
        28 => "Untrusted IP Error",
        29 => "RIS down-contact admin",
        30 => "Proxy not allowed",
        31..=47 => "Extension Mobility Cross Cluster error",
        _ => "CUCM error",
    }
}
