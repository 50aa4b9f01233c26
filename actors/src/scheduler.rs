//! `Scheduler`: which operation goes to CUCM next, and which are refused.
//!
//! One model owns everything about an operation between its arrival and its CUCM call:
//! the per-device queues, the ready line of devices whose next operation may start, the
//! count of operations not yet sent (what `queue_limit` bounds), the slots and rate of
//! the [`Shaper`], the estimate of how long CUCM takes, and the busy back-off. The
//! cluster actor asks it what to do and carries out the answer; nothing here touches a
//! clock of its own (the caller passes `now`) or a socket, so every rule is unit-tested.
//!
//! A "device" here is a [`QueueKey`]: a phone, or the user of a user query.
//!
//! Fairness: a device is in the ready line at most once (its own queue keeps the rest),
//! so a device with a hundred queued operations cannot starve the others; and the line
//! is shared round-robin between clients ([`FairLine`], keyed by the client of the
//! device's next operation), so a client sending a flood waits behind its own requests.
//! A device retrying after CUCM said busy goes to the front: it had its turn already.
//! Admission is fair too: whether an operation can meet its deadline is judged by the
//! wait ahead of it in its client's turn, and a full queue still takes a client holding
//! less than its share of it (up to twice `queue_limit` in all).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};

use crate::backoff::{jittered, ExpBackoff};
use crate::device_queue::{DeviceQueue, PendingOp, Pushed, Turn};
use crate::em::dispatch::CallEnd;
use crate::em::steps::Stage;
use crate::fair_line::{ClientId, FairLine};
use crate::operation::{Credentials, OpError, Operation, QueueKey};
use crate::shaper::{Held, Rate, Shaper};

/// CUCM said busy: wait this long before the first retry, doubling up to the max.
const BUSY_BACK_OFF: ExpBackoff =
    ExpBackoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// Shortest time worth a retry after CUCM said busy.
const MIN_RETRY_WINDOW: Duration = Duration::from_millis(50);
/// A refused caller is told to come back after at least this long.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Weight of the newest CUCM call time in the running estimate.
const CALL_TIME_WEIGHT: f64 = 0.2;
/// How far down the ready line a batch looks for further queries: bounds the work of
/// one step however long the line is.
const BATCH_SCAN_WINDOW: usize = 2048;

/// Why an operation is refused before it is queued (code 1004 for the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `queue_limit` operations are already waiting.
    QueueFull { retry_after: Duration },
    /// The expected wait ends after the caller's deadline.
    MissesDeadline { retry_after: Duration },
}

impl Shed {
    pub fn into_error(self) -> OpError {
        match self {
            Shed::QueueFull { retry_after } => OpError::Overloaded {
                reason: "the cluster's queue is full",
                retry_after,
            },
            Shed::MissesDeadline { retry_after } => OpError::Overloaded {
                reason: "the wait for CUCM would exceed the deadline",
                retry_after,
            },
        }
    }
}

/// What became of an offered operation.
// Returned once per offer and taken apart at once: boxing the operation would cost an
// allocation on every shed for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Offer {
    /// It shares an identical query already queued or running: nothing new to send.
    Joined,
    /// Queued behind its device's earlier operations.
    Queued,
    /// Refused; the operation comes back so its waiters can be answered.
    Shed(Shed, Box<PendingOp>),
}

/// An operation that may go to CUCM now: what the EM call needs.
#[derive(Debug, Clone)]
pub struct Started {
    /// The queue it comes from: its device's, or for a user query its user's.
    pub key: QueueKey,
    pub operation: Operation,
    pub credentials: Credentials,
    pub deadline: Instant,
    /// Which of the operation's calls this is.
    pub stage: Stage,
    /// How long it waited in the gateway; `None` for a retry or a later stage.
    pub waited: Option<Duration>,
}

/// What the actor should do next.
#[derive(Debug)]
pub enum Step {
    /// Send this to CUCM; report its end with [`Scheduler::complete`].
    Start(Started),
    /// Queries of several devices (same credentials), to send as one
    /// `deviceUserQuery` under one slot and one rate token; report its end with
    /// [`Scheduler::batch_ended`] and then each member with
    /// [`Scheduler::finish_member`] or [`Scheduler::retry_alone`].
    Batch(Vec<Started>),
    /// It cannot finish before its deadline: answer it 1004 without calling CUCM.
    Expired(PendingOp, OpError),
    /// The rate limit holds the next call back this long.
    Wait(Duration),
    /// Nothing may start: nothing is ready, or every slot is taken.
    Blocked,
}

/// What to do with a finished call's operation.
#[derive(Debug)]
pub enum Completion {
    /// CUCM was busy and the deadline allows a retry: call
    /// [`Scheduler::retry_due`] after this long.
    RetryAfter(Duration),
    /// The operation is over: answer its waiters.
    Done(PendingOp),
    /// CUCM stayed busy and no retry fits before the deadline: answer 1004 (CUCM's
    /// 26 is never passed on).
    StillBusy(PendingOp),
    /// The device had nothing running (cannot happen when driven correctly).
    Unknown,
}

pub struct Scheduler<C: Clock = DefaultClock> {
    devices: HashMap<QueueKey, DeviceQueue>,
    /// Devices whose next operation may start: per client in the order they got
    /// ready, clients taking turns.
    ready: FairLine<ClientId, QueueKey>,
    /// Accepted operations not yet sent to CUCM.
    queued: usize,
    /// How many of them are device queries (they may leave in batches).
    queued_queries: usize,
    queue_limit: usize,
    shaper: Shaper<C>,
    /// Recent CUCM call time (exponentially weighted), to foresee a missed deadline.
    call_time: Option<Duration>,
    /// How long a timed-out call keeps its slot after the timeout.
    timeout_hold: Duration,
    /// When the slots of timed-out calls are released.
    held: Vec<Instant>,
    /// Most devices one `deviceUserQuery` carries; 1 = no batching.
    max_batch: usize,
}

