//! Northbound security end to end (the real server on port 0, a simulated CUCM): TLS
//! with client certificates, address rules, the per-client rate, slow clients, and
//! parse errors that never quote a secret.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use business_connector::access::AccessConfig;
use business_connector::config::Config;
use business_connector::tls::TlsConfig;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(sim: &sim::SimHandle, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut cluster = actors::ClusterConfig::new("EU", vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    let mut config = Config::single_cluster(cluster);
    tweak(&mut config);
    config
}

fn cidrs(list: &[&str]) -> Vec<business_connector::access::Cidr> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

/// Sends one HTTP/1.1 request (Connection: close) and reads the whole answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    body: &str,
) -> std::io::Result<String> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

// ---------------------------------------------------------------- TLS

struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

fn ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { params, key, cert }
}

fn leaf(ca: &Ca, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    (params.signed_by(&key, &issuer).unwrap(), key)
}

fn client_config(
    server_ca: &Ca,
    identity: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

/// One login over TLS; `Err` when the handshake or the exchange is refused.
async fn tls_login(gw: &Gateway, client: Arc<rustls::ClientConfig>) -> std::io::Result<String> {
    let tcp = TcpStream::connect(gw.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await?;
    let body = format!("<request>{CREDS}</request>");
    tokio::time::timeout(
        Duration::from_secs(5),
        exchange(&mut tls, &format!("/api/login/{}/user1", device(1)), &body),
    )
    .await?
}

#[actix_web::test]
async fn tls_with_client_certificates() {
    let sim = simulator(2, |_| {});
    let dir = std::env::temp_dir().join(format!("bc-security-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki { dir };
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let other_ca = ca("another CA");
    let (server_cert, server_key) = leaf(&server_ca, &["localhost", "127.0.0.1"]);
    let write = |name: &str, text: String| {
        let path = pki.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let tls = TlsConfig {
        cert_file: write("server.pem", server_cert.pem()),
        key_file: write("server.key", server_key.serialize_pem()),
        client_ca_file: Some(write("clients.pem", client_ca.cert.pem())),
    };
    let gw = Gateway::start(config(&sim, |c| c.tls = Some(tls))).await;

    let accepted = leaf(&client_ca, &["client.example"]);
    let answer = tls_login(&gw, client_config(&server_ca, Some(&accepted)))
        .await
        .expect("a client with an accepted certificate is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("<code>0</code>"), "{answer}");
    let calls = sim.stats().calls_total;

    let refused = |result: std::io::Result<String>| match result {
        Err(_) => true,
        Ok(answer) => !answer.contains("HTTP/1.1"),
    };
    assert!(
        refused(tls_login(&gw, client_config(&server_ca, None)).await),
        "no client certificate"
    );
    let stranger = leaf(&other_ca, &["client.example"]);
    assert!(
        refused(tls_login(&gw, client_config(&server_ca, Some(&stranger))).await),
        "a certificate from another CA"
    );
    assert_eq!(
        sim.stats().calls_total,
        calls,
        "refused clients reach no CUCM"
    );
    // Plain HTTP on the TLS port gets no API answer either.
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange(&mut plain, "/healthz", ""))
        .await
        .expect("answered or closed");
    assert!(!answer.map(|a| a.contains("200")).unwrap_or(false));
    drop(pki);
}

/// The per-client connection cap counts TLS connections too (after the handshake).
#[actix_web::test]
async fn tls_connections_beyond_the_per_client_cap_are_closed() {
    let sim = simulator(2, |_| {});
    let dir = std::env::temp_dir().join(format!("bc-security-tls-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki { dir };
    let server_ca = ca("server CA");
    let (server_cert, server_key) = leaf(&server_ca, &["localhost", "127.0.0.1"]);
    let write = |name: &str, text: String| {
        let path = pki.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let tls = TlsConfig {
        cert_file: write("server.pem", server_cert.pem()),
        key_file: write("server.key", server_key.serialize_pem()),
        client_ca_file: None,
    };
    let gw = Gateway::start(config(&sim, |c| {
        c.tls = Some(tls);
        c.access.max_connections_per_client = 2;
    }))
    .await;
    let client = client_config(&server_ca, None);
    let connect = || async {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
    };
    let _held = [connect().await.unwrap(), connect().await.unwrap()];
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tls = connect().await?;
        exchange(&mut tls, "/healthz", "").await
    })
    .await
    .expect("answered or closed at once");
    assert!(
        !third.map(|a| a.contains("HTTP/1.1")).unwrap_or(false),
        "the third TLS connection from one address gets no answer"
    );
    drop(pki);
}

// ---------------------------------------------------------------- access

#[actix_web::test]
async fn addresses_outside_allow_or_in_deny_get_403_1009_without_cucm() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |c| {
        c.access = AccessConfig {
            allow: cidrs(&["10.0.0.0/8"]),
            ..AccessConfig::default()
        }
    }))
    .await;
    let answer = gw.login_seeded(1).await;
    answer.expect(403, 1009);
    assert_eq!(gw.get("/api/getversioninfo").await.status, 403);
    assert_eq!(gw.get("/metrics").await.status, 403);
    // Health probes from the host itself are served whatever the lists say.
    assert_eq!(gw.get("/healthz").await.status, 200);
    assert_eq!(sim.stats().calls_total, 0);
    gw.shutdown().await;

    let gw = Gateway::start(config(&sim, |c| {
        c.access = AccessConfig {
            allow: cidrs(&["127.0.0.0/8", "::1"]),
            deny: cidrs(&["127.0.0.1"]),
            ..AccessConfig::default()
        }
    }))
    .await;
    gw.query(&device(1)).await.expect(403, 1009);
    assert_eq!(sim.stats().calls_total, 0, "deny wins over allow");
}

#[actix_web::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_judged() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |c| {
        c.access = AccessConfig {
            deny: cidrs(&["203.0.113.0/24"]),
            trusted_proxies: cidrs(&["127.0.0.1"]),
            ..AccessConfig::default()
        }
    }))
    .await;
    let send = |xff: &'static str| {
        gw.client
            .post(gw.url(&format!("/api/getloggedinuser/{}", device(1))))
            .header("X-Forwarded-For", xff)
            .form(&[("xml", format!("<request>{CREDS}</request>"))])
            .send()
    };
    let refused = Answer::read(send("198.51.100.1, 203.0.113.9").await.unwrap()).await;
    refused.expect(403, 1009);
    assert_eq!(sim.stats().calls_total, 0);
    // The client wrote the left part itself: only the right-most untrusted hop counts.
    let served = Answer::read(send("203.0.113.9, 198.51.100.1").await.unwrap()).await;
    served.expect(200, 0);
    let text = gw.metrics().await;
    assert_eq!(
        metric(&text, "bc_access_refused_total{reason=\"denied\"}"),
        1.0
    );
    assert!(!text.contains("203.0.113"), "addresses never become labels");
}

