//! The shipped binary, whole: started as a process once per shipped example config and
//! per feature, with the config a user would write. Each run makes one call of every
//! kind, finds the records in `/api/history` and the series in `/metrics`, then sends
//! SIGTERM and expects exit 0 with the last records in the database.
//!
//! - `config/example.toml` (two clusters, HTTPS to a lab cluster), history on SQLite;
//! - `config/secure.example.toml`: HTTPS with client certificates, access lists behind a
//!   trusted proxy (X-Forwarded-For), JSON logs, dashboard users, history on SQLite;
//! - `config/example.toml` with the history on PostgreSQL;
//! - several clusters with discovery and a PIN login (an EMCC set of simulators).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::*;
use common::*;
use history::{Record, Store};
use sim::{SimConfig, SimHandle, Simulator};

const STOP: Duration = Duration::from_secs(30);
const EXAMPLE: &str = include_str!("../config/example.toml");
const SECURE_EXAMPLE: &str = include_str!("../config/secure.example.toml");

/// How a test reaches the gateway: the client (TLS identity, roots) and its base URL.
struct Caller {
    client: reqwest::Client,
    base: String,
    /// Sent as X-Forwarded-For (the gateway trusts the loopback proxy).
    forwarded_for: Option<&'static str>,
    /// HTTP Basic for `/api/history` and the dashboard.
    admin: Option<(&'static str, &'static str)>,
}

impl Caller {
    fn plain(gateway: &Running) -> Self {
        Self {
            client: reqwest::Client::new(),
            base: format!("http://{}", gateway.addr),
            forwarded_for: None,
            admin: None,
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, xml: Option<&str>) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(address) = self.forwarded_for {
            request = request.header("X-Forwarded-For", address);
        }
        if let Some(xml) = xml {
            request = request.form(&[("xml", xml)]);
        }
        Answer::read(request.send().await.expect("gateway reachable")).await
    }

    async fn post(&self, path: &str) -> Answer {
        let xml = format!("<request>{CREDS}</request>");
        self.send(reqwest::Method::POST, path, Some(&xml)).await
    }

    async fn history(&self, query: &str) -> Vec<serde_json::Value> {
        let mut request = self
            .client
            .get(format!("{}/api/history?{query}", self.base));
        if let Some((name, password)) = self.admin {
            request = request.basic_auth(name, Some(password));
        }
        let response = request.send().await.expect("gateway reachable");
        assert_eq!(response.status().as_u16(), 200, "/api/history");
        let body = response.text().await.expect("body");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        json["entries"].as_array().cloned().unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("gateway reachable")
            .text()
            .await
            .expect("body")
    }
}

/// One call of every kind for `device`/`user` (cluster code as the caller gives it:
/// "" for a default or discovered cluster); then the history lists the login and the
/// logout, and /metrics the series. Returns the device's records as listed.
async fn every_call(caller: &Caller, device: &str, user: &str) -> Vec<serde_json::Value> {
    let version = caller
        .send(reqwest::Method::GET, "/api/getversioninfo", None)
        .await;
    assert_eq!(version.status, 200, "{}", version.body);
    caller
        .post(&format!("/api/login/{device}/{user}"))
        .await
        .expect(200, 0);
    let query = caller.post(&format!("/api/getloggedinuser/{device}")).await;
    query.expect(200, 0);
    assert_eq!(query.user.as_deref(), Some(user));
    let devices = caller.post(&format!("/api/getuserdevices/{user}")).await;
    assert_eq!(devices.status, 200, "{}", devices.body);
    assert!(devices.body.contains(device), "{}", devices.body);
    caller
        .post(&format!("/api/logout/{device}"))
        .await
        .expect(200, 0);
    let give_up = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = caller.history(&format!("device={device}")).await;
        let operations: Vec<&str> = records
            .iter()
            .filter_map(|r| r["operation"].as_str())
            .collect();
        if operations.contains(&"login") && operations.contains(&"logout") {
            break records;
        }
        assert!(Instant::now() < give_up, "history lists {operations:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let metrics = caller.metrics().await;
    for series in [
        "bc_requests_total{",
        "bc_cucm_calls_total{",
        "bc_history_written_total",
        "bc_history_store_up 1",
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}");
    }
    records
}

