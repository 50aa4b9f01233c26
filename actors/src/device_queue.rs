//! `DeviceQueue`: the operations of one device, one at a time, in arrival order.
//!
//! The cluster actor keeps one per device with work pending (and drops it when the
//! device goes idle, so memory follows the live working set). Two operations on one
//! phone never race: the next starts only when the previous was answered.
//!
//! Identical queries share one CUCM call: a query joins the last queued operation if
//! that is a query with the same credentials, or — when nothing is queued — the
//! query in flight. Joining never reorders anything: no change can sit between them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::em::steps::Stage;
use crate::fair_line::ClientId;
use crate::operation::{Credentials, Operation, Reply};

/// One operation and everyone waiting for its answer.
#[derive(Debug)]
pub struct PendingOp {
    pub operation: Operation,
    pub credentials: Credentials,
    /// The latest deadline among its waiters: it is worth doing until then.
    pub deadline: Instant,
    pub accepted_at: Instant,
    pub waiters: Vec<oneshot::Sender<Reply>>,
    /// CUCM busy answers so far (for back-off).
    pub busy_answers: u32,
    /// Which of the operation's CUCM calls is next (a PIN login makes three, one after
    /// the other, all in the device's turn).
    pub stage: Stage,
    /// One flag per waiter, set once the operation went to CUCM: a caller whose own
    /// wait ends at its deadline then knows whether to say 1003 (sent) or 1004 (not).
    pub sent: Vec<Arc<AtomicBool>>,
    /// Who asked first: its device waits in this client's lane of the ready line.
    pub client: ClientId,
}

impl PendingOp {
    pub fn new(
        operation: Operation,
        credentials: Credentials,
        deadline: Instant,
        waiter: oneshot::Sender<Reply>,
    ) -> Self {
        Self {
            stage: Stage::first(&operation),
            operation,
            credentials,
            deadline,
            accepted_at: Instant::now(),
            waiters: vec![waiter],
            busy_answers: 0,
            sent: vec![Arc::new(AtomicBool::new(false))],
            client: ClientId::default(),
        }
    }

    /// The client that asked (default: unknown, one shared lane).
    pub fn from_client(mut self, client: ClientId) -> Self {
        self.client = client;
        self
    }

    fn mark_sent(&self) {
        for flag in &self.sent {
            flag.store(true, Ordering::Release);
        }
    }

    fn can_share_with(&self, other: &PendingOp) -> bool {
        !self.operation.mutates()
            && self.operation == other.operation
            && self.credentials.fingerprint() == other.credentials.fingerprint()
    }

    fn absorb(&mut self, other: PendingOp) {
        self.deadline = self.deadline.max(other.deadline);
        self.waiters.extend(other.waiters);
        self.sent.extend(other.sent);
    }
}

/// Where the device stands with the shaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Turn {
    /// Nothing pending.
    #[default]
    Idle,
    /// Lined up in the shaper for a slot.
    Lined,
    /// Its operation is at CUCM.
    Running,
    /// CUCM said busy; waiting out a back-off before lining up again.
    BackingOff,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Shared an identical query's answer: nothing new to do.
    Joined,
    /// Queued; `needs_turn` when the device was idle and must line up in the shaper.
    Queued { needs_turn: bool },
}

#[derive(Debug, Default)]
pub struct DeviceQueue {
    current: Option<PendingOp>,
    waiting: VecDeque<PendingOp>,
    turn: Turn,
}

impl DeviceQueue {
    /// Whether `op` would share an identical query's answer if pushed now.
    pub fn would_join(&self, op: &PendingOp) -> bool {
        let target = self.waiting.back().or(self.current.as_ref());
        target.is_some_and(|t| t.can_share_with(op))
    }

    pub fn push(&mut self, op: PendingOp) -> Pushed {
        if self.would_join(&op) {
            let target = match self.waiting.back_mut() {
                Some(last) => Some(last),
                None => self.current.as_mut(),
            };
            if let Some(target) = target {
                target.absorb(op);
                if self.turn == Turn::Running && self.waiting.is_empty() {
                    // Joined the query already at CUCM.
                    if let Some(current) = &self.current {
                        current.mark_sent();
                    }
                }
                return Pushed::Joined;
            }
        }
        self.waiting.push_back(op);
        let needs_turn = self.turn == Turn::Idle;
        if needs_turn {
            self.turn = Turn::Lined;
        }
        Pushed::Queued { needs_turn }
    }

    /// The operation that runs when the device's turn comes: a retried one, else the
    /// oldest waiting.
    pub fn next(&self) -> Option<&PendingOp> {
        self.current.as_ref().or_else(|| self.waiting.front())
    }

    /// The device got its slot. Returns the operation to send, and whether it is
    /// being started for the first time (not a retry).
    pub fn start(&mut self) -> Option<(&PendingOp, bool)> {
        let first_time = self.current.is_none();
        if first_time {
            self.current = self.waiting.pop_front();
        }
        self.turn = Turn::Running;
        if let Some(op) = &self.current {
            op.mark_sent();
        }
        self.current.as_ref().map(|op| (op, first_time))
    }

    pub fn current_mut(&mut self) -> Option<&mut PendingOp> {
        self.current.as_mut()
    }

    /// CUCM said busy: hold the operation and wait out the back-off.
    pub fn back_off(&mut self) {
        self.turn = Turn::BackingOff;
    }

