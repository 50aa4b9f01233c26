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
//! [`ClusterHandle`] (`handle.rs`) is what the HTTP layer holds; it knows the actor only
//! as the recipient of [`Submit`] (and of the always-watched list). Batched queries are
//! wired in `batch.rs`, the occupancy watch (polls, change events) in `watch.rs`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::Rng;
use tokio::sync::oneshot;

use crate::cache::LoggedInCache;
use crate::config::ClusterConfig;
use crate::coordination::{ClusterGate, Coordination, Grant};
use crate::device_queue::PendingOp;
use crate::em::dispatch::{self, CallEnd};
use crate::em::rules::{self, CacheEffect, Exchange, Interpretation};
use crate::em::steps::{self, Stage, Verdict};
use crate::em::{EmAppClient, EmClient, EmClientError};
use crate::events::EventHub;
use crate::metrics::{ClusterMetrics, Metrics};
use crate::operation::{OpError, Operation, QueueKey, Reply};
use crate::scheduler::{Completion, Offer, Scheduler, Shed, Started, Step};
use crate::watch::{WatchSettings, Watching};
pub use handle::{Close, ClusterHandle, Submit, Ticket};

/// Mailbox bound: `Submit` handling is quick, so this only fills under a pathological
/// burst, and then `send` makes callers wait rather than grow memory.
const MAILBOX_CAPACITY: usize = 4096;
const CACHE_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Batched queries: the same actor, wired in its own file.
mod batch;
mod handle;
mod watch;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster {code}: {source}")]
    Client { code: String, source: EmClientError },
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
    /// One CUCM call's timeout (`timeout_ms`).
    call_timeout: Duration,
    /// The gateway is stopping: nothing new starts, newcomers are answered 1004.
    closed: bool,
    /// With `[coordination]`: the grant each CUCM call awaits first.
    gate: Option<ClusterGate>,
    /// `None` when `[watch] enabled = false`.
    watch: Option<watch::ClusterWatch>,
}

impl ClusterActor {
    /// Starts the actor on the current arbiter and returns the handle callers use
    /// (without the occupancy watch).
    pub fn launch(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        coordination: Option<&Coordination>,
    ) -> Result<ClusterHandle, ClusterError> {
        let hub = Arc::new(EventHub::new(1, &metrics));
        let watching = Watching::new(WatchSettings::off(), hub);
        Self::launch_watching(config, metrics, coordination, &watching)
    }