#[actix_web::test]
async fn a_client_over_its_rate_gets_429_1010_with_retry_after() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |c| {
        c.access = AccessConfig {
            client_requests_per_second: 1,
            client_burst: 2,
            ..AccessConfig::default()
        }
    }))
    .await;
    gw.query(&device(1)).await.expect(200, 0);
    gw.query(&device(1)).await.expect(200, 0);
    let calls = sim.stats().calls_total;
    let limited = gw.query(&device(1)).await;
    limited.expect(429, 1010);
    assert_eq!(limited.retry_after.as_deref(), Some("1"));
    assert_eq!(sim.stats().calls_total, calls);
}

// ---------------------------------------------------------------- slow clients

#[actix_web::test]
async fn a_body_that_never_arrives_is_cut_after_client_timeout() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |c| c.client_timeout_ms = 500)).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /api/logout HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n<",
        )
        .await
        .unwrap();
    // The first bytes of an answer, or the close (0 bytes), whichever comes first.
    let mut first = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut first)).await;
    let took = started.elapsed();
    let length = read
        .expect("the connection was neither answered nor closed")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&first[..length]);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "cut after {took:?}"
    );
    // And the connection does not stay open.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest))
        .await
        .expect("closed after the answer")
        .ok();
    assert_eq!(sim.stats().calls_total, 0);
}