    /// The back-off is over: line up again.
    pub fn line_up(&mut self) {
        self.turn = Turn::Lined;
    }

    /// The running operation is answered. Returns it; the device then lines up for
    /// its next operation, or goes idle.
    pub fn finish(&mut self) -> Option<PendingOp> {
        let done = self.current.take();
        self.turn = if self.waiting.is_empty() {
            Turn::Idle
        } else {
            Turn::Lined
        };
        done
    }

    /// Takes the operation that would run next without running it (it expired).
    /// Returns it and whether it had not been started before.
    pub fn drop_next(&mut self) -> Option<(PendingOp, bool)> {
        let dropped = match self.current.take() {
            Some(op) => Some((op, false)),
            None => self.waiting.pop_front().map(|op| (op, true)),
        };
        self.turn = if self.waiting.is_empty() {
            Turn::Idle
        } else {
            Turn::Lined
        };
        dropped
    }

    /// The gateway is stopping: hands over every operation that is not at CUCM right
    /// now (waiting, lined up, backing off after a busy answer). What is running stays.
    pub fn take_unsent(&mut self) -> Vec<PendingOp> {
        let mut unsent = Vec::with_capacity(self.waiting.len() + 1);
        if self.turn != Turn::Running {
            unsent.extend(self.current.take());
        }
        unsent.extend(self.waiting.drain(..));
        if self.turn != Turn::Running {
            self.turn = Turn::Idle;
        }
        unsent
    }

    pub fn turn(&self) -> Turn {
        self.turn
    }

    pub fn is_idle(&self) -> bool {
        self.turn == Turn::Idle
    }

    /// Operations waiting behind the running one.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::{DeviceName, UserId};
    use std::time::Duration;

    fn device() -> DeviceName {
        DeviceName::parse("SEP1").unwrap()
    }

    fn op(operation: Operation, creds: &str) -> (PendingOp, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + Duration::from_secs(5);
        let op = PendingOp::new(operation, Credentials::new("app", creds), deadline, tx);
        (op, rx)
    }

    fn query(creds: &str) -> PendingOp {
        op(Operation::Query { device: device() }, creds).0
    }

    fn login() -> PendingOp {
        op(
            Operation::Login {
                device: device(),
                user: UserId::parse("alice").unwrap(),
            },
            "pw",
        )
        .0
    }

    #[test]
    fn runs_in_arrival_order_one_at_a_time() {
        let mut queue = DeviceQueue::default();
        assert_eq!(queue.push(login()), Pushed::Queued { needs_turn: true });
        assert_eq!(
            queue.push(query("pw")),
            Pushed::Queued { needs_turn: false }
        );
        let (first, fresh) = queue.start().unwrap();
        assert!(fresh);
        assert!(matches!(first.operation, Operation::Login { .. }));
        assert_eq!(queue.turn(), Turn::Running);
        // A login behind the query is not merged with anything.
        assert_eq!(queue.push(login()), Pushed::Queued { needs_turn: false });
        assert!(queue.finish().is_some());
        assert_eq!(queue.turn(), Turn::Lined);
        assert!(matches!(
            queue.start().unwrap().0.operation,
            Operation::Query { .. }
        ));
        queue.finish();
        assert!(matches!(
            queue.start().unwrap().0.operation,
            Operation::Login { .. }
        ));
        queue.finish();
        assert!(queue.is_idle());
    }

    #[test]
    fn identical_queries_share_the_queued_or_running_one() {
        let mut queue = DeviceQueue::default();
        assert_eq!(queue.push(query("pw")), Pushed::Queued { needs_turn: true });
        assert_eq!(queue.push(query("pw")), Pushed::Joined);
        queue.start();
        // Running and nothing queued: join the running query.
        assert_eq!(queue.push(query("pw")), Pushed::Joined);
        // Other credentials never share.
        assert_eq!(
            queue.push(query("other")),
            Pushed::Queued { needs_turn: false }
        );
        let done = queue.finish().unwrap();
        assert_eq!(done.waiters.len(), 3);
    }

    #[test]
    fn a_query_never_joins_across_a_change() {
        let mut queue = DeviceQueue::default();
        queue.push(query("pw"));
        queue.start();
        queue.push(login());
        // The running query predates the login: a new query must wait for the login.
        assert_eq!(
            queue.push(query("pw")),
            Pushed::Queued { needs_turn: false }
        );
        assert_eq!(queue.waiting(), 2);
    }

    #[test]
    fn busy_retry_keeps_the_operation_and_its_place() {
        let mut queue = DeviceQueue::default();
        queue.push(login());
        queue.push(query("pw"));
        queue.start();
        queue.back_off();
        assert_eq!(queue.turn(), Turn::BackingOff);
        queue.line_up();
        let (retried, fresh) = queue.start().unwrap();
        assert!(!fresh);
        assert!(matches!(retried.operation, Operation::Login { .. }));
    }

    #[test]
    fn dropping_an_expired_operation_moves_on() {
        let mut queue = DeviceQueue::default();
        queue.push(login());
        queue.push(query("pw"));
        let (dropped, never_started) = queue.drop_next().unwrap();
        assert!(never_started);
        assert!(matches!(dropped.operation, Operation::Login { .. }));
        assert_eq!(queue.turn(), Turn::Lined);
        queue.drop_next();
        assert!(queue.is_idle());
    }
}
