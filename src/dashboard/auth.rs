//! Who may see the history and the dashboard: HTTP Basic users from
//! `[dashboard] users` (Argon2 PHC hashes), or, with no users configured, loopback
//! clients only.
//!
//! Argon2 is slow by design (tens of ms); a dashboard polls twice every few seconds. So
//! verification runs on the blocking pool (never on an HTTP worker), and a success is
//! remembered for `CACHE_TTL` under a keyed BLAKE2b digest of (name, password): the
//! plaintext password is never kept, and the digest is useless without the per-process
//! random key.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::HttpMessage as _;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use blake2::digest::{KeyInit, Mac};
use prometheus::{IntCounter, Registry};
use serde::Deserialize;

/// The realm browsers show in their login prompt.
pub const REALM: &str = "Business Connector";
/// How long a verified (name, password) is accepted without running Argon2 again.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// More entries than this and the cache starts over: bounded memory whatever clients do.
const CACHE_MAX_ENTRIES: usize = 1024;
/// An `Authorization` header longer than this is refused unread.
const MAX_HEADER_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("registering bc_dashboard_auth_failures_total: {0}")]
    Metrics(#[from] prometheus::Error),
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
    cache_key: [u8; 32],
    verified: Mutex<HashMap<Digest, Instant>>,
}

impl Auth {
    pub fn new(users: Vec<DashboardUser>, registry: &Registry) -> Result<Self, AuthError> {
        let failures = IntCounter::new(
            "bc_dashboard_auth_failures_total",
            "Requests to the dashboard, /api/history or /api/status refused with 401: missing or wrong HTTP Basic credentials.",
        )?;
        registry.register(Box::new(failures.clone()))?;
        Ok(Self {
            users,
            failures,
            cache_key: rand::random(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// `Ok` when the request may be served; otherwise the answer to send (401 or 403).
    pub async fn check(&self, request: &HttpRequest) -> Result<(), HttpResponse> {
        if self.users.is_empty() {
            // The client as the access guard saw it: behind a trusted proxy that is the
            // X-Forwarded-For address, so a balancer on this host opens nothing.
            let client = request
                .extensions()
                .get::<crate::access::ClientAddr>()
                .map(|c| c.0)
                .or_else(|| request.peer_addr().map(|peer| peer.ip()));
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
        // Unknown names are checked against some user's hash too (and refused whatever
        // it says), so a wrong name costs the same time as a wrong password.
        let known = self.users.iter().find(|user| user.name == name);
        let hash = known.unwrap_or(&self.users[0]).password_hash.clone();
        let matched = web::block(move || super::password::verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        if matched && known.is_some() {
            self.remember(digest);
            Ok(())
        } else {
            Err(self.refuse())
        }
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