    /// Starts the actor, watching its devices as `watching` says.
    pub fn launch_watching(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
        coordination: Option<&Coordination>,
        watching: &Watching,
    ) -> Result<ClusterHandle, ClusterError> {
        let code: Arc<str> = Arc::from(config.normalized_code());
        let settings = config.client_settings();
        let client_error = |source| ClusterError::Client {
            code: code.to_string(),
            source,
        };
        let em = EmClient::new(&code, &config.nodes, &settings, metrics.clone())
            .map_err(client_error)?;
        let em = Arc::new(em);
        let emapp = EmAppClient::new(&code, &config.emapp_urls(), &settings, metrics.clone())
            .map_err(client_error)?;
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
                .hold_slots_after_timeout(config.timeout())
                .with_batching(config.max_devices_per_query),
            call_timeout: config.timeout(),
            gate: coordination.map(|c| c.gate_for(config, &metrics)),
            rate_wake_up: None,
            metrics: cluster_metrics.clone(),
            closed: false,
            watch: watch::ClusterWatch::new(
                watching,
                config.rate().map(|rate| rate.per_second.get()),
            ),
        };
        let addr = actor.start();
        Ok(ClusterHandle {
            code,
            actor: addr.clone().recipient(),
            closer: addr.clone().recipient(),
            always_watched: addr.recipient(),
            cache,
            em,
            metrics: cluster_metrics,
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        })
    }

    fn accept(&mut self, msg: Submit, ctx: &mut Context<Self>) -> Ticket {
        let (tx, answer) = oneshot::channel();
        let Submit {
            operation,
            credentials,
            deadline,
            client,
        } = msg;
        if self.closed {
            let _ = tx.send(Reply::failed(closing_error()));
            return Ticket {
                reply: answer,
                sent: Arc::new(AtomicBool::new(false)),
            };
        }
        let key = operation.queue_key();
        self.watch_requested(&operation);
        if matches!(operation, Operation::Query { .. }) {
            // Nothing pending on the device: a fresh cache entry is the current truth.
            let settled = !self.scheduler.has_pending(&key);
            if let Some(reply) = settled
                .then(|| self.cache.cached_answer(&operation, &credentials))
                .flatten()
            {
                self.metrics.cache_hits.inc();
                let _ = tx.send(reply);
                return Ticket {
                    reply: answer,
                    sent: Arc::new(AtomicBool::new(true)),
                };
            }
            self.metrics.cache_misses.inc();
        }
        let changes = operation
            .mutates()
            .then(|| operation.device().cloned())
            .flatten();
        let pending = PendingOp::new(operation, credentials, deadline, tx).from_client(client);
        let sent = pending.sent[0].clone();
        match self.scheduler.offer(pending, Instant::now()) {
            Offer::Joined => self.metrics.cache_coalesced.inc(),
            Offer::Queued => {
                if let Some(device) = changes {
                    // From now on the cached state of this device is about to change.
                    self.cache.hold(&device);
                }
            }
            Offer::Shed(shed, pending) => {
                match shed {
                    Shed::QueueFull { .. } => self.metrics.shed_queue_full.inc(),
                    Shed::MissesDeadline { .. } => self.metrics.shed_deadline.inc(),
                }
                answer_all(pending.waiters, Reply::failed(shed.into_error()));
            }
        }
        self.pump(ctx);
        Ticket {
            reply: answer,
            sent,
        }
    }

    /// Does everything the scheduler allows now; schedules a wake-up for the rate
    /// limiter if it holds a call back.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while !self.closed {
            match self.scheduler.next_step(Instant::now()) {
                Step::Start(started) => self.call(started, ctx),
                Step::Batch(members) => self.call_batch(members, ctx),
                Step::Expired(op, error) => {
                    self.metrics.shed_deadline.inc();
                    self.cache.release_after(&op.operation);
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
        self.poll_if_due(ctx);
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
            key,
            operation,
            credentials,
            deadline,
            stage,
            ..
        } = started;
        let gate = self.gate.clone();
        let call_timeout = self.call_timeout;
        let call = async move {
            let grant = match &gate {
                Some(gate) => match gate.grant(deadline).await {
                    Some(grant) => Some(grant),
                    None => return (operation, stage, None, Duration::ZERO, call_timeout, None),
                },
                None => None,
            };
            let call_started = Instant::now();
            // The EM client gives up after this long: a failure that took it is a timeout.
            let budget = call_timeout.min(deadline.saturating_duration_since(call_started));
            let exchange =
                dispatch::exchange(&em, &emapp, &operation, &stage, &credentials, deadline).await;
            let took = call_started.elapsed();
            (operation, stage, Some(exchange), took, budget, grant)
        };
        ctx.spawn(call.into_actor(self).map(
            move |(operation, stage, exchange, took, budget, grant), actor, ctx| {
                let call = EndedCall {
                    key,
                    operation,
                    stage,
                    exchange,
                    took,
                    budget,
                    grant,
                };
                actor.finish(call, ctx);
            },
        ));
    }

    fn finish(&mut self, call: EndedCall, ctx: &mut Context<Self>) {
        let EndedCall {
            key,
            operation,
            stage,
            exchange,
            took,
            budget,
            grant,
        } = call;
        let Some(exchange) = exchange else {
            // Never sent: no slot of the shared allowance before the deadline.
            let jitter = rand::rng().random_range(0.0..1.0);
            let now = Instant::now();
            let completion = self
                .scheduler
                .complete(&key, CallEnd::NoAnswer, now, jitter);
            self.settle(key, completion, not_granted(), ctx);
            self.pump(ctx);
            return;
        };
        let end = dispatch::call_end(&exchange, took, budget);
        self.give_back(grant, end);
        let busy = matches!(end, CallEnd::Answered { busy: true, .. });
        // A busy answer is the scheduler's to retry; anything else is judged now.
        let verdict = (!busy).then(|| steps::judge(&operation, &stage, exchange.clone()));
        if let Some(Verdict::Next(next)) = &verdict {
            if self
                .scheduler
                .advance(&key, next.clone(), took, Instant::now())
            {
                self.pump(ctx);
                return;
            }
        }
        let meaning = match verdict {
            Some(Verdict::Done(meaning)) => meaning,
            // Busy, and should no time be left to retry: CUCM's answer stands.
            _ => steps::judge_last(&operation, &stage, exchange),
        };
        let jitter = rand::rng().random_range(0.0..1.0);
        let completion = self.scheduler.complete(&key, end, Instant::now(), jitter);
        self.settle(key, completion, meaning, ctx);
        self.pump(ctx);
    }

    /// What the scheduler decided about a queue whose call ended (alone or in a
    /// batch): a retry after a back-off, or the answer for its waiters.
    fn settle(
        &mut self,
        key: QueueKey,
        completion: Completion,
        meaning: Interpretation,
        ctx: &mut Context<Self>,
    ) {
        match completion {
            Completion::RetryAfter(back_off) => {
                self.metrics.busy_retries.inc();
                ctx.run_later(back_off, move |actor, ctx| {
                    actor.scheduler.retry_due(&key);
                    actor.pump(ctx);
                });
            }
            Completion::Done(op) => self.conclude(op, meaning),
            Completion::StillBusy(op) => self.still_busy(op),
            Completion::Unknown => {}
        }
    }
}

