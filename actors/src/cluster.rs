//! `ClusterActor`: one per CUCM cluster. It wires messages to the [`Scheduler`] (which
//! decides what goes to CUCM and when), the [`EmClient`] (which calls CUCM) and the
//! EM rules (which say what an answer means).
//!
//! The handler of `Submit` is synchronous: it answers from the cache, or offers the
//! operation to the scheduler and hands back a receiver for the answer. CUCM calls run
//! as futures spawned in the actor's context; their completions come back to the actor
//! (`finish`), which updates the cache, answers every waiter and starts what may start.
//! Because those futures interleave, per-device order comes from the scheduler's
//! device queues, never from the mailbox.
//!
//! `ClusterHandle` is what the HTTP layer holds: cache fast path, `send` (which
//! respects the bounded mailbox) and a deadline on the whole wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::Rng;
use tokio::sync::oneshot;

use crate::cache::LoggedInCache;
use crate::config::ClusterConfig;
use crate::device_queue::PendingOp;
use crate::em::rules::{self, BatchAnswer, CacheEffect, Exchange, Interpretation, Plan, Verdict};
use crate::em::{EmAppClient, EmClient, EmClientError, EmRequest};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::operation::{Credentials, DeviceName, OpError, Operation, Reply};
use crate::scheduler::{CallEnd, Completion, Offer, Scheduler, Shed, Started, Step};

/// Mailbox bound: `Submit` handling is quick, so this only fills under a pathological
/// burst, and then `send` makes callers wait rather than grow memory.
const MAILBOX_CAPACITY: usize = 4096;
/// The caller's wait outlives the deadline by this much, so the actor's own deadline
/// handling (which answers precisely) always wins the race.
const ANSWER_GRACE: Duration = Duration::from_secs(1);
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

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

pub struct ClusterActor {
    code: Arc<str>,
    em: Arc<EmClient>,
    emapp: Arc<EmAppClient>,
    cache: Arc<LoggedInCache>,
    scheduler: Scheduler,
    /// A wake-up is scheduled for when the rate limiter allows the next call.
    rate_wake_up: Option<SpawnHandle>,
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
        let emapp = EmAppClient::new(
            &code,
            &config.emapp_urls(),
            &config.client_settings(),
            metrics.clone(),
        )
        .map_err(|source| ClusterError::Client {
            code: code.to_string(),
            source,
        })?;
        let cluster_metrics = ClusterMetrics::new(&metrics, &code, config.max_concurrent);
        let cache = Arc::new(LoggedInCache::new(
            config.cache_ttl(),
            cluster_metrics.cache_entries.clone(),
        ));
        let actor = ClusterActor {
            code: code.clone(),
            em: em.clone(),
            emapp: Arc::new(emapp),
            cache: cache.clone(),
            scheduler: Scheduler::new(config.max_concurrent, config.rate(), config.queue_limit)
                .with_batching(config.max_devices_per_query),
            rate_wake_up: None,
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
        if matches!(operation, Operation::Query { .. }) {
            // Nothing pending on the device: a fresh cache entry is the current truth.
            let settled = !self.scheduler.has_pending(&device);
            if let Some(reply) = settled
                .then(|| cached_answer(&self.cache, &self.metrics, &operation, &credentials))
                .flatten()
            {
                let _ = tx.send(reply);
                return rx;
            }
            self.metrics.cache_misses.inc();
        }
        let mutates = operation.mutates();
        let pending = PendingOp::new(operation, credentials, deadline, tx);
        match self.scheduler.offer(pending, Instant::now()) {
            Offer::Joined => self.metrics.cache_coalesced.inc(),
            Offer::Queued if mutates => {
                // From now on the cached state of this device is about to change.
                self.cache.invalidate(&device);
            }
            Offer::Queued => {}
            Offer::Shed(shed, pending) => {
                match shed {
                    Shed::QueueFull { .. } => self.metrics.shed_queue_full.inc(),
                    Shed::MissesDeadline { .. } => self.metrics.shed_deadline.inc(),
                }
                answer_all(pending.waiters, Reply::failed(shed.into_error()));
            }
        }
        self.pump(ctx);
        rx
    }

