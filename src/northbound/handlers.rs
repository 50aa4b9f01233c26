//! The actix-web handlers: `/api/*`, `/metrics`, `/healthz`, `/readyz`.
//!
//! `/api/*` is one handler that reads the raw path itself, so that path segments are
//! percent-decoded exactly once and `%2F` inside a user ID stays part of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use actors::{ClientId, ClusterHandle, Metrics, Operation, Outcome, Route, Router};
use futures_util::StreamExt;

use super::json;
use super::record::{RequestRecord, Source};
use super::request::{apply_path, parse_message, validate, Call, Fields, ValidRequest};
use super::response::{version_document, xml_response, Failure, ResultDoc};

/// What every handler shares.
pub struct AppState {
    pub router: std::sync::Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub deadline: Duration,
    pub max_body_bytes: usize,
    /// The body must arrive within this (the head is bounded by actix).
    pub client_timeout: Duration,
    pub access: Arc<crate::access::Access>,
    /// Where every answered request is recorded; `None` with `[history] enabled = false`.
    pub history: Option<Arc<history::History>>,
}

/// `/api/{call}[/{segments}...]`, GET or POST.
pub async fn api(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let started = Instant::now();
    let path = request.uri().path();
    let mut segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments.last() == Some(&"") {
        segments.pop(); // a trailing slash
    }
    let call = match segments.as_slice() {
        [api, call, ..] if api.eq_ignore_ascii_case("api") => Call::from_segment(call),
        _ => None,
    };
    let Some(call) = call else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if request.method() != Method::GET && request.method() != Method::POST {
        return HttpResponse::MethodNotAllowed()
            .insert_header((header::ALLOW, "GET, POST"))
            .content_type("text/plain; charset=utf-8")
            .body("method not allowed\n");
    }
    let answer_json = json::wants_json(request.headers());
    if call == Call::Version {
        if segments.len() > 2 {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        if answer_json {
            return json::response(StatusCode::OK, &json::version_value(), None);
        }
        return xml_response(StatusCode::OK, version_document(), None);
    }

    let message = read_message(&request, payload, &state).await;
    let mut record = RequestRecord::new(call, started);
    record.client = crate::access::client_of(&request);
    let json_body = json::has_json_body(request.headers());
    let doc = match screen(
        &state,
        call,
        &segments[2..],
        message,
        json_body,
        &mut record,
    ) {
        Err(Screened::NotFound) => return plain(StatusCode::NOT_FOUND, "not found\n"),
        Err(Screened::Refused(failure)) => ResultDoc::failure(
            call,
            record.device.as_deref().unwrap_or_default(),
            record.user.as_deref(),
            &failure,
        ),
        Ok((valid, route)) => {
            let deadline = started + state.deadline;
            record.with_pin = matches!(valid.operation, Operation::PinLogin { .. });
            // Shares the cluster's ready line fairly with other clients.
            let client = crate::access::client_ip(&request)
                .map(ClientId::address)
                .unwrap_or_default();
            let ValidRequest {
                operation,
                credentials,
                ..
            } = valid;
            let (cluster, reply) = state
                .router
                .carry_out(route, operation, credentials, deadline, client)
                .await;
            record.cluster = cluster;
            record.node = reply.node.clone();
            record.source = match (&reply.node, reply.from_cache) {
                (_, true) => Source::Cache,
                (Some(_), false) => Source::Cucm,
                (None, false) => Source::Gateway,
            };
            let device = record.device.as_deref().unwrap_or_default();
            match &reply.result {
                Ok(outcome) => {
                    if let Outcome::CurrentUser(current) = outcome {
                        record.user = current.as_ref().map(|u| u.as_str().to_string());
                    }
                    ResultDoc::success(call, device, record.user.as_deref(), outcome)
                }
                Err(error) => ResultDoc::failure(
                    call,
                    device,
                    record.user.as_deref(),
                    &Failure::Operation(error.clone()),
                ),
            }
        }
    };
    record.answered(&doc);
    record.publish(&state.metrics, state.history.as_deref());
    if answer_json {
        return json::response(doc.status, &json::result_value(&doc), doc.retry_after);
    }
    xml_response(doc.status, doc.render(), doc.retry_after)
}

/// Why a request is answered before reaching a cluster.
enum Screened {
    /// More path segments than the call has fields: not an API path.
    NotFound,
    /// Answered with a code.
    Refused(Failure),
}

/// Everything before the cluster, in the API's order of faults: the body, the XML,
/// the path segments, the values, the credentials, the cluster code. Fills the record
/// with what the caller sent (refused) or the validated values (accepted).
fn screen<'a>(
    state: &'a AppState,
    call: Call,
    path_segments: &[&str],
    message: Result<Option<String>, Failure>,
    json_body: bool,
    record: &mut RequestRecord,
) -> Result<(ValidRequest, Route<'a>), Screened> {
    let parse = if json_body {
        json::parse_fields
    } else {
        parse_message
    };
    let mut fields = match message.map_err(Screened::Refused)?.as_deref().map(parse) {
        Some(parsed) => parsed.map_err(|e| Screened::Refused(Failure::Request(e)))?,
        None => Fields::default(),
    };
    let applied = apply_path(call, path_segments, &mut fields);
    // Echoed and recorded as sent until validated (bounded where they are written).
    record.device = fields.device_name.clone();
    record.user = fields.user_id.clone();
    record.app = fields.app_id.clone();
    match applied {
        Ok(true) => {}
        Ok(false) => return Err(Screened::NotFound),
        Err(error) => return Err(Screened::Refused(Failure::Request(error))),
    }
    let valid =
        validate(call, &fields).map_err(|error| Screened::Refused(Failure::Request(error)))?;
    record.device = valid.operation.device().map(|d| d.as_str().to_string());
    record.user = match &valid.operation {
        Operation::Login { user, .. }
        | Operation::PinLogin { user, .. }
        | Operation::ForceLogin { user, .. }
        | Operation::UserDevicesQuery { user } => Some(user.as_str().to_string()),
        _ => None,
    };
    record.app = Some(valid.credentials.app_id().to_string());
    let route = state
        .router
        .route(valid.cluster_code.as_deref())
        .map_err(|error| Screened::Refused(Failure::Route(error)))?;
    if let Route::Cluster(cluster) = &route {
        record.cluster = Some(cluster.code.clone());
    }
    Ok((valid, route))
}

