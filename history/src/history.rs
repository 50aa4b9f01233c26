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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::config::HistoryConfig;
use crate::filter::Filter;
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
    /// file), create its schema, and start the writer thread. Fails when the database
    /// cannot be opened: a wrong `[history]` setting should stop the start, not lose
    /// every record silently.
    pub fn open(config: &HistoryConfig, metrics: HistoryMetrics) -> Result<History, HistoryError> {
        let (writer_store, reader): (Box<dyn Store>, Box<dyn Store>) = match &config.url {
            Some(url) => (
                Box::new(PostgresStore::connect(url)?),
                Box::new(PostgresStore::connect_read_only(url)?),
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
        Self::start_with_interval(writer_store, reader, config, metrics, WRITE_INTERVAL)
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
        let writer = Writer {
            store: writer_store,
            lanes: [kept_queue, best_effort_queue],
            control: control_queue,
            queued: queued.clone(),
            batch: Vec::new(),
            write_interval,
            metrics: metrics.clone(),
            retention_days: config.retention_days,
            failure_warning: RateLimitedWarning::new(WARNING_INTERVAL),
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
        })
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
    pub fn query(&self, filter: &Filter) -> Result<Vec<Record>, HistoryError> {
        Ok(lock(&self.reader).query(filter)?)
    }

    /// Wait until everything recorded before this call is written (or failed and was
    /// counted), at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), HistoryError> {
        let deadline = Instant::now() + timeout;
        let (done, done_receiver) = mpsc::sync_channel(1);
        self.send_control(Control::Flush(done), deadline)?;
        done_receiver
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| HistoryError::Timeout("flush"))
    }

    /// Write everything queued and stop the writer, waiting at most `timeout` (the
    /// gateway calls this on SIGTERM). Records recorded afterwards are dropped and
    /// counted. Calling it again returns at once.
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
    /// One queue per [`Lane`], in `Lane::index` order.
    lanes: [Receiver<Record>; 2],
    control: Receiver<Control>,
    queued: Arc<[AtomicUsize; 2]>,
    /// Reused between writes.
    batch: Vec<Record>,
    /// `WRITE_INTERVAL`, or longer in tests.
    write_interval: Duration,
    metrics: HistoryMetrics,
    retention_days: u32,
    failure_warning: RateLimitedWarning,
}

impl Writer {
    fn run(mut self) {
        let mut next_write = Instant::now() + self.write_interval;
        let mut next_purge = (self.retention_days > 0).then(Instant::now);
        loop {
            let now = Instant::now();
            if now >= next_write {
                self.write_queued();
                next_write = Instant::now() + self.write_interval;
            }
            if next_purge.is_some_and(|due| now >= due) {
                next_purge = self.purge_step();
            }
            let wake_at = next_purge.map_or(next_write, |purge| purge.min(next_write));
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
                    self.write_queued();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Write what is on the lanes now, in transactions of at most `BATCH_MAX_RECORDS`:
    /// the kept lane is emptied before every best-effort batch, so a flood of cache hits
    /// delays a login record by one batch at most. Only what was queued on entry: a flood
    /// faster than the database must not keep the writer from its control messages (a
    /// flush or shutdown waiting) for ever.
    fn write_queued(&mut self) {
        let mut best_effort_budget = self.queued_in(Lane::BestEffort).max(1);
        loop {
            self.write_all_queued(Lane::Kept);
            let taken =
                self.write_one_batch(Lane::BestEffort, best_effort_budget.min(BATCH_MAX_RECORDS));
            best_effort_budget = best_effort_budget.saturating_sub(taken);
            if taken == 0 || best_effort_budget == 0 {
                break;
            }
        }
        // What came to the kept lane during the last best-effort batch.
        self.write_all_queued(Lane::Kept);
    }

    /// Write what `lane` holds now, in as many batches as it takes.
    fn write_all_queued(&mut self, lane: Lane) {
        let mut budget = self.queued_in(lane).max(1);
        while budget > 0 {
            let taken = self.write_one_batch(lane, budget.min(BATCH_MAX_RECORDS));
            if taken == 0 {
                break;
            }
            budget = budget.saturating_sub(taken);
        }
    }

    fn queued_in(&self, lane: Lane) -> usize {
        self.queued[lane.index()].load(Ordering::Relaxed)
    }

    /// Take up to `max` records from `lane` and write them in one transaction; returns
    /// how many were taken.
    fn write_one_batch(&mut self, lane: Lane, max: usize) -> usize {
        let mut batch = std::mem::take(&mut self.batch);
        let queue = &self.lanes[lane.index()];
        while batch.len() < max {
            match queue.try_recv() {
                Ok(record) => batch.push(record),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let taken = batch.len();
        self.queued[lane.index()].fetch_sub(taken, Ordering::Relaxed);
        self.write(lane, &mut batch);
        self.batch = batch;
        taken
    }

    fn write(&mut self, lane: Lane, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        match self.store.write_batch(batch) {
            Ok(()) => self.metrics.written.inc_by(count),
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

    #[test]
    fn only_getloggedinuser_that_never_reached_cucm_is_best_effort() {
        for operation in Operation::ALL {
            for source in Source::ALL {
                let expected = if operation == Operation::GetLoggedInUser && source != Source::Cucm
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