    /// Does everything the scheduler allows now; schedules a wake-up for the rate
    /// limiter if it holds a call back.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        loop {
            match self.scheduler.next_step(Instant::now()) {
                Step::Start(started) => self.call(started, ctx),
                Step::Batch(members) => self.call_batch(members, ctx),
                Step::Expired(op, error) => {
                    self.metrics.shed_deadline.inc();
                    answer_all(op.waiters, Reply::failed(error));
                }
                Step::Wait(wait) => {
                    if self.rate_wake_up.is_none() {
                        self.metrics.rate_limiter_waits.inc();
                        self.rate_wake_up = Some(ctx.run_later(wait, |actor, ctx| {
                            actor.rate_wake_up = None;
                            actor.pump(ctx);
                        }));
                    }
                    break;
                }
                Step::Blocked => break,
            }
        }
        self.metrics.queue_depth.set(self.scheduler.queued() as i64);
        self.metrics
            .in_flight
            .set(self.scheduler.in_flight() as i64);
    }

    fn call(&mut self, started: Started, ctx: &mut Context<Self>) {
        if let Some(waited) = started.waited {
            self.metrics.queue_wait.observe(waited.as_secs_f64());
        }
        let em = self.em.clone();
        let emapp = self.emapp.clone();
        let Started {
            device,
            operation,
            credentials,
            deadline,
            stage,
            ..
        } = started;
        let call_started = Instant::now();
        let call = async move {
            let devices = [operation.device().clone()];
            let exchange = match (rules::plan(&operation, stage), &operation) {
                (
                    Plan::EmLogin,
                    Operation::Login { device, user } | Operation::ForceLogin { device, user, .. },
                ) => Exchange::Em(
                    em.call(EmRequest::Login { device, user }, &credentials, deadline)
                        .await,
                ),
                (Plan::EmUserDevicesQuery, Operation::UserDevicesQuery { user, .. }) => {
                    Exchange::Em(
                        em.call(EmRequest::UserDevicesQuery { user }, &credentials, deadline)
                            .await,
                    )
                }
                (Plan::EmLogout, _) => Exchange::Em(
                    em.call(
                        EmRequest::Logout {
                            device: &devices[0],
                        },
                        &credentials,
                        deadline,
                    )
                    .await,
                ),
                (Plan::EmAppLogin, Operation::PinLogin { device, user, pin }) => {
                    Exchange::EmApp(emapp.login(device, user, pin, deadline).await)
                }
                _ => Exchange::Em(
                    em.call(
                        EmRequest::DeviceUserQuery { devices: &devices },
                        &credentials,
                        deadline,
                    )
                    .await,
                ),
            };
            (operation, stage, exchange)
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |(operation, stage, exchange), actor, ctx| {
                    actor.finish(
                        device,
                        operation,
                        stage,
                        exchange,
                        call_started.elapsed(),
                        ctx,
                    );
                }),
        );
    }

    fn finish(
        &mut self,
        device: DeviceName,
        operation: Operation,
        stage: usize,
        exchange: Exchange,
        took: Duration,
        ctx: &mut Context<Self>,
    ) {
        let (answered, busy) = match &exchange {
            Exchange::Em(result) => (result.is_ok(), rules::is_busy(result)),
            Exchange::EmApp(result) => (result.is_ok(), false),
        };
        // A busy answer is the scheduler's to retry; anything else is judged now.
        let mut verdict = (!busy).then(|| rules::judge(&operation, stage, exchange.clone()));
        if let Some(Verdict::Displacing(user)) =
            verdict.take_if(|v| matches!(v, Verdict::Displacing(_)))
        {
            if let Some(op) = self.scheduler.running_mut(&device) {
                rules::displace(&mut op.operation, user);
            }
            verdict = Some(Verdict::NextStage);
        }
        if verdict == Some(Verdict::NextStage) && self.scheduler.advance(&device, took) {
            self.pump(ctx);
            return;
        }
        let end = if answered {
            CallEnd::Answered { took, busy }
        } else {
            CallEnd::NoAnswer
        };
        let jitter = rand::rng().random_range(0.0..1.0);
        match self
            .scheduler
            .complete(&device, end, Instant::now(), jitter)
        {
            Completion::RetryAfter(back_off) => {
                self.metrics.busy_retries.inc();
                ctx.run_later(back_off, move |actor, ctx| {
                    actor.scheduler.retry_due(&device);
                    actor.pump(ctx);
                });
            }
            Completion::Done(op) => {
                let meaning = match verdict {
                    Some(Verdict::Done(meaning)) => meaning,
                    // Busy with no time left to retry: CUCM's answer stands.
                    _ => rules::judge_last(&op.operation, stage, exchange),
                };
                if meaning.credentials_accepted {
                    self.cache.mark_verified(op.credentials.fingerprint());
                }
                if let CacheEffect::Set(user) = meaning.cache {
                    self.cache.set(&device, user);
                }
                let reply = Reply {
                    result: meaning.result,
                    node: meaning.node,
                    from_cache: false,
                };
                answer_all(op.waiters, reply);
            }
            Completion::Unknown => {}
        }
        self.pump(ctx);
    }
}

