//! The [`History`] handle: recording off the request path, queries, shutdown.
//!
//! `record` puts the record on one of two bounded queues, its [`Lane`], and returns at
//! once. The kept lane holds every record the history must not lose (a login or logout,
//! a getuserdevices, anything CUCM answered): their volume is bounded by CUCM's own rate,
//! so that lane fills only when the database stops answering. The best-effort lane holds
//! getloggedinuser answers that never reached CUCM (cache hits, recorded only with
//! `record_cache_hits`, and refusals): the most frequent requests by far, which a
//! saturated machine may drop. A flood on one lane never takes the other's room, and the
//! writer empties the kept lane before each best-effort batch. A full lane drops the
//! record and counts it (`bc_history_dropped_total{lane}`): recording never slows or
//! fails a request. One writer thread, at the normal CPU priority, empties the queues
//! every `WRITE_INTERVAL`, or sooner when a lane is half full, and writes what it took in
//! transactions of up to `BATCH_MAX_RECORDS`. It is never woken per record: on a busy gateway a wake-up per
//! record (a futex call and a context switch, often on the core that serves requests)
//! cost more than the insert itself. It purges records older than `retention_days` in
//! small chunks. Queries use their own connection, so they never wait for the writer.
//!
//! The writer connects to its store itself (a PostgreSQL client must not be used on an
//! async executor thread). While the store is unreachable, at start or later, records
//! wait in the queue, the writer reconnects with back-off (`link`), `bc_history_store_up`
//! is 0 and `query` fails at once with [`HistoryError::StoreDown`]; when the store is back
//! the records that waited are written. Only what overflows the queue is dropped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::HistoryConfig;
use crate::filter::Filter;
use crate::link::StoreLink;
use crate::postgres::PostgresStore;
use crate::record::{
    truncate_at_char_boundary, Operation, Record, Source, UtcMillis, MAX_FIELD_BYTES,
};
use crate::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Most records written in one transaction: big transactions amortize the commit and
/// the index pages they touch, and one still takes well under a second.
pub const BATCH_MAX_RECORDS: usize = 20_000;
/// How often the writer empties the queue when it is less than half full: the longest a
/// record waits before it can be queried (plus the write itself).
pub const WRITE_INTERVAL: Duration = Duration::from_millis(500);
/// Control messages (flush, pause, shutdown, the half-full doorbell) waiting at once.
const CONTROL_CAPACITY: usize = 64;
/// How often the retention purge runs (also once at start).
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Rows deleted per purge step; between steps the writer writes what has queued up.
const PURGE_CHUNK_ROWS: u32 = 10_000;
/// At most one "dropped" warning (and one "write failed" warning) per this interval:
/// a stalled database must not turn into a log storm on top.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// How long `pause_writer` waits for the writer to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Polling step while waiting for queue space or the writer's exit.
const POLL_STEP: Duration = Duration::from_millis(2);
/// How long `open` waits for the writer's first connect, so a reachable store is up
/// before the gateway announces itself; an unreachable one does not hold the start.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history database: {0}")]
    Store(#[from] StoreError),
    #[error("starting the history writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the history writer did not {0} in time")]
    Timeout(&'static str),
    #[error("the history writer has stopped")]
    Stopped,
    #[error("the history database is unreachable (records wait in the queue until it is back)")]
    StoreDown,
}

/// Which queue a record waits on, and so whether a saturated machine may drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Never dropped while the store works: logins and logouts (force and PIN logins
    /// included), getuserdevices, and every request CUCM answered. CUCM's own rate
    /// bounds how many there are.
    Kept,
    /// A getloggedinuser that never reached CUCM: a cache hit (recorded only with
    /// `record_cache_hits`) or a refusal. Dropped, and counted, when its lane is full.
    BestEffort,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Kept, Lane::BestEffort];

    /// The lane a record of `operation` answered by `source` goes to.
    pub fn of(operation: Operation, source: Source) -> Lane {
        match (operation, source) {
            (Operation::GetLoggedInUser, Source::Cache | Source::Gateway) => Lane::BestEffort,
            _ => Lane::Kept,
        }
    }

    /// The `lane` label of `bc_history_dropped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Kept => "kept",
            Lane::BestEffort => "best_effort",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Kept => 0,
            Lane::BestEffort => 1,
        }
    }
}

