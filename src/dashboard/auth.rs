//! Who may see the history and the dashboard: HTTP Basic users from
//! `[dashboard] users` (Argon2 PHC hashes), or, with no users configured, loopback
//! clients only.
//!
//! Argon2 is slow and memory-hard by design (tens of ms, 19 MiB per check); a dashboard
//! polls twice every few seconds, and anyone can send wrong passwords. So:
//! - a success is remembered for `CACHE_TTL` under a keyed BLAKE2b digest of (name,
//!   password): the plaintext password is never kept, and the digest is useless without
//!   the per-process random key — a polling dashboard runs Argon2 once a minute;
//! - checks run on `VERIFIER_THREADS` threads of their own (`verifier`), never on an
//!   HTTP worker; when all are busy the answer is 503 at once, so memory stays flat
//!   however many clients send wrong passwords;
//! - each client address may start `CHECKS_PER_MINUTE` checks (burst `CHECK_BURST`);
//!   beyond that 429 without a check. Remembered successes cost no check.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::HttpMessage as _;
use actix_web::{HttpRequest, HttpResponse};
use base64::Engine as _;
use blake2::digest::{KeyInit, Mac};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::Deserialize;

use super::verifier::{Busy, Verifier};

/// The realm browsers show in their login prompt.
pub const REALM: &str = "Business Connector";
/// How long a verified (name, password) is accepted without running Argon2 again.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// More entries than this and the cache starts over: bounded memory whatever clients do.
const CACHE_MAX_ENTRIES: usize = 1024;
/// An `Authorization` header longer than this is refused unread.
const MAX_HEADER_BYTES: usize = 1024;
/// Argon2 checks running at once: each holds its memory cost (19 MiB by default).
const VERIFIER_THREADS: usize = 2;
/// Argon2 checks one client address may start per minute, and at once.
const CHECKS_PER_MINUTE: u32 = 30;
const CHECK_BURST: u32 = 10;
/// Forget idle clients' check budgets every this many checks (bounded memory).
const RETAIN_EVERY: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("registering the dashboard's auth counters: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the password check threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// One `[dashboard] users` entry.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardUser {
    pub name: String,
    /// Argon2 PHC string from `business-connector hash-password`.
    pub password_hash: String,
}

// The hash is not the password, but it is what an offline attack starts from: keep it
// out of logs and `--check-config` output.
impl fmt::Debug for DashboardUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardUser")
            .field("name", &self.name)
            .field("password_hash", &"***")
            .finish()
    }
}

/// Errors as (key, message), for `Config::validate`.
pub fn validate_users(users: &[DashboardUser]) -> Result<(), (&'static str, String)> {
    let mut seen = std::collections::HashSet::new();
    for user in users {
        if user.name.is_empty() || user.name.len() > 64 {
            return Err(("dashboard.users.name", "must be 1-64 bytes".into()));
        }
        // Basic credentials are "name:password", split at the first colon.
        if user.name.contains(':') || user.name.chars().any(char::is_control) {
            return Err((
                "dashboard.users.name",
                format!("{:?} may not contain ':' or control characters", user.name),
            ));
        }
        if !seen.insert(user.name.as_str()) {
            return Err((
                "dashboard.users.name",
                format!("{:?} is listed twice", user.name),
            ));
        }
        if !super::password::is_valid_hash(&user.password_hash) {
            return Err((
                "dashboard.users.password_hash",
                format!(
                    "user {:?}: not an Argon2 PHC hash (make one with `business-connector hash-password`)",
                    user.name
                ),
            ));
        }
    }
    Ok(())
}

type Digest = [u8; 32];

/// The access check shared by `/dashboard`, `/api/history` and `/api/status`.
pub struct Auth {
    users: Vec<DashboardUser>,
    failures: IntCounter,
    /// Refused before any check: `busy` (503) or `rate_limited` (429).
    shed: IntCounterVec,
    cache_key: [u8; 32],
    verified: Mutex<HashMap<Digest, Instant>>,
    /// `None` without users (nothing to check).
    verifier: Option<Verifier>,
    checks: DefaultKeyedRateLimiter<IpAddr>,
    checks_started: AtomicU64,
}

impl Auth {
    pub fn new(users: Vec<DashboardUser>, registry: &Registry) -> Result<Self, AuthError> {
        let failures = IntCounter::new(
            "bc_dashboard_auth_failures_total",
            "Requests to the dashboard, /api/history or /api/status refused with 401: missing or wrong HTTP Basic credentials.",
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "bc_dashboard_auth_shed_total",
                "Dashboard password checks refused before running: busy (503, every check thread in use) or rate_limited (429, the client's checks per minute used up).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        let verifier = match users.is_empty() {
            true => None,
            false => Some(Verifier::start(VERIFIER_THREADS, || {
                let mut checker = super::password::Checker::default();
                move |password: &str, hash: &str| checker.verify(password, hash)
            })?),
        };
        let quota =
            Quota::per_minute(NonZeroU32::new(CHECKS_PER_MINUTE).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(CHECK_BURST).unwrap_or(NonZeroU32::MIN));
        Ok(Self {
            users,
            failures,
            shed,
            cache_key: rand::random(),
            verified: Mutex::new(HashMap::new()),
            verifier,
            checks: RateLimiter::keyed(quota),
            checks_started: AtomicU64::new(0),
        })
    }

