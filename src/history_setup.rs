//! The request history in the gateway's life: opened before serving, flushed on
//! SIGTERM. The `[history]` table itself is `history::HistoryConfig`; `GET /api/history`
//! is served with the dashboard's routes (`dashboard`).
//!
//! Recording happens in `northbound::record` (`RequestRecord::publish`), the one place
//! every answered API request passes. `History::record` only queues, so the request path
//! never waits for the database.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use history::{History, HistoryConfig, HistoryMetrics};
use prometheus::Registry;

/// How long SIGTERM waits for queued records to be written before giving up on them.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HistorySetupError {
    #[error("registering the history metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Names the key: `history.path` (the file) or `history.url` (the URL is not quoted:
    /// it may carry a password).
    #[error("{key}{}: {source}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Open {
        key: &'static str,
        path: Option<PathBuf>,
        source: history::HistoryError,
    },
    #[error("opening the history: {0}")]
    Task(String),
}

/// Test seam (`Config::opened_history`): a history the caller opened, so that a test can
/// pause its writer, used instead of opening one from `[history]`. Equal only to itself.
#[derive(Clone)]
pub struct OpenedHistory(pub Arc<History>);

impl PartialEq for OpenedHistory {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OpenedHistory {}

impl std::fmt::Debug for OpenedHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Registers the history's series in the gateway's registry (always, so the alert on
/// `bc_history_dropped_total` sees a series even with recording off) and opens the
/// database when recording is on (or takes the `opened` one): an SQLite file that cannot
/// be opened is an error; a PostgreSQL server is connected to by the history's writer
/// thread (the `postgres` client must not run on this async thread), and one that is
/// unreachable only leaves `bc_history_store_up` at 0 while the gateway serves.
pub async fn open(
    config: &HistoryConfig,
    opened: Option<&OpenedHistory>,
    registry: &Registry,
) -> Result<Option<Arc<History>>, HistorySetupError> {
    for (key, advice) in config.deprecated_keys() {
        tracing::warn!(key, "{advice}");
    }
    if let Some(OpenedHistory(history)) = opened {
        // Its counters join the gateway's registry, so /metrics shows them as usual.
        history.metrics().register_in(registry)?;
        return Ok(Some(history.clone()));
    }
    let metrics = HistoryMetrics::register(registry)?;
    if !config.enabled {
        // No database to wait for: the store-down alert stays quiet.
        metrics.store_up.set(1);
        return Ok(None);
    }
    let (key, path) = match &config.url {
        Some(_) => ("history.url", None),
        None => ("history.path", Some(config.path.clone())),
    };
    let opening = config.clone();
    // `open` blocks (a file, or the wait for the writer's first connect).
    let history = actix_web::rt::task::spawn_blocking(move || History::open(&opening, metrics))
        .await
        .map_err(|error| HistorySetupError::Task(error.to_string()))?
        .map_err(|source| HistorySetupError::Open { key, path, source })?;
    if !history.store_up() {
        tracing::warn!(
            "history database unreachable at start: the gateway serves, records wait in the queue, /api/history answers 503 until it is back"
        );
    }
    tracing::info!(
        backend = if config.url.is_some() { "postgres" } else { "sqlite" },
        path = %config.path.display(),
        instance = %config.instance_name(),
        retention_days = config.retention_days,
        record_cache_hits = config.record_cache_hits,
        "history recording"
    );
    Ok(Some(Arc::new(history)))
}

/// On SIGTERM, after the last request: write what is queued. `shutdown` blocks (it
/// joins the writer thread), so it runs on the blocking pool.
pub async fn close(history: Option<Arc<History>>) {
    let Some(history) = history else { return };
    let result =
        actix_web::rt::task::spawn_blocking(move || history.shutdown(SHUTDOWN_FLUSH)).await;
    match result {
        Ok(Ok(())) => tracing::info!("history flushed"),
        Ok(Err(error)) => tracing::error!(%error, "history not fully flushed on shutdown"),
        Err(error) => tracing::error!(%error, "history shutdown task failed"),
    }
}
