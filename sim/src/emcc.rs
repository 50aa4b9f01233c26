//! The simulator's own stand-in for EMCC between clusters: a visiting simulator asks
//! its peers (possible home simulators) over a private HTTP call on the peer's EM
//! listener. The real EMCC protocol (home and visiting EMService talking HTTPS) is not
//! imitated; only its
//! outcome is: does the user live there, is the PIN right, may they log in elsewhere.
//!
//! Routes (JSON bodies, on the peer's EM address, HTTP or HTTPS like the EM service):
//! * `POST /_emcc/checkUser`: [`CheckUser`] → [`CheckUserAnswer`]
//! * `POST /_emcc/logout`: [`VisitEnded`] → `{}`

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::emapp::Pin;

pub(crate) const EMCC_PREFIX: &str = "/_emcc/";
pub(crate) const CHECK_USER_PATH: &str = "/_emcc/checkUser";
pub(crate) const LOGOUT_PATH: &str = "/_emcc/logout";
/// How long a visiting simulator waits for a peer before calling it unreachable (208).
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Peer answers are tiny; anything bigger is not a peer.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Errors of the EMCC peer call (any of them makes the peer "unreachable", code 208).
#[derive(Debug, thiserror::Error)]
pub enum EmccError {
    #[error("invalid EMCC peer {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    BadPeer(String),
    #[error("peer {peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("peer {0}: no answer within the timeout")]
    Timeout(String),
    #[error("peer {peer}: unexpected answer (HTTP {status})")]
    BadAnswer { peer: String, status: u16 },
    #[error("peer {peer}: TLS: {message}")]
    Tls { peer: String, message: String },
}

/// An EMCC peer: where another simulator's EM service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUrl {
    pub tls: bool,
    /// `host:port`
    pub authority: String,
    pub host: String,
}

impl PeerUrl {
    /// Accepts `http://HOST:PORT[/anything]`, `https://HOST:PORT[/anything]` or a bare
    /// `HOST:PORT` (plain HTTP), so a peer's `url()` or `addr()` can be passed as is.
    pub fn parse(text: &str) -> Result<PeerUrl, EmccError> {
        let bad = || EmccError::BadPeer(text.to_string());
        let trimmed = text.trim();
        let (tls, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = trimmed.strip_prefix("http://") {
            (false, rest)
        } else if trimmed.contains("://") {
            return Err(bad());
        } else {
            (false, trimmed)
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(PeerUrl {
            tls,
            authority: authority.to_string(),
            host: host.to_string(),
        })
    }
}

impl std::fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// Visiting → home: does `user` live here, is `pin` right; with `login`, also record
/// the visit on `device` (so the home counts the user as logged in elsewhere).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckUser {
    pub user: String,
    pub pin: Pin,
    pub device: String,
    #[serde(default)]
    pub login: bool,
}

/// Home → visiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckUserAnswer {
    /// Not a user of this simulator.
    Unknown,
    /// A user here, but the PIN is wrong (→ EMCC code 2).
    PinRejected,
    /// PIN right, but the user is logged in elsewhere and multiple logins are not allowed (25).
    LoggedInElsewhere,
    /// PIN right (and, with `login`, the visit is recorded).
    Ok,
}

/// Visiting → home: the visitor left `device` (EM logout, doLogout, logoutAll).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisitEnded {
    pub user: String,
    pub device: String,
}

/// POSTs a JSON body to a peer and decodes the JSON answer (one connection per call:
/// peer calls are rare, and it keeps the client trivial).
pub(crate) async fn call<Req: Serialize, Ans: for<'de> Deserialize<'de>>(
    peer: &PeerUrl,
    path: &str,
    body: &Req,
) -> Result<Ans, EmccError> {
    let work = async {
        let io_error = |source| EmccError::Io {
            peer: peer.to_string(),
            source,
        };
        let body = serde_json::to_vec(body).map_err(|e| io_error(e.into()))?;
        let tcp = TcpStream::connect(&peer.authority)
            .await
            .map_err(io_error)?;
        let _ = tcp.set_nodelay(true);
        let (status, answer) = if peer.tls {
            let stream = tls_connect(peer, tcp).await?;
            exchange(stream, peer, path, &body).await
        } else {
            exchange(tcp, peer, path, &body).await
        }
        .map_err(io_error)?;
        if status != 200 {
            return Err(EmccError::BadAnswer {
                peer: peer.to_string(),
                status,
            });
        }
        serde_json::from_slice(&answer).map_err(|_| EmccError::BadAnswer {
            peer: peer.to_string(),
            status,
        })
    };
    tokio::time::timeout(PEER_TIMEOUT, work)
        .await
        .map_err(|_| EmccError::Timeout(peer.to_string()))?
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: &PeerUrl,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        peer.authority,
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES as u64)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

/// Splits a complete `Connection: close` HTTP/1.1 response into status and body.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[split + 4..];
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let body = match length {
        Some(length) if length <= body.len() => &body[..length],
        _ => body,
    };
    Some((status, body.to_vec()))
}

async fn tls_connect(
    peer: &PeerUrl,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, EmccError> {
    use rustls::pki_types::ServerName;
    let tls_error = |message: String| EmccError::Tls {
        peer: peer.to_string(),
        message,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .dangerous()
        // Peers are other simulators with generated self-signed certificates; the EMCC
        // stand-in does not model Bulk Certificate Management, so it trusts any peer.
        .with_custom_certificate_verifier(Arc::new(AnyPeerCertificate(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(peer.host.clone()).map_err(|e| tls_error(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(e.to_string()))
}

/// Accepts any server certificate but still checks handshake signatures.
#[derive(Debug)]
struct AnyPeerCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyPeerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls() {
        let p = PeerUrl::parse("http://127.0.0.1:8080/emservice/EMServiceServlet").unwrap();
        assert_eq!((p.tls, p.authority.as_str()), (false, "127.0.0.1:8080"));
        assert_eq!(p.to_string(), "http://127.0.0.1:8080");
        let p = PeerUrl::parse("https://localhost:8443").unwrap();
        assert_eq!((p.tls, p.host.as_str()), (true, "localhost"));
        let p = PeerUrl::parse("127.0.0.1:9").unwrap();
        assert!(!p.tls);
        let p = PeerUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(p.host, "::1");
        for bad in ["ftp://x:1", "http://nohost", "http://:80", "x:notaport", ""] {
            assert!(PeerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n\"ok\"trailing";
        assert_eq!(parse_response(raw), Some((200, b"\"ok\"".to_vec())));
        let raw = b"HTTP/1.1 503 Service Unavailable\r\n\r\nbody";
        assert_eq!(parse_response(raw), Some((503, b"body".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn wire_forms() {
        let check = CheckUser {
            user: "u".into(),
            pin: Pin::new("4321"),
            device: "SEP1".into(),
            login: true,
        };
        let json = serde_json::to_string(&check).unwrap();
        assert!(json.contains("\"pin\":\"4321\""), "the home needs the PIN");
        assert!(!format!("{check:?}").contains("4321"));
        let answer: CheckUserAnswer = serde_json::from_str("\"pin_rejected\"").unwrap();
        assert_eq!(answer, CheckUserAnswer::PinRejected);
    }
}
