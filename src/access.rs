//! Who may call the gateway: the `[access]` table, address rules (allow, deny,
//! trusted proxies) and a per-client request rate, checked by a middleware before any
//! parsing.
//!
//! The decisions (`Cidr::contains`, `client_address`, `Rules::verdict`) are pure and
//! unit-tested; `AccessGuard` only applies them to a request. A refusal is counted in
//! `bc_access_refused_total{reason}` — by reason, never by address, so the series stay
//! bounded whoever knocks.

use std::future::{ready, Future, Ready};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::HeaderValue;
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use actors::metrics::MetricsError;
use actors::Metrics;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::Deserialize;

use crate::northbound::request::Call;
use crate::northbound::response::{xml_response, Failure, ResultDoc};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("{0:?} is not an address or CIDR block (like 10.0.0.0/8 or 2001:db8::/32)")]
    BadCidr(String),
}

/// An address block, IPv4 or IPv6. A bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = AccessError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || AccessError::BadCidr(text.to_string());
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let network = IpAddr::from_str(address).map_err(|_| bad())?.to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { network, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = AccessError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl Cidr {
    /// Whether `address` lies in the block. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`, what a dual-stack socket reports) count as IPv4.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => prefix_matches(
                u128::from(u32::from(network)) << 96,
                u128::from(u32::from(address)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                prefix_matches(u128::from(network), u128::from(address), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_matches(network: u128, address: u128, prefix: u8) -> bool {
    let mask = match prefix {
        0 => 0,
        bits => u128::MAX << (128 - u32::from(bits)),
    };
    network & mask == address & mask
}

fn any_contains(blocks: &[Cidr], address: IpAddr) -> bool {
    blocks.iter().any(|block| block.contains(address))
}

/// `[access]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// When not empty, only these clients are served.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Refused even when allowed.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// From these peers, the client is taken from X-Forwarded-For.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Per client address; 0 = unlimited.
    #[serde(default)]
    pub client_requests_per_second: u32,
    #[serde(default = "default_client_burst")]
    pub client_burst: u32,
    /// Open connections per client address (a trusted proxy is not capped); beyond it
    /// a new connection is closed at once. 0 = unlimited.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
}

fn default_client_burst() -> u32 {
    20
}

fn default_max_connections_per_client() -> usize {
    256
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            trusted_proxies: Vec::new(),
            client_requests_per_second: 0,
            client_burst: default_client_burst(),
            max_connections_per_client: default_max_connections_per_client(),
        }
    }
}

impl AccessConfig {
    /// Errors as (key, message).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.client_requests_per_second > 0 && self.client_burst == 0 {
            return Err((
                "client_burst",
                "must be at least 1 when client_requests_per_second is set".into(),
            ));
        }
        Ok(())
    }
}

/// The client a request is from: the peer, or — when the peer is a trusted proxy — the
/// right-most X-Forwarded-For address that is not a trusted proxy itself (everything left
/// of it was written by the client and proves nothing). `forwarded_for` are the raw
/// header values, in order; several headers are one list.
///
/// Fails closed: an entry that must be read on the way to the client but is not an
/// address (`unknown`, `fe80::1%eth0`, a byte that is not ASCII, an empty entry) makes
/// the client unknown, never the proxy itself — the proxy may be loopback or allowed.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted_proxies: &[Cidr],
) -> Result<IpAddr, Unidentified> {
    let peer = peer.to_canonical();
    if !any_contains(trusted_proxies, peer) {
        return Ok(peer);
    }
    let values: Vec<&[u8]> = forwarded_for.collect();
    let mut client = peer;
    for hop in values
        .iter()
        .rev()
        .flat_map(|value| value.rsplit(|b| *b == b','))
    {
        let address = parse_hop(hop).ok_or(Unidentified)?;
        client = address;
        if !any_contains(trusted_proxies, address) {
            return Ok(address);
        }
    }
    Ok(client)
}

