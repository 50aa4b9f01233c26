//! `EmClient`: one cluster's HTTP client to its EM service nodes.
//!
//! Node choice: healthy nodes in configured order first, then the ones being skipped
//! (soonest to recover first). A node that refuses, times out, answers HTTP 5xx or
//! garbage is skipped for a hold-off that doubles with each failure (1 s … 30 s).
//!
//! Retry rules: a query may move to the next node after any
//! failure. A login or logout moves on only when it surely did not take effect — the
//! connection was refused or CUCM answered HTTP 503. After a timeout or another 5xx it
//! is never sent again (the caller gets 1003), because CUCM may have executed it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use reqwest::StatusCode;
use std::sync::{Mutex, MutexGuard};

use super::code;
use super::codec::{decode, EmRequest, EmResponse};
use crate::backoff::ExpBackoff;
use crate::metrics::Metrics;
use crate::operation::Credentials;

/// A failed node is skipped for 1 s, doubling with each failure in a row up to 30 s.
const NODE_HOLD_OFF: ExpBackoff = ExpBackoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// A refused or black-holed connection is known quickly; never wait the whole call
/// timeout to find out.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A readiness probe is a TCP connect; a node that cannot take one in this long is
/// not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// EM answers are a few hundred bytes; a bigger body is not an EM answer.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EmClientError {
    #[error("building the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
    #[error("reading ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("ca_file {path} holds no usable PEM certificate")]
    CaFileEmpty { path: String },
}

/// Why a call produced no EM answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Every node failed, timed out, or a login/logout could not safely move on.
    #[error("{0}")]
    Unavailable(String),
    /// A node answered HTTP 200 with something that is not an EM response.
    #[error("{0}")]
    InvalidResponse(String),
}

/// A successful exchange: CUCM's answer and the node that gave it.
#[derive(Debug, Clone)]
pub struct Answered {
    pub response: EmResponse,
    pub node: Arc<str>,
}

/// TLS and timing settings for one cluster's client.
#[derive(Debug, Clone, Default)]
pub struct EmClientSettings {
    pub timeout: Duration,
    pub ca_file: Option<String>,
    pub tls_insecure: bool,
}

struct Node {
    url: String,
    /// `url` parsed once: parsing it for every call was a measurable share of a
    /// pass-through request (BENCHMARKS.md). `None` keeps reqwest's own error for a
    /// URL it cannot parse.
    parsed: Option<reqwest::Url>,
    /// `host:port`: the bounded label for metrics and logs.
    label: Arc<str>,
    health: Mutex<NodeHealth>,
    up: IntGauge,
    failovers: IntCounter,
}