#[actix_web::test]
async fn slow_connections_do_not_hold_up_a_normal_request() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |c| c.client_timeout_ms = 5000)).await;
    let mut slow = Vec::new();
    for n in 0..200 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let part: &[u8] = if n % 2 == 0 {
            b"POST /api/logout HTTP/1.1\r\nHost: x\r\n" // headers trickling
        } else {
            b"POST /api/logout HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n<"
        };
        stream.write_all(part).await.unwrap();
        slow.push(stream);
    }
    let started = Instant::now();
    gw.query(&device(1)).await.expect(200, 0);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    drop(slow);
}

// ---------------------------------------------------------------- parse errors

#[actix_web::test]
async fn malformed_xml_comes_first_and_never_quotes_a_secret() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::start(config(&sim, |_| {})).await;
    gw.post_xml("/api/logout", "hello").await.expect(200, 1002);
    for secret_bearing in [
        "<request><appID>bcapp</appID><appCertificate>Zq9&SECRETx7;</appCertificate></request>",
        "<request><appID>bcapp</appID><appCertificate>Zq9<SECRETx7</appCertificate></request>",
        "<request><pin>12<SECRETx7>34</pin></request>",
    ] {
        let answer = gw
            .post_xml(&format!("/api/logout/{}", device(1)), secret_bearing)
            .await;
        answer.expect(200, 1002);
        assert!(!answer.body.contains("SECRET"), "{}", answer.body);
    }
    assert_eq!(sim.stats().calls_total, 0);
}

// ---------------------------------------------------------------- deadlines

#[actix_web::test]
async fn a_hung_cucm_gets_answers_by_the_deadline_and_never_more_than_max_concurrent() {
    let sim = simulator(100, |_| {});
    sim.set_behavior(faults(sim::Faults {
        hang: true,
        ..sim::Faults::default()
    }));
    let gw = Gateway::start(config(&sim, |c| {
        c.deadline_ms = 1500;
        c.clusters[0].max_concurrent = 5;
    }))
    .await;
    let clients: Vec<reqwest::Client> = (0..20).map(|_| reqwest::Client::new()).collect();
    let deadline = Duration::from_millis(1500);
    let mut peak_hung = 0;
    // Two waves: the second arrives while CUCM may still work on the first's calls.
    for wave in 0..2 {
        let requests = (0..40).map(|n| {
            let client = clients[n % 20].clone();
            let url = gw.url(&format!("/api/logout/{}", device(wave * 40 + n + 1)));
            async move {
                let started = Instant::now();
                let response = client
                    .post(url)
                    .form(&[("xml", format!("<request>{CREDS}</request>"))])
                    .send()
                    .await
                    .expect("answered");
                let answer = Answer::read(response).await;
                (started.elapsed(), answer)
            }
        });
        let all = futures_util::future::join_all(requests);
        tokio::pin!(all);
        let answers = loop {
            tokio::select! {
                answers = &mut all => break answers,
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    peak_hung = peak_hung.max(sim.stats().hung_calls);
                }
            }
        };
        for (took, answer) in answers {
            assert!(
                // The client's clock also counts connecting and queueing for the one
                // worker; before the fix answers came a whole second late (2.5 s).
                took < deadline + Duration::from_millis(600),
                "answered after {took:?}: {}",
                answer.body
            );
            assert!(matches!(answer.code, Some(1003 | 1004)), "{}", answer.body);
        }
    }
    let stats = sim.stats();
    assert!(peak_hung <= 5, "CUCM saw {peak_hung} calls at once");
    assert!(stats.max_concurrent_calls <= 5, "{stats:?}");
    sim.set_behavior(sim::Behavior::default());
}