impl<C: Clock> std::fmt::Debug for Scheduler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("devices", &self.devices.len())
            .field("ready", &self.ready.len())
            .field("queued", &self.queued)
            .field("shaper", &self.shaper)
            .finish()
    }
}

impl Scheduler<DefaultClock> {
    pub fn new(max_concurrent: usize, rate: Option<Rate>, queue_limit: usize) -> Self {
        Self::with_shaper(Shaper::new(max_concurrent, rate), queue_limit)
    }
}

impl<C: Clock + Clone> Scheduler<C> {
    pub fn with_shaper(shaper: Shaper<C>, queue_limit: usize) -> Self {
        Self {
            devices: HashMap::new(),
            ready: FairLine::default(),
            queued: 0,
            queued_queries: 0,
            queue_limit,
            shaper,
            call_time: None,
            max_batch: 1,
            timeout_hold: Duration::ZERO,
            held: Vec::new(),
        }
    }

    /// A call that timed out keeps its slot this much longer: the gateway gave up, but
    /// CUCM may still be working on it, and `max_concurrent` is about what CUCM sees.
    pub fn hold_slots_after_timeout(mut self, hold: Duration) -> Self {
        self.timeout_hold = hold;
        self
    }

    fn release_held(&mut self, now: Instant) {
        let before = self.held.len();
        self.held.retain(|until| *until > now);
        for _ in self.held.len()..before {
            self.shaper.release();
        }
    }

    /// Lets queries of up to `max_devices` devices leave together (1 = off).
    pub fn with_batching(mut self, max_devices: usize) -> Self {
        self.max_batch = max_devices.max(1);
        self
    }

    /// The cluster does not answer batches properly: one device per query from now
    /// on. Returns whether batching was on until now.
    pub fn disable_batching(&mut self) -> bool {
        std::mem::replace(&mut self.max_batch, 1) > 1
    }

    /// Whether the device has an operation queued or running (then a cache entry may
    /// be about to change and must not answer for it).
    pub fn has_pending(&self, device: &QueueKey) -> bool {
        self.devices.contains_key(device)
    }

    /// Takes an operation in: shares an identical query, queues it, or refuses it when
    /// the queue is full or the wait would outlast its deadline.
    pub fn offer(&mut self, op: PendingOp, now: Instant) -> Offer {
        let device = op.operation.queue_key();
        let joins = self
            .devices
            .get(&device)
            .is_some_and(|queue| queue.would_join(&op));
        // Sharing an identical query costs nothing: no room needed.
        if !joins {
            if let Err(shed) = self.room_for(&op.client, op.deadline, now) {
                return Offer::Shed(shed, Box::new(op));
            }
        }
        let query = batchable(&op.operation);
        let client = op.client;
        match self.devices.entry(device.clone()).or_default().push(op) {
            Pushed::Joined => Offer::Joined,
            Pushed::Queued { needs_turn } => {
                self.queued += 1;
                self.queued_queries += usize::from(query);
                if needs_turn {
                    self.ready.push_back(client, device);
                } else if self.devices.get(&device).map(DeviceQueue::turn) == Some(Turn::Lined) {
                    // Its device waits in another client's lane: served no later than in
                    // this client's own turn.
                    self.ready.promote(&device, client);
                }
                Offer::Queued
            }
        }
    }

    fn room_for(&self, client: &ClientId, deadline: Instant, now: Instant) -> Result<(), Shed> {
        let expected = self.expected_wait_for(client);
        let retry_after = expected.max(MIN_RETRY_AFTER);
        if self.queued >= self.queue_limit {
            // Full, mostly of others' work: a client below its share still gets in,
            // up to twice the limit in all.
            let clients = self.ready.clients() + usize::from(self.ready.lane_len(client) == 0);
            let share = self.queue_limit / clients.max(1);
            if self.queued >= 2 * self.queue_limit || self.ready.lane_len(client) >= share {
                return Err(Shed::QueueFull { retry_after });
            }
        }
        if now + expected > deadline {
            return Err(Shed::MissesDeadline { retry_after });
        }
        Ok(())
    }

    /// The expected wait of a new operation from `client`: the whole queue's, scaled
    /// to the part of the ready line served before it in its client's turn.
    pub fn expected_wait_for(&self, client: &ClientId) -> Duration {
        let whole = self.expected_wait();
        let line = self.ready.len();
        if line == 0 {
            return whole;
        }
        let ahead = self.ready.ahead_of_new(client).min(line);
        whole.mul_f64(ahead as f64 / line as f64)
    }

    /// How long a new operation would likely wait: the work ahead divided by what the
    /// cap and the rate let through. Queued queries count as the batches they will
    /// leave in (with batching off, one call each).
    pub fn expected_wait(&self) -> Duration {
        let others = self.queued.saturating_sub(self.queued_queries);
        let ahead = (others + self.queued_queries.div_ceil(self.max_batch)) as f64;
        let by_concurrency = self.call_time.map_or(0.0, |t| {
            t.as_secs_f64() * ahead / self.shaper.max_concurrent() as f64
        });
        let by_rate = self.shaper.rate().map_or(0.0, |rate| {
            (ahead - f64::from(rate.burst.get())).max(0.0) / f64::from(rate.per_second.get())
        });
        Duration::from_secs_f64(by_concurrency.max(by_rate))
    }