impl Node {
    fn health(&self) -> MutexGuard<'_, NodeHealth> {
        // Plain data behind the lock: a panic elsewhere cannot leave it inconsistent.
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct NodeHealth {
    skip_until: Option<Instant>,
    consecutive_failures: u32,
}

/// How one attempt on one node went.
enum Attempt {
    Answer(EmResponse),
    /// Surely not executed by CUCM: safe to send anywhere again.
    NotDelivered(String),
    /// Maybe executed (timeout, 5xx other than 503): only a query may go again.
    Unknown(String),
    Garbage(String),
}

pub struct EmClient {
    cluster: String,
    http: reqwest::Client,
    nodes: Vec<Node>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmClient")
            .field("cluster", &self.cluster)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.url).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl EmClient {
    pub fn new(
        cluster: &str,
        node_urls: &[String],
        settings: &EmClientSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EmClientError> {
        let http = http_client(settings)?;
        let nodes = node_urls
            .iter()
            .map(|url| {
                let label: Arc<str> = Arc::from(node_label(url));
                let up = metrics.node_up.with_label_values(&[cluster, &label]);
                up.set(1);
                Node {
                    url: url.clone(),
                    parsed: reqwest::Url::parse(url).ok(),
                    failovers: metrics.node_failovers.with_label_values(&[cluster, &label]),
                    label,
                    health: Mutex::new(NodeHealth::default()),
                    up,
                }
            })
            .collect();
        Ok(Self {
            cluster: cluster.to_string(),
            http,
            nodes,
            timeout: settings.timeout,
            metrics,
        })
    }

    /// Readiness: true when a node that is not being skipped accepts a TCP
    /// connection now. Probes only; routing state is left to real calls (a hung node
    /// accepts connections, so a probe must never mark a node usable).
    pub async fn any_node_reachable(&self) -> bool {
        let now = Instant::now();
        let targets: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.health().skip_until.is_none_or(|until| until <= now))
            .filter_map(|n| {
                let url = n.parsed.as_ref()?;
                Some(format!(
                    "{}:{}",
                    url.host_str()?,
                    url.port_or_known_default()?
                ))
            })
            .collect();
        let probes = targets.iter().map(|target| async move {
            let connect = tokio::net::TcpStream::connect(target.as_str());
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                Ok(Ok(_))
            )
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .any(|reachable| reachable)
    }

    /// Sends one EM request, moving across nodes as the retry rules allow, and never
    /// past `deadline`.
    pub async fn call(
        &self,
        request: EmRequest<'_>,
        credentials: &Credentials,
        deadline: Instant,
    ) -> Result<Answered, CallError> {
        // Form-encoded once per call, not once per attempt.
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("xml", &request.encode(credentials))
            .finish();
        let mut last_problem = String::from("no node configured");
        let mut saw_garbage = None;
        let order = self.node_order();
        for (position, &index) in order.iter().enumerate() {
            let node = &self.nodes[index];
            let now = Instant::now();
            let Some(remaining) = deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                last_problem = format!("deadline reached before trying {}", node.label);
                break;
            };
            let attempt = self
                .attempt(node, request.kind(), &body, self.timeout.min(remaining))
                .await;
            let has_next = position + 1 < order.len();
            match attempt {
                Attempt::Answer(response) => {
                    self.mark_up(node);
                    return Ok(Answered {
                        response,
                        node: node.label.clone(),
                    });
                }
                Attempt::NotDelivered(problem) => {
                    self.mark_down(node);
                    last_problem = problem;
                }
                Attempt::Unknown(problem) => {
                    self.mark_down(node);
                    if request.mutates() {
                        // CUCM may have executed it: sending it again could log a
                        // user in twice or out of the wrong session.
                        return Err(CallError::Unavailable(problem));
                    }
                    last_problem = problem;
                }
                Attempt::Garbage(problem) => {
                    self.mark_down(node);
                    if request.mutates() {
                        return Err(CallError::InvalidResponse(problem));
                    }
                    saw_garbage = Some(problem.clone());
                    last_problem = problem;
                }
            }
            if has_next {
                node.failovers.inc();
            }
        }
        match saw_garbage {
            Some(problem) => Err(CallError::InvalidResponse(problem)),
            None => Err(CallError::Unavailable(last_problem)),
        }
    }

    async fn attempt(
        &self,
        node: &Node,
        operation: &str,
        body: &str,
        timeout: Duration,
    ) -> Attempt {
        let started = Instant::now();
        let (attempt, outcome) = self.exchange(node, body, timeout).await;
        let labels = [self.cluster.as_str(), &*node.label, operation];
        let outcome = match &attempt {
            Attempt::Answer(EmResponse::Failure {
                code: Some(code::BUSY),
                ..
            }) => "busy",
            Attempt::Answer(EmResponse::Failure { .. }) => "failure",
            Attempt::Answer(_) => "success",
            _ => outcome,
        };
        observe_call(&self.metrics, labels, outcome, started.elapsed());
        attempt
    }

    /// One HTTP exchange; the second value is the metric outcome for non-answers.
    async fn exchange(
        &self,
        node: &Node,
        body: &str,
        timeout: Duration,
    ) -> (Attempt, &'static str) {
        let builder = match &node.parsed {
            Some(url) => self.http.post(url.clone()),
            None => self.http.post(&node.url),
        };
        let sent = builder
            .timeout(timeout)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.to_string())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_connect() => {
                return (
                    Attempt::NotDelivered(format!("{}: connection failed", node.label)),
                    "refused",
                )
            }
            Err(e) if e.is_timeout() => {
                return (
                    Attempt::Unknown(format!("{}: timed out after {timeout:?}", node.label)),
                    "timeout",
                )
            }
            Err(_) => {
                return (
                    Attempt::Unknown(format!("{}: the HTTP exchange failed", node.label)),
                    "error",
                )
            }
        };
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return (
                Attempt::NotDelivered(format!("{}: HTTP 503", node.label)),
                "http_error",
            );
        }
        if !status.is_success() {
            return (
                Attempt::Unknown(format!("{}: HTTP {}", node.label, status.as_u16())),
                "http_error",
            );
        }
        let bytes = match read_limited(response, MAX_RESPONSE_BYTES).await {
            Ok(bytes) => bytes,
            Err(ReadProblem::TooLarge) => {
                return (
                    Attempt::Garbage(format!("{}: answer larger than 1 MiB", node.label)),
                    "invalid_response",
                )
            }
            Err(ReadProblem::Timeout) => {
                return (
                    Attempt::Unknown(format!("{}: timed out reading the answer", node.label)),
                    "timeout",
                )
            }
            Err(ReadProblem::Broken) => {
                return (
                    Attempt::Unknown(format!("{}: the answer broke off", node.label)),
                    "error",
                )
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        match decode(&text) {
            Ok(answer) => (Attempt::Answer(answer), "success"),
            Err(problem) => (
                Attempt::Garbage(format!("{}: {problem}", node.label)),
                "invalid_response",
            ),
        }
    }

    fn node_order(&self) -> Vec<usize> {
        let now = Instant::now();
        let mut healthy = Vec::with_capacity(self.nodes.len());
        let mut skipped = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            match node.health().skip_until {
                Some(until) if until > now => skipped.push((until, index)),
                _ => healthy.push(index),
            }
        }
        skipped.sort();
        healthy.extend(skipped.into_iter().map(|(_, index)| index));
        healthy
    }

    fn mark_up(&self, node: &Node) {
        let mut health = node.health();
        if health.consecutive_failures > 0 || health.skip_until.is_some() {
            *health = NodeHealth::default();
        }
        node.up.set(1);
    }

    fn mark_down(&self, node: &Node) {
        let mut health = node.health();
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        health.skip_until = Some(Instant::now() + NODE_HOLD_OFF.delay(health.consecutive_failures));
        node.up.set(0);
    }
}

