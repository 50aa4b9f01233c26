//! The shared store: each cluster's slots and rate in PostgreSQL, driven from one
//! dedicated thread.
//!
//! The synchronous `postgres` crate runs its own small runtime inside each call and
//! panics on an async executor thread, so the actors never call it: they send a
//! [`Command`] and await the answer on a oneshot channel, bounded by a timeout.
//!
//! - A slot is a row `(cluster, slot)`; a lease is `holder` + `lease_until`. A slot is
//!   free when it has no holder or its lease has passed (a dead instance's slots come
//!   back by themselves). It is taken with `FOR UPDATE SKIP LOCKED`, so instances
//!   never wait on each other's row locks.
//! - The rate is one GCRA row per cluster (its theoretical arrival time, `tat`),
//!   checked and advanced under the row's lock in the same transaction as the slot:
//!   a refused token takes no slot and a refused slot spends no token.
//! - Giving a slot back sends `NOTIFY bc_coordination, '<cluster>'`; the thread
//!   listens and wakes the waiters of that cluster.
//!
//! Tables are created under an advisory lock, so instances starting together against
//! an empty database all come up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Statement};
use tokio::sync::{oneshot, Notify};

use crate::backoff::ExpBackoff;
use crate::shaper::Rate;

/// Connecting to a coordination store must be quick: calls wait on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Data sent to a vanished server fails the connection after this.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(2);
/// A statement stuck on a lock is cancelled rather than holding every grant.
const STATEMENT_TIMEOUT_OPTION: &str = "-c statement_timeout=1000";
/// Reconnect attempts while the store is down.
const RECONNECT: ExpBackoff = ExpBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// While someone waits for a slot: the longest the thread waits on the socket for a
/// notification before it looks at its commands again.
const NOTIFICATION_TICK: Duration = Duration::from_millis(1);
/// With nobody waiting: how long the thread sleeps between looks at its mail.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Commands waiting for the store thread. Each is a call waiting for its grant or
/// giving one back, so the local slot caps keep it far below this; beyond it a grant
/// is answered "unreachable" and a lease left to expire.
const COMMAND_CAPACITY: usize = 4096;
const SCHEMA_LOCK_KEY: i64 = 0x4243_434F_4F52; // "BCCOOR"
const CHANNEL: &str = "bc_coordination";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bc_coordination_slots (
    cluster     TEXT    NOT NULL,
    slot        INTEGER NOT NULL,
    holder      TEXT,
    lease_until TIMESTAMPTZ,
    PRIMARY KEY (cluster, slot)
);
CREATE TABLE IF NOT EXISTS bc_coordination_rate (
    cluster TEXT        PRIMARY KEY,
    tat     TIMESTAMPTZ NOT NULL
);
-- One grant in one round trip: a free slot (skipping rows others hold locked), then the
-- rate token (GCRA: tat is the theoretical arrival time of the next call); a refused
-- token takes no slot. Returns the slot, or NULL and how long until a token (0 when
-- every slot is taken).
CREATE OR REPLACE FUNCTION bc_coordination_acquire(
    p_cluster TEXT, p_max_slot INTEGER, p_holder TEXT, p_lease_ms FLOAT8,
    p_interval_us FLOAT8, p_tolerance_us FLOAT8)
RETURNS TABLE (o_slot INTEGER, o_wait_us FLOAT8) LANGUAGE plpgsql AS $$
DECLARE
    v_now   TIMESTAMPTZ := clock_timestamp();
    v_slot  INTEGER;
    v_tat   TIMESTAMPTZ;
    v_ahead FLOAT8;