/// After exit: the records the SQLite file holds for `device`.
fn sqlite_records(path: &Path, device: &str) -> Vec<Record> {
    let mut store = history::sqlite::SqliteStore::open_read_only(path).expect("history file");
    let filter = history::parse_filter(&format!("device={device}")).expect("filter");
    store.query(&filter).expect("query")
}

fn replace_all(mut text: String, replacements: &[(&str, &str)]) -> String {
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "the example no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

fn tls_simulator() -> SimHandle {
    Simulator::start(SimConfig {
        devices: 4,
        users: 4,
        tls: true,
        ..SimConfig::default()
    })
    .expect("simulator starts")
}

/// `config/example.toml` as shipped, its CUCM nodes replaced by simulators (the US
/// cluster over HTTPS, as the example's `tls_insecure` lab cluster), history on SQLite.
fn example_config(eu: &SimHandle, eu_standby: &SimHandle, us: &SimHandle, history: &str) -> String {
    let text = replace_all(
        EXAMPLE.to_string(),
        &[
            ("listen = \"0.0.0.0:8080\"", "listen = \"127.0.0.1:0\""),
            ("drain_ms = 5000", "drain_ms = 0"),
            ("workers = 0", "workers = 2"),
            (
                "\"https://cucm-eu-1:8443/emservice/EMServiceServlet\"",
                &format!("\"{}\"", eu.url()),
            ),
            (
                "\"https://cucm-eu-2:8443/emservice/EMServiceServlet\"",
                &format!("\"{}\"", eu_standby.url()),
            ),
            (
                "\"https://cucm-us-1:8443/emservice/EMServiceServlet\"",
                &format!("\"{}\"", us.url()),
            ),
        ],
    );
    // [history] is not in the example: appended as a user would.
    format!("{text}\n[history]\n{history}\n")
}

#[actix_web::test]
async fn example_config_with_history_on_sqlite() {
    let (eu, eu_standby, us) = (simulator(4, |_| {}), simulator(4, |_| {}), tls_simulator());
    let directory = tempfile::tempdir().expect("temp dir");
    let file = directory.path().join("history.sqlite");
    let config = write_config(
        directory.path(),
        "example.toml",
        &example_config(
            &eu,
            &eu_standby,
            &us,
            &format!("path = \"{}\"", file.display()),
        ),
    );
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let caller = Caller::plain(&gateway);
    let records = every_call(&caller, &device(1), "user1").await;
    assert!(records.iter().all(|r| r["cluster"] == "EU"), "{records:?}");
    // The second cluster, over HTTPS, by its code.
    caller
        .post(&format!("/api/login/{}/user2/US", device(2)))
        .await
        .expect(200, 0);
    let (status, _) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    let stored = sqlite_records(&file, &device(1));
    for operation in [history::Operation::Login, history::Operation::Logout] {
        assert!(
            stored.iter().any(|r| r.operation == operation),
            "{stored:?}"
        );
    }
    assert_eq!(
        sqlite_records(&file, &device(2)).len(),
        1,
        "the last call is flushed"
    );
}

#[actix_web::test]
async fn example_config_with_history_on_postgres() {
    let Some(database) = PostgresDatabase::create("example_config_with_history_on_postgres") else {
        return;
    };
    let (eu, eu_standby, us) = (simulator(4, |_| {}), simulator(4, |_| {}), tls_simulator());
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        directory.path(),
        "example.toml",
        &example_config(
            &eu,
            &eu_standby,
            &us,
            &format!("url = \"{}\"\ninstance = \"gw-pg\"", database.url),
        ),
    );
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let caller = Caller::plain(&gateway);
    every_call(&caller, &device(1), "user1").await;
    caller
        .post(&format!("/api/login/{}/user2/US", device(2)))
        .await
        .expect(200, 0);
    let (status, _) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    let device1 = database.count(&format!(
        "device = '{}' AND operation IN ('login', 'logout')",
        device(1)
    ));
    assert_eq!(device1, 2, "login and logout");
    assert_eq!(
        database.count(&format!("device = '{}'", device(2))),
        1,
        "the last call is flushed"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it issued.
struct Pki {
    server_pem: String,
    client_identity_pem: String,
}

fn pki(directory: &Path) -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "clients CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["hotdesk-app".to_string()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&server_key)
        .unwrap();
    std::fs::write(directory.join("server.pem"), server.pem()).unwrap();
    std::fs::write(directory.join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(directory.join("clients-ca.pem"), ca.pem()).unwrap();
    Pki {
        server_pem: server.pem(),
        client_identity_pem: format!("{}{}", client.pem(), client_key.serialize_pem()),
    }
}

#[actix_web::test]
async fn secure_example_tls_client_certificates_access_behind_a_proxy_dashboard_users() {
    let directory = tempfile::tempdir().expect("temp dir");
    let dir = directory.path().display().to_string();
    let pki = pki(directory.path());
    let (eu, eu_standby) = (tls_simulator(), tls_simulator());
    // Both nodes' self-signed certificates are the cluster's trust.
    std::fs::write(
        directory.path().join("cucm-eu-ca.pem"),
        format!(
            "{}{}",
            eu.ca_pem().expect("TLS simulator"),
            eu_standby.ca_pem().expect("TLS simulator")
        ),
    )
    .unwrap();
    let file = directory.path().join("history.sqlite");
    let hash =
        business_connector::dashboard::password::hash_password("dashboard-pw").expect("hash");
    let text = replace_all(
        SECURE_EXAMPLE.to_string(),
        &[
            ("listen = \"0.0.0.0:8443\"", "listen = \"127.0.0.1:0\""),
            ("/etc/business-connector", &dir),
            // The balancer in front is this test, on loopback.
            (
                "trusted_proxies = [\"10.1.2.3/32\"]",
                "trusted_proxies = [\"127.0.0.1/32\"]",
            ),
            (
                "\"https://cucm-eu-1:8443/emservice/EMServiceServlet\"",
                &format!("\"{}\"", eu.url()),
            ),
            (
                "\"https://cucm-eu-2:8443/emservice/EMServiceServlet\"",
                &format!("\"{}\"", eu_standby.url()),
            ),
        ],
    );
    let text = format!(
        "drain_ms = 0\nworkers = 2\n{text}\n[history]\npath = \"{}\"\n\
         [dashboard]\nusers = [{{ name = \"ops\", password_hash = \"{hash}\" }}]\n",
        file.display()
    );
    let config = write_config(directory.path(), "secure.toml", &text);
    let check = std::process::Command::new(BINARY)
        .args(["--config", config.to_str().unwrap(), "--check-config"])
        .output()
        .expect("runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let tls_client = |identity: bool| {
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(pki.server_pem.as_bytes()).unwrap()]);
        if identity {
            builder = builder
                .identity(reqwest::Identity::from_pem(pki.client_identity_pem.as_bytes()).unwrap());
        }
        builder.build().expect("client")
    };
    let caller = Caller {
        client: tls_client(true),
        base: format!("https://{}", gateway.addr),
        forwarded_for: Some("10.0.0.5"),
        admin: Some(("ops", "dashboard-pw")),
    };
    let records = every_call(&caller, &device(1), "user1").await;
    assert!(
        records.iter().all(|r| r["client"] == "10.0.0.5"),
        "the recorded client is the forwarded address: {records:?}"
    );
    // Without a client certificate: no TLS session, no answer.
    let refused = tls_client(false)
        .get(format!("https://{}/healthz", gateway.addr))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    // A forwarded address in the deny list: 403, code 1009.
    let denied = Caller {
        forwarded_for: Some("10.9.0.1"),
        ..Caller {
            client: caller.client.clone(),
            base: caller.base.clone(),
            forwarded_for: None,
            admin: None,
        }
    };
    denied
        .post(&format!("/api/logout/{}", device(2)))
        .await
        .expect(403, 1009);
    // The history needs the dashboard user.
    let anonymous = caller
        .client
        .get(format!("{}/api/history", caller.base))
        .send()
        .await
        .expect("reachable");
    assert_eq!(anonymous.status().as_u16(), 401);
    caller
        .post(&format!("/api/login/{}/user2", device(2)))
        .await
        .expect(200, 0);
    let (status, lines) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    assert!(
        lines
            .iter()
            .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "JSON logs"
    );
    assert!(lines.iter().all(|l| !l.contains("dashboard-pw")));
    assert_eq!(
        sqlite_records(&file, &device(2)).len(),
        1,
        "the last call is flushed"
    );
}

