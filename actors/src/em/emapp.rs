//! `EmAppClient`: the cluster's EM *application* (`/emapp/EMAppServlet`), the phone's own
//! path to Extension Mobility. The gateway uses it for one thing: a login with a PIN,
//! which is how CUCM logs a user in on a phone of another cluster (Extension Mobility
//! Cross Cluster): `GET …/emapp/EMAppServlet?device=D&userid=U&seq=PIN&EMCC=true`.
//!
//! Rules that keep users safe:
//! - The GET is sent at most once. It moves to another node only when the connection
//!   was refused (nothing was sent); after a timeout or any answer it is never sent
//!   again: a PIN sent twice can lock the user out.
//! - The URL carries the PIN, so neither the URL nor a reqwest error (which prints it)
//!   ever reaches a log, an error text or a metric; only the node's `host:port` does.
//! - No `Via` header (CUCM refuses proxied logins unless told otherwise).
//!
//! EMApp answers a phone page with HTTP 200 whatever happened; a failure is a text
//! ending in the code in parentheses, `Please try to login again (201)`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::client::{
    http_client, node_label, observe_call, read_limited, CallError, EmClientError,
    EmClientSettings, ReadProblem,
};
use crate::metrics::Metrics;
use crate::operation::{DeviceName, Pin, UserId};

/// The EM application's path on a CUCM node.
pub const EMAPP_PATH: &str = "/emapp/EMAppServlet";
/// A phone page is a few hundred bytes.
const MAX_PAGE_BYTES: usize = 64 * 1024;
/// Operation label of EMApp calls in the CUCM call metrics.
const OPERATION_LABEL: &str = "emapp_login";

/// The page EMApp answered, as far as the gateway cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAnswer {
    /// The code in parentheses, when the page reports a failure.
    pub code: Option<u32>,
    pub node: Arc<str>,
}

struct EmAppNode {
    url: reqwest::Url,
    label: Arc<str>,
}

pub struct EmAppClient {
    cluster: String,
    http: reqwest::Client,
    nodes: Vec<EmAppNode>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EmAppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmAppClient")
            .field("cluster", &self.cluster)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &*n.label).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The EMApp URL of an EM service node: same scheme, host and port, EMApp's path.
pub fn derive_emapp_url(em_service_url: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(em_service_url).ok()?;
    url.host_str()?;
    url.set_path(EMAPP_PATH);
    url.set_query(None);
    url.set_fragment(None);
    Some(url.to_string())
}

impl EmAppClient {
    pub fn new(
        cluster: &str,
        node_urls: &[String],
        settings: &EmClientSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EmClientError> {
        let nodes = node_urls
            .iter()
            .filter_map(|url| {
                Some(EmAppNode {
                    url: reqwest::Url::parse(url).ok()?,
                    label: Arc::from(node_label(url)),
                })
            })
            .collect();
        Ok(Self {
            cluster: cluster.to_string(),
            http: http_client(settings)?,
            nodes,
            timeout: settings.timeout,
            metrics,
        })
    }

    /// Logs `user` in on `device` with `pin`, sent once, never past `deadline`.
    pub async fn login(
        &self,
        device: &DeviceName,
        user: &UserId,
        pin: &Pin,
        deadline: Instant,
    ) -> Result<PageAnswer, CallError> {
        let mut last_problem = String::from("no EM application node configured");
        for node in &self.nodes {
            let Some(remaining) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                last_problem = format!("deadline reached before trying {}", node.label);
                break;
            };
            let mut url = node.url.clone();
            url.query_pairs_mut()
                .append_pair("device", device.as_str())
                .append_pair("userid", user.as_str())
                .append_pair("seq", pin.expose())
                .append_pair("EMCC", "true");
            let started = Instant::now();
            let (result, outcome) = self.exchange(node, url, self.timeout.min(remaining)).await;
            let labels = [self.cluster.as_str(), &*node.label, OPERATION_LABEL];
            observe_call(&self.metrics, labels, outcome, started.elapsed());
            match result {
                Exchanged::Page(code) => {
                    return Ok(PageAnswer {
                        code,
                        node: node.label.clone(),
                    })
                }
                // Refused: the PIN never left; the next node may take it.
                Exchanged::NotSent(problem) => last_problem = problem,
                Exchanged::MaybeSent(problem) => return Err(CallError::Unavailable(problem)),
            }
        }
        Err(CallError::Unavailable(last_problem))
    }

