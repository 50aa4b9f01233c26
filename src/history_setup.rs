//! The request history in the gateway's life: opened before serving, flushed on
//! SIGTERM. The `[history]` table itself is `history::HistoryConfig`; `GET /api/history`
//! is served with the dashboard's routes (`dashboard`).
//!
//! Recording happens in `northbound::record` (`RequestRecord::publish`), the one place
//! every answered API request passes. `History::record` only queues, so the request path
//! never waits for the database.

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
    #[error("opening the history: {0}")]
    Open(#[from] history::HistoryError),
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
/// database when recording is on (or takes the `opened` one).
pub fn open(
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
        return Ok(None);
    }
    let history = History::open(config, metrics)?;
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