    /// The next thing to do. Call it until it answers `Wait` or `Blocked`.
    pub fn next_step(&mut self, now: Instant) -> Step {
        self.release_held(now);
        loop {
            let Some(device) = self.ready.front() else {
                return Step::Blocked;
            };
            let Some(queue) = self.devices.get(device) else {
                // A device is lined up only while it has a queue; never spin on one
                // that has not.
                self.ready.pop_front();
                continue;
            };
            // Late means: it cannot finish before its deadline. Starting it anyway
            // would risk a login that CUCM executes after the caller was told it failed.
            let latest_start = now + self.call_time.unwrap_or_default();
            if queue.next().is_some_and(|op| op.deadline <= latest_start) {
                if let Some(step) = self.expire_front() {
                    return step;
                }
                continue;
            }
            return match self.shaper.try_acquire() {
                Ok(()) => match self.start_front() {
                    Some(started) if self.max_batch > 1 && batchable(&started.operation) => {
                        let mut members = vec![started];
                        self.gather(&mut members, now);
                        match members.len() {
                            1 => Step::Start(members.remove(0)),
                            _ => Step::Batch(members),
                        }
                    }
                    Some(started) => Step::Start(started),
                    None => {
                        self.shaper.release();
                        continue;
                    }
                },
                // Slots held after timeouts free themselves: wake up for the first.
                Err(Held::AtCapacity) => match self.held.iter().min() {
                    Some(until) => Step::Wait(until.saturating_duration_since(now)),
                    None => Step::Blocked,
                },
                Err(Held::RateLimited(wait)) => Step::Wait(wait),
            };
        }
    }

    fn expire_front(&mut self) -> Option<Step> {
        let device = self.ready.pop_front()?;
        let (op, never_started) = self.devices.get_mut(&device)?.drop_next()?;
        if never_started {
            self.queued = self.queued.saturating_sub(1);
            if batchable(&op.operation) {
                self.queued_queries = self.queued_queries.saturating_sub(1);
            }
        }
        self.after_turn(device);
        let error = OpError::Overloaded {
            reason: "the deadline would pass before CUCM could answer",
            retry_after: self.expected_wait().max(MIN_RETRY_AFTER),
        };
        Some(Step::Expired(op, error))
    }

    fn start_front(&mut self) -> Option<Started> {
        let device = self.ready.pop_front()?;
        self.start_device(device)
    }

    /// Adds to a batch further ready devices whose next operation is a query with the
    /// same credentials (one `appInfo` per document) that can still finish in time,
    /// from anywhere in the ready line: they ride along without a slot or a token of
    /// their own, so nobody behind them waits longer. Each stays its device's current
    /// operation, so per-device order is untouched.
    fn gather(&mut self, members: &mut Vec<Started>, now: Instant) {
        let Some(first) = members.first() else {
            return;
        };
        let fingerprint = first.credentials.fingerprint();
        let latest_start = now + self.call_time.unwrap_or_default();
        let room = self.max_batch.saturating_sub(members.len());
        let devices = &self.devices;
        let taken = self.ready.take_where(BATCH_SCAN_WINDOW, room, |device| {
            devices
                .get(device)
                .and_then(DeviceQueue::next)
                .is_some_and(|op| {
                    batchable(&op.operation)
                        && op.credentials.fingerprint() == fingerprint
                        && op.deadline > latest_start
                })
        });
        for device in taken {
            if let Some(started) = self.start_device(device) {
                members.push(started);
            }
        }
    }

    fn start_device(&mut self, device: QueueKey) -> Option<Started> {
        let (op, first_time) = self.devices.get_mut(&device)?.start()?;
        let started = Started {
            key: device.clone(),
            operation: op.operation.clone(),
            credentials: op.credentials.clone(),
            deadline: op.deadline,
            stage: op.stage.clone(),
            waited: first_time.then(|| op.accepted_at.elapsed()),
        };
        if first_time {
            self.queued = self.queued.saturating_sub(1);
            if batchable(&started.operation) {
                self.queued_queries = self.queued_queries.saturating_sub(1);
            }
        }
        Some(started)
    }

    /// A started call ended. `unit` is a random sample in 0..1 for the back-off jitter.
    pub fn complete(
        &mut self,
        device: &QueueKey,
        end: CallEnd,
        now: Instant,
        unit: f64,
    ) -> Completion {
        self.call_ended(end, now);
        let busy = matches!(end, CallEnd::Answered { busy: true, .. });
        self.finish_member(device, busy, now, unit)
    }

    /// A batch's call ended: its one slot is free again.
    pub fn batch_ended(&mut self, end: CallEnd, now: Instant) {
        self.call_ended(end, now);
    }

    /// One device of an ended call (a batch member, or via [`Scheduler::complete`]):
    /// `busy` when CUCM said busy, then it backs off like a single call.
    pub fn finish_member(
        &mut self,
        device: &QueueKey,
        busy: bool,
        now: Instant,
        unit: f64,
    ) -> Completion {
        let Some(queue) = self.devices.get_mut(device) else {
            return Completion::Unknown;
        };
        let mut exhausted = false;
        if busy {
            if let Some(op) = queue.current_mut() {
                op.busy_answers += 1;
                let wanted = jittered(BUSY_BACK_OFF.delay(op.busy_answers), unit);
                // The longest wait that still leaves time for the retry itself.
                let room = op
                    .deadline
                    .saturating_duration_since(now)
                    .saturating_sub(self.call_time.unwrap_or_default() + MIN_RETRY_WINDOW);
                if !room.is_zero() {
                    // CUCM is at its own limit: wait, then retry ahead of newcomers.
                    queue.back_off();
                    return Completion::RetryAfter(wanted.min(room));
                }
                exhausted = true;
            }
        }
        let done = queue.finish();
        self.after_turn(device.clone());
        match done {
            Some(op) if exhausted => Completion::StillBusy(op),
            Some(op) => Completion::Done(op),
            None => Completion::Unknown,
        }
    }