#[actix_web::test]
async fn several_clusters_discovery_and_a_pin_login() {
    const PIN: &str = "48151623";
    let home = simulator(2, |_| {});
    // The visited cluster's phones have names of their own (discovery must find one
    // cluster per device) and no users.
    let fixture = (1..=4)
        .map(|n| format!("[[devices]]\nname = \"SEPB{n:09}\"\n"))
        .collect::<String>();
    let phones = Simulator::start(SimConfig {
        fixture: Some(sim::Fixture::from_toml_str(&fixture).expect("fixture")),
        ..SimConfig::default()
    })
    .expect("simulator starts");
    phones.add_emcc_peer(&home.url()).expect("peer");
    assert!(home.set_pin("user1", PIN));
    let directory = tempfile::tempdir().expect("temp dir");
    let file = directory.path().join("history.sqlite");
    // No default cluster: a device's cluster is discovered.
    let text = format!(
        "listen = \"127.0.0.1:0\"\nworkers = 2\ndrain_ms = 0\n\
         [history]\npath = \"{}\"\n\
         [[cluster]]\ncode = \"HOME\"\nnodes = [\"{}\"]\n\
         [[cluster]]\ncode = \"PHONES\"\nnodes = [\"{}\"]\n",
        file.display(),
        home.url(),
        phones.url()
    );
    let config = write_config(directory.path(), "clusters.toml", &text);
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let caller = Caller::plain(&gateway);
    // Home cluster's own phone, discovered.
    every_call(&caller, &device(1), "user2").await;
    // A visitor's phone in the other cluster, with the PIN.
    let phone = "SEPB000000003".to_string();
    caller
        .post(&format!("/api/login/{phone}/user1/PHONES/{PIN}"))
        .await
        .expect(200, 0);
    assert_eq!(phones.logged_in_user(&phone).as_deref(), Some("user1"));
    let query = caller.post(&format!("/api/getloggedinuser/{phone}")).await;
    query.expect(200, 0);
    assert_eq!(query.user.as_deref(), Some("user1"));
    caller
        .post(&format!("/api/logout/{phone}"))
        .await
        .expect(200, 0);
    let metrics = caller.metrics().await;
    assert!(metrics.contains("bc_pin_logins_total"));
    assert!(metrics.contains("bc_discovery_total"));
    assert!(!metrics.contains(PIN));
    let (status, lines) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    assert!(
        lines.iter().all(|l| !l.contains(PIN)),
        "a PIN reached the log"
    );
    let stored = sqlite_records(&file, &phone);
    assert!(
        stored
            .iter()
            .any(|r| r.operation == history::Operation::Login),
        "{stored:?}"
    );
    assert!(
        stored
            .iter()
            .all(|r| r.cluster.as_deref() == Some("PHONES")),
        "{stored:?}"
    );
    let file_bytes = std::fs::read(&file).expect("history file");
    assert!(
        !file_bytes.windows(PIN.len()).any(|w| w == PIN.as_bytes()),
        "a PIN reached the history file"
    );
}