/// The history's series, made by the caller so they live in the gateway's registry.
#[derive(Clone, Debug)]
pub struct HistoryMetrics {
    /// `bc_history_dropped_total{lane}`: records not written (lane full, writer stopped,
    /// or their batch failed), by [`Lane`]. Both series exist from the start.
    pub dropped: IntCounterVec,
    /// `bc_history_written_total`: records committed to the database.
    pub written: IntCounter,
    /// `bc_history_store_up`: 0 while the writer cannot reach the database (records
    /// wait in the queue meanwhile, it reconnects), else 1 (the gateway also sets 1 when
    /// recording is off: there is nothing to wait for).
    pub store_up: IntGauge,
}

impl HistoryMetrics {
    /// Create both counters and register them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered()?;
        metrics.register_in(registry)?;
        Ok(metrics)
    }

    /// Register these (existing) counters in `registry` too.
    pub fn register_in(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.dropped.clone()))?;
        registry.register(Box::new(self.written.clone()))?;
        registry.register(Box::new(self.store_up.clone()))?;
        Ok(())
    }

    /// Both counters, in no registry (tests, tools).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "bc_history_dropped_total",
                "History records dropped: lane full, writer stopped, or a failed write; \
                 lane=kept should stay 0 while the database works",
            ),
            &["lane"],
        )?;
        for lane in Lane::ALL {
            dropped.with_label_values(&[lane.as_str()]);
        }
        Ok(Self {
            dropped,
            written: IntCounter::new(
                "bc_history_written_total",
                "History records written to the database",
            )?,
            store_up: IntGauge::new(
                "bc_history_store_up",
                "0 while the history database is unreachable and records wait for it, else 1",
            )?,
        })
    }

    /// Records of `lane` dropped so far.
    pub fn dropped_from(&self, lane: Lane) -> u64 {
        self.dropped.with_label_values(&[lane.as_str()]).get()
    }

    /// Records dropped so far, both lanes.
    pub fn dropped_total(&self) -> u64 {
        Lane::ALL.iter().map(|lane| self.dropped_from(*lane)).sum()
    }

    fn count_dropped(&self, lane: Lane, count: u64) {
        self.dropped
            .with_label_values(&[lane.as_str()])
            .inc_by(count);
    }
}

/// What wakes the writer. Records travel on their own queue, which the writer only
/// empties (never waits on), so recording a request wakes no thread.
enum Control {
    /// A record lane is half full: write now rather than at the next interval.
    Write,
    /// Write everything queued before this, then acknowledge.
    Flush(SyncSender<()>),
    /// Write what is queued, acknowledge on `parked`, then wait until `resume`'s sender
    /// is dropped (tests: a stalled database).
    Pause {
        parked: SyncSender<()>,
        resume: Receiver<()>,
    },
    /// Write everything queued before this, then exit.
    Shutdown,
}

/// While this guard lives the writer is parked, as if the database had stalled: the queue
/// fills and `record` starts dropping. Dropping the guard resumes the writer.
#[must_use = "the writer resumes when the guard is dropped"]
pub struct WriterPause {
    _resume: SyncSender<()>,
}