BEGIN
    SELECT s.slot INTO v_slot FROM bc_coordination_slots s
     WHERE s.cluster = p_cluster AND s.slot <= p_max_slot
       AND (s.holder IS NULL OR s.lease_until <= v_now)
     ORDER BY s.slot LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF v_slot IS NULL THEN
        RETURN QUERY SELECT NULL::INTEGER, 0::FLOAT8;
        RETURN;
    END IF;
    IF p_interval_us > 0 THEN
        SELECT r.tat INTO v_tat FROM bc_coordination_rate r
         WHERE r.cluster = p_cluster FOR UPDATE;
        v_ahead := EXTRACT(EPOCH FROM (v_tat - v_now)) * 1e6;
        IF v_ahead > p_tolerance_us THEN
            RETURN QUERY SELECT NULL::INTEGER, v_ahead - p_tolerance_us;
            RETURN;
        END IF;
        UPDATE bc_coordination_rate r
           SET tat = GREATEST(v_tat, v_now) + p_interval_us * interval '1 microsecond'
         WHERE r.cluster = p_cluster;
    END IF;
    UPDATE bc_coordination_slots s
       SET holder = p_holder, lease_until = v_now + p_lease_ms * interval '1 millisecond'
     WHERE s.cluster = p_cluster AND s.slot = v_slot;
    RETURN QUERY SELECT v_slot, 0::FLOAT8;
END $$;
";

const ACQUIRE: &str =
    "SELECT o_slot, o_wait_us FROM bc_coordination_acquire($1, $2, $3, $4, $5, $6)";
const RELEASE: &str = "WITH freed AS (
         UPDATE bc_coordination_slots SET holder = NULL, lease_until = NULL
         WHERE cluster = $1 AND slot = $2 AND holder = $3 RETURNING 1)
     SELECT pg_notify($4, $1) FROM freed";

/// A live connection and its statements, prepared once (one round trip per grant).
struct Connection {
    client: Client,
    acquire: Statement,
    release: Statement,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordination store URL: {0}")]
    Url(#[source] postgres::Error),
    #[error("starting the coordination thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the store said to a request for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A slot is leased to the caller: give it back with [`StoreClient::release`].
    Leased(Lease),
    /// Every slot is leased.
    Full,
    /// The shared rate allows the next call after this long.
    RateLimited(Duration),
    /// The store did not answer.
    Unreachable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub slot: i32,
    /// Unique per grant of this instance: the holder is `<instance>:<grant>`.
    pub grant: u64,
}

/// One cluster as the store knows it.
#[derive(Debug, Clone)]
pub struct ClusterShape {
    pub code: Arc<str>,
    pub max_concurrent: usize,
    pub rate: Option<Rate>,
    pub lease: Duration,
}

enum Command {
    Acquire {
        cluster: Arc<str>,
        grant: u64,
        reply: oneshot::Sender<Answer>,
    },
    Release {
        cluster: Arc<str>,
        lease: Lease,
    },
}

/// The actors' side of the store thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreClient {
    commands: SyncSender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("up", &self.is_up())
            .finish()
    }
}

struct Shared {
    up: AtomicBool,
    /// Callers waiting for a slot: while any, notifications are read often.
    waiting: AtomicUsize,
    wake: HashMap<Arc<str>, Arc<Notify>>,
    up_gauge: prometheus::IntGauge,
}

impl StoreClient {
    /// Starts the store thread for these clusters. Does not connect: the thread does,
    /// and retries with a back-off while the store is down (calls are granted locally
    /// meanwhile).
    pub fn start(
        url: &str,
        clusters: Vec<ClusterShape>,
        up_gauge: prometheus::IntGauge,
    ) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(StoreError::Url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
        if config.get_options().is_none() {
            config.options(STATEMENT_TIMEOUT_OPTION);
        }
        config.application_name("business-connector-coordination");
        let wake = clusters
            .iter()
            .map(|c| (c.code.clone(), Arc::new(Notify::new())))
            .collect();
        let shared = Arc::new(Shared {
            up: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            wake,
            up_gauge,
        });
        shared.up_gauge.set(0);
        let (commands, inbox) = mpsc::sync_channel(COMMAND_CAPACITY);
        let instance = instance_id();
        let driver = Driver {
            config,
            client: None,
            clusters: clusters.into_iter().map(|c| (c.code.clone(), c)).collect(),
            instance,
            shared: shared.clone(),
            failures: 0,
            retry_at: Instant::now(),
        };
        std::thread::Builder::new()
            .name("bc-coordination".into())
            .spawn(move || driver.run(inbox))
            .map_err(StoreError::Thread)?;
        Ok(Self { commands, shared })
    }

    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Asks for a slot and a rate token; `Unreachable` when the thread does not answer
    /// within `patience`.
    pub async fn acquire(&self, cluster: &Arc<str>, grant: u64, patience: Duration) -> Answer {
        let (reply, answer) = oneshot::channel();
        let command = Command::Acquire {
            cluster: cluster.clone(),
            grant,
            reply,
        };
        if self.commands.try_send(command).is_err() {
            return Answer::Unreachable;
        }
        match tokio::time::timeout(patience, answer).await {
            Ok(Ok(answer)) => answer,
            // A late lease is given back by the thread (the receiver is gone).
            _ => Answer::Unreachable,
        }
    }