    async fn exchange(
        &self,
        node: &EmAppNode,
        url: reqwest::Url,
        timeout: Duration,
    ) -> (Exchanged, &'static str) {
        let label = &node.label;
        let sent = self
            .http
            .get(url)
            .timeout(timeout)
            .header(reqwest::header::ACCEPT_LANGUAGE, "en_US")
            .header(reqwest::header::ACCEPT_CHARSET, "utf-8")
            .send()
            .await;
        // Never format the reqwest error: it prints the URL, and the URL holds the PIN.
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_connect() => {
                return (
                    Exchanged::NotSent(format!("EM application {label}: connection failed")),
                    "refused",
                )
            }
            Err(e) if e.is_timeout() => {
                return (
                    Exchanged::MaybeSent(format!(
                        "EM application {label}: timed out after {timeout:?}"
                    )),
                    "timeout",
                )
            }
            Err(_) => {
                return (
                    Exchanged::MaybeSent(format!(
                        "EM application {label}: the HTTP exchange failed"
                    )),
                    "error",
                )
            }
        };
        let status = response.status();
        if status != StatusCode::OK {
            return (
                Exchanged::MaybeSent(format!("EM application {label}: HTTP {}", status.as_u16())),
                "http_error",
            );
        }
        match read_limited(response, MAX_PAGE_BYTES).await {
            Ok(body) => {
                let code = page_code(&String::from_utf8_lossy(&body));
                (
                    Exchanged::Page(code),
                    if code.is_some() { "failure" } else { "success" },
                )
            }
            Err(ReadProblem::TooLarge) => (
                Exchanged::MaybeSent(format!("EM application {label}: page larger than 64 KiB")),
                "invalid_response",
            ),
            Err(ReadProblem::Timeout) => (
                Exchanged::MaybeSent(format!(
                    "EM application {label}: timed out reading the page"
                )),
                "timeout",
            ),
            Err(ReadProblem::Broken) => (
                Exchanged::MaybeSent(format!("EM application {label}: the page broke off")),
                "error",
            ),
        }
    }
}

enum Exchanged {
    Page(Option<u32>),
    NotSent(String),
    MaybeSent(String),
}

/// The failure code of a phone page: the last `(NNN)` in it (1-4 digits), the way
/// EMApp ends its error texts (`Login is unavailable(23)`). `None`: no failure.
pub fn page_code(page: &str) -> Option<u32> {
    let mut found = None;
    let mut rest = page;
    while let Some(open) = rest.find('(') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(')') else {
            break;
        };
        let inner = &rest[..close];
        if (1..=4).contains(&inner.len()) && inner.bytes().all(|b| b.is_ascii_digit()) {
            found = inner.parse().ok();
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_code_in_parentheses_is_the_failure() {
        assert_eq!(
            page_code(
                "<CiscoIPPhoneText><Text>Please try to login again (201)</Text></CiscoIPPhoneText>"
            ),
            Some(201)
        );
        assert_eq!(page_code("Login is unavailable(23)"), Some(23));
        assert_eq!(page_code("a (12) then (2)"), Some(2));
        assert_eq!(page_code("<Text>Login successful</Text>"), None);
        assert_eq!(page_code("Sign out? (Yes/No)"), None);
        assert_eq!(page_code("(12345) is not a code; nor is ()"), None);
        assert_eq!(page_code("unclosed (204"), None);
    }

    #[test]
    fn emapp_urls_derive_from_em_service_urls() {
        assert_eq!(
            derive_emapp_url("https://cucm-eu-1:8443/emservice/EMServiceServlet").as_deref(),
            Some("https://cucm-eu-1:8443/emapp/EMAppServlet")
        );
        assert_eq!(
            derive_emapp_url("http://10.0.0.1:8080/emservice/EMServiceServlet?x=1").as_deref(),
            Some("http://10.0.0.1:8080/emapp/EMAppServlet")
        );
        assert_eq!(derive_emapp_url("not a url"), None);
    }
}
