//! The request history in the gateway: the `[history]` config table,
//! opening and closing the `history` crate's [`History`], and `GET /api/history`.
//!
//! Recording itself happens in `northbound::record` (`RequestRecord::publish`), the one
//! place every answered API request passes. `History::record` only queues, so the request
//! path never waits for the database.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use history::{
    parse_filter, to_csv, to_json, Format, History, HistoryConfig, HistoryMetrics, WriterPriority,
};
use prometheus::Registry;
use serde::Deserialize;

use crate::dashboard::Admin;

/// How long SIGTERM waits for queued records to be written before giving up on them.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// The most records a queue may hold: 1M records is about 300 MB, past which a stalled
/// database would rather drop than eat the host's memory.
const MAX_QUEUE_CAPACITY: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum HistoryApiError {
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

/// `[history]`: where and whether requests are recorded.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Off: nothing is recorded and `/api/history` answers 503 (tests, benchmarks).
    pub enabled: bool,
    /// The SQLite file (used when `url` is absent).
    pub path: PathBuf,
    /// `postgres://user@host:port/db`: one database shared by every instance.
    pub url: Option<String>,
    /// Records older than this are purged; 0 keeps everything.
    pub retention_days: u32,
    /// Records waiting for the writer before new ones are dropped and counted.
    pub queue_capacity: usize,
    /// This instance's name in every record; default the host name, else "gateway".
    pub instance: Option<String>,
    /// The writer thread's CPU priority: `idle` (requests first; a saturated machine
    /// drops records) or `normal` (a fair share; requests slow down instead).
    pub writer_priority: WriterPriority,
    /// Test seam: a history the caller opened (so a test can pause its writer), used
    /// instead of opening one from the settings above. Never set from a config file.
    #[doc(hidden)]
    #[serde(skip)]
    pub opened: Option<OpenedHistory>,
}

/// A history opened outside the gateway; equal only to itself.
#[derive(Clone)]
pub struct OpenedHistory(pub Arc<History>);

impl PartialEq for OpenedHistory {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OpenedHistory {}

impl Default for HistorySettings {
    fn default() -> Self {
        let defaults = HistoryConfig::default();
        Self {
            enabled: true,
            path: defaults.path,
            url: None,
            retention_days: defaults.retention_days,
            queue_capacity: defaults.queue_capacity,
            instance: None,
            writer_priority: WriterPriority::default(),
            opened: None,
        }
    }
}

// By hand: `url` may carry a password, and Config's Debug must never print it.
impl fmt::Debug for HistorySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistorySettings")
            .field("enabled", &self.enabled)
            .field("path", &self.path)
            .field(
                "url",
                &self.url.as_deref().map(history::config::mask_password),
            )
            .field("retention_days", &self.retention_days)
            .field("queue_capacity", &self.queue_capacity)
            .field("instance", &self.instance)
            .field("writer_priority", &self.writer_priority)
            .field("opened", &self.opened.is_some())
            .finish()
    }
}

impl HistorySettings {
    /// Recording off: for tests and benchmarks that do not look at the history, and
    /// that must not share a file when run side by side.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// On, in the SQLite file `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// Errors as (key, message), for `Config::validate`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err((
                "history.queue_capacity",
                format!("must be 1-{MAX_QUEUE_CAPACITY}"),
            ));
        }
        if self.retention_days > 36_500 {
            return Err((
                "history.retention_days",
                "must be at most 36500 (0 keeps everything)".into(),
            ));
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err((
                    "history.url",
                    "must be a postgres://user@host:port/db URL".into(),
                ));
            }
        } else if self.path.as_os_str().is_empty() {
            return Err(("history.path", "must not be empty".into()));
        }
        if let Some(instance) = &self.instance {
            if instance.trim().is_empty() || instance.len() > 256 {
                return Err(("history.instance", "must be 1-256 bytes".into()));
            }
        }
        Ok(())
    }

    /// What the history crate is opened with.
    pub fn history_config(&self) -> HistoryConfig {
        HistoryConfig {
            path: self.path.clone(),
            url: self.url.clone(),
            retention_days: self.retention_days,
            queue_capacity: self.queue_capacity,
            instance: self.instance.clone().unwrap_or_else(default_instance_name),
            writer_priority: self.writer_priority,
        }
    }
}

/// The host name (what operators call the machine), else "gateway".
fn default_instance_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| history::config::DEFAULT_INSTANCE.to_string())
}