    /// Gives a slot back (no answer awaited: an unreachable store lets it expire).
    pub fn release(&self, cluster: &Arc<str>, lease: Lease) {
        let _ = self.commands.try_send(Command::Release {
            cluster: cluster.clone(),
            lease,
        });
    }

    /// Woken when a slot of this cluster is given back by any instance.
    pub fn slot_freed(&self, cluster: &str) -> Option<Arc<Notify>> {
        self.shared.wake.get(cluster).cloned()
    }

    /// Marks a caller as waiting for a slot while the guard lives.
    pub fn waiting(&self) -> WaitingGuard {
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(self.shared.clone())
    }
}

pub struct WaitingGuard(Arc<Shared>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Distinguishes this process's leases from every other's.
fn instance_id() -> String {
    let random: u64 = rand::random();
    format!("{}-{random:016x}", std::process::id())
}

struct Driver {
    config: Config,
    client: Option<Connection>,
    clusters: HashMap<Arc<str>, ClusterShape>,
    instance: String,
    shared: Arc<Shared>,
    failures: u32,
    retry_at: Instant,
}

impl Driver {
    fn run(mut self, inbox: Receiver<Command>) {
        loop {
            if self.client.is_none() && Instant::now() >= self.retry_at {
                self.connect();
            }
            let waiting = self.shared.waiting.load(Ordering::Relaxed) > 0;
            if self.client.is_some() && waiting {
                // Someone waits for a slot: the commands at hand, then up to one tick
                // on the socket for a NOTIFY.
                loop {
                    match inbox.try_recv() {
                        Ok(command) => self.handle(command),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
                self.read_notifications(NOTIFICATION_TICK);
                continue;
            }
            let tick = match self.client {
                None => self
                    .retry_at
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_TICK),
                Some(_) => IDLE_TICK,
            };
            match inbox.recv_timeout(tick) {
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Nobody waits: only drain what has arrived.
            self.read_notifications(Duration::ZERO);
        }
    }

    fn connect(&mut self) {
        match self.open() {
            Ok(client) => {
                self.client = Some(client);
                self.failures = 0;
                self.set_up(true);
                tracing::info!("coordination store connected");
            }
            Err(error) => self.down(&error),
        }
    }

    fn open(&self) -> Result<Connection, postgres::Error> {
        let mut client = self.config.connect(NoTls)?;
        let mut transaction = client.transaction()?;
        transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])?;
        transaction.batch_execute(SCHEMA)?;
        for cluster in self.clusters.values() {
            let slots = i32::try_from(cluster.max_concurrent).unwrap_or(i32::MAX);
            transaction.execute(
                "INSERT INTO bc_coordination_slots (cluster, slot)
                 SELECT $1, generate_series(1, $2) ON CONFLICT DO NOTHING",
                &[&&*cluster.code, &slots],
            )?;
            transaction.execute(
                "INSERT INTO bc_coordination_rate (cluster, tat)
                 VALUES ($1, clock_timestamp()) ON CONFLICT DO NOTHING",
                &[&&*cluster.code],
            )?;
        }
        transaction.commit()?;
        client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        let acquire = client.prepare(ACQUIRE)?;
        let release = client.prepare(RELEASE)?;
        Ok(Connection {
            client,
            acquire,
            release,
        })
    }

    fn down(&mut self, error: &postgres::Error) {
        if self.client.take().is_some() || self.failures == 0 {
            // Once per outage; the message of a connection error carries no password.
            tracing::warn!(%error, "coordination store unreachable: granting locally");
        }
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Instant::now() + RECONNECT.delay(self.failures);
        self.set_up(false);
    }

    fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::Relaxed);
        self.shared.up_gauge.set(i64::from(up));
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Acquire {
                cluster,
                grant,
                reply,
            } => {
                let answer = self.acquire(&cluster, grant);
                if let Err(Answer::Leased(lease)) = reply.send(answer) {
                    // The caller stopped waiting: the slot goes straight back.
                    self.release(&cluster, lease);
                }
            }
            Command::Release { cluster, lease } => self.release(&cluster, lease),
        }
    }

    fn holder(&self, grant: u64) -> String {
        format!("{}:{grant}", self.instance)
    }

    fn acquire(&mut self, cluster: &str, grant: u64) -> Answer {
        let Some(shape) = self.clusters.get(cluster).cloned() else {
            return Answer::Unreachable;
        };
        let holder = self.holder(grant);
        let Some(connection) = self.client.as_mut() else {
            return Answer::Unreachable;
        };
        match try_acquire(connection, &shape, &holder, grant) {
            Ok(answer) => answer,
            Err(error) => {
                self.down(&error);
                Answer::Unreachable
            }
        }
    }

    fn release(&mut self, cluster: &str, lease: Lease) {
        let holder = self.holder(lease.grant);
        let Some(connection) = self.client.as_mut() else {
            return; // The lease expires by itself.
        };
        let released = connection.client.execute(
            &connection.release,
            &[&cluster, &lease.slot, &holder, &CHANNEL],
        );
        if let Err(error) = released {
            self.down(&error);
        }
    }

    /// Wakes the waiters of every cluster named in a NOTIFY that arrived, waiting up
    /// to `wait` for one. (The non-blocking `iter` only returns notifications already
    /// buffered; `timeout_iter` reads the socket.)
    fn read_notifications(&mut self, wait: Duration) {
        let Some(connection) = self.client.as_mut() else {
            return;
        };
        let client = &mut connection.client;
        let mut woken = Vec::new();
        let mut failed = None;
        {
            let mut notifications = client.notifications();
            let mut pending = notifications.timeout_iter(wait);
            loop {
                match pending.next() {
                    Ok(Some(notification)) => woken.push(notification.payload().to_string()),
                    Ok(None) => break,
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
        }
        for cluster in woken {
            if let Some(notify) = self.shared.wake.get(cluster.as_str()) {
                notify.notify_waiters();
            }
        }
        if let Some(error) = failed {
            self.down(&error);
        }
    }
}

/// One grant: `bc_coordination_acquire` in one round trip.
fn try_acquire(
    connection: &mut Connection,
    shape: &ClusterShape,
    holder: &str,
    grant: u64,
) -> Result<Answer, postgres::Error> {
    let code: &str = &shape.code;
    let max_slot = i32::try_from(shape.max_concurrent).unwrap_or(i32::MAX);
    let (interval_us, tolerance_us) = match shape.rate {
        Some(rate) => {
            let interval_us = 1e6 / f64::from(rate.per_second.get());
            (interval_us, interval_us * f64::from(rate.burst.get() - 1))
        }
        None => (0.0, 0.0),
    };
    let lease_ms = shape.lease.as_secs_f64() * 1e3;
    let row = connection.client.query_one(
        &connection.acquire,
        &[
            &code,
            &max_slot,
            &holder,
            &lease_ms,
            &interval_us,
            &tolerance_us,
        ],
    )?;
    let slot: Option<i32> = row.get(0);
    let wait_us: f64 = row.get::<_, Option<f64>>(1).unwrap_or(0.0);
    Ok(match slot {
        Some(slot) => Answer::Leased(Lease { slot, grant }),
        None if wait_us > 0.0 => {
            let wait = Duration::from_micros(wait_us.ceil() as u64);
            Answer::RateLimited(wait.max(Duration::from_millis(1)))
        }
        None => Answer::Full,
    })
}