impl ClusterActor {
    /// Several devices' queries as one `deviceUserQuery` (one slot, one token). The
    /// call is bounded by the earliest member's deadline, so no caller waits past its
    /// own.
    fn call_batch(&mut self, members: Vec<Started>, ctx: &mut Context<Self>) {
        for waited in members.iter().filter_map(|m| m.waited) {
            self.metrics.queue_wait.observe(waited.as_secs_f64());
        }
        self.metrics.batched_queries.inc_by(members.len() as u64);
        let Some(first) = members.first() else {
            return;
        };
        let credentials = first.credentials.clone();
        let deadline = members
            .iter()
            .map(|m| m.deadline)
            .min()
            .unwrap_or(first.deadline);
        let devices: Vec<DeviceName> = members.into_iter().map(|m| m.device).collect();
        let em = self.em.clone();
        let call_started = Instant::now();
        let call = async move {
            let result = em
                .call(
                    EmRequest::DeviceUserQuery { devices: &devices },
                    &credentials,
                    deadline,
                )
                .await;
            (devices, result)
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |(devices, result), actor, ctx| {
                    actor.finish_batch(devices, result, call_started.elapsed(), ctx);
                }),
        );
    }

    fn finish_batch(
        &mut self,
        devices: Vec<DeviceName>,
        result: Result<crate::em::Answered, crate::em::CallError>,
        took: Duration,
        ctx: &mut Context<Self>,
    ) {
        let busy = rules::is_busy(&result);
        self.scheduler.batch_ended(if result.is_ok() {
            CallEnd::Answered { took, busy }
        } else {
            CallEnd::NoAnswer
        });
        if busy {
            // Each member backs off (and may batch again when it retries); one that
            // has no time left gets CUCM's answer.
            for device in devices {
                let meaning = rules::interpret(
                    &Operation::Query {
                        device: device.clone(),
                    },
                    result.clone(),
                );
                self.member_done(device, true, meaning, ctx);
            }
        } else {
            match rules::split_batch(&devices, result) {
                BatchAnswer::PerDevice(meanings) => {
                    for (device, meaning) in devices.into_iter().zip(meanings) {
                        self.member_done(device, false, meaning, ctx);
                    }
                }
                BatchAnswer::NotBatching(why) => {
                    if self.scheduler.disable_batching() {
                        self.metrics.batching_disabled.set(1);
                        tracing::warn!(
                            cluster = %self.code,
                            answered = why,
                            "CUCM did not answer a batched deviceUserQuery properly: asking one device at a time from now on"
                        );
                    }
                    for device in devices.iter().rev() {
                        self.scheduler.retry_alone(device);
                    }
                }
            }
        }
        self.pump(ctx);
    }

    fn member_done(
        &mut self,
        device: DeviceName,
        busy: bool,
        meaning: Interpretation,
        ctx: &mut Context<Self>,
    ) {
        let jitter = rand::rng().random_range(0.0..1.0);
        match self
            .scheduler
            .finish_member(&device, busy, Instant::now(), jitter)
        {
            Completion::RetryAfter(back_off) => {
                self.metrics.busy_retries.inc();
                ctx.run_later(back_off, move |actor, ctx| {
                    actor.scheduler.retry_due(&device);
                    actor.pump(ctx);
                });
            }
            Completion::Done(op) => self.conclude(&device, op, meaning),
            Completion::Unknown => {}
        }
    }

    /// An operation is over: the cache learns, every waiter gets the answer.
    fn conclude(&mut self, device: &DeviceName, op: PendingOp, meaning: Interpretation) {
        if meaning.credentials_accepted {
            self.cache.mark_verified(op.credentials.fingerprint());
        }
        if let CacheEffect::Set(user) = meaning.cache {
            self.cache.set(device, user);
        }
        let reply = Reply {
            result: meaning.result,
            node: meaning.node,
            from_cache: false,
        };
        answer_all(op.waiters, reply);
    }
}

impl Actor for ClusterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        if self.cache.enabled() {
            let cache = self.cache.clone();
            ctx.run_interval(CACHE_SWEEP_INTERVAL, move |_, _| cache.sweep());
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
        // Fast path: a fresh hit needs no actor hop. The actor removes a device's entry
        // when a change for it is queued, so this never jumps a change.
        if let Some(reply) = cached_answer(&self.cache, &self.metrics, &operation, &credentials) {
            return reply;
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
            Ok(None) => Reply::failed(OpError::Unavailable {
                reason: "the cluster is shutting down".into(),
            }),
            Err(_) => Reply::failed(OpError::Unavailable {
                reason: "no answer before the deadline".into(),
            }),
        }
    }

    /// Readiness: at least one node is not being skipped and accepts connections.
    pub async fn ready(&self) -> bool {
        self.em.any_node_reachable().await
    }
}

/// A query answered from a fresh cache entry these credentials may see (counted).
fn cached_answer(
    cache: &LoggedInCache,
    metrics: &ClusterMetrics,
    operation: &Operation,
    credentials: &Credentials,
) -> Option<Reply> {
    let Operation::Query { device } = operation else {
        return None;
    };
    let user = cache.get(device, credentials.fingerprint())?;
    metrics.cache_hits.inc();
    Some(Reply::cached(user))
}

fn answer_all(waiters: Vec<oneshot::Sender<Reply>>, reply: Reply) {
    for waiter in waiters {
        // A caller that gave up has dropped its receiver: nothing to do.
        let _ = waiter.send(reply.clone());
    }
}
