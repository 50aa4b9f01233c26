//! `ClusterHandle`: what the HTTP layer holds for one cluster — the cache fast path,
//! `send` to the actor (which respects its bounded mailbox), and a wait that ends
//! exactly at the caller's deadline, or when the gateway closes the cluster at the end
//! of its shutdown grace (then every caller still waiting is answered: 1003 when CUCM
//! has its operation, else 1004 from the actor).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use crate::cache::LoggedInCache;
use crate::em::code::{self, cucm_message};
use crate::em::EmClient;
use crate::fair_line::ClientId;
use crate::metrics::ClusterMetrics;
use crate::operation::{Credentials, DeviceName, OpError, Operation, Reply};
use crate::watch::WatchAlways;

/// Ask the cluster to carry out one operation before `deadline`.
#[derive(Debug)]
pub struct Submit {
    pub operation: Operation,
    pub credentials: Credentials,
    pub deadline: Instant,
    /// Who asked: the ready line is shared fairly between clients.
    pub client: ClientId,
}

/// The answer to come, and whether the operation has gone to CUCM yet.
pub struct Ticket {
    pub reply: oneshot::Receiver<Reply>,
    pub sent: Arc<AtomicBool>,
}

impl Message for Submit {
    type Result = Ticket;
}

/// The gateway is stopping: answer what waits, start nothing more.
#[derive(Debug)]
pub struct Close;

impl Message for Close {
    type Result = ();
}

/// After the cluster closed, how often a caller whose operation was not yet at CUCM
/// looks again (the actor answers it 1004 as it processes `Close`).
const CLOSING_POLL: Duration = Duration::from_millis(20);

/// What the HTTP layer holds for one cluster.
#[derive(Clone)]
pub struct ClusterHandle {
    pub code: Arc<str>,
    /// The cluster actor's mailbox (bounded: `send` waits when it is full).
    pub(crate) actor: Recipient<Submit>,
    /// The same actor, told to close at the end of the shutdown grace.
    pub(crate) closer: Recipient<Close>,
    /// Where the always-watched list of this cluster goes.
    pub(crate) always_watched: Recipient<WatchAlways>,
    pub(crate) cache: Arc<LoggedInCache>,
    pub(crate) em: Arc<EmClient>,
    pub(crate) metrics: ClusterMetrics,
    /// `true` once the cluster is closed (see [`ClusterHandle::close`]).
    pub(crate) closing: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("code", &self.code)
            .finish()
    }
}

impl ClusterHandle {
    /// Carries out one operation for `client`; always answers, by the deadline.
    pub async fn submit(
        &self,
        operation: Operation,
        credentials: Credentials,
        deadline: Instant,
        client: ClientId,
    ) -> Reply {
        // CUCM refused these credentials seconds ago: it would again, at the cost of a
        // slot and a rate token the cluster's real callers need.
        if self.cache.recently_rejected(credentials.fingerprint()) {
            self.metrics.rejected_credentials.inc();
            return Reply::failed(OpError::Cucm {
                code: code::INVALID_APP_USER,
                text: cucm_message(code::INVALID_APP_USER).into(),
            });
        }
        // Fast path: a fresh hit needs no actor hop. The actor holds a device's entry
        // when a change for it is queued, so this never jumps a change.
        if let Some(reply) = self.cache.cached_answer(&operation, &credentials) {
            self.metrics.cache_hits.inc();
            return reply;
        }
        let submit = Submit {
            operation,
            credentials,
            deadline,
            client,
        };
        // The deadline is a promise to the caller: the wait ends exactly there. The
        // actor's own answer usually comes first; when it does not, the flag says
        // whether CUCM got the operation (1003: it may still be working on it) or it
        // was still waiting in the gateway (1004).
        let sent = std::sync::Mutex::new(None::<Arc<AtomicBool>>);
        let went_to_cucm = || {
            sent.lock()
                .ok()
                .and_then(|slot| slot.as_ref().map(|f| f.load(Ordering::Acquire)))
                .unwrap_or(false)
        };
        let answer = async {
            let ticket = self.actor.send(submit).await.ok()?;
            if let Ok(mut slot) = sent.lock() {
                *slot = Some(ticket.sent.clone());
            }
            ticket.reply.await.ok()
        };
        let answer = tokio::time::timeout_at(deadline.into(), answer);
        tokio::pin!(answer);
        let mut closing = self.closing.subscribe();
        tokio::select! {
            biased;
            answered = &mut answer => return reply_or_timeout(answered, went_to_cucm()),
            _ = closing.wait_for(|closed| *closed) => {}
        }
        // Closed: an operation at CUCM is answered now (CUCM may still carry it out);
        // one still waiting gets the actor's 1004, which cannot start it any more.
        loop {
            if went_to_cucm() {
                return Reply::failed(OpError::Unavailable {
                    reason: "the gateway stopped before CUCM answered".into(),
                });
            }
            if let Ok(answered) = tokio::time::timeout(CLOSING_POLL, &mut answer).await {
                return reply_or_timeout(answered, went_to_cucm());
            }
        }
    }

    /// The gateway is stopping (the end of its shutdown grace): every caller still
    /// waiting on this cluster is answered at once, and nothing more goes to CUCM.
    pub fn close(&self) {
        self.closing.send_replace(true);
        self.closer.do_send(Close);
    }

    /// These devices are watched always (a new list replaces the last).
    pub fn watch_always(&self, devices: Vec<DeviceName>) {
        // A list is small and rare (start, SIGHUP): the mailbox bound is not at stake.
        self.always_watched.do_send(WatchAlways(devices));
    }

    /// Readiness: at least one node is not being skipped and accepts connections.
    pub async fn ready(&self) -> bool {
        self.em.any_node_reachable().await
    }
}

/// The caller's answer, or what its deadline means: 1003 when CUCM got the operation
/// (it may still be working on it), 1004 when it was still waiting in the gateway.
fn reply_or_timeout(
    answered: Result<Option<Reply>, tokio::time::error::Elapsed>,
    went_to_cucm: bool,
) -> Reply {
    match answered {
        Ok(Some(reply)) => reply,
        Ok(None) => Reply::failed(OpError::Unavailable {
            reason: "the cluster is shutting down".into(),
        }),
        Err(_) if went_to_cucm => Reply::failed(OpError::Unavailable {
            reason: "no answer from CUCM before the deadline".into(),
        }),
        Err(_) => Reply::failed(OpError::Overloaded {
            reason: "the deadline passed while waiting for CUCM",
            retry_after: Duration::from_secs(1),
        }),
    }
}
