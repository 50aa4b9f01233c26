//! The cluster actor's batched queries: several devices' `deviceUserQuery`s under one
//! slot and one rate token, each member answered on its own (the rules split the
//! answer), and the fallback to single queries for a cluster that does not batch.
//! A child module of `cluster`, so it wires the same actor without widening its fields.

use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::Rng;

use super::ClusterActor;
use crate::coordination::Grant;
use crate::em::dispatch::CallEnd;
use crate::em::rules::{self, BatchAnswer, Interpretation};
use crate::em::{Answered, CallError, EmRequest};
use crate::operation::{DeviceName, Operation, QueueKey};
use crate::scheduler::Started;

impl ClusterActor {
    /// CUCM answered a batched `deviceUserQuery` (an operation's or a watch poll's)
    /// without every device: this cluster is asked one device at a time from now on,
    /// said once in the log and in `bc_batching_disabled`.
    pub(super) fn stop_batching(&mut self, why: &str) {
        if self.scheduler.disable_batching() {
            self.metrics.batching_disabled.set(1);
            tracing::warn!(
                cluster = %self.code,
                answered = why,
                "CUCM did not answer a batched deviceUserQuery properly: asking one device at a time from now on"
            );
        }
    }

    /// Several devices' queries as one `deviceUserQuery` (one slot, one token). The
    /// call is bounded by the earliest member's deadline, so no caller waits past its
    /// own.
    pub(super) fn call_batch(&mut self, members: Vec<Started>, ctx: &mut Context<Self>) {
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
        // Only device queries ride in a batch.
        let devices: Vec<DeviceName> = members
            .iter()
            .filter_map(|m| m.operation.device().cloned())
            .collect();
        let em = self.em.clone();
        let gate = self.gate.clone();
        let call = async move {
            let grant = match &gate {
                Some(gate) => match gate.grant(deadline).await {
                    Some(grant) => Some(grant),
                    None => return (devices, None, Duration::ZERO, None),
                },
                None => None,
            };
            let call_started = Instant::now();
            let result = em
                .call(
                    EmRequest::DeviceUserQuery { devices: &devices },
                    &credentials,
                    deadline,
                )
                .await;
            (devices, Some(result), call_started.elapsed(), grant)
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |(devices, result, took, grant), actor, ctx| {
                    actor.finish_batch(devices, result, took, grant, ctx);
                }),
        );
    }

    fn finish_batch(
        &mut self,
        devices: Vec<DeviceName>,
        result: Option<Result<Answered, CallError>>,
        took: Duration,
        grant: Option<Grant>,
        ctx: &mut Context<Self>,
    ) {
        let Some(result) = result else {
            // Never sent: no slot of the shared allowance before the deadline.
            self.scheduler
                .batch_ended(CallEnd::NoAnswer, Instant::now());
            for device in devices {
                self.member_done(device, false, super::not_granted(), ctx);
            }
            self.pump(ctx);
            return;
        };
        let busy = rules::is_busy(&result);
        let end = if result.is_ok() {
            CallEnd::Answered { took, busy }
        } else {
            CallEnd::NoAnswer
        };
        self.give_back(grant, end);
        self.scheduler.batch_ended(end, Instant::now());
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
                    self.stop_batching(why);
                    for device in devices.iter().rev() {
                        self.scheduler
                            .retry_alone(&QueueKey::Device(device.clone()));
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
        let key = QueueKey::Device(device);
        let completion = self
            .scheduler
            .finish_member(&key, busy, Instant::now(), jitter);
        self.settle(key, completion, meaning, ctx);
    }
}