/// The gateway's history. Share it (`Arc<History>`); every method takes `&self`.
pub struct History {
    /// One queue per [`Lane`], in `Lane::index` order.
    lanes: [SyncSender<Record>; 2],
    control: SyncSender<Control>,
    /// Records on each lane, counted before they are sent (so never below the truth).
    queued: Arc<[AtomicUsize; 2]>,
    /// At this many queued records in one lane the writer is woken early.
    write_early_at: usize,
    /// `[history] record_cache_hits`.
    record_cache_hits: bool,
    reader: Mutex<Box<dyn Store>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: HistoryMetrics,
    drop_warning: RateLimitedWarning,
    instance: String,
    /// Taken by the first `wait_for_first_connect`.
    first_connect_done: Mutex<Option<Receiver<()>>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl History {
    /// Open the database named by `config` (PostgreSQL when `url` is set, else the SQLite
    /// file), create its schema, and start the writer thread. An SQLite file that cannot
    /// be opened fails here: a wrong `[history] path` should stop the start, not lose
    /// every record silently. A PostgreSQL database is a remote service: only a
    /// malformed URL fails; an unreachable server is retried by the writer (see the
    /// module doc). Blocks for at most `FIRST_CONNECT_WAIT` (call it off async threads).
    pub fn open(config: &HistoryConfig, metrics: HistoryMetrics) -> Result<History, HistoryError> {
        let (writer_store, reader): (Box<dyn Store>, Box<dyn Store>) = match &config.url {
            Some(url) => (
                Box::new(PostgresStore::new(url)?),
                Box::new(PostgresStore::new_read_only(url)?),
            ),
            None => {
                // The writer first: it creates the file and schema the reader needs.
                let writer = SqliteStore::open(&config.path)?;
                let reader = SqliteStore::open_read_only(&config.path)?;
                (Box::new(writer), Box::new(reader))
            }
        };
        Self::start(writer_store, reader, config, metrics)
    }

    /// Like `open`, with stores made by the caller (another backend, or a test double).
    pub fn with_stores(
        writer_store: Box<dyn Store>,
        reader: Box<dyn Store>,
        config: &HistoryConfig,
        metrics: HistoryMetrics,
    ) -> Result<History, HistoryError> {
        Self::start(writer_store, reader, config, metrics)
    }

    fn start(
        writer_store: Box<dyn Store>,
        reader: Box<dyn Store>,
        config: &HistoryConfig,
        metrics: HistoryMetrics,
    ) -> Result<History, HistoryError> {
        let history =
            Self::start_with_interval(writer_store, reader, config, metrics, WRITE_INTERVAL)?;
        history.wait_for_first_connect(FIRST_CONNECT_WAIT);
        Ok(history)
    }

    fn start_with_interval(
        writer_store: Box<dyn Store>,
        reader: Box<dyn Store>,
        config: &HistoryConfig,
        metrics: HistoryMetrics,
        write_interval: Duration,
    ) -> Result<History, HistoryError> {
        // sync_channel(0) would be a rendezvous: every record dropped, the writer never
        // waiting on this queue.
        let capacity = config.queue_capacity.max(1);
        let (kept, kept_queue) = mpsc::sync_channel(capacity);
        let (best_effort, best_effort_queue) = mpsc::sync_channel(capacity);
        let (control, control_queue) = mpsc::sync_channel(CONTROL_CAPACITY);
        let queued = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (first_connect, first_connect_done) = mpsc::sync_channel(1);
        metrics.store_up.set(0);
        let writer = Writer {
            store: writer_store,
            link: StoreLink::new(Instant::now()),
            first_connect: Some(first_connect),
            lanes: [kept_queue, best_effort_queue],
            control: control_queue,
            queued: queued.clone(),
            pending: [Vec::new(), Vec::new()],
            write_interval,
            metrics: metrics.clone(),
            retention_days: config.retention_days,
            failure_warning: RateLimitedWarning::new(WARNING_INTERVAL),
            capacity,
        };
        let handle = std::thread::Builder::new()
            .name("history-writer".to_string())
            .spawn(move || writer.run())
            .map_err(HistoryError::Spawn)?;
        let mut instance = config.instance_name();
        truncate_at_char_boundary(&mut instance, MAX_FIELD_BYTES);
        Ok(History {
            lanes: [kept, best_effort],
            control,
            queued,
            write_early_at: (capacity / 2).max(1),
            record_cache_hits: config.record_cache_hits,
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(handle)),
            metrics,
            drop_warning: RateLimitedWarning::new(WARNING_INTERVAL),
            instance,
            first_connect_done: Mutex::new(Some(first_connect_done)),
        })
    }

    /// Wait (at most `timeout`) until the writer's first connect attempt has ended,
    /// whatever its outcome.
    fn wait_for_first_connect(&self, timeout: Duration) {
        if let Some(done) = lock(&self.first_connect_done).take() {
            let _ = done.recv_timeout(timeout);
        }
    }

    /// Whether the writer can reach the database now (`bc_history_store_up`).
    pub fn store_up(&self) -> bool {
        self.metrics.store_up.get() == 1
    }

