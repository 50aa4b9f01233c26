//! `run(listener, config, shutdown)`: the whole gateway on a bound listener, until
//! `shutdown` completes. Tests drive it on port 0; `main` passes a signal future.
//!
//! Shutdown drains first: `/readyz` answers 503 at once so a load
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

use crate::access::{Access, AccessGuard};
use crate::config::Config;
use crate::dashboard::{self, Admin, DashboardError};
use crate::events_api::{self, Events};
use crate::history_api::{self, HistoryApiError};
use crate::northbound::handlers::{self, AppState};
use crate::tls::{self, TlsError};
use crate::watch::{self, WatchError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("history: {0}")]
    History(#[from] HistoryApiError),
    #[error("dashboard: {0}")]
    Dashboard(#[from] DashboardError),
    #[error("{0}")]
    Watch(#[from] WatchError),
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
    let history = history_api::open(&config.history, metrics.registry())?;
    let admin = web::Data::new(Admin::new(
        &config.dashboard,
        &config.history,
        history.clone(),
        metrics.clone(),
    )?);
    let hub = Arc::new(actors::events::EventHub::new(
        config.watch.event_buffer,
        &metrics,
    ));
    events_api::record_observed(&hub, history.clone());
    let watched = watch::load(&config.watch, hub.clone())?;
    let sampler = dashboard::start_sampler(admin.clone());
    let router = Router::launch(
        &config.clusters,
        config.default_cluster.as_deref(),
        config.discovery_ttl(),
        metrics.clone(),
        &watched.watching,
    )?;
    let router = Arc::new(router);
    watch::place_always_watched(router.clone(), watched.watching.clone(), watched.always);
    #[cfg(unix)]
    watch::reload_on_sighup(
        config.watch.clone(),
        router.clone(),
        watched.watching.clone(),
    );
    let (end_streams, streams_end) = tokio::sync::watch::channel(false);
    let events = web::Data::new(Events {
        hub,
        closing: streams_end,
    });
    let access = Arc::new(Access::new(&config.access, &metrics)?);
    let state = web::Data::new(AppState {
        router,
        metrics,
        deadline: config.deadline(),
        max_body_bytes: config.max_body_bytes,
        client_timeout: config.client_timeout(),
        access: access.clone(),
        history: history.clone(),
    });
    let draining = web::Data::new(Draining(AtomicBool::new(false)));
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new({
        let draining = draining.clone();
        move || {
            App::new()
                .wrap(AccessGuard(access.clone()))
                .app_data(state.clone())
                .app_data(draining.clone())
                .app_data(admin.clone())
                .app_data(events.clone())
                .configure(dashboard::routes)
                .route("/api/events", web::get().to(events_api::get))
                .route("/api/events/latest", web::get().to(events_api::latest))
                .route("/metrics", web::get().to(handlers::metrics))
                .route("/healthz", web::get().to(handlers::healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/openapi.json", web::get().to(crate::openapi::serve))
                .default_service(web::to(handlers::api))
        }
    })
    .workers(workers)
    .backlog(4096)
    .max_connections(config.max_connections)
    // The head must arrive within client_timeout (the body is bounded in read_message);
    // an idle keep-alive connection is closed after the same time.
    .client_request_timeout(config.client_timeout())
    .keep_alive(config.client_timeout())
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .tls_handshake_timeout(config.client_timeout())
    .disable_signals()
    .shutdown_timeout(config.shutdown_grace().as_secs().max(1));
    let server = match tls {
        Some((tls_config, resolver)) => {
            tls::reload_on_sighup(resolver);
            server.listen_rustls_0_23(listener, tls_config)?
        }
        None => server.listen(listener)?,
    }
    .run();
    let handle = server.handle();
    let drain = config.drain();
    actix_web::rt::spawn(async move {
        shutdown.await;
        draining.0.store(true, Ordering::Relaxed);
        // Event streams never end by themselves: end them so the drain can finish.
        let _ = end_streams.send(true);
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
    let served = server.await;
    sampler.abort();
    // After the last request: flush what is queued (SIGTERM must not lose records).
    history_api::close(history).await;
    served?;
    Ok(())
}