    /// A started call was answered and its operation goes on at `next`: the device
    /// keeps its turn and goes to the front of the line for its next call (it takes a
    /// slot and a token like any other). Returns false when nothing was running.
    pub fn advance(
        &mut self,
        device: &QueueKey,
        next: Stage,
        took: Duration,
        now: Instant,
    ) -> bool {
        self.call_ended(CallEnd::Answered { took, busy: false }, now);
        let Some(queue) = self.devices.get_mut(device) else {
            return false;
        };
        let Some(op) = queue.current_mut() else {
            return false;
        };
        op.stage = next;
        op.busy_answers = 0;
        queue.line_up();
        self.ready.push_front(device.clone());
        true
    }

    fn call_ended(&mut self, end: CallEnd, now: Instant) {
        match end {
            // CUCM may still be working on it: the slot stays taken a while longer.
            CallEnd::TimedOut if !self.timeout_hold.is_zero() => {
                self.held.push(now + self.timeout_hold);
            }
            _ => self.shaper.release(),
        }
        if let CallEnd::Answered { took, .. } = end {
            // Only real answers teach how long CUCM takes; a timeout says nothing.
            self.call_time = Some(match self.call_time {
                Some(previous) => {
                    previous.mul_f64(1.0 - CALL_TIME_WEIGHT) + took.mul_f64(CALL_TIME_WEIGHT)
                }
                None => took,
            });
        }
    }

    /// A batch member goes again on its own, at the front of the line (its cluster
    /// did not answer the batch for it). Call it for the members in reverse order to
    /// keep their order. Returns false when nothing was running.
    pub fn retry_alone(&mut self, device: &QueueKey) -> bool {
        let Some(queue) = self.devices.get_mut(device) else {
            return false;
        };
        if queue.turn() != Turn::Running {
            return false;
        }
        queue.line_up();
        self.ready.push_front(device.clone());
        true
    }

    /// A busy back-off is over: the device retries before anyone who came later.
    pub fn retry_due(&mut self, device: &QueueKey) {
        if let Some(queue) = self.devices.get_mut(device) {
            if queue.turn() == Turn::BackingOff {
                queue.line_up();
                self.ready.push_front(device.clone());
            }
        }
    }

    /// A device's turn is over: it lines up for its next operation or goes idle.
    fn after_turn(&mut self, device: QueueKey) {
        match self.devices.get(&device).map(DeviceQueue::turn) {
            Some(Turn::Lined) => {
                let client = self
                    .devices
                    .get(&device)
                    .and_then(DeviceQueue::next)
                    .map(|op| op.client)
                    .unwrap_or_default();
                self.ready.push_back(client, device);
            }
            Some(Turn::Idle) => {
                self.devices.remove(&device);
            }
            _ => {}
        }
    }

    /// The gateway is stopping: takes every operation that is not at CUCM right now
    /// out of the model (nothing will start again), for the caller to answer. Running
    /// calls stay until they end.
    pub fn give_up_unsent(&mut self) -> Vec<PendingOp> {
        let mut unsent = Vec::new();
        self.devices.retain(|_, queue| {
            unsent.extend(queue.take_unsent());
            queue.turn() == Turn::Running
        });
        self.ready.clear();
        self.queued = 0;
        self.queued_queries = 0;
        unsent
    }

    /// A watch poll asks for a slot and a token: only when no operation waits (polls
    /// cost callers nothing). `Err(AtCapacity)` also means "operations waiting". Report
    /// its end with [`Scheduler::poll_ended`].
    pub fn try_start_poll(&mut self, now: Instant) -> Result<(), Held> {
        self.release_held(now);
        if self.queued > 0 || !self.ready.is_empty() {
            return Err(Held::AtCapacity);
        }
        self.shaper.try_acquire()
    }

    /// A watch poll's call ended: its slot is free again.
    pub fn poll_ended(&mut self, end: CallEnd, now: Instant) {
        self.call_ended(end, now);
    }

    /// Operations are waiting for CUCM (queued, or lined up for a retry or next stage).
    pub fn operations_waiting(&self) -> bool {
        self.queued > 0 || !self.ready.is_empty()
    }

    /// Most devices one `deviceUserQuery` may carry now (1: batching off).
    pub fn batch_limit(&self) -> usize {
        self.max_batch
    }

    /// Operations accepted and not yet sent to CUCM.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn in_flight(&self) -> usize {
        self.shaper.in_flight()
    }
}