    /// Whether a request of `operation` answered by `source` is recorded: everything but
    /// a getloggedinuser answered from the cache, unless `record_cache_hits`. Ask before
    /// building a record, so that an unrecorded cache hit costs nothing.
    pub fn wants(&self, operation: Operation, source: Source) -> bool {
        self.record_cache_hits
            || !(operation == Operation::GetLoggedInUser && source == Source::Cache)
    }

    /// Queue `record` for writing on its [`Lane`]. Never blocks and never fails: when the
    /// lane is full (or the writer has stopped) the record is dropped and counted. A
    /// record [`wants`](Self::wants) refuses is ignored. Strings are cut to their bounds
    /// and `instance` is set to this instance's name.
    pub fn record(&self, mut record: Record) {
        if !self.wants(record.operation, record.source) {
            return;
        }
        let lane = Lane::of(record.operation, record.source);
        record.instance.clone_from(&self.instance);
        record.bound();
        let queued = &self.queued[lane.index()];
        let now_queued = queued.fetch_add(1, Ordering::Relaxed) + 1;
        let why = match self.lanes[lane.index()].try_send(record) {
            Ok(()) => {
                if now_queued == self.write_early_at {
                    // Best effort: a full control queue already holds a reason to wake.
                    let _ = self.control.try_send(Control::Write);
                }
                return;
            }
            Err(TrySendError::Full(_)) => "queue full",
            Err(TrySendError::Disconnected(_)) => "writer stopped",
        };
        queued.fetch_sub(1, Ordering::Relaxed);
        self.metrics.count_dropped(lane, 1);
        if self.drop_warning.due() {
            tracing::warn!(
                reason = why,
                lane = lane.as_str(),
                dropped_total = self.metrics.dropped_total(),
                "history record dropped (further drops are counted, logged at most every {}s)",
                WARNING_INTERVAL.as_secs()
            );
        }
    }

    /// The records `filter` selects, newest first. Blocking (a database round trip):
    /// from async code call it through `spawn_blocking` / `actix_web::web::block`.
    /// Queries share one read connection, one at a time.
    /// While the writer cannot reach the database this fails at once with
    /// [`HistoryError::StoreDown`] instead of waiting for a connect timeout.
    pub fn query(&self, filter: &Filter) -> Result<Vec<Record>, HistoryError> {
        if !self.store_up() {
            return Err(HistoryError::StoreDown);
        }
        Ok(lock(&self.reader).query(filter)?)
    }

