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
use crate::connections::{raise_open_files, ConnectionGuard};
use crate::dashboard::{self, Admin, DashboardError};
use crate::events_api::{self, Events};
use crate::history_setup::{self, HistorySetupError};
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
    #[error("{0}")]
    History(#[from] HistorySetupError),
    #[error("dashboard: {0}")]
    Dashboard(#[from] DashboardError),
    #[error("{0}")]
    Coordination(#[from] actors::coordination::StoreError),
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

/// actix's own shutdown timeout (whole seconds): the grace, and then a second for the
/// answers given at its end to be written.
fn answers_written_by(grace: std::time::Duration) -> u64 {
    grace.as_secs() + u64::from(grace.subsec_nanos() > 0) + 1
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
    start(listener, config).await?.until(shutdown).await
}

/// A gateway that has done everything that can fail at start and is serving.
pub struct Started {
    server: actix_web::dev::Server,
    draining: web::Data<Draining>,
    drain: std::time::Duration,
    /// After the drain: how long in-flight requests may finish before every request
    /// still waiting is answered.
    grace: std::time::Duration,
    /// The clusters to close when the grace is over.
    closing: web::Data<AppState>,
    /// Ends the `/api/events` streams when the drain begins.
    end_streams: tokio::sync::watch::Sender<bool>,
    sampler: actix_web::rt::task::JoinHandle<()>,
    history: Option<Arc<history::History>>,
}

/// Everything that can fail at start, in one place and before anything is announced:
/// the TLS files (and that key and certificate match), the history (an SQLite file is
/// opened; a PostgreSQL server is only connected to by the history's writer, so an
/// unreachable one does not stop the start), the dashboard users, the clusters'
/// clients, the listener. Returns once the server accepts connections; `main` logs the
/// "serving" line only after this succeeded.
pub async fn start(listener: TcpListener, config: Config) -> Result<Started, ServerError> {
    // Files first: nothing else has been started when one of them is missing.
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let metrics = Arc::new(Metrics::new()?);
    let history = history_setup::open(
        &config.history,
        config.opened_history.as_ref(),
        metrics.registry(),
    )
    .await?;
    let admin = web::Data::new(Admin::new(
        &config.dashboard,
        &config.history,
        history.clone(),
        metrics.clone(),
    )?);
    let access = Arc::new(Access::new(&config.access, &metrics)?);
    let coordination =
        config
            .coordination
            .start(config.history.url.as_deref(), &config.clusters, &metrics)?;
    let hub = Arc::new(actors::events::EventHub::new(
        config.watch.event_buffer,
        &metrics,
    ));
    events_api::record_observed(&hub, history.clone());
    let watched = watch::load(&config.watch, hub.clone())?;
    let router = Router::launch(
        &config.clusters,
        config.default_cluster.as_deref(),
        config.discovery_ttl(),
        metrics.clone(),
        coordination.as_ref(),
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
    let connections = Arc::new(ConnectionGuard::new(&config.access, &metrics)?);
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
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    raise_open_files((config.max_connections * workers) as u64);

    let closing = state.clone();
    let server = HttpServer::new({
        let draining = draining.clone();
        let admin = admin.clone();
        move || {
            App::new()
                .wrap(AccessGuard(access.clone()))
                .app_data(state.clone())
                .app_data(draining.clone())
                .app_data(admin.clone())
                .app_data(events.clone())
                .configure(dashboard::routes)
                // Resources, not bare routes: another method answers 405 with Allow.
                .service(web::resource("/metrics").route(web::get().to(handlers::metrics)))
                .service(web::resource("/healthz").route(web::get().to(handlers::healthz)))
                .service(web::resource("/readyz").route(web::get().to(readyz)))
                .service(web::resource("/openapi.json").route(web::get().to(crate::openapi::serve)))
                .service(web::resource("/api/events").route(web::get().to(events_api::get)))
                .service(
                    web::resource("/api/events/latest").route(web::get().to(events_api::latest)),
                )
                .default_service(web::to(handlers::api))
        }
    })
    .on_connect(move |io, ext| connections.on_connect(io, ext))
    .workers(workers)
    .backlog(4096)
    .max_connections(config.max_connections)
    // The head must arrive within client_timeout (the body is bounded in read_message);
    // an idle keep-alive connection is closed after the same time.
    .client_request_timeout(config.client_timeout())
    .keep_alive(config.client_timeout())
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .tls_handshake_timeout(config.client_timeout())
    // actix stops accepting while this many TLS handshakes are pending (default 256):
    // idle connections that never send a ClientHello would then hold every other
    // client in the backlog until they time out. Pending handshakes cost no CPU; the
    // connection cap bounds them.
    .max_connection_rate(config.max_connections)
    .disable_signals()
    .shutdown_timeout(answers_written_by(config.shutdown_grace()));
    let server = match tls {
        Some((tls_config, resolver)) => {
            let server = server.listen_rustls_0_23(listener, tls_config)?;
            tls::reload_on_sighup(resolver);
            server
        }
        None => server.listen(listener)?,
    }
    .run();
    let sampler = dashboard::start_sampler(admin);
    Ok(Started {
        server,
        draining,
        drain: config.drain(),
        grace: config.shutdown_grace(),
        closing,
        end_streams,
        sampler,
        history,
    })
}

impl Started {
    /// Serve until `shutdown` resolves, then drain, stop, and flush the history.
    pub async fn until(
        self,
        shutdown: impl Future<Output = ()> + 'static,
    ) -> Result<(), ServerError> {
        let Started {
            server,
            draining,
            drain,
            grace,
            closing,
            end_streams,
            sampler,
            history,
        } = self;
        let handle = server.handle();
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
            let close = actix_web::rt::spawn(async move {
                actix_web::rt::time::sleep(grace).await;
                tracing::info!("shutdown grace over: answering every request still waiting");
                closing.router.close();
            });
            handle.stop(true).await;
            close.abort();
        });
        let served = server.await;
        sampler.abort();
        // After the last request: flush what is queued (SIGTERM must not lose records).
        history_setup::close(history).await;
        served?;
        Ok(())
    }
}