/// Only a device query rides in a batch (a PIN login's checks stay its own calls).
fn batchable(operation: &Operation) -> bool {
    matches!(operation, Operation::Query { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::em::steps::ForcedStage;
    use crate::operation::{DeviceName, Reply, UserId};
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;
    use tokio::sync::oneshot;

    const LONG: Duration = Duration::from_secs(60);

    fn device(n: u32) -> DeviceName {
        DeviceName::parse(&format!("SEP{n}")).unwrap()
    }

    fn key(n: u32) -> QueueKey {
        QueueKey::Device(device(n))
    }

    fn pending(operation: Operation, deadline: Instant) -> PendingOp {
        let (tx, rx) = oneshot::channel::<Reply>();
        drop(rx);
        PendingOp::new(operation, Credentials::new("app", "pw"), deadline, tx)
    }

    fn login(n: u32, deadline: Instant) -> PendingOp {
        pending(
            Operation::Login {
                device: device(n),
                user: UserId::parse("alice").unwrap(),
            },
            deadline,
        )
    }

    fn forced_login(n: u32, deadline: Instant) -> PendingOp {
        pending(
            Operation::ForceLogin {
                device: device(n),
                user: UserId::parse("alice").unwrap(),
            },
            deadline,
        )
    }

    fn query(n: u32, deadline: Instant) -> PendingOp {
        pending(Operation::Query { device: device(n) }, deadline)
    }

    fn scheduler(
        max_concurrent: usize,
        rate: Option<(u32, u32)>,
        queue_limit: usize,
    ) -> (Scheduler<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let rate = rate.map(|(per_second, burst)| Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        });
        let shaper = Shaper::with_clock(max_concurrent, rate, clock.clone());
        (Scheduler::with_shaper(shaper, queue_limit), clock)
    }

    fn started(step: Step) -> Started {
        match step {
            Step::Start(started) => started,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    fn answered() -> CallEnd {
        CallEnd::Answered {
            took: Duration::from_millis(100),
            busy: false,
        }
    }

    #[test]
    fn sends_in_arrival_order_within_the_cap() {
        let (mut s, _) = scheduler(2, None, 100);
        let now = Instant::now();
        for n in 1..=3 {
            assert!(matches!(s.offer(login(n, now + LONG), now), Offer::Queued));
        }
        assert_eq!(s.queued(), 3);
        assert_eq!(started(s.next_step(now)).key, key(1));
        assert_eq!(started(s.next_step(now)).key, key(2));
        assert!(matches!(s.next_step(now), Step::Blocked));
        assert_eq!((s.in_flight(), s.queued()), (2, 1));
        assert!(matches!(
            s.complete(&key(1), answered(), now, 0.5),
            Completion::Done(_)
        ));
        assert_eq!(started(s.next_step(now)).key, key(3));
        assert!(!s.has_pending(&key(1)), "an idle device is forgotten");
    }

    #[test]
    fn one_device_one_operation_at_a_time_and_others_are_not_starved() {
        let (mut s, _) = scheduler(5, None, 100);
        let now = Instant::now();
        for _ in 0..3 {
            s.offer(login(1, now + LONG), now);
        }
        s.offer(login(2, now + LONG), now);
        // Device 1's second operation waits for its first; device 2 goes meanwhile.
        assert_eq!(started(s.next_step(now)).key, key(1));
        assert_eq!(started(s.next_step(now)).key, key(2));
        assert!(matches!(s.next_step(now), Step::Blocked));
        s.complete(&key(1), answered(), now, 0.5);
        assert_eq!(started(s.next_step(now)).key, key(1));
    }

    #[test]
    fn identical_queries_join_without_needing_room() {
        let (mut s, _) = scheduler(1, None, 1);
        let now = Instant::now();
        assert!(matches!(s.offer(query(1, now + LONG), now), Offer::Queued));
        assert!(matches!(s.offer(query(1, now + LONG), now), Offer::Joined));
        assert!(matches!(
            s.offer(query(2, now + LONG), now),
            Offer::Shed(Shed::QueueFull { .. }, _)
        ));
        let Completion::Done(op) = ({
            started(s.next_step(now));
            s.complete(&key(1), answered(), now, 0.5)
        }) else {
            panic!("the query should be done");
        };
        assert_eq!(op.waiters.len(), 2);
    }

    #[test]
    fn sheds_when_the_rate_makes_the_deadline_unreachable() {
        // 1 call/s with a burst of 1: the tenth queued operation waits ~9 s.
        let (mut s, _) = scheduler(5, Some((1, 1)), 100);
        let now = Instant::now();
        for n in 1..=10 {
            assert!(matches!(s.offer(login(n, now + LONG), now), Offer::Queued));
        }
        let shed = s.offer(login(11, now + Duration::from_secs(5)), now);
        let Offer::Shed(Shed::MissesDeadline { retry_after }, _) = shed else {
            panic!("expected a deadline shed, got {shed:?}");
        };
        assert_eq!(retry_after, Duration::from_secs(9));
        assert!(matches!(
            s.offer(login(12, now + Duration::from_secs(20)), now),
            Offer::Queued
        ));
    }

    #[test]
    fn the_rate_limit_asks_to_wait_for_the_next_token() {
        let (mut s, clock) = scheduler(5, Some((10, 1)), 100);
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        s.offer(login(2, now + LONG), now);
        started(s.next_step(now));
        assert!(matches!(s.next_step(now), Step::Wait(w) if w == Duration::from_millis(100)));
        clock.advance(Duration::from_millis(100));
        assert_eq!(started(s.next_step(now)).key, key(2));
    }

    #[test]
    fn busy_backs_off_then_retries_ahead_of_newcomers() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        let first = started(s.next_step(now));
        assert!(first.waited.is_some());
        s.offer(login(2, now + LONG), now);
        let busy = CallEnd::Answered {
            took: Duration::from_millis(10),
            busy: true,
        };
        let Completion::RetryAfter(after) = s.complete(&key(1), busy, now, 0.5) else {
            panic!("busy should back off");
        };
        assert_eq!(after, Duration::from_millis(100));
        // During the back-off the slot is free for others.
        assert_eq!(started(s.next_step(now)).key, key(2));
        s.offer(login(3, now + LONG), now);
        s.complete(&key(2), answered(), now, 0.5);
        s.retry_due(&key(1));
        let retry = started(s.next_step(now));
        assert_eq!(retry.key, key(1), "the retry goes before device 3");
        assert!(retry.waited.is_none());
        // The second busy answer doubles the back-off.
        let Completion::RetryAfter(after) = s.complete(&key(1), busy, now, 0.5) else {
            panic!("busy should back off again");
        };
        assert_eq!(after, Duration::from_millis(200));
    }

    #[test]
    fn busy_backs_off_less_when_the_deadline_is_near_and_gives_up_when_nothing_fits() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        s.offer(login(1, now + Duration::from_millis(120)), now);
        started(s.next_step(now));
        let busy = CallEnd::Answered {
            took: Duration::from_millis(10),
            busy: true,
        };
        // 120 ms left, 10 ms per call, 50 ms to spare: wait at most 60 ms, not 100.
        let Completion::RetryAfter(after) = s.complete(&key(1), busy, now, 0.5) else {
            panic!("a retry still fits");
        };
        assert_eq!(after, Duration::from_millis(60));
        s.retry_due(&key(1));
        started(s.next_step(now));
        let later = now + Duration::from_millis(70);
        assert!(matches!(
            s.complete(&key(1), busy, later, 0.5),
            Completion::StillBusy(_)
        ));
    }

    #[test]
    fn an_operation_that_cannot_finish_in_time_expires_without_a_call() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        started(s.next_step(now));
        // CUCM took 2 s: an operation due in 1 s can no longer make it.
        s.offer(login(2, now + Duration::from_secs(1)), now);
        s.offer(login(3, now + LONG), now);
        s.complete(
            &key(1),
            CallEnd::Answered {
                took: Duration::from_secs(2),
                busy: false,
            },
            now,
            0.5,
        );
        assert!(matches!(
            s.next_step(now),
            Step::Expired(_, OpError::Overloaded { .. })
        ));
        assert_eq!(started(s.next_step(now)).key, key(3));
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn a_later_stage_keeps_the_devices_turn_and_goes_first() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        s.offer(forced_login(1, now + LONG), now);
        s.offer(login(2, now + LONG), now);
        s.offer(login(1, now + LONG), now);
        let first = started(s.next_step(now));
        let who_is_on = Stage::Forced(ForcedStage::WhoIsOn);
        assert_eq!(
            (first.key.clone(), first.stage),
            (key(1), Stage::Forced(ForcedStage::Login))
        );
        assert!(s.advance(&key(1), who_is_on.clone(), Duration::from_millis(10), now));
        let second = started(s.next_step(now));
        assert_eq!(second.key, key(1), "the next stage goes before device 2");
        assert_eq!(second.stage, who_is_on);
        assert!(second.waited.is_none());
        assert!(matches!(s.next_step(now), Step::Blocked), "one slot: held");
        assert!(matches!(
            s.complete(&key(1), answered(), now, 0.5),
            Completion::Done(op) if op.stage == who_is_on
        ));
        // Device 1's next operation waits behind device 2.
        assert_eq!(started(s.next_step(now)).key, key(2));
        assert!(!s.advance(&key(9), Stage::Single, Duration::ZERO, now));
    }

    #[test]
    fn a_timed_out_call_keeps_its_slot_for_another_timeout() {
        let (s, _) = scheduler(1, None, 100);
        let mut s = s.hold_slots_after_timeout(Duration::from_secs(5));
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        s.offer(login(2, now + LONG), now);
        started(s.next_step(now));
        assert!(matches!(
            s.complete(&key(1), CallEnd::TimedOut, now, 0.5),
            Completion::Done(_)
        ));
        // CUCM may still be working on device 1's call: device 2 waits for the hold.
        assert!(matches!(s.next_step(now), Step::Wait(w) if w == Duration::from_secs(5)));
        let later = now + Duration::from_secs(4);
        assert!(matches!(s.next_step(later), Step::Wait(w) if w == Duration::from_secs(1)));
        assert_eq!(
            started(s.next_step(now + Duration::from_secs(5))).key,
            key(2)
        );
        // Other failures free the slot at once.
        s.complete(&key(2), CallEnd::NoAnswer, now, 0.5);
        assert_eq!(s.in_flight(), 0);
    }

    fn batch(step: Step) -> Vec<DeviceName> {
        match step {
            Step::Batch(members) => members
                .into_iter()
                .filter_map(|m| m.operation.device().cloned())
                .collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn query_as(n: u32, app: &str, deadline: Instant) -> PendingOp {
        let (tx, rx) = oneshot::channel::<Reply>();
        drop(rx);
        PendingOp::new(
            Operation::Query { device: device(n) },
            Credentials::new(app, "pw"),
            deadline,
            tx,
        )
    }

    #[test]
    fn queries_of_several_devices_leave_together_under_one_slot_and_token() {
        // One slot, one token a second: without batching, three calls would take 2 s.
        let (s, clock) = scheduler(1, Some((1, 1)), 100);
        let mut s = s.with_batching(3);
        let now = Instant::now();
        s.offer(query(1, now + LONG), now);
        s.offer(login(6, now + LONG), now);
        for n in 2..=5 {
            s.offer(query(n, now + LONG), now);
        }
        // The front is a query: further ready queries join it, up to the max, past
        // the login (which keeps its place at the front).
        assert_eq!(batch(s.next_step(now)), [device(1), device(2), device(3)]);
        assert_eq!((s.in_flight(), s.queued()), (1, 3));
        assert!(
            matches!(s.next_step(now), Step::Blocked),
            "one slot for all"
        );
        s.batch_ended(answered(), now);
        for n in 1..=3 {
            assert!(matches!(
                s.finish_member(&key(n), false, now, 0.5),
                Completion::Done(_)
            ));
        }
        assert!(
            matches!(s.next_step(now), Step::Wait(_)),
            "one token for all"
        );
        clock.advance(Duration::from_secs(1));
        // The login goes alone; the rest wait for its slot.
        assert_eq!(started(s.next_step(now)).key, key(6));
    }

    #[test]
    fn a_batch_keeps_each_devices_order_and_credentials_apart() {
        let (s, _) = scheduler(2, None, 100);
        let mut s = s.with_batching(50);
        let now = Instant::now();
        s.offer(query(1, now + LONG), now);
        s.offer(login(1, now + LONG), now);
        s.offer(query_as(2, "other-app", now + LONG), now);
        s.offer(query(3, now + LONG), now);
        s.offer(login(4, now + LONG), now);
        // Device 1's login waits for its query; device 2 has other credentials.
        assert_eq!(batch(s.next_step(now)), [device(1), device(3)]);
        assert_eq!(started(s.next_step(now)).key, key(2));
        assert!(matches!(s.next_step(now), Step::Blocked));
        s.batch_ended(answered(), now);
        s.finish_member(&key(1), false, now, 0.5);
        s.finish_member(&key(3), false, now, 0.5);
        // Device 4's login came first; device 1's login after it.
        assert_eq!(started(s.next_step(now)).key, key(4));
    }

    #[test]
    fn a_member_that_cannot_finish_in_time_stays_out_and_expires() {
        let (s, _) = scheduler(1, None, 100);
        let mut s = s.with_batching(50);
        let now = Instant::now();
        s.offer(login(9, now + LONG), now);
        started(s.next_step(now));
        s.offer(query(1, now + LONG), now);
        s.offer(query(2, now + Duration::from_secs(1)), now);
        s.offer(query(3, now + LONG), now);
        // CUCM took 2 s: device 2's query can no longer make it.
        s.complete(
            &key(9),
            CallEnd::Answered {
                took: Duration::from_secs(2),
                busy: false,
            },
            now,
            0.5,
        );
        assert_eq!(batch(s.next_step(now)), [device(1), device(3)]);
        s.batch_ended(answered(), now);
        s.finish_member(&key(1), false, now, 0.5);
        s.finish_member(&key(3), false, now, 0.5);
        assert!(matches!(s.next_step(now), Step::Expired(..)));
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn a_cluster_that_does_not_batch_gets_each_device_alone_in_order() {
        let (s, _) = scheduler(1, None, 100);
        let mut s = s.with_batching(50);
        let now = Instant::now();
        for n in 1..=3 {
            s.offer(query(n, now + LONG), now);
        }
        let members = batch(s.next_step(now));
        s.batch_ended(answered(), now);
        assert!(s.disable_batching());
        assert!(!s.disable_batching(), "once");
        for device in members.into_iter().rev() {
            assert!(s.retry_alone(&QueueKey::Device(device)));
        }
        for n in 1..=3 {
            let alone = started(s.next_step(now));
            assert_eq!(alone.key, key(n));
            assert!(alone.waited.is_none(), "a retry, not a new start");
            s.complete(&key(n), answered(), now, 0.5);
        }
        assert!(!s.retry_alone(&key(1)), "nothing running");
    }

    #[test]
    fn the_expected_wait_counts_queries_by_batch() {
        // 1,000 cold queries at 20 calls/s: one by one that is a 50 s wait, which a
        // 15 s deadline would shed; in batches of 50 it is about one second.
        let now = Instant::now();
        let deadline = now + Duration::from_secs(15);
        let (mut off, _) = scheduler(5, Some((20, 5)), 10_000);
        let shed = (1..=1000)
            .filter(|&n| matches!(off.offer(query(n, deadline), now), Offer::Shed(..)))
            .count();
        assert!(shed > 600, "{shed} shed without batching");
        let (s, _) = scheduler(5, Some((20, 5)), 10_000);
        let mut on = s.with_batching(50);
        for n in 1..=1000 {
            assert!(matches!(on.offer(query(n, deadline), now), Offer::Queued));
        }
        assert!(on.expected_wait() < Duration::from_secs(1));
        // Logins still count one call each.
        for n in 1001..=1100 {
            on.offer(login(n, now + LONG), now);
        }
        assert!(on.expected_wait() > Duration::from_secs(5));
        // Started and expired queries leave the count.
        batch(on.next_step(now));
        assert_eq!(on.queued_queries, 950);
        assert!(on.disable_batching());
        assert!(on.expected_wait() > Duration::from_secs(50));
    }

    #[test]
    fn batching_off_sends_one_device_per_call() {
        let (mut s, _) = scheduler(5, None, 100);
        let now = Instant::now();
        s.offer(query(1, now + LONG), now);
        s.offer(query(2, now + LONG), now);
        assert_eq!(started(s.next_step(now)).key, key(1));
        assert_eq!(started(s.next_step(now)).key, key(2));
    }

    #[test]
    fn a_busy_batch_backs_each_member_off() {
        let (s, _) = scheduler(1, None, 100);
        let mut s = s.with_batching(50);
        let now = Instant::now();
        s.offer(query(1, now + LONG), now);
        s.offer(query(2, now + LONG), now);
        batch(s.next_step(now));
        s.batch_ended(
            CallEnd::Answered {
                took: Duration::from_millis(10),
                busy: true,
            },
            now,
        );
        for n in 1..=2 {
            assert!(matches!(
                s.finish_member(&key(n), true, now, 0.5),
                Completion::RetryAfter(_)
            ));
        }
        s.retry_due(&key(2));
        s.retry_due(&key(1));
        assert_eq!(batch(s.next_step(now)), [device(1), device(2)]);
    }

    fn from(client: &str, op: PendingOp) -> PendingOp {
        op.from_client(ClientId::address(client.parse().unwrap()))
    }

    #[test]
    fn a_flooding_client_waits_behind_its_own_requests_on_the_fake_clock() {
        // 10 calls/s, burst 1: one start every 100 ms of the fake clock.
        let (mut s, clock) = scheduler(100, Some((10, 1)), 1000);
        let now = Instant::now();
        for n in 1..=50 {
            assert!(matches!(
                s.offer(from("203.0.113.66", login(n, now + LONG)), now),
                Offer::Queued
            ));
        }
        assert_eq!(started(s.next_step(now)).key, key(1));
        // A well-behaved client arrives behind 49 of the flood's requests.
        s.offer(from("198.51.100.1", login(100, now + LONG)), now);
        s.offer(from("198.51.100.1", login(101, now + LONG)), now);
        let mut order = Vec::new();
        for _ in 0..6 {
            assert!(matches!(s.next_step(now), Step::Wait(w) if w == Duration::from_millis(100)));
            clock.advance(Duration::from_millis(100));
            order.push(started(s.next_step(now)).key);
        }
        // Turns alternate (the newcomer's first turn is after the flood's current
        // one): it is done within 400 ms, not after 5 s.
        assert_eq!(order, [key(2), key(100), key(3), key(101), key(4), key(5)]);
    }

    #[test]
    fn a_device_the_flood_holds_up_is_served_in_the_other_clients_turn() {
        let (mut s, clock) = scheduler(100, Some((10, 1)), 1000);
        let now = Instant::now();
        for n in 1..=50 {
            s.offer(from("203.0.113.66", login(n, now + LONG)), now);
        }
        assert_eq!(started(s.next_step(now)).key, key(1));
        // The other client needs device 40, where the flood's login waits first.
        s.offer(from("198.51.100.1", query(40, now + LONG)), now);
        let mut order = Vec::new();
        for _ in 0..4 {
            clock.advance(Duration::from_millis(100));
            order.push(started(s.next_step(now)).key);
        }
        // Device 40 (the flood's login, then the query) goes in the client's turn.
        assert_eq!(order, [key(2), key(40), key(3), key(4)]);
    }

    #[test]
    fn the_deadline_check_counts_only_the_wait_in_the_clients_own_turn() {
        // 1 call/s, burst 1: the flood's tenth request waits ~9 s.
        let (mut s, _) = scheduler(5, Some((1, 1)), 100);
        let now = Instant::now();
        for n in 1..=10 {
            s.offer(from("203.0.113.66", login(n, now + LONG)), now);
        }
        let soon = now + Duration::from_secs(5);
        // The flood's next cannot make a 5 s deadline...
        assert!(matches!(
            s.offer(from("203.0.113.66", login(11, soon)), now),
            Offer::Shed(Shed::MissesDeadline { .. }, _)
        ));
        // ...another client's can: it waits for one of the flood's, not ten.
        assert!(matches!(
            s.offer(from("198.51.100.1", login(12, soon)), now),
            Offer::Queued
        ));
        assert!(
            s.expected_wait_for(&ClientId::address("198.51.100.2".parse().unwrap()))
                < Duration::from_secs(3)
        );
    }

    #[test]
    fn a_full_queue_still_takes_a_client_below_its_share() {
        let (mut s, _) = scheduler(1, None, 10);
        let now = Instant::now();
        for n in 1..=10 {
            s.offer(from("203.0.113.66", login(n, now + LONG)), now);
        }
        assert!(matches!(
            s.offer(from("203.0.113.66", login(11, now + LONG)), now),
            Offer::Shed(Shed::QueueFull { .. }, _)
        ));
        // Two clients: a share of 5 each, so the other one gets in up to 5.
        for n in 20..25 {
            assert!(matches!(
                s.offer(from("198.51.100.1", login(n, now + LONG)), now),
                Offer::Queued
            ));
        }
        assert!(matches!(
            s.offer(from("198.51.100.1", login(25, now + LONG)), now),
            Offer::Shed(Shed::QueueFull { .. }, _)
        ));
        // Never more than twice the limit, however many clients come.
        let mut accepted = 0;
        for n in 30..60 {
            let client = format!("192.0.2.{n}");
            if matches!(
                s.offer(from(&client, login(n, now + LONG)), now),
                Offer::Queued
            ) {
                accepted += 1;
            }
        }
        assert_eq!(s.queued(), 20);
        assert_eq!(accepted, 5);
    }

    #[test]
    fn giving_up_takes_everything_not_at_cucm_and_keeps_what_runs() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        for n in 1..=3 {
            s.offer(login(n, now + LONG), now);
        }
        s.offer(login(1, now + LONG), now);
        let running = started(s.next_step(now));
        assert_eq!(running.key, key(1));
        let unsent = s.give_up_unsent();
        let mut devices: Vec<String> = unsent
            .iter()
            .filter_map(|op| op.operation.device().map(|d| d.as_str().to_string()))
            .collect();
        devices.sort();
        let expected: Vec<String> = (1..=3).map(|n| device(n).as_str().to_string()).collect();
        assert_eq!(devices, expected);
        assert_eq!(unsent.len(), 3, "device 1's second login, devices 2 and 3");
        assert_eq!(s.queued(), 0);
        assert!(
            matches!(s.next_step(now), Step::Blocked),
            "nothing lined up"
        );
        // The running call still ends normally, and nothing follows it.
        assert!(matches!(
            s.complete(&key(1), answered(), now, 0.5),
            Completion::Done(_)
        ));
        assert!(!s.has_pending(&key(1)));
        assert!(matches!(s.next_step(now), Step::Blocked));
    }

    #[test]
    fn a_call_without_an_answer_teaches_no_call_time() {
        let (mut s, _) = scheduler(1, None, 100);
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        started(s.next_step(now));
        s.complete(&key(1), CallEnd::NoAnswer, now, 0.5);
        assert_eq!(s.expected_wait(), Duration::ZERO);
    }

    #[test]
    fn a_poll_goes_only_when_no_operation_waits_and_takes_a_slot_and_a_token() {
        let (mut s, clock) = scheduler(2, Some((10, 1)), 100);
        let now = Instant::now();
        s.offer(login(1, now + LONG), now);
        // An operation waits: no poll.
        assert_eq!(s.try_start_poll(now), Err(Held::AtCapacity));
        let first = started(s.next_step(now));
        // Nothing waits now, but the operation spent the only token of the burst.
        assert!(matches!(s.try_start_poll(now), Err(Held::RateLimited(_))));
        clock.advance(Duration::from_millis(100));
        assert_eq!(s.try_start_poll(now), Ok(()));
        assert_eq!(s.in_flight(), 2);
        // The poll holds a slot: an operation now waits for the next free one.
        s.offer(login(2, now + LONG), now);
        clock.advance(Duration::from_millis(100));
        assert!(matches!(s.next_step(now), Step::Blocked));
        s.poll_ended(
            CallEnd::Answered {
                took: Duration::from_millis(5),
                busy: false,
            },
            now,
        );
        assert_eq!(started(s.next_step(now)).key, key(2));
        s.complete(&first.key, CallEnd::NoAnswer, now, 0.5);
    }
}