/// Counts one HTTP call to a CUCM node (`[cluster, node, operation]`) and its duration.
pub(crate) fn observe_call(metrics: &Metrics, labels: [&str; 3], outcome: &str, elapsed: Duration) {
    let histogram: Histogram = metrics.cucm_call_duration.with_label_values(&labels);
    histogram.observe(elapsed.as_secs_f64());
    metrics
        .cucm_calls
        .with_label_values(&[labels[0], labels[1], labels[2], outcome])
        .inc();
}

/// The HTTP client of one cluster (EM service and EM application alike): its TLS trust,
/// timeouts, and no redirects.
pub fn http_client(settings: &EmClientSettings) -> Result<reqwest::Client, EmClientError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.timeout.min(MAX_CONNECT_TIMEOUT))
        .pool_idle_timeout(Duration::from_secs(50))
        .tcp_nodelay(true)
        // The EM API answers in place; a redirected POST would arrive as a GET
        // without its document. Not following also skips per-call policy work.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("business-connector/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|source| EmClientError::CaFile {
            path: path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)?;
        if certs.is_empty() {
            return Err(EmClientError::CaFileEmpty { path: path.clone() });
        }
        builder = builder.tls_certs_only(certs);
    }
    if settings.tls_insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    Ok(builder.build()?)
}

pub(crate) enum ReadProblem {
    TooLarge,
    Timeout,
    Broken,
}

pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ReadProblem> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(ReadProblem::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err(ReadProblem::Timeout),
            Err(_) => return Err(ReadProblem::Broken),
        }
    }
}

/// `https://cucm-eu-1:8443/emservice/EMServiceServlet` → `cucm-eu-1:8443`.
pub fn node_label(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = without_scheme.split('/').next().unwrap_or(without_scheme);
    // Never let credentials embedded in a URL reach a label.
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    authority.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_labels_are_host_and_port_without_userinfo() {
        assert_eq!(
            node_label("https://cucm-eu-1:8443/emservice/EMServiceServlet"),
            "cucm-eu-1:8443"
        );
        assert_eq!(
            node_label("http://user:pw@10.0.0.1:8080/x"),
            "10.0.0.1:8080"
        );
        assert_eq!(node_label("host"), "host");
    }
}