    /// Wait until everything recorded before this call is written (or failed and was
    /// counted), at most `timeout`. While the database is unreachable it returns at once:
    /// the records keep waiting in the queue.
    pub fn flush(&self, timeout: Duration) -> Result<(), HistoryError> {
        let deadline = Instant::now() + timeout;
        let (done, done_receiver) = mpsc::sync_channel(1);
        self.send_control(Control::Flush(done), deadline)?;
        done_receiver
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| HistoryError::Timeout("flush"))
    }

    /// Write everything queued and stop the writer, waiting at most `timeout` (the
    /// gateway calls this on SIGTERM). A database still unreachable gets one more
    /// connect attempt; what cannot be written then is dropped, counted and logged.
    /// Records recorded afterwards are dropped and counted. Calling it again returns at
    /// once.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), HistoryError> {
        let deadline = Instant::now() + timeout;
        let Some(handle) = lock(&self.writer).take() else {
            return Ok(());
        };
        match self.send_control(Control::Shutdown, deadline) {
            Ok(()) | Err(HistoryError::Stopped) => {}
            Err(error) => {
                *lock(&self.writer) = Some(handle);
                return Err(error);
            }
        }
        // JoinHandle::join cannot time out; poll is_finished instead.
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                *lock(&self.writer) = Some(handle);
                return Err(HistoryError::Timeout("shut down"));
            }
            std::thread::sleep(POLL_STEP);
        }
        // The writer never panics by design; if it did, its records are lost either way.
        if handle.join().is_err() {
            tracing::error!("the history writer thread panicked");
        }
        Ok(())
    }

    /// Test hook: park the writer, as if the database had stalled, until the returned
    /// guard is dropped. Not for production use.
    #[doc(hidden)]
    pub fn pause_writer(&self) -> Result<WriterPause, HistoryError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let (parked, parked_receiver) = mpsc::sync_channel(1);
        let (resume, resume_receiver) = mpsc::sync_channel(1);
        self.send_control(
            Control::Pause {
                parked,
                resume: resume_receiver,
            },
            deadline,
        )?;
        parked_receiver
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| HistoryError::Timeout("pause"))?;
        Ok(WriterPause { _resume: resume })
    }

    /// The counters this history updates.
    pub fn metrics(&self) -> &HistoryMetrics {
        &self.metrics
    }

    /// Control messages wait for space until `deadline` rather than dropping. The writer
    /// empties the record queue after taking one, so "flush" covers every record sent
    /// before it.
    fn send_control(&self, message: Control, deadline: Instant) -> Result<(), HistoryError> {
        let mut message = message;
        loop {
            match self.control.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(HistoryError::Stopped),
                Err(TrySendError::Full(returned)) => {
                    if Instant::now() >= deadline {
                        return Err(HistoryError::Timeout("accept a control message"));
                    }
                    message = returned;
                    std::thread::sleep(POLL_STEP);
                }
            }
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (a
/// connection, a join handle) is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Writer {
    store: Box<dyn Store>,
    /// Up, or down until the next reconnect attempt.
    link: StoreLink,
    /// Told once the first connect attempt has ended (`History::open` waits for it).
    first_connect: Option<SyncSender<()>>,
    /// One queue per [`Lane`], in `Lane::index` order.
    lanes: [Receiver<Record>; 2],
    control: Receiver<Control>,
    queued: Arc<[AtomicUsize; 2]>,
    /// Per lane, records taken from its queue and not yet written: reused between
    /// writes, and kept across an outage so a batch that failed is written when the
    /// store is back.
    pending: [Vec<Record>; 2],
    /// `WRITE_INTERVAL`, or longer in tests.
    write_interval: Duration,
    metrics: HistoryMetrics,
    retention_days: u32,
    failure_warning: RateLimitedWarning,
    /// The record queue's capacity (for the log lines).
    capacity: usize,
}

impl Writer {
    fn run(mut self) {
        self.try_connect();
        if let Some(done) = self.first_connect.take() {
            let _ = done.send(());
        }
        let mut next_write = Instant::now() + self.write_interval;
        let mut next_purge = (self.retention_days > 0).then(Instant::now);
        loop {
            let now = Instant::now();
            if now >= next_write || self.link.attempt_due(now) {
                self.write_queued();
                next_write = Instant::now() + self.write_interval;
            }
            if next_purge.is_some_and(|due| now >= due) && self.link.is_up() {
                next_purge = self.purge_step();
            }
            let mut wake_at = next_purge.map_or(next_write, |purge| purge.min(next_write));
            if let Some(retry_at) = self.link.retry_at() {
                wake_at = wake_at.min(retry_at);
            }
            match self
                .control
                .recv_timeout(wake_at.saturating_duration_since(Instant::now()))
            {
                Ok(Control::Write) => {
                    self.write_queued();
                    next_write = Instant::now() + self.write_interval;
                }
                Ok(Control::Flush(done)) => {
                    self.write_queued();
                    let _ = done.send(());
                }
                Ok(Control::Pause { parked, resume }) => {
                    self.write_queued();
                    let _ = parked.send(());
                    // Returns Err once the guard (the only sender) is dropped.
                    let _ = resume.recv();
                }
                Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.final_write();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Connect when the store is down and an attempt is due; true when it is up.
    fn connected(&mut self) -> bool {
        if self.link.attempt_due(Instant::now()) {
            self.try_connect();
        }
        self.link.is_up()
    }

    fn try_connect(&mut self) {
        match self.store.connect() {
            Ok(()) => {
                if let Some(down_for) = self.link.connected(Instant::now()) {
                    self.metrics.store_up.set(1);
                    let waiting = self.queued_in(Lane::Kept)
                        + self.queued_in(Lane::BestEffort)
                        + self.pending.iter().map(Vec::len).sum::<usize>();
                    if waiting > 0 || down_for > FIRST_CONNECT_WAIT {
                        tracing::info!(
                            down_ms = u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX),
                            waiting,
                            "history database reachable again; writing the records that waited"
                        );
                    }
                }
            }
            Err(error) => self.store_failed(&error),
        }
    }

    /// The store cannot be reached: records wait, the writer retries with back-off.
    fn store_failed(&mut self, error: &StoreError) {
        let went_down = self.link.failed(Instant::now());
        self.metrics.store_up.set(0);
        if went_down || self.failure_warning.due() {
            let retry_in = self.link.retry_at().map_or(0, |at| {
                at.saturating_duration_since(Instant::now()).as_millis()
            });
            tracing::warn!(
                %error,
                queue_capacity = self.capacity,
                retry_in_ms = u64::try_from(retry_in).unwrap_or(u64::MAX),
                "history database unreachable: records wait in their queues (beyond their \
                 capacity they are dropped and counted); reconnecting with back-off"
            );
        }
    }

    /// Write what is on the lanes now, in transactions of at most `BATCH_MAX_RECORDS`:
    /// the kept lane is emptied before every best-effort batch, so a flood of cache hits
    /// delays a login record by one batch at most. Only what was queued on entry: a flood
    /// faster than the database must not keep the writer from its control messages (a
    /// flush or shutdown waiting) for ever. While the store is down nothing is taken:
    /// the records wait on their lanes.
    fn write_queued(&mut self) {
        if !self.connected() {
            return;
        }
        let mut best_effort_budget = self.queued_in(Lane::BestEffort).max(1);
        loop {
            if !self.write_all_queued(Lane::Kept) {
                return;
            }
            let Some(taken) =
                self.write_one_batch(Lane::BestEffort, best_effort_budget.min(BATCH_MAX_RECORDS))
            else {
                return;
            };
            best_effort_budget = best_effort_budget.saturating_sub(taken);
            if taken == 0 || best_effort_budget == 0 {
                break;
            }
        }
        // What came to the kept lane during the last best-effort batch.
        self.write_all_queued(Lane::Kept);
    }

    /// Write what `lane` holds now, in as many batches as it takes; false when the
    /// store went down meanwhile.
    fn write_all_queued(&mut self, lane: Lane) -> bool {
        let mut budget = self.queued_in(lane).max(1);
        while budget > 0 {
            match self.write_one_batch(lane, budget.min(BATCH_MAX_RECORDS)) {
                None => return false,
                Some(0) => break,
                Some(taken) => budget = budget.saturating_sub(taken),
            }
        }
        true
    }

    fn queued_in(&self, lane: Lane) -> usize {
        self.queued[lane.index()].load(Ordering::Relaxed)
    }

    /// Take up to `max` records from `lane` (after those of it that waited for the
    /// store) and write them in one transaction; returns how many were taken from the
    /// queue, or None when the store turned out to be down (the batch waits for it).
    fn write_one_batch(&mut self, lane: Lane, max: usize) -> Option<usize> {
        let mut batch = std::mem::take(&mut self.pending[lane.index()]);
        let queue = &self.lanes[lane.index()];
        let mut taken = 0;
        while batch.len() < max {
            match queue.try_recv() {
                Ok(record) => {
                    batch.push(record);
                    taken += 1;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        self.queued[lane.index()].fetch_sub(taken, Ordering::Relaxed);
        let written = self.write(lane, &mut batch);
        self.pending[lane.index()] = batch;
        written.then_some(taken)
    }

    /// Write `batch`; false when the store turned out to be down (the batch is kept for
    /// the next attempt). A batch refused for any other reason is dropped and counted.
    fn write(&mut self, lane: Lane, batch: &mut Vec<Record>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let count = batch.len() as u64;
        match self.store.write_batch(batch) {
            Ok(()) => {
                self.metrics.written.inc_by(count);
                self.link.wrote();
            }
            Err(error) if error.is_unavailable() => {
                self.store_failed(&error);
                return false;
            }
            Err(error) => {
                self.metrics.count_dropped(lane, count);
                if self.failure_warning.due() {
                    tracing::warn!(
                        %error,
                        records = count,
                        "history batch not written; its records are dropped \
                         (further failures logged at most every {}s)",
                        WARNING_INTERVAL.as_secs()
                    );
                }
            }
        }
        batch.clear();
        true
    }

    /// On shutdown: a store still down gets one more attempt at once, then whatever
    /// could not be written is counted as dropped and logged.
    fn final_write(&mut self) {
        if !self.link.is_up() {
            self.try_connect();
        }
        self.write_queued();
        let mut lost = 0;
        for lane in Lane::ALL {
            let mut lost_here = std::mem::take(&mut self.pending[lane.index()]).len();
            while self.lanes[lane.index()].try_recv().is_ok() {
                self.queued[lane.index()].fetch_sub(1, Ordering::Relaxed);
                lost_here += 1;
            }
            self.metrics.count_dropped(lane, lost_here as u64);
            lost += lost_here;
        }
        if lost > 0 {
            let reason = if self.link.is_up() {
                "more were queued than one final write takes"
            } else {
                "the history database is unreachable"
            };
            tracing::error!(
                records = lost,
                reason,
                "history records not written at shutdown"
            );
        }
    }

    /// Delete one chunk of expired records; returns when the next step is due: at once
    /// while chunks come back full, else after `PURGE_INTERVAL`.
    fn purge_step(&mut self) -> Option<Instant> {
        let cutoff = UtcMillis::now().minus_days(self.retention_days);
        match self.store.purge_older_than(cutoff, PURGE_CHUNK_ROWS) {
            Ok(deleted) if deleted >= u64::from(PURGE_CHUNK_ROWS) => Some(Instant::now()),
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::info!(
                        deleted,
                        retention_days = self.retention_days,
                        "history purged"
                    );
                }
                Some(Instant::now() + PURGE_INTERVAL)
            }
            Err(error) => {
                tracing::warn!(%error, "history retention purge failed; retrying later");
                Some(Instant::now() + PURGE_INTERVAL)
            }
        }
    }
}

/// "Log this at most once per interval", shared by threads without a lock.
struct RateLimitedWarning {
    started: Instant,
    interval_ms: u64,
    /// Milliseconds since `started`, plus one, of the last warning; 0 = never.
    last_ms_plus_one: AtomicU64,
}

impl RateLimitedWarning {
    fn new(interval: Duration) -> Self {
        Self {
            started: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms_plus_one: AtomicU64::new(0),
        }
    }

    /// True for the first call, then for the first call after each interval; exactly one
    /// of several racing threads wins.
    fn due(&self) -> bool {
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_ms_plus_one.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            return false;
        }
        self.last_ms_plus_one
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_is_due_once_per_interval() {
        let warning = RateLimitedWarning::new(Duration::from_millis(200));
        assert!(warning.due());
        assert!(!warning.due());
        assert!(!warning.due());
        std::thread::sleep(Duration::from_millis(250));
        assert!(warning.due());
        assert!(!warning.due());
    }

    #[test]
    fn a_half_full_queue_is_written_before_the_interval() {
        let directory = tempfile::tempdir().expect("temp dir");
        let config = HistoryConfig {
            path: directory.path().join("history.sqlite"),
            queue_capacity: 100,
            retention_days: 0,
            ..HistoryConfig::default()
        };
        let writer = SqliteStore::open(&config.path).expect("writer");
        let reader = SqliteStore::open_read_only(&config.path).expect("reader");
        let metrics = HistoryMetrics::unregistered().expect("metrics");
        // An interval no test waits for: only the doorbell can get these written.
        let history = History::start_with_interval(
            Box::new(writer),
            Box::new(reader),
            &config,
            metrics.clone(),
            Duration::from_secs(3600),
        )
        .expect("history");
        for _ in 0..50 {
            history.record(Record::new(Operation::Login, 0, Source::Cucm));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.written.get() < 50 && Instant::now() < deadline {
            std::thread::sleep(POLL_STEP);
        }
        assert_eq!(metrics.written.get(), 50);
        assert_eq!(metrics.dropped_total(), 0);
        history.shutdown(Duration::from_secs(5)).expect("shutdown");
    }

    /// A store that is down while `down` is set: connect and writes fail as unavailable.
    struct FlakyStore {
        down: Arc<std::sync::atomic::AtomicBool>,
        rows: Arc<AtomicUsize>,
    }

    impl Store for FlakyStore {
        fn connect(&mut self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            Ok(())
        }
        fn write_batch(&mut self, records: &[Record]) -> Result<(), StoreError> {
            self.connect()?;
            self.rows.fetch_add(records.len(), Ordering::SeqCst);
            Ok(())
        }
        fn query(&mut self, _filter: &Filter) -> Result<Vec<Record>, StoreError> {
            Ok(Vec::new())
        }
        fn purge_older_than(&mut self, _cutoff: UtcMillis, _max: u32) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(POLL_STEP);
        }
    }

    #[test]
    fn records_wait_while_the_store_is_down_and_are_written_once_it_is_back() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let rows = Arc::new(AtomicUsize::new(0));
        let store = || FlakyStore {
            down: down.clone(),
            rows: rows.clone(),
        };
        let config = HistoryConfig {
            queue_capacity: 1000,
            retention_days: 0,
            ..HistoryConfig::default()
        };
        let metrics = HistoryMetrics::unregistered().expect("metrics");
        let history = History::start_with_interval(
            Box::new(store()),
            Box::new(store()),
            &config,
            metrics.clone(),
            Duration::from_millis(20),
        )
        .expect("history");
        history.wait_for_first_connect(Duration::from_secs(5));
        // Down at start: nothing written, nothing dropped, queries refused at once.
        assert!(!history.store_up());
        let record = || {
            Record::new(
                crate::record::Operation::Login,
                0,
                crate::record::Source::Cucm,
            )
        };
        for _ in 0..10 {
            history.record(record());
        }
        history.flush(Duration::from_secs(5)).expect("flush");
        assert_eq!((metrics.written.get(), metrics.dropped_total()), (0, 0));
        assert!(matches!(
            history.query(&Filter::default()),
            Err(HistoryError::StoreDown)
        ));
        // Back: the ten that waited are written.
        down.store(false, Ordering::SeqCst);
        wait_for("the waiting records are written", || {
            metrics.written.get() == 10
        });
        assert!(history.store_up());
        // Down in the middle: the failed batch is kept and written after the outage.
        down.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            history.record(record());
        }
        wait_for("the writer notices", || !history.store_up());
        down.store(false, Ordering::SeqCst);
        wait_for("the batch that failed is written", || {
            metrics.written.get() == 15
        });
        assert_eq!(metrics.dropped_total(), 0);
        assert_eq!(rows.load(Ordering::SeqCst), 15);
        history.shutdown(Duration::from_secs(5)).expect("shutdown");
    }

    #[test]
    fn a_store_still_down_at_shutdown_counts_what_waited_as_dropped() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let rows = Arc::new(AtomicUsize::new(0));
        let store = || FlakyStore {
            down: down.clone(),
            rows: rows.clone(),
        };
        let metrics = HistoryMetrics::unregistered().expect("metrics");
        let history = History::with_stores(
            Box::new(store()),
            Box::new(store()),
            &HistoryConfig::default(),
            metrics.clone(),
        )
        .expect("history");
        for _ in 0..3 {
            history.record(Record::new(
                crate::record::Operation::Logout,
                0,
                crate::record::Source::Cucm,
            ));
        }
        history.shutdown(Duration::from_secs(5)).expect("shutdown");
        assert_eq!((metrics.written.get(), metrics.dropped_total()), (0, 3));
    }

    #[test]
    fn only_getloggedinuser_that_never_reached_cucm_is_best_effort() {
        // Observed changes (sources poll and query) are kept like every change.
        for operation in Operation::ALL {
            for source in Source::ALL {
                let expected = if operation == Operation::GetLoggedInUser
                    && matches!(source, Source::Cache | Source::Gateway)
                {
                    Lane::BestEffort
                } else {
                    Lane::Kept
                };
                assert_eq!(
                    Lane::of(operation, source),
                    expected,
                    "{operation} {source}"
                );
            }
        }
    }

    #[test]
    fn metrics_register_under_their_names() {
        let registry = Registry::new();
        let metrics = HistoryMetrics::register(&registry).expect("register");
        metrics.count_dropped(Lane::Kept, 1);
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        assert!(
            names.contains(&"bc_history_dropped_total".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"bc_history_written_total".to_string()),
            "{names:?}"
        );
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encode");
        assert!(
            text.contains("bc_history_dropped_total{lane=\"best_effort\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("bc_history_dropped_total{lane=\"kept\"} 1"),
            "{text}"
        );
    }
}
