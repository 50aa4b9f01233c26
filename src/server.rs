//! `run(listener, config, shutdown)`: the whole gateway on a bound listener, until
//! `shutdown` completes. Tests drive it on port 0; `main` passes a signal future.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use actors::cluster::ClusterError;
use actors::metrics::MetricsError;
use actors::{Metrics, Router};

use crate::config::Config;
use crate::dashboard::{self, Admin, DashboardError};
use crate::history_api::{self, HistoryApiError};
use crate::northbound::handlers::{self, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    History(#[from] HistoryApiError),
    #[error("dashboard: {0}")]
    Dashboard(#[from] DashboardError),
}

/// Starts the cluster actors and serves until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish within the configured grace, and returns.
/// Must run inside an actix System (`#[actix_web::main]` / `#[actix_web::test]`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new()?);
    let history = history_api::open(&config.history, metrics.registry())?;
    let admin = web::Data::new(Admin::new(
        &config.dashboard,
        &config.history,
        history.clone(),
        metrics.clone(),
    )?);
    let sampler = dashboard::start_sampler(admin.clone());
    let router = Router::launch(
        &config.clusters,
        config.default_cluster.as_deref(),
        metrics.clone(),
    )?;
    let state = web::Data::new(AppState {
        router,
        metrics,
        deadline: config.deadline(),
        max_body_bytes: config.max_body_bytes,
        history: history.clone(),
    });
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(admin.clone())
            .configure(dashboard::routes)
            .route("/metrics", web::get().to(handlers::metrics))
            .route("/healthz", web::get().to(handlers::healthz))
            .route("/readyz", web::get().to(handlers::readyz))
            .default_service(web::to(handlers::api))
    })
    .workers(workers)
    .backlog(4096)
    .max_connections(50_000)
    .disable_signals()
    .shutdown_timeout(config.shutdown_grace().as_secs().max(1))
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        handle.stop(true).await;
    });
    let served = server.await;
    sampler.abort();
    // After the last request: flush what is queued (SIGTERM must not lose records).
    history_api::close(history).await;
    served?;
    Ok(())
}