/// Registers the history's series in the gateway's registry (always, so the alert on
/// `bc_history_dropped_total` sees a series even with recording off) and opens the
/// database when recording is on: an SQLite file that cannot be opened is an error; a
/// PostgreSQL server is connected to by the history's writer thread (the `postgres`
/// client must not run on this async thread), and one that is unreachable only leaves
/// `bc_history_store_up` at 0 while the gateway serves.
pub async fn open(
    settings: &HistorySettings,
    registry: &Registry,
) -> Result<Option<Arc<History>>, HistoryApiError> {
    if let Some(OpenedHistory(history)) = &settings.opened {
        // Its counters join the gateway's registry, so /metrics shows them as usual.
        let metrics = history.metrics();
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.written.clone()))?;
        registry.register(Box::new(metrics.store_up.clone()))?;
        return Ok(Some(history.clone()));
    }
    let metrics = HistoryMetrics::register(registry)?;
    if !settings.enabled {
        // No database to wait for: the store-down alert stays quiet.
        metrics.store_up.set(1);
        return Ok(None);
    }
    let config = settings.history_config();
    let (key, path) = match &config.url {
        Some(_) => ("history.url", None),
        None => ("history.path", Some(config.path.clone())),
    };
    let opening = config.clone();
    // `open` blocks (a file, or the wait for the writer's first connect).
    let history = actix_web::rt::task::spawn_blocking(move || History::open(&opening, metrics))
        .await
        .map_err(|error| HistoryApiError::Task(error.to_string()))?
        .map_err(|source| HistoryApiError::Open { key, path, source })?;
    if !history.store_up() {
        tracing::warn!(
            "history database unreachable at start: the gateway serves, records wait in the queue, /api/history answers 503 until it is back"
        );
    }
    tracing::info!(
        backend = if config.url.is_some() { "postgres" } else { "sqlite" },
        path = %config.path.display(),
        instance = %config.instance,
        retention_days = config.retention_days,
        writer_priority = %config.writer_priority,
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

/// `GET /api/history?device=&user=&cluster=&operation=&code=&since=&until=&limit=&format=`
pub async fn get(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    if let Err(refused) = admin.authorize(&request).await {
        return refused;
    }
    let Some(history) = admin.history.clone() else {
        return text(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "history is disabled ([history] enabled = false)\n".to_string(),
        );
    };
    let filter = match parse_filter(request.query_string()) {
        Ok(filter) => filter,
        // The message names the parameter (FilterError's contract).
        Err(error) => {
            return text(
                actix_web::http::StatusCode::BAD_REQUEST,
                format!("{error}\n"),
            )
        }
    };
    let format = filter.format;
    let records = match web::block(move || history.query(&filter)).await {
        Ok(Ok(records)) => records,
        Ok(Err(history::HistoryError::StoreDown)) => {
            return text(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "the history database is unreachable; records wait until it is back\n".to_string(),
            );
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "history query failed");
            return text(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "the history database could not be read\n".to_string(),
            );
        }
        Err(error) => {
            tracing::warn!(%error, "history query task failed");
            return text(
                actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
                "history query failed\n".to_string(),
            );
        }
    };
    let (content_type, body) = match format {
        Format::Json => ("application/json", to_json(&records)),
        Format::Csv => ("text/csv; charset=utf-8", to_csv(&records)),
    };
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

fn text(status: actix_web::http::StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_database_password() {
        let settings = HistorySettings {
            url: Some("postgres://bc:hunter2@db:5432/bc".into()),
            ..HistorySettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                HistorySettings {
                    queue_capacity: 0,
                    ..HistorySettings::default()
                },
                "history.queue_capacity",
            ),
            (
                HistorySettings {
                    url: Some("mysql://x".into()),
                    ..HistorySettings::default()
                },
                "history.url",
            ),
            (
                HistorySettings {
                    instance: Some(" ".into()),
                    ..HistorySettings::default()
                },
                "history.instance",
            ),
        ];
        for (settings, key) in cases {
            assert_eq!(settings.validate().map_err(|(k, _)| k), Err(key));
        }
        assert!(HistorySettings::default().validate().is_ok());
    }

    #[test]
    fn writer_priority_is_idle_unless_set_to_normal() {
        let parse = |text: &str| crate::config::Config::parse(text).map(|c| c.history);
        let cluster = "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://cucm:8080/x\"]\n";
        let default = parse(&format!("[history]\npath = \"h.sqlite\"\n{cluster}")).expect("parses");
        assert_eq!(
            default.history_config().writer_priority,
            WriterPriority::Idle
        );
        let normal = parse(&format!(
            "[history]\nwriter_priority = \"normal\"\n{cluster}"
        ))
        .expect("parses");
        assert_eq!(
            normal.history_config().writer_priority,
            WriterPriority::Normal
        );
        let error = parse(&format!("[history]\nwriter_priority = \"high\"\n{cluster}"))
            .expect_err("an unknown priority is refused")
            .to_string();
        assert!(error.contains("writer_priority"), "{error}");
    }
}
