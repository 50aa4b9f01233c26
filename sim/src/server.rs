//! HTTP transport: accept loops (with the `refuse` fault), optional TLS, routing of
//! `/emservice/EMServiceServlet` and `/_sim/*`, and turning [`EmReply`] into responses.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::Behavior;
use crate::control;
use crate::em::{EmReply, EmService};
use crate::emapp::EMAPP_PATH;
use crate::emcc::EMCC_PREFIX;
use crate::protocol;

pub(crate) const EM_PATH: &str = "/emservice/EMServiceServlet";
const MAX_BODY_BYTES: usize = 1 << 20;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a behaviour change waits for the listener to close or re-bind.
pub(crate) const LISTENER_APPLY_TIMEOUT: Duration = Duration::from_secs(5);
const REBIND_RETRY: Duration = Duration::from_millis(50);

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read request body: {0}")]
    Body(String),
    #[error("hung call released; closing the connection unanswered")]
    HangReleased,
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

pub(crate) type HttpResponse = Response<Full<Bytes>>;

/// Whether the EM listener currently refuses connections, as actually applied by the
/// accept loop, so that `set_behavior` can return only once the change is real.
#[derive(Debug, Default)]
pub(crate) struct ListenerStatus {
    refusing: Mutex<bool>,
    changed: Condvar,
    notify: Notify,
}

impl ListenerStatus {
    fn set(&self, refusing: bool) {
        let mut current = self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        if *current != refusing {
            *current = refusing;
            self.changed.notify_all();
            self.notify.notify_waiters();
        }
    }

    fn is(&self, refusing: bool) -> bool {
        *self.refusing.lock().unwrap_or_else(|e| e.into_inner()) == refusing
    }

    /// Waits (blocking the calling thread) until the state is `refusing`; false on timeout.
    pub fn wait_blocking(&self, refusing: bool, timeout: Duration) -> bool {
        let guard = self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        let (_guard, result) = self
            .changed
            .wait_timeout_while(guard, timeout, |current| *current != refusing)
            .unwrap_or_else(|e| e.into_inner());
        !result.timed_out()
    }