    /// `Ok` when the request may be served; otherwise the answer to send (401 or 403).
    pub async fn check(&self, request: &HttpRequest) -> Result<(), HttpResponse> {
        if self.users.is_empty() {
            let client = client_of(request);
            let loopback = client.is_some_and(|ip| ip.to_canonical().is_loopback());
            return if loopback {
                Ok(())
            } else {
                Err(plain(
                    StatusCode::FORBIDDEN,
                    "the dashboard is served to loopback clients only while no [dashboard] users are configured\n",
                ))
            };
        }
        let Some((name, password)) = basic_credentials(request) else {
            return Err(self.refuse());
        };
        let digest = self.digest(&name, &password);
        if self.recently_verified(&digest) {
            return Ok(());
        }
        let client = client_of(request).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if let Err(wait) = self.may_check(client) {
            self.shed.with_label_values(&["rate_limited"]).inc();
            return Err(retry_later(StatusCode::TOO_MANY_REQUESTS, wait));
        }
        let Some(verifier) = &self.verifier else {
            return Err(self.refuse());
        };
        // Unknown names are checked against some user's hash too (and refused whatever
        // it says), so a wrong name costs the same time as a wrong password.
        let known = self.users.iter().find(|user| user.name == name);
        let hash = known.unwrap_or(&self.users[0]).password_hash.clone();
        match verifier.verify(password, hash).await {
            Ok(true) if known.is_some() => {
                self.remember(digest);
                Ok(())
            }
            Ok(_) => Err(self.refuse()),
            Err(Busy) => {
                self.shed.with_label_values(&["busy"]).inc();
                Err(retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Duration::from_secs(1),
                ))
            }
        }
    }

    /// Takes one of the client's checks, or says how long until it has one again.
    fn may_check(&self, client: IpAddr) -> Result<(), Duration> {
        if self.checks_started.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.checks.retain_recent();
            self.checks.shrink_to_fit();
        }
        self.checks
            .check_key(&client.to_canonical())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn refuse(&self) -> HttpResponse {
        self.failures.inc();
        HttpResponse::Unauthorized()
            .insert_header((
                header::WWW_AUTHENTICATE,
                format!("Basic realm=\"{REALM}\", charset=\"UTF-8\""),
            ))
            .content_type("text/plain; charset=utf-8")
            .body("authentication required\n")
    }

    fn digest(&self, name: &str, password: &str) -> Digest {
        type Keyed = blake2::Blake2bMac<blake2::digest::consts::U32>;
        let mut mac = match <Keyed as KeyInit>::new_from_slice(&self.cache_key) {
            Ok(mac) => mac,
            // A 32-byte key is always accepted; an all-zero digest only ever misses.
            Err(_) => return [0; 32],
        };
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn recently_verified(&self, digest: &Digest) -> bool {
        let cache = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get(digest).is_some_and(|at| at.elapsed() < CACHE_TTL)
    }

    fn remember(&self, digest: Digest) {
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() >= CACHE_MAX_ENTRIES {
            cache.retain(|_, at| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(digest, Instant::now());
    }
}

/// The client as the access guard saw it: behind a trusted proxy that is the
/// X-Forwarded-For address, so a balancer on this host opens nothing.
fn client_of(request: &HttpRequest) -> Option<IpAddr> {
    request
        .extensions()
        .get::<crate::access::ClientAddr>()
        .map(|c| c.0)
        .or_else(|| request.peer_addr().map(|peer| peer.ip()))
}

/// 503 or 429 with `Retry-After` (whole seconds, at least 1).
fn retry_later(status: StatusCode, wait: Duration) -> HttpResponse {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HttpResponse::build(status)
        .insert_header((header::RETRY_AFTER, seconds.max(1).to_string()))
        .content_type("text/plain; charset=utf-8")
        .body("too many password checks; retry later\n")
}

/// (name, password) from `Authorization: Basic …`; `None` when absent or malformed.
fn basic_credentials(request: &HttpRequest) -> Option<(String, String)> {
    let value = request.headers().get(header::AUTHORIZATION)?.as_bytes();
    if value.len() > MAX_HEADER_BYTES {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (name, password) = decoded.split_once(':')?;
    Some((name.to_string(), password.to_string()))
}

fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn user(name: &str, hash: &str) -> DashboardUser {
        DashboardUser {
            name: name.into(),
            password_hash: hash.into(),
        }
    }

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("ops:pa:ss");
        let request = TestRequest::default()
            .insert_header((header::AUTHORIZATION, format!("Basic {encoded}")))
            .to_http_request();
        assert_eq!(
            basic_credentials(&request),
            Some(("ops".into(), "pa:ss".into()))
        );
        for bad in ["Bearer abc", "Basic !!!", "Basic", "basic Zm9v"] {
            let request = TestRequest::default()
                .insert_header((header::AUTHORIZATION, bad))
                .to_http_request();
            assert_eq!(basic_credentials(&request), None, "{bad}");
        }
    }

    #[test]
    fn users_are_validated() {
        let hash = crate::dashboard::password::hash_password("x").expect("hash");
        assert!(validate_users(&[user("ops", &hash)]).is_ok());
        let cases = [
            (vec![user("", &hash)], "dashboard.users.name"),
            (vec![user("a:b", &hash)], "dashboard.users.name"),
            (
                vec![user("ops", &hash), user("ops", &hash)],
                "dashboard.users.name",
            ),
            (vec![user("ops", "plain")], "dashboard.users.password_hash"),
        ];
        for (users, key) in cases {
            assert_eq!(validate_users(&users).map_err(|(k, _)| k), Err(key));
        }
    }

    #[test]
    fn debug_hides_the_hash() {
        let shown = format!("{:?}", user("ops", "$argon2id$secretish"));
        assert!(!shown.contains("secretish"), "{shown}");
    }
}
