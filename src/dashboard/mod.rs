//! The administrators' side: `GET /dashboard` (one page, its script and
//! style embedded in the binary), `GET /api/status` (the page's per-cluster panel, see
//! `status`), `GET /api/history` (the recorded requests), and who may see them (`auth`,
//! with the password hashes of `password`).
//!
//! The page is static: every value it shows comes from `/api/status` and `/api/history`
//! and is inserted with `textContent`, never as HTML. The Content-Security-Policy allows
//! only this origin's script and style, so even a value that slipped through could not
//! run.

pub mod auth;
pub mod password;
pub mod status;
mod verifier;

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use actors::Metrics;
use history::{parse_filter, to_csv, to_json, Format, History, HistoryConfig};
use serde::Deserialize;

pub use auth::DashboardUser;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("{0}")]
    Auth(#[from] auth::AuthError),
}

/// `[dashboard]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSettings {
    /// HTTP Basic users; none = loopback clients only.
    pub users: Vec<DashboardUser>,
}

impl DashboardSettings {
    /// Errors as (key, message), for `Config::validate`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        auth::validate_users(&self.users)
    }
}

/// What the dashboard, `/api/status` and `/api/history` share (one per server).
pub struct Admin {
    /// `None` when `[history] enabled = false`.
    pub history: Option<Arc<History>>,
    auth: auth::Auth,
    sampler: status::Sampler,
    metrics: Arc<Metrics>,
    instance: String,
    backend: &'static str,
}

impl Admin {
    pub fn new(
        settings: &DashboardSettings,
        history_config: &HistoryConfig,
        history: Option<Arc<History>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DashboardError> {
        let backend = match (&history, &history_config.url) {
            (None, _) => "off",
            (Some(_), Some(_)) => "postgres",
            (Some(_), None) => "sqlite",
        };
        Ok(Self {
            auth: auth::Auth::new(settings.users.clone(), metrics.registry())?,
            history,
            sampler: status::Sampler::default(),
            instance: history_config.instance_name(),
            metrics,
            backend,
        })
    }

    /// `Ok` when this client may see the dashboard and the history; else the answer.
    pub async fn authorize(&self, request: &HttpRequest) -> Result<(), HttpResponse> {
        self.auth.check(request).await
    }
}

/// Snapshots the counters every `status::SAMPLE_EVERY` for the rates in `/api/status`.
/// Abort the handle when the server stops.
pub fn start_sampler(admin: web::Data<Admin>) -> actix_web::rt::task::JoinHandle<()> {
    actix_web::rt::spawn(async move {
        let mut ticks = actix_web::rt::time::interval(status::SAMPLE_EVERY);
        loop {
            ticks.tick().await;
            admin.sampler.sample(&admin.metrics.render());
        }
    })
}

/// The routes of this module, `/api/history` among them; registered before the `/api/*`
/// catch-all so they win. Resources, not bare routes: another method answers 405 with
/// `Allow: GET` instead of falling through to the catch-all's 404.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .service(web::resource("/dashboard").route(web::get().to(page)))
        .service(web::resource("/dashboard/page.js").route(web::get().to(script)))
        .service(web::resource("/dashboard/page.css").route(web::get().to(style)))
        .service(web::resource("/api/status").route(web::get().to(status)))
        .service(web::resource("/api/history").route(web::get().to(history_query)));
}

async fn page(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&request, &admin, "text/html; charset=utf-8", PAGE).await
}

async fn script(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&request, &admin, "text/javascript; charset=utf-8", SCRIPT).await
}

async fn style(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    asset(&request, &admin, "text/css; charset=utf-8", STYLE).await
}

async fn asset(
    request: &HttpRequest,
    admin: &Admin,
    content_type: &'static str,
    body: &'static str,
) -> HttpResponse {
    if let Err(refused) = admin.authorize(request).await {
        return refused;
    }
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// `GET /api/status` (see `status` for the document).
async fn status(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    if let Err(refused) = admin.authorize(&request).await {
        return refused;
    }
    let document = admin
        .sampler
        .status(&admin.metrics.render(), &admin.instance, admin.backend);
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(document)
}

/// `GET /api/history?device=&user=&cluster=&operation=&code=&since=&until=&limit=&format=`
async fn history_query(request: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    if let Err(refused) = admin.authorize(&request).await {
        return refused;
    }
    let Some(history) = admin.history.clone() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "history is disabled ([history] enabled = false)\n".to_string(),
        );
    };
    let filter = match parse_filter(request.query_string()) {
        Ok(filter) => filter,
        // The message names the parameter (FilterError's contract).
        Err(error) => return text(StatusCode::BAD_REQUEST, format!("{error}\n")),
    };
    let format = filter.format;
    let records = match web::block(move || history.query(&filter)).await {
        Ok(Ok(records)) => records,
        Ok(Err(history::HistoryError::StoreDown)) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the history database is unreachable; records wait until it is back\n".to_string(),
            );
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "history query failed");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the history database could not be read\n".to_string(),
            );
        }
        Err(error) => {
            tracing::warn!(%error, "history query task failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
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

fn text(status: StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}
