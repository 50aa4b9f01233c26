//! `run(listener, config, shutdown)`: the whole gateway on a bound listener, until
//! `shutdown` completes. Tests drive it on port 0; `main` passes a signal future.
//!
//! Shutdown drains first (SPEC.md §12): `/readyz` answers 503 at once so a load
//! balancer stops sending, new work is still served for `drain_ms` (requests the
//! balancer sent before it noticed must not fail), then the server stops accepting and
//! finishes what it holds within `shutdown_grace_ms`.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use actors::cluster::ClusterError;
use actors::metrics::MetricsError;
use actors::{Metrics, Router};

use crate::config::Config;
use crate::northbound::handlers::{self, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Set once shutdown has begun; `/readyz` then answers 503 whatever the clusters say.
/// Its own `app_data` (not a field of `AppState`) so the drain stays in this file.
struct Draining(AtomicBool);

/// `/readyz`: 503 "draining" once shutdown has begun, else the clusters' readiness.
async fn readyz(draining: web::Data<Draining>, state: web::Data<AppState>) -> HttpResponse {
    if draining.0.load(Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain; charset=utf-8")
            .body("not ready: draining\n");
    }
    handlers::readyz(state).await
}

/// Starts the cluster actors and serves until `shutdown` resolves; then drains for
/// `drain_ms` (readyz 503, still serving), stops accepting, lets in-flight requests
/// finish within the configured grace, and returns.
/// Must run inside an actix System (`#[actix_web::main]` / `#[actix_web::test]`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new()?);
    let router = Router::launch(
        &config.clusters,
        config.default_cluster.as_deref(),
        config.discovery_ttl(),
        metrics.clone(),
    )?;
    let state = web::Data::new(AppState {
        router,
        metrics,
        deadline: config.deadline(),
        max_body_bytes: config.max_body_bytes,
    });
    let draining = web::Data::new(Draining(AtomicBool::new(false)));
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new({
        let draining = draining.clone();
        move || {
            App::new()
                .app_data(state.clone())
                .app_data(draining.clone())
                .route("/metrics", web::get().to(handlers::metrics))
                .route("/healthz", web::get().to(handlers::healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/openapi.json", web::get().to(crate::openapi::serve))
                .default_service(web::to(handlers::api))
        }
    })
    .workers(workers)
    .backlog(4096)
    .max_connections(50_000)
    .disable_signals()
    .shutdown_timeout(config.shutdown_grace().as_secs().max(1))
    .listen(listener)?
    .run();
    let handle = server.handle();
    let drain = config.drain();
    actix_web::rt::spawn(async move {
        shutdown.await;
        draining.0.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_ms = drain.as_millis() as u64,
            "draining: /readyz answers 503, still serving until the balancer stops sending"
        );
        // Not a synchronization: the balancer polls /readyz on its own clock, and this
        // is the time it is given to notice before connections are refused.
        actix_web::rt::time::sleep(drain).await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        handle.stop(true).await;
    });
    server.await?;
    Ok(())
}