/// A CUCM call that came back, with what the actor needs to carry on.
struct EndedCall {
    key: QueueKey,
    operation: Operation,
    stage: Stage,
    /// `None`: the call was never sent (no coordination grant before the deadline).
    exchange: Option<Exchange>,
    took: Duration,
    /// How long the EM client could take: a failure that took this long timed out.
    budget: Duration,
    /// The coordination grant the call had, to give back.
    grant: Option<Grant>,
}

/// What a call that never got a coordination grant before its deadline means: 1004,
/// like any operation the allowance could not serve in time.
fn not_granted() -> Interpretation {
    Interpretation::refused(OpError::Overloaded {
        reason: "no CUCM slot of the shared allowance was free before the deadline",
        retry_after: Duration::from_secs(1),
    })
}

impl ClusterActor {
    /// A call's coordination grant goes back (a timed-out call's lease runs out instead).
    pub(super) fn give_back(&self, grant: Option<Grant>, end: CallEnd) {
        if let (Some(gate), Some(grant)) = (&self.gate, grant) {
            gate.ended(grant, matches!(end, CallEnd::TimedOut));
        }
    }

    /// An operation is over: the cache learns, every waiter gets the answer.
    fn conclude(&mut self, op: PendingOp, meaning: Interpretation) {
        if meaning.credentials_accepted {
            self.cache.mark_verified(op.credentials.fingerprint());
        }
        if rules::refuses_credentials(&meaning.result) {
            self.cache.mark_rejected(op.credentials.fingerprint());
        }
        self.watch_concluded(&op.operation, &op.credentials, &meaning);
        // A user query's answer teaches the cache (keyed by device) nothing.
        if let Some(device) = op.operation.device() {
            match meaning.cache {
                CacheEffect::Set(user) => self.cache.set(device, user),
                CacheEffect::Forget => self.cache.invalidate(device),
                CacheEffect::Unchanged => {}
            }
        }
        self.cache.release_after(&op.operation);
        let reply = Reply {
            result: meaning.result,
            node: meaning.node,
            from_cache: false,
        };
        answer_all(op.waiters, reply);
    }

    /// CUCM stayed busy and no retry fits before the deadline: 1004, never its 26.
    fn still_busy(&mut self, op: PendingOp) {
        self.cache.release_after(&op.operation);
        let error = OpError::Overloaded {
            reason: "CUCM stayed busy until the deadline",
            retry_after: Duration::from_secs(1),
        };
        answer_all(op.waiters, Reply::failed(error));
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
        self.start_watch(ctx);
        tracing::debug!(cluster = %self.code, "cluster actor started");
    }
}

impl Handler<Close> for ClusterActor {
    type Result = ();

    /// Answers everything not at CUCM now and starts nothing more; running calls end
    /// as they do (their callers were answered 1003 by their handles).
    fn handle(&mut self, _: Close, ctx: &mut Self::Context) {
        self.closed = true;
        if let Some(wake_up) = self.rate_wake_up.take() {
            ctx.cancel_future(wake_up);
        }
        for op in self.scheduler.give_up_unsent() {
            self.cache.release_after(&op.operation);
            let error = if op.stage != Stage::first(&op.operation) {
                // An earlier call of it (a forced login's logout, a PIN check) was done.
                OpError::Unavailable {
                    reason: "the gateway stopped between the operation's CUCM calls".into(),
                }
            } else {
                closing_error()
            };
            answer_all(op.waiters, Reply::failed(error));
        }
        self.pump(ctx);
        tracing::debug!(cluster = %self.code, "cluster closed");
    }
}

/// 1004 for what had not reached CUCM when the gateway stopped.
fn closing_error() -> OpError {
    OpError::Overloaded {
        reason: "the gateway is shutting down",
        retry_after: Duration::from_secs(1),
    }
}

impl Handler<Submit> for ClusterActor {
    type Result = MessageResult<Submit>;

    fn handle(&mut self, msg: Submit, ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.accept(msg, ctx))
    }
}

fn answer_all(waiters: Vec<oneshot::Sender<Reply>>, reply: Reply) {
    for waiter in waiters {
        // A caller that gave up has dropped its receiver: nothing to do.
        let _ = waiter.send(reply.clone());
    }
}