/// The XML message: form field `xml` (body or query string) or the raw XML body.
/// `Ok(None)` when there is none (path-only calls).
async fn read_message(
    request: &HttpRequest,
    mut payload: web::Payload,
    state: &AppState,
) -> Result<Option<String>, Failure> {
    let limit = state.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(Failure::BodyTooLarge { limit });
    }
    // actix bounds only the head: a client that declares a body and sends it slowly
    // (or never) must not hold the connection. The body shares the request's budget too,
    // so a late body is the client's fault (408 + 1002), never a CUCM one.
    let within = state.client_timeout.min(state.deadline);
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| {
                Failure::Request(super::request::RequestError::MalformedXml(
                    "the body could not be read".into(),
                ))
            })?;
            if body.len() + chunk.len() > limit {
                return Err(Failure::BodyTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = match tokio::time::timeout(within, read).await {
        Ok(body) => body?,
        Err(_) => {
            state.access.too_slow.inc();
            return Err(Failure::TooSlow {
                limit_ms: within.as_millis() as u64,
            });
        }
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    super::message::select(&body, content_type, request.uri().query()).map_err(Failure::Request)
}

fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

pub async fn healthz() -> HttpResponse {
    plain(StatusCode::OK, "ok\n")
}

/// Ready when every cluster has a node that is not being skipped after failures and
/// accepts a connection now.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let clusters: Vec<&ClusterHandle> = state.router.clusters().collect();
    let ready = futures_util::future::join_all(clusters.iter().map(|c| c.ready())).await;
    let down: Vec<&str> = clusters
        .iter()
        .zip(ready)
        .filter(|(_, ready)| !ready)
        .map(|(c, _)| &*c.code)
        .collect();
    if down.is_empty() {
        return plain(StatusCode::OK, "ready\n");
    }
    HttpResponse::ServiceUnavailable()
        .content_type("text/plain; charset=utf-8")
        .body(format!(
            "not ready: no reachable CUCM node in {}\n",
            down.join(", ")
        ))
}