    /// Async variant for the control endpoint (which runs on the simulator's runtime).
    pub async fn wait(&self, refusing: bool, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is(refusing) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// State shared by all connections of one simulator.
pub(crate) struct Shared {
    pub em: EmService,
    pub listener: ListenerStatus,
}

impl Shared {
    /// Replaces the behaviour; returns the refuse state the listener must reach.
    pub fn replace_behavior(&self, behavior: Behavior) -> bool {
        let refuse = behavior.faults.refuse;
        self.em.behavior.send_replace(behavior);
        refuse
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerRole {
    /// The EM service address: EM calls and `/_sim/*`.
    Em,
    /// The separate control address: `/_sim/*` only, never subject to faults (not even refuse).
    Control,
}

/// Binds a listening socket with SO_REUSEADDR, so `refuse` off can re-bind the same port.
pub(crate) fn bind_listener(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().map_err(|source| ServerError::Bind { addr, source })
}

/// Builds the rustls acceptor for a certificate and its PKCS#8 key (both DER).
pub(crate) fn tls_acceptor(
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<TlsAcceptor, ServerError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accept loop of the EM address. Honors `refuse`: drops the listener and every open
/// connection, and re-binds the same address when `refuse` is turned off.
pub(crate) async fn run_em_listener(
    shared: Arc<Shared>,
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
) {
    let mut behavior: watch::Receiver<Behavior> = shared.em.behavior.subscribe();
    let mut connections: JoinSet<()> = JoinSet::new();
    loop {
        let refuse = behavior.borrow_and_update().faults.refuse;
        if refuse && listener.is_some() {
            listener = None;
            // Abort and wait, so existing keep-alive connections are really closed.
            connections.shutdown().await;
            tracing::debug!(%addr, "refuse on: listener closed");
        } else if !refuse && listener.is_none() {
            match bind_listener(addr) {
                Ok(l) => {
                    listener = Some(l);
                    tracing::debug!(%addr, "refuse off: listener re-bound");
                }
                Err(error) => {
                    tracing::warn!(%error, "re-binding after refuse failed; retrying");
                    tokio::time::sleep(REBIND_RETRY).await;
                    continue;
                }
            }
        }
        shared.listener.set(listener.is_none());

        tokio::select! {
            accepted = accept(listener.as_ref()) => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        tls.clone(),
                        shared.clone(),
                        ListenerRole::Em,
                    ));
                }
                Err(error) => {
                    // E.g. EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(REBIND_RETRY).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = behavior.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Accept loop of the control address (plain HTTP, `/_sim/*` only).
pub(crate) async fn run_control_listener(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    None,
                    shared.clone(),
                    ListenerRole::Control,
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "control accept failed");
                tokio::time::sleep(REBIND_RETRY).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    role: ListenerRole,
) {
    // Small request/response exchanges: do not let Nagle add latency.
    let _ = stream.set_nodelay(true);
    match tls {
        None => serve_http(stream, peer, shared, role).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_http(tls_stream, peer, shared, role).await,
                Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<I>(io: I, peer: SocketAddr, shared: Arc<Shared>, role: ListenerRole)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| route(shared.clone(), request, role, peer));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended with an error");
    }
}

async fn route(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    role: ListenerRole,
    peer: SocketAddr,
) -> Result<HttpResponse, ServerError> {
    let path = request.uri().path();
    if path.starts_with(control::CONTROL_PREFIX) {
        let (parts, body) = request.into_parts();
        let body = read_body(body).await?;
        return Ok(control::handle(&shared, &parts.method, &parts.uri, body).await);
    }
    if role == ListenerRole::Em && path.trim_end_matches('/') == EM_PATH {
        return em_call(&shared, request).await;
    }
    if role == ListenerRole::Em && path.trim_end_matches('/') == EMAPP_PATH {
        return emapp_call(&shared, request, peer.ip()).await;
    }
    if role == ListenerRole::Em && path.starts_with(EMCC_PREFIX) {
        if request.method() != Method::POST {
            return Ok(text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST only",
            ));
        }
        let path = path.to_string();
        let body = read_body(request.into_body()).await?;
        let reply = shared.em.handle_emcc(&path, &body).await;
        let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(text_response(status, "application/json", reply.body));
    }
    Ok(text_response(
        StatusCode::NOT_FOUND,
        "text/plain",
        "not found",
    ))
}

async fn read_body(body: Incoming) -> Result<Bytes, ServerError> {
    Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| ServerError::Body(e.to_string()))
}

async fn em_call(shared: &Shared, request: Request<Incoming>) -> Result<HttpResponse, ServerError> {
    let (parts, body) = request.into_parts();
    let from_query = || {
        parts
            .uri
            .query()
            .and_then(|q| protocol::extract_xml_param(q.as_bytes()))
    };
    let xml = match parts.method {
        Method::GET => from_query(),
        Method::POST => {
            let body = read_body(body).await?;
            protocol::extract_xml_param(&body).or_else(from_query)
        }
        _ => {
            return Ok(text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use POST (or GET) with an xml parameter",
            ))
        }
    };
    reply_response(shared.em.handle(xml).await)
}

/// EMApp: the phone's GET (POST and HEAD with the query string are accepted too, as
/// some scripts send them). The body of a POST is ignored: EMApp reads the query.
async fn emapp_call(
    shared: &Shared,
    request: Request<Incoming>,
    caller: std::net::IpAddr,
) -> Result<HttpResponse, ServerError> {
    if !matches!(*request.method(), Method::GET | Method::POST | Method::HEAD) {
        return Ok(text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET with a query string",
        ));
    }
    let query = request.uri().query().map(str::to_string);
    reply_response(shared.em.handle_emapp(query.as_deref(), caller).await)
}

fn reply_response(reply: EmReply) -> Result<HttpResponse, ServerError> {
    match reply {
        EmReply::Xml(body) => Ok(text_response(
            StatusCode::OK,
            "text/xml; charset=utf-8",
            body,
        )),
        EmReply::HttpStatus(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = format!(
                "<html><head><title>{status}</title></head><body><h1>HTTP Status {status}</h1></body></html>"
            );
            Ok(text_response(status, "text/html;charset=utf-8", body))
        }
        EmReply::Garbage => Ok(text_response(
            StatusCode::OK,
            "text/html;charset=utf-8",
            "<html><head><title>Cisco Unified CM</title></head><body><p>Service temporarily \
             unavailable. Please try again later.</p></body></html>",
        )),
        EmReply::Abandon => Err(ServerError::HangReleased),
    }
}

pub(crate) fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
