//! Test harness: the real gateway server on port 0, simulated CUCM clusters, and a
//! client that speaks the northbound API.
#![allow(dead_code)] // each test binary uses a different part of the harness

/// Polls an async condition (each try may `.await`) until it holds, failing after
/// `$timeout`: the tests' way to wait for something without sleeping a guessed time.
#[allow(unused_macros)] // each test binary uses a different part of the harness
macro_rules! eventually {
    ($what:expr, $timeout:expr, $condition:expr) => {{
        let give_up = std::time::Instant::now() + $timeout;
        loop {
            if $condition {
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "timed out waiting until {}",
                $what
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

pub mod binary;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use actors::ClusterConfig;
use business_connector::config::Config;
use business_connector::server;
use sim::{Behavior, Faults, Latency, SimConfig, SimHandle, Simulator};
use tokio::sync::oneshot;

pub const CREDS: &str = "<appID>bcapp</appID><appCertificate>bcsecret</appCertificate>";

/// A gateway serving on 127.0.0.1:0 inside the test's actix System.
pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    finished: Option<oneshot::Receiver<()>>,
    pub client: reqwest::Client,
}

impl Gateway {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        Self::start_on(listener, config).await
    }

    /// On a listener of the test's choice (e.g. 0.0.0.0:0 to be reached from a
    /// non-loopback address).
    pub async fn start_on(listener: TcpListener, mut config: Config) -> Self {
        if config.workers == 0 {
            config.workers = 1;
        }
        // No balancer watches these gateways: a test that stops one should not wait
        // out the drain (tests/binary.rs tests the drain itself).
        config.drain_ms = 0;
        let addr = listener.local_addr().expect("bound address");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (finished_tx, finished_rx) = oneshot::channel::<()>();
        actix_web::rt::spawn(async move {
            let shutdown = async move {
                let _ = shutdown_rx.await;
            };
            if let Err(error) = server::run(listener, config, shutdown).await {
                panic!("gateway failed: {error}");
            }
            let _ = finished_tx.send(());
        });
        Self {
            addr,
            shutdown: Some(shutdown_tx),
            finished: Some(finished_rx),
            client: reqwest::Client::new(),
        }
    }

    /// One cluster `code` over these nodes, with a tweak applied to its settings.
    pub async fn with_cluster(
        code: &str,
        nodes: Vec<String>,
        tweak: impl FnOnce(&mut ClusterConfig),
    ) -> Self {
        let mut cluster = ClusterConfig::new(code, nodes);
        // Tests are not about the rate limit unless they say so.
        cluster.max_requests_per_second = 0;
        tweak(&mut cluster);
        Self::start(Config::single_cluster(cluster)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POST with the XML in form field `xml` (the vendor document's way).
    pub async fn post_form(&self, path: &str, xml: &str) -> Answer {
        let response = self
            .client
            .post(self.url(path))
            .form(&[("xml", xml)])
            .send()
            .await
            .expect("gateway reachable");
        Answer::read(response).await
    }

    /// POST with a raw XML body.
    pub async fn post_xml(&self, path: &str, xml: &str) -> Answer {
        let response = self
            .client
            .post(self.url(path))
            .header("Content-Type", "text/xml")
            .body(xml.to_string())
            .send()
            .await
            .expect("gateway reachable");
        Answer::read(response).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("gateway reachable");
        Answer::read(response).await
    }

    pub async fn login(&self, device: &str, user: &str) -> Answer {
        self.post_form(
            &format!("/api/login/{device}/{user}"),
            &format!("<request>{CREDS}</request>"),
        )
        .await
    }

    /// Seeded user n on seeded device n.
    pub async fn login_seeded(&self, n: usize) -> Answer {
        self.login(&device(n), &format!("user{n}")).await
    }

    pub async fn logout(&self, device: &str) -> Answer {
        self.post_form(
            &format!("/api/logout/{device}"),
            &format!("<request>{CREDS}</request>"),
        )
        .await
    }

    pub async fn query(&self, device: &str) -> Answer {
        self.post_form(
            &format!("/api/getloggedinuser/{device}"),
            &format!("<request>{CREDS}</request>"),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics body")
    }

    /// Stops like SIGTERM does and waits until the server has finished.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rx) = self.finished.take() {
            let _ = rx.await;
        }
    }

    /// The shutdown switch, to flip while other requests borrow the gateway.
    pub fn take_shutdown_trigger(&mut self) -> oneshot::Sender<()> {
        self.shutdown.take().expect("shutdown not yet triggered")
    }

    pub async fn finished(&mut self) {
        if let Some(rx) = self.finished.take() {
            let _ = rx.await;
        }
    }
}

/// A northbound answer, parsed.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: String,
    pub body: String,
    pub code: Option<u32>,
    pub text: String,
    pub device: Option<String>,
    pub user: Option<String>,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header("retry-after");
        let content_type = header("content-type").unwrap_or_default();
        let body = response.text().await.expect("body");
        let (mut code, mut text, mut device, mut user) = (None, String::new(), None, None);
        if let Ok(root) = actors::xml::parse(&body) {
            if let Some(result) = root.descendant("result").or(Some(&root)) {
                code = result.child("code").and_then(|c| c.text.parse().ok());
                text = result
                    .child("text")
                    .map(|t| t.text.clone())
                    .unwrap_or_default();
                device = result.child("deviceName").map(|d| d.text.clone());
                user = result.child("userID").map(|u| u.text.clone());
            }
        }
        Self {
            status,
            retry_after,
            content_type,
            body,
            code,
            text,
            device,
            user,
        }
    }

    #[track_caller]
    pub fn expect(&self, status: u16, code: u32) -> &Self {
        assert_eq!(
            (self.status, self.code),
            (status, Some(code)),
            "unexpected answer: {}",
            self.body
        );
        self
    }
}

/// A simulated cluster with `devices` devices and users (names per sim/README.md).
pub fn simulator(devices: usize, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig {
        devices,
        users: devices,
        ..SimConfig::default()
    };
    tweak(&mut config);
    Simulator::start(config).expect("simulator starts")
}

pub fn latency_ms(ms: u64) -> Behavior {
    Behavior {
        latency: Latency::Fixed(Duration::from_millis(ms)),
        ..Behavior::default()
    }
}

pub fn faults(faults: Faults) -> Behavior {
    Behavior {
        faults,
        ..Behavior::default()
    }
}

/// Device `n` of the simulator's seeding scheme.
pub fn device(n: usize) -> String {
    format!("SEP{n:012X}")
}

/// An address where nothing listens: bound, then released.
pub fn dead_node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/emservice/EMServiceServlet")
}

/// Polls `condition` until it holds (observing state, not guessing a delay).
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let give_up = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The value of one series in a Prometheus text exposition (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
