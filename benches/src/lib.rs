//! Shared helpers of the benchmark tools: the request documents of each scenario, a
//! minimal HTTP/1.1 keep-alive client, and percentiles.
//!
//! The client is hand-written on purpose: a load generator must cost as little CPU
//! per request as possible and add no pooling or buffering of its own, so that what
//! it measures is the server. It handles exactly what the servers under test send
//! (a `Content-Length` body); anything else is an error, never a guess.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The simulator's seeded device `index` (1-based): `SEP` + 12 upper-case hex digits.
pub fn device_name(index: usize) -> String {
    format!("SEP{index:012X}")
}

/// `application/x-www-form-urlencoded` value encoding (everything but unreserved).
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The EM `deviceUserQuery` form body CUCM (or the simulator) receives.
pub fn em_query_body(device: &str, app_id: &str, app_certificate: &str) -> String {
    let xml = format!(
        "<query><appInfo><appID>{app_id}</appID><appCertificate>{app_certificate}</appCertificate></appInfo>\
         <deviceUserQuery><deviceName>{device}</deviceName></deviceUserQuery></query>"
    );
    format!("xml={}", form_encode(&xml))
}

/// The northbound form body carrying only the credentials (the rest is in the path).
pub fn northbound_body(app_id: &str, app_certificate: &str) -> String {
    let xml = format!(
        "<request><appID>{app_id}</appID><appCertificate>{app_certificate}</appCertificate></request>"
    );
    format!("xml={}", form_encode(&xml))
}

/// A complete keep-alive request, ready to write.
pub fn http_request(method: &str, host: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    match body {
        Some(body) => {
            out.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
            out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        }
        None => out.push_str("\r\n"),
    }
    out.into_bytes()
}

/// One answer: the status and the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The northbound `<code>` of the answer, if it has one.
    pub fn result_code(&self) -> Option<u32> {
        let text = std::str::from_utf8(&self.body).ok()?;
        let start = text.find("<code>")? + "<code>".len();
        let end = start + text[start..].find("</code>")?;
        text[start..end].trim().parse().ok()
    }
}

/// A keep-alive HTTP/1.1 connection with a reusable read buffer.
pub struct Connection {
    addr: String,
    stream: TcpStream,
    buffer: Vec<u8>,
    /// The server said `Connection: close` (nginx does every 1,000 requests): the
    /// next exchange opens a fresh connection first, as any HTTP client would.
    closing: bool,
}

impl Connection {
    pub async fn open(addr: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            addr: addr.to_string(),
            stream,
            buffer: Vec::with_capacity(2048),
            closing: false,
        })
    }

    /// Sends `request` and reads the whole answer.
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<Answer> {
        if self.closing {
            *self = Self::open(&self.addr).await?;
        }
        self.stream.write_all(request).await?;
        self.read_answer().await
    }

    async fn read_answer(&mut self) -> io::Result<Answer> {
        self.buffer.clear();
        let header_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            if self.buffer.len() > 64 * 1024 {
                return Err(invalid("response head over 64 KiB"));
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..header_end])
            .map_err(|_| invalid("response head is not UTF-8"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("no status code"))?;
        let mut length = None;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                self.closing = value.trim().eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(invalid("chunked answers are not supported"));
            }
        }
        let length = length.ok_or_else(|| invalid("no Content-Length"))?;
        while self.buffer.len() < header_end + length {
            self.fill().await?;
        }
        Ok(Answer {
            status,
            body: self.buffer[header_end..header_end + length].to_vec(),
        })
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let read = self.stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// The `q`-quantile (0.0..=1.0) of sorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Splits `http://host:port/path` into (`host:port`, `/path`).
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs are supported: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    Ok((host.to_string(), path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_match_the_simulator_seeding() {
        assert_eq!(device_name(1), "SEP000000000001");
        assert_eq!(device_name(255), "SEP0000000000FF");
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&samples, 0.5), 50);
        assert_eq!(quantile(&samples, 0.99), 99);
        assert_eq!(quantile(&samples, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn bodies_are_form_encoded_and_codes_read() {
        assert!(northbound_body("a", "b").starts_with("xml=%3Crequest%3E%3CappID%3Ea"));
        let answer = Answer {
            status: 200,
            body: b"<result><code>26</code></result>".to_vec(),
        };
        assert_eq!(answer.result_code(), Some(26));
    }
}