/// A trusted proxy forwarded a request whose client address cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unidentified;

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678` (spaces around it
/// are fine); anything else is `None`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop).ok()?.trim_matches([' ', '\t']);
    if let Ok(address) = IpAddr::from_str(hop) {
        return Some(address.to_canonical());
    }
    std::net::SocketAddr::from_str(hop)
        .ok()
        .map(|socket| socket.ip().to_canonical())
}

/// Why a client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// In `deny`.
    Denied,
    /// `allow` is set and the client is not in it.
    NotAllowed,
    /// Over its request rate; may come back after this long.
    RateLimited(Duration),
    /// Behind a trusted proxy, but its X-Forwarded-For cannot be read.
    Unidentified,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::NotAllowed => "not_allowed",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::Unidentified => "unidentified",
        }
    }
}

/// The address rules: deny wins, then allow (when given).
pub fn address_verdict(config: &AccessConfig, client: IpAddr) -> Result<(), Refusal> {
    if any_contains(&config.deny, client) {
        return Err(Refusal::Denied);
    }
    if !config.allow.is_empty() && !any_contains(&config.allow, client) {
        return Err(Refusal::NotAllowed);
    }
    Ok(())
}

/// Forget idle clients' rate state every this many checks, so that memory stays
/// bounded by the clients of the last few seconds, not by every address ever seen.
const RETAIN_EVERY: u64 = 1024;

/// The client address a request was judged as, for the request record.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The client address of a request that passed the guard.
pub fn client_of(request: &HttpRequest) -> Option<String> {
    client_ip(request).map(|ip| ip.to_string())
}

/// The client address of a request that passed the guard, as an address.
pub fn client_ip(request: &HttpRequest) -> Option<IpAddr> {
    request.extensions().get::<ClientAddr>().map(|c| c.0)
}

/// The access rules, the per-client limiter and their counters; shared by all workers.
pub struct Access {
    config: AccessConfig,
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    checks: AtomicU64,
    refused: IntCounterVec,
    /// Requests whose body did not arrive in time (answered 408).
    pub too_slow: IntCounter,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("config", &self.config)
            .finish()
    }
}

impl Access {
    pub fn new(config: &AccessConfig, metrics: &Metrics) -> Result<Self, MetricsError> {
        let refused = IntCounterVec::new(
            Opts::new(
                "bc_access_refused_total",
                "Requests refused before parsing, by reason (denied, not_allowed, rate_limited, unidentified)",
            ),
            &["reason"],
        )?;
        let too_slow = IntCounter::new(
            "bc_client_too_slow_total",
            "Requests whose body did not arrive within client_timeout_ms or the deadline",
        )?;
        metrics.register(Box::new(refused.clone()))?;
        metrics.register(Box::new(too_slow.clone()))?;
        let limiter = NonZeroU32::new(config.client_requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(config.client_burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Ok(Self {
            config: config.clone(),
            limiter,
            checks: AtomicU64::new(0),
            refused,
            too_slow,
        })
    }

    /// Judges one request from `peer` (the socket's address) for `path`. The client is
    /// `None` when a trusted proxy forwarded it unreadably (then it is refused).
    pub fn check<'a>(
        &self,
        peer: IpAddr,
        path: &str,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> (Option<IpAddr>, Result<(), Refusal>) {
        let client = client_address(peer, forwarded_for, &self.config.trusted_proxies);
        // Probes from the host itself work whatever the lists say: an orchestrator's
        // health check must not depend on the client lists.
        if peer.to_canonical().is_loopback() && matches!(path, "/healthz" | "/readyz") {
            return (client.ok(), Ok(()));
        }
        let verdict = match client {
            Ok(client) => address_verdict(&self.config, client).and_then(|()| self.rate(client)),
            Err(Unidentified) => Err(Refusal::Unidentified),
        };
        if let Err(refusal) = verdict {
            self.refused.with_label_values(&[refusal.reason()]).inc();
        }
        (client.ok(), verdict)
    }

    fn rate(&self, client: IpAddr) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&client).map_err(|not_until| {
            Refusal::RateLimited(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// The answer to a refused request: 403 + 1009, or 429 + Retry-After + 1010.
    pub fn refusal_response(path: &str, refusal: Refusal) -> HttpResponse {
        let failure = match refusal {
            Refusal::Denied | Refusal::NotAllowed | Refusal::Unidentified => Failure::Forbidden,
            Refusal::RateLimited(wait) => Failure::TooManyRequests { retry_after: wait },
        };
        let call = path
            .trim_start_matches('/')
            .split('/')
            .nth(1)
            .and_then(Call::from_segment)
            .unwrap_or(Call::Logout);
        let doc = ResultDoc::failure(call, "", None, &failure);
        xml_response(doc.status, doc.render(), doc.retry_after)
    }
}

/// The middleware: judges every request before any handler sees it.
#[derive(Clone)]
pub struct AccessGuard(pub Arc<Access>);

impl<S, B> Transform<S, ServiceRequest> for AccessGuard
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = AccessMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(AccessMiddleware {
            service: Rc::new(service),
            access: self.0.clone(),
        }))
    }
}

pub struct AccessMiddleware<S> {
    service: Rc<S>,
    access: Arc<Access>,
}

type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

impl<S, B> Service<ServiceRequest> for AccessMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        // Without a peer address (not a TCP connection: tests' in-process calls) there
        // is nothing to judge by; such requests cannot come from the network.
        let Some(peer) = request.peer_addr().map(|a| a.ip()) else {
            let service = self.service.clone();
            return Box::pin(async move { Ok(service.call(request).await?.map_into_left_body()) });
        };
        let forwarded = request.headers().get_all("x-forwarded-for");
        let forwarded = forwarded.map(HeaderValue::as_bytes);
        let (client, verdict) = self.access.check(peer, request.path(), forwarded);
        match verdict {
            Ok(()) => {
                if let Some(client) = client {
                    request.extensions_mut().insert(ClientAddr(client));
                }
                let service = self.service.clone();
                Box::pin(async move { Ok(service.call(request).await?.map_into_left_body()) })
            }
            Err(refusal) => {
                let response = Access::refusal_response(request.path(), refusal);
                Box::pin(ready(Ok(request
                    .into_response(response)
                    .map_into_right_body())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidr_matching_v4_and_v6() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("10.9.0.0/16").contains(ip("10.9.200.1")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        // A dual-stack socket reports IPv4 clients as mapped IPv6.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        // Host bits in the network are ignored.
        assert!(cidr("10.1.2.3/8").contains(ip("10.200.0.1")));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for text in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0/8",
            "host",
            "10.0.0.0/x",
            "",
        ] {
            assert!(text.parse::<Cidr>().is_err(), "{text}");
        }
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let proxies = [cidr("10.1.2.3/32"), cidr("10.1.2.4/32")];
        let xff = |values: &'static [&'static str]| values.iter().map(|v| v.as_bytes());
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            client_address(ip("198.51.100.7"), xff(&["1.1.1.1"]), &proxies),
            Ok(ip("198.51.100.7"))
        );
        // Behind a trusted proxy: the right-most untrusted address.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff(&["6.6.6.6, 203.0.113.5"]), &proxies),
            Ok(ip("203.0.113.5"))
        );
        // Chained trusted proxies are skipped; several headers are one list.
        assert_eq!(
            client_address(
                ip("10.1.2.3"),
                xff(&["6.6.6.6, 203.0.113.5", "10.1.2.4"]),
                &proxies
            ),
            Ok(ip("203.0.113.5"))
        );
        // With ports and IPv6.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff(&["[2001:db8::5]:443"]), &proxies),
            Ok(ip("2001:db8::5"))
        );
        // No header: the proxy itself.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff(&[]), &proxies),
            Ok(ip("10.1.2.3"))
        );
        // Only trusted proxies: the left-most of them.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff(&["10.1.2.4"]), &proxies),
            Ok(ip("10.1.2.4"))
        );
        // What the client wrote left of its own address is never read.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff(&["unknown, 203.0.113.5"]), &proxies),
            Ok(ip("203.0.113.5"))
        );
    }

    #[test]
    fn a_forwarded_client_that_cannot_be_read_is_unidentified_never_the_proxy() {
        let proxies = [cidr("127.0.0.1/32"), cidr("10.1.2.4/32")];
        let unreadable: [&[u8]; 9] = [
            b"203.0.113.5, unknown",
            b"unknown",
            b"fe80::1%eth0",
            b"ip:abc",
            b"x\xff",
            b"203.0.113.5, \xff10.0.0.1",
            b"",
            b"203.0.113.5,",
            b"10.1.2.4, _hidden",
        ];
        for value in unreadable {
            assert_eq!(
                client_address(ip("127.0.0.1"), std::iter::once(value), &proxies),
                Err(Unidentified),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        // A non-ASCII byte left of the client is the client's own business.
        assert_eq!(
            client_address(
                ip("127.0.0.1"),
                std::iter::once(&b"x\xff, 203.0.113.9"[..]),
                &proxies
            ),
            Ok(ip("203.0.113.9"))
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let config = AccessConfig {
            allow: vec![cidr("10.0.0.0/8"), cidr("127.0.0.1/32")],
            deny: vec![cidr("10.9.0.0/16")],
            ..AccessConfig::default()
        };
        assert_eq!(address_verdict(&config, ip("10.1.1.1")), Ok(()));
        assert_eq!(
            address_verdict(&config, ip("10.9.1.1")),
            Err(Refusal::Denied)
        );
        assert_eq!(
            address_verdict(&config, ip("192.0.2.1")),
            Err(Refusal::NotAllowed)
        );
        let open = AccessConfig::default();
        assert_eq!(address_verdict(&open, ip("192.0.2.1")), Ok(()));
        let deny_only = AccessConfig {
            deny: vec![cidr("192.0.2.0/24")],
            ..AccessConfig::default()
        };
        assert_eq!(
            address_verdict(&deny_only, ip("192.0.2.1")),
            Err(Refusal::Denied)
        );
    }

    #[test]
    fn the_rate_is_per_client_and_health_probes_from_loopback_pass() {
        let metrics = Metrics::new().unwrap();
        let config = AccessConfig {
            allow: vec![cidr("10.0.0.0/8")],
            client_requests_per_second: 1,
            client_burst: 2,
            ..AccessConfig::default()
        };
        let access = Access::new(&config, &metrics).unwrap();
        let none = || std::iter::empty::<&[u8]>();
        for _ in 0..2 {
            assert_eq!(
                access.check(ip("10.0.0.1"), "/api/logout", none()).1,
                Ok(())
            );
        }
        assert!(matches!(
            access.check(ip("10.0.0.1"), "/api/logout", none()).1,
            Err(Refusal::RateLimited(wait)) if wait > Duration::ZERO
        ));
        // Another client has its own budget.
        assert_eq!(
            access.check(ip("10.0.0.2"), "/api/logout", none()).1,
            Ok(())
        );
        // Loopback is not in `allow`, yet its health probes are served.
        assert_eq!(access.check(ip("127.0.0.1"), "/healthz", none()).1, Ok(()));
        assert_eq!(
            access.check(ip("127.0.0.1"), "/api/logout", none()).1,
            Err(Refusal::NotAllowed)
        );
        let rendered = metrics.render();
        assert!(
            rendered.contains("bc_access_refused_total{reason=\"rate_limited\"} 1"),
            "{rendered}"
        );
        assert!(
            rendered.contains("bc_access_refused_total{reason=\"not_allowed\"} 1"),
            "{rendered}"
        );
    }
}
