//! Shared helpers for the simulator's integration tests: a minimal HTTP/1.1 client over
//! plain TCP or rustls (so `sim` needs no HTTP client dependency) and EM document builders.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `code` of an EM `<error code="N">`, if the body is a failure.
    pub fn em_code(&self) -> Option<u32> {
        em_code(&self.body)
    }
}

pub fn em_code(body: &str) -> Option<u32> {
    let start = body.find("<error code=\"")? + "<error code=\"".len();
    let end = start + body[start..].find('"')?;
    body[start..end].parse().ok()
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn<S> {
    stream: BufReader<S>,
    host: String,
}

pub type TcpConn = Conn<TcpStream>;

impl Conn<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(stream),
            host: addr.to_string(),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, host: String) -> Self {
        Conn {
            stream: BufReader::new(stream),
            host,
        }
    }

    /// Sends raw bytes (a complete request) and reads one response.
    pub async fn raw(&mut self, request: &[u8]) -> anyhow::Result<HttpReply> {
        self.stream.get_mut().write_all(request).await?;
        self.stream.get_mut().flush().await?;
        self.read_reply().await
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<HttpReply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        self.raw(&bytes).await
    }

    /// POSTs an EM document the standard way: form field `xml`, URL-encoded.
    pub async fn em(&mut self, xml: &str) -> anyhow::Result<HttpReply> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("xml", xml)
            .finish();
        self.request(
            "POST",
            sim::EM_PATH,
            Some("application/x-www-form-urlencoded"),
            body.as_bytes(),
        )
        .await
    }

    async fn read_reply(&mut self) -> anyhow::Result<HttpReply> {
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line).await? == 0 {
            bail!("connection closed before a response");
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?
            .parse()?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("bad header {line:?}"))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse())
            .transpose()?
            .context("response without content-length")?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(HttpReply {
            status,
            headers,
            body: String::from_utf8(body)?,
        })
    }

    /// True when the server has closed the connection (EOF or reset on read).
    pub async fn is_closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.stream.read(&mut buf).await, Ok(0) | Err(_))
    }
}

/// POSTs one EM document on a fresh connection.
pub async fn em(addr: SocketAddr, xml: &str) -> anyhow::Result<HttpReply> {
    Conn::connect(addr).await?.em(xml).await
}

/// GET/POST on the control endpoint.
pub async fn control(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: &str,
) -> anyhow::Result<HttpReply> {
    let mut conn = Conn::connect(addr).await?;
    conn.request(method, path, Some("application/json"), json.as_bytes())
        .await
}

/// Connects with rustls, trusting only `ca_pem`, verifying `server_name`.
pub async fn connect_tls(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
) -> anyhow::Result<Conn<tokio_rustls::client::TlsStream<TcpStream>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = connector.connect(name, tcp).await?;
    Ok(Conn::new(tls, addr.to_string()))
}

pub const APP: (&str, &str) = ("bcapp", "bcsecret");

pub fn app_info(app: (&str, &str)) -> String {
    format!(
        "<appInfo><appID>{}</appID><appCertificate>{}</appCertificate></appInfo>",
        app.0, app.1
    )
}

pub fn login_xml(device: &str, user: &str) -> String {
    login_as(APP, device, user)
}

pub fn login_as(app: (&str, &str), device: &str, user: &str) -> String {
    format!(
        "<request>{}<login><deviceName>{device}</deviceName><userID>{user}</userID></login></request>",
        app_info(app)
    )
}

pub fn login_with_profile(device: &str, user: &str, profile: &str) -> String {
    format!(
        "<request>{}<login><deviceName>{device}</deviceName><userID>{user}</userID>\
         <deviceProfile>{profile}</deviceProfile></login></request>",
        app_info(APP)
    )
}

pub fn logout_xml(device: &str) -> String {
    logout_as(APP, device)
}

pub fn logout_as(app: (&str, &str), device: &str) -> String {
    format!(
        "<request>{}<logout><deviceName>{device}</deviceName></logout></request>",
        app_info(app)
    )
}

pub fn logout_all_xml() -> String {
    format!(
        "<request>{}<logoutAll></logoutAll></request>",
        app_info(APP)
    )
}

pub fn device_user_query(devices: &[&str]) -> String {
    let names: String = devices
        .iter()
        .map(|d| format!("<deviceName>{d}</deviceName>"))
        .collect();
    format!(
        "<query>{}<deviceUserQuery>{names}</deviceUserQuery></query>",
        app_info(APP)
    )
}

pub fn user_devices_query(users: &[&str]) -> String {
    let ids: String = users
        .iter()
        .map(|u| format!("<userID>{u}</userID>"))
        .collect();
    format!(
        "<query>{}<userDevicesQuery>{ids}</userDevicesQuery></query>",
        app_info(APP)
    )
}

pub fn device_profile_query(element: &str, users: &[&str]) -> String {
    let ids: String = users
        .iter()
        .map(|u| format!("<userID>{u}</userID>"))
        .collect();
    format!(
        "<query>{}<{element}>{ids}</{element}></query>",
        app_info(APP)
    )
}

pub const SUCCESS: &str =
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><success/></response>";

pub fn seeded_sim(devices: usize, users: usize) -> sim::SimHandle {
    sim::Simulator::start(sim::SimConfig {
        devices,
        users,
        ..sim::SimConfig::default()
    })
    .expect("simulator starts")
}
