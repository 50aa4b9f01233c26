//! The [`History`] handle: recording off the request path, queries, shutdown.
//!
//! `record` hands the record to one writer thread through a bounded queue and returns at
//! once; a full queue drops the record and counts it (`bc_history_dropped_total`):
//! recording never slows or fails a request. The writer writes batches (up to
//! `BATCH_MAX_RECORDS` records, or what arrived within `BATCH_MAX_WAIT`) in one
//! transaction each, and purges records older than `retention_days` in small chunks.
//! Queries use their own connection, so they never wait for the writer's queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, Registry};

use crate::config::HistoryConfig;
use crate::filter::Filter;
use crate::postgres::PostgresStore;
use crate::record::{truncate_at_char_boundary, Record, UtcMillis, MAX_FIELD_BYTES};
use crate::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Most records written in one transaction.
pub const BATCH_MAX_RECORDS: usize = 500;
/// Longest a record waits in a partial batch before it is written.
pub const BATCH_MAX_WAIT: Duration = Duration::from_millis(100);
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

/// The history's series, made by the caller so they live in the gateway's registry.
#[derive(Clone, Debug)]
pub struct HistoryMetrics {
    /// `bc_history_dropped_total`: records not written (queue full, writer stopped, or
    /// their batch failed).
    pub dropped: IntCounter,
    /// `bc_history_written_total`: records committed to the database.
    pub written: IntCounter,
}

impl HistoryMetrics {
    /// Create both counters and register them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.written.clone()))?;
        Ok(metrics)
    }

    /// Both counters, in no registry (tests, tools).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(Self {
            dropped: IntCounter::new(
                "bc_history_dropped_total",
                "History records dropped: queue full, writer stopped, or a failed write",
            )?,
            written: IntCounter::new(
                "bc_history_written_total",
                "History records written to the database",
            )?,
        })
    }
}

enum WriterMessage {
    Record(Record),
    /// Write everything queued before this, then acknowledge.
    Flush(SyncSender<()>),
    /// Write the current batch, acknowledge on `parked`, then wait until `resume`'s
    /// sender is dropped (tests: a stalled database).
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
    sender: SyncSender<WriterMessage>,
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
        // sync_channel(0) would be a rendezvous: every record dropped unless the writer
        // happened to wait at that instant.
        let (sender, receiver) = mpsc::sync_channel(config.queue_capacity.max(1));
        let writer = Writer {
            store: writer_store,
            receiver,
            metrics: metrics.clone(),
            retention_days: config.retention_days,
            failure_warning: RateLimitedWarning::new(WARNING_INTERVAL),
        };
        let handle = std::thread::Builder::new()
            .name("history-writer".to_string())
            .spawn(move || writer.run())
            .map_err(HistoryError::Spawn)?;
        let mut instance = config.instance.clone();
        truncate_at_char_boundary(&mut instance, MAX_FIELD_BYTES);
        Ok(History {
            sender,
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(handle)),
            metrics,
            drop_warning: RateLimitedWarning::new(WARNING_INTERVAL),
            instance,
        })
    }

    /// Queue `record` for writing. Never blocks and never fails: when the queue is full
    /// (or the writer has stopped) the record is dropped and counted. Strings are cut to
    /// their bounds and `instance` is set to this instance's name.
    pub fn record(&self, mut record: Record) {
        record.instance.clone_from(&self.instance);
        record.bound();
        let why = match self.sender.try_send(WriterMessage::Record(record)) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "queue full",
            Err(TrySendError::Disconnected(_)) => "writer stopped",
        };
        self.metrics.dropped.inc();
        if self.drop_warning.due() {
            tracing::warn!(
                reason = why,
                dropped_total = self.metrics.dropped.get(),
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
        self.send_control(WriterMessage::Flush(done), deadline)?;
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
        match self.send_control(WriterMessage::Shutdown, deadline) {
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
            WriterMessage::Pause {
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

    /// Control messages queue behind records (so "flush" means "what came before"),
    /// and wait for space until `deadline` rather than dropping.
    fn send_control(&self, message: WriterMessage, deadline: Instant) -> Result<(), HistoryError> {
        let mut message = message;
        loop {
            match self.sender.try_send(message) {
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
    receiver: Receiver<WriterMessage>,
    metrics: HistoryMetrics,
    retention_days: u32,
    failure_warning: RateLimitedWarning,
}

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<Record> = Vec::with_capacity(BATCH_MAX_RECORDS);
        let mut batch_deadline: Option<Instant> = None;
        let mut next_purge = (self.retention_days > 0).then(Instant::now);
        loop {
            if next_purge.is_some_and(|due| Instant::now() >= due) {
                next_purge = self.purge_step();
            }
            let wake_at = batch_deadline.or(next_purge);
            let wait = wake_at
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(PURGE_INTERVAL);
            match self.receiver.recv_timeout(wait) {
                Ok(WriterMessage::Record(record)) => {
                    batch.push(record);
                    let deadline =
                        *batch_deadline.get_or_insert_with(|| Instant::now() + BATCH_MAX_WAIT);
                    if batch.len() >= BATCH_MAX_RECORDS || Instant::now() >= deadline {
                        self.write(&mut batch);
                        batch_deadline = None;
                    }
                }
                Ok(WriterMessage::Flush(done)) => {
                    self.write(&mut batch);
                    batch_deadline = None;
                    let _ = done.send(());
                }
                Ok(WriterMessage::Pause { parked, resume }) => {
                    self.write(&mut batch);
                    batch_deadline = None;
                    let _ = parked.send(());
                    // Returns Err once the guard (the only sender) is dropped.
                    let _ = resume.recv();
                }
                Ok(WriterMessage::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.drain(&mut batch);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if batch_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        self.write(&mut batch);
                        batch_deadline = None;
                    }
                }
            }
        }
    }

    /// Before exiting: write whatever is still queued (records recorded while the
    /// shutdown message was on its way too).
    fn drain(&mut self, batch: &mut Vec<Record>) {
        loop {
            match self.receiver.try_recv() {
                Ok(WriterMessage::Record(record)) => {
                    batch.push(record);
                    if batch.len() >= BATCH_MAX_RECORDS {
                        self.write(batch);
                    }
                }
                Ok(WriterMessage::Flush(done)) => {
                    self.write(batch);
                    let _ = done.send(());
                }
                Ok(WriterMessage::Pause { .. } | WriterMessage::Shutdown) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        self.write(batch);
    }

    fn write(&mut self, batch: &mut Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        match self.store.write_batch(batch) {
            Ok(()) => self.metrics.written.inc_by(count),
            Err(error) => {
                self.metrics.dropped.inc_by(count);
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
    fn metrics_register_under_their_names() {
        let registry = Registry::new();
        let metrics = HistoryMetrics::register(&registry).expect("register");
        metrics.dropped.inc();
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
    }
}
