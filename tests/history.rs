//! The request history and the dashboard's access rules, against the real
//! server on port 0 and a simulated cluster: what is recorded (refusals too), the
//! `/api/history` filters and formats, no secret in the database file, records kept
//! across a restart, a stalled writer that drops instead of blocking, HTTP Basic and
//! loopback-only access, and `business-connector hash-password`.

mod common;

use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::ClusterConfig;
use business_connector::config::Config;
use business_connector::dashboard::DashboardUser;
use business_connector::history_setup::OpenedHistory;
use common::*;
use history::{History, HistoryConfig, HistoryMetrics, Lane};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_business-connector");

fn config(sim: &sim::SimHandle, database: &Path) -> Config {
    let mut cluster = ClusterConfig::new("EU", vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    let mut config = Config::single_cluster(cluster);
    config.history = HistoryConfig::sqlite(database);
    config
}

fn database(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("history.sqlite")
}

/// `GET /api/history?query` as JSON entries (panics on anything but 200 JSON).
async fn entries(gateway: &Gateway, query: &str) -> Vec<Value> {
    let response = gateway
        .client
        .get(gateway.url(&format!("/api/history?{query}")))
        .send()
        .await
        .expect("history reachable");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = serde_json::from_str(&response.text().await.expect("body")).expect("JSON");
    body["entries"].as_array().expect("entries").clone()
}

/// Polls until the query returns at least `count` entries: the writer commits in
/// batches (≤ 100 ms), so a record shows a moment after its answer.
async fn wait_for_entries(gateway: &Gateway, query: &str, count: usize) -> Vec<Value> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let found = entries(gateway, query).await;
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < give_up,
            "timed out waiting for {count} entries of {query:?}; have {found:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn every_request_but_version_is_recorded_with_its_code() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(&sim, &database(&dir));
    // The getloggedinuser below is a cache hit (see cache_hits_are_counted_not_recorded..).
    config.history.record_cache_hits = true;
    let gateway = Gateway::start(config).await;
    let dev = device(1);

    gateway.login(&dev, "user1").await.expect(200, 0);
    gateway.query(&dev).await.expect(200, 0);
    gateway.logout(&dev).await.expect(200, 0);
    gateway
        .post_form(&format!("/api/login/{dev}/user1"), "<request></request>")
        .await
        .expect(200, 1006);
    gateway
        .post_form(
            &format!("/api/login/{dev}/user1/XX"),
            &format!("<request>{CREDS}</request>"),
        )
        .await
        .expect(200, 1001);
    gateway.get("/api/getversioninfo").await;

    let found = wait_for_entries(&gateway, "", 5).await;
    assert_eq!(found.len(), 5, "getversioninfo is not recorded: {found:#?}");
    // Newest first.
    let summary: Vec<(&str, i64)> = found
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap_or(""),
                e["code"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("login", 1001),
            ("login", 1006),
            ("logout", 0),
            ("getloggedinuser", 0),
            ("login", 0)
        ]
    );
    let (unknown_cluster, no_credentials, logout, query, login) =
        (&found[0], &found[1], &found[2], &found[3], &found[4]);
    for entry in &found {
        assert_eq!(entry["device"], dev.as_str());
        assert_eq!(entry["client"], "127.0.0.1");
        assert!(!entry["instance"].as_str().unwrap_or("").is_empty());
        assert!(entry["time"].as_str().unwrap_or("").ends_with('Z'));
        assert!(entry["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    }
    assert_eq!(login["cluster"], "EU");
    assert_eq!(login["user"], "user1");
    assert_eq!(login["app"], "bcapp");
    assert_eq!(login["source"], "cucm");
    assert!(login["node"].as_str().unwrap_or("").contains("127.0.0.1"));
    assert_eq!(
        query["user"], "user1",
        "getloggedinuser records who it found"
    );
    assert_eq!(query["source"], "cache");
    assert_eq!(logout["operation"], "logout");
    assert_eq!(no_credentials["source"], "gateway");
    assert!(no_credentials["app"].is_null());
    assert!(unknown_cluster["cluster"].is_null());
    assert!(unknown_cluster["text"]
        .as_str()
        .unwrap_or("")
        .contains("XX"));
    gateway.shutdown().await;
}

#[actix_web::test]
async fn history_filters_limit_csv_and_bad_parameters() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(&sim, &database(&dir));
    config.history.record_cache_hits = true;
    let gateway = Gateway::start(config).await;
    for n in 1..=3 {
        gateway.login_seeded(n).await.expect(200, 0);
    }
    gateway.query(&device(2)).await.expect(200, 0);
    wait_for_entries(&gateway, "", 4).await;

    let by_device = entries(&gateway, &format!("device={}", device(2))).await;
    assert_eq!(by_device.len(), 2);
    assert_eq!(by_device[0]["operation"], "getloggedinuser");
    // Device names are matched upper-cased, as they are recorded.
    let lower = entries(&gateway, &format!("device={}", device(2).to_lowercase())).await;
    assert_eq!(lower.len(), 2);
    let by_user = entries(&gateway, "user=user3").await;
    assert_eq!(by_user.len(), 1);
    assert_eq!(by_user[0]["device"], device(3).as_str());
    assert_eq!(entries(&gateway, "operation=login").await.len(), 3);
    assert_eq!(entries(&gateway, "code=0&cluster=EU").await.len(), 4);
    assert_eq!(entries(&gateway, "code=1006").await.len(), 0);
    let limited = entries(&gateway, "limit=2").await;
    assert_eq!(limited.len(), 2);
    assert_eq!(limited[0]["operation"], "getloggedinuser", "newest first");
    let since = limited[1]["time"].as_str().expect("time").to_string();
    let newer = entries(&gateway, &format!("since={}", since.replace('+', "%2B"))).await;
    assert!(newer.len() >= 2, "since is inclusive: {newer:#?}");
    assert!(entries(&gateway, "until=2000-01-01T00:00:00Z")
        .await
        .is_empty());

    let csv = gateway
        .client
        .get(gateway.url("/api/history?format=csv&operation=login"))
        .send()
        .await
        .expect("csv");
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/csv"));
    let text = csv.text().await.expect("body");
    let mut lines = text.lines();
    assert!(lines
        .next()
        .unwrap_or("")
        .starts_with("time,operation,cluster,device,user,code,"));
    assert_eq!(lines.filter(|l| l.contains(",login,EU,")).count(), 3);

    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("colour=red", "colour"),
        ("since=yesterday", "since"),
        ("code=abc", "code"),
        ("operation=dance", "operation"),
        ("format=xml", "format"),
    ] {
        let answer = gateway.get(&format!("/api/history?{query}")).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert!(
            answer.body.contains(parameter),
            "{query}: the message names {parameter}: {}",
            answer.body
        );
    }
    gateway.shutdown().await;
}

#[actix_web::test]
async fn no_credential_or_pin_reaches_the_database_file() {
    const CERT_MARKER: &str = "CertMarker7f3a9d";
    const PIN_MARKER: &str = "739164";
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = database(&dir);
    let gateway = Gateway::start(config(&sim, &path)).await;
    let dev = device(4);
    // Wrong certificate (CUCM refuses it), a PIN login, and a refused request, each
    // carrying a marker.
    gateway
        .post_form(
            "/api/login",
            &format!(
                "<request><appID>bcapp</appID><appCertificate>{CERT_MARKER}</appCertificate>\
                 <deviceName>{dev}</deviceName><userID>user4</userID></request>"
            ),
        )
        .await;
    gateway
        .post_form(
            &format!("/api/login/{dev}/user4/EU/{PIN_MARKER}"),
            &format!("<request>{CREDS}</request>"),
        )
        .await;
    gateway
        .post_form(
            &format!("/api/logout/{dev}/NOPE"),
            &format!(
                "<request><appID>bcapp</appID><appCertificate>{CERT_MARKER}</appCertificate>\
                 <pin>{PIN_MARKER}</pin></request>"
            ),
        )
        .await;
    wait_for_entries(&gateway, "", 3).await;
    gateway.shutdown().await;

    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        if let Ok(content) = std::fs::read(&file) {
            bytes.extend_from_slice(&content);
        }
    }
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains(&dev), "the scan reads the recorded rows");
    assert!(!contains(CERT_MARKER), "the appCertificate is never stored");
    assert!(!contains(PIN_MARKER), "the PIN is never stored");
}

#[actix_web::test]
async fn history_is_kept_across_shutdown_and_restart() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = database(&dir);
    let first = Gateway::start(config(&sim, &path)).await;
    first.login_seeded(5).await.expect(200, 0);
    // No waiting for the writer: shutdown itself must flush what is queued.
    first.shutdown().await;

    let second = Gateway::start(config(&sim, &path)).await;
    let found = entries(&second, &format!("device={}", device(5))).await;
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["operation"], "login");
    assert_eq!(found[0]["code"], 0);
    second.shutdown().await;
}

#[actix_web::test]
async fn a_stalled_writer_drops_cache_hits_and_counts_instead_of_blocking_requests() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = database(&dir);
    let history = Arc::new(
        History::open(
            &HistoryConfig {
                path: path.clone(),
                queue_capacity: 4,
                record_cache_hits: true,
                ..HistoryConfig::default()
            },
            HistoryMetrics::unregistered().expect("metrics"),
        )
        .expect("history opens"),
    );
    let mut config = config(&sim, &path);
    config.opened_history = Some(OpenedHistory(history.clone()));
    let gateway = Gateway::start(config).await;
    // The first answer comes from CUCM, so the rest are cache hits.
    gateway.query(&device(6)).await.expect(200, 0);
    history.flush(Duration::from_secs(5)).expect("flush");
    let pause = history.pause_writer().expect("writer parks");

    let started = Instant::now();
    for _ in 0..20 {
        gateway.query(&device(6)).await.expect(200, 0);
    }
    // 20 answers from the cache take milliseconds; blocking on a full queue would hang
    // here until the pause ends.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(history.metrics().dropped_from(Lane::BestEffort), 16);
    // Logins have a lane of their own: the full cache-hit lane takes none of its room.
    for n in 7..=9 {
        gateway.login_seeded(n).await.expect(200, 0);
    }
    assert_eq!(history.metrics().dropped_from(Lane::Kept), 0);
    let exposition = gateway.metrics().await;
    assert_eq!(
        metric(
            &exposition,
            "bc_history_dropped_total{lane=\"best_effort\"}"
        ),
        16.0
    );
    assert_eq!(
        metric(&exposition, "bc_history_dropped_total{lane=\"kept\"}"),
        0.0
    );

    drop(pause);
    history.flush(Duration::from_secs(5)).expect("flush");
    assert_eq!(entries(&gateway, "limit=100").await.len(), 1 + 4 + 3);
    assert_eq!(entries(&gateway, "operation=login").await.len(), 3);
    gateway.shutdown().await;
}

#[actix_web::test]
async fn cache_hits_are_counted_not_recorded_unless_asked() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = database(&dir);
    let gateway = Gateway::start(config(&sim, &path)).await;
    let dev = device(8);
    gateway.login(&dev, "user8").await.expect(200, 0);
    // Asked until three come from the cache (the login may have left the cache cold).
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        gateway.query(&dev).await.expect(200, 0);
        let exposition = gateway.metrics().await;
        if metric(&exposition, "bc_cache_hits_total{cluster=\"EU\"}") >= 3.0 {
            break;
        }
        assert!(Instant::now() < give_up, "no cache hits: {exposition}");
    }
    gateway.logout(&dev).await.expect(200, 0);
    let found = wait_for_entries(&gateway, "operation=logout", 1).await;
    assert_eq!(found.len(), 1);
    let cached = entries(&gateway, "limit=1000")
        .await
        .into_iter()
        .filter(|entry| entry["source"] == "cache")
        .count();
    assert_eq!(cached, 0, "no cache hit is recorded by default");
    gateway.shutdown().await;

    let mut config = config(&sim, &path);
    config.history.record_cache_hits = true;
    let gateway = Gateway::start(config).await;
    gateway.login(&dev, "user8").await.expect(200, 0);
    for _ in 0..3 {
        gateway.query(&dev).await.expect(200, 0);
    }
    let found = wait_for_entries(&gateway, "operation=getloggedinuser", 3).await;
    assert!(
        found.iter().any(|entry| entry["source"] == "cache"),
        "record_cache_hits = true records them: {found:#?}"
    );
    gateway.shutdown().await;
}

fn hash_with_binary(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(BINARY)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let output = child.wait_with_output().expect("hash-password exits");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the hash on stdout: {stdout:?}");
    lines[0].to_string()
}

#[test]
fn hash_password_round_trips_through_the_binary() {
    let hash = hash_with_binary("correct horse battery staple");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(business_connector::dashboard::password::verify_password(
        "correct horse battery staple",
        &hash
    ));
    assert!(!business_connector::dashboard::password::verify_password(
        "correct horse",
        &hash
    ));
    // What it prints is accepted by the config.
    let text = format!(
        "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n\n[dashboard]\nusers = [{{ name = \"ops\", password_hash = \"{hash}\" }}]\n"
    );
    let parsed = Config::parse(&text).expect("config with the printed hash");
    assert_eq!(parsed.dashboard.users[0].name, "ops");
    // An empty line is refused, not hashed.
    let output = Command::new(BINARY)
        .arg("hash-password")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!output.status.success());
}

#[actix_web::test]
async fn with_users_the_dashboard_needs_http_basic() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(&sim, &database(&dir));
    config.dashboard.users = vec![DashboardUser {
        name: "ops".into(),
        password_hash: business_connector::dashboard::password::hash_password("s3cret pass")
            .expect("hash"),
    }];
    let gateway = Gateway::start(config).await;
    let get = |path: &'static str, credentials: Option<(&'static str, &'static str)>| {
        let mut request = gateway.client.get(gateway.url(path));
        if let Some((name, password)) = credentials {
            request = request.basic_auth(name, Some(password));
        }
        request.send()
    };

    let mut refused = 0.0;
    for (path, credentials) in [
        ("/dashboard", None),
        ("/dashboard", Some(("ops", "wrong"))),
        ("/api/history", Some(("nobody", "s3cret pass"))),
        ("/api/status", None),
    ] {
        let response = get(path, credentials).await.expect("reachable");
        assert_eq!(response.status(), 401, "{path} {credentials:?}");
        assert_eq!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap_or(""),
            "Basic realm=\"Business Connector\", charset=\"UTF-8\""
        );
        refused += 1.0;
    }
    assert_eq!(
        metric(&gateway.metrics().await, "bc_dashboard_auth_failures_total"),
        refused
    );
    for path in [
        "/dashboard",
        "/api/history",
        "/api/status",
        "/dashboard/page.js",
    ] {
        // Twice: the second is answered from the verification cache.
        for _ in 0..2 {
            let response = get(path, Some(("ops", "s3cret pass")))
                .await
                .expect("reachable");
            assert_eq!(response.status(), 200, "{path}");
        }
    }
    // The northbound API itself stays open to its clients.
    gateway.login_seeded(1).await.expect(200, 0);
    gateway.shutdown().await;
}

/// This host's address on its default route, if it has one that is not loopback.
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    // connect() on UDP only picks a route; nothing is sent.
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[actix_web::test]
async fn without_users_only_loopback_clients_are_served() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let gateway = Gateway::start_on(listener, config(&sim, &database(&dir))).await;
    let local = |path: &str| format!("http://127.0.0.1:{port}{path}");

    let page = gateway
        .client
        .get(local("/dashboard"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap_or("")
        .contains("script-src 'self'"));
    assert!(page
        .text()
        .await
        .expect("body")
        .contains("Business Connector"));
    let status = gateway
        .client
        .get(local("/api/status"))
        .send()
        .await
        .expect("status")
        .text()
        .await
        .expect("body");
    let status: Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["clusters"][0]["code"], "EU");
    assert_eq!(status["clusters"][0]["max_concurrent"], 5);
    assert_eq!(status["history"], "sqlite");

    match non_loopback_address() {
        None => println!("skipped: this host has no non-loopback address to test 403 from"),
        Some(ip) => {
            for path in ["/dashboard", "/api/history", "/api/status"] {
                let url = format!("http://{}{path}", std::net::SocketAddr::new(ip, port));
                let response = gateway.client.get(&url).send().await.expect("reachable");
                assert_eq!(response.status(), 403, "{url}");
            }
            // The API itself is not restricted by the dashboard rule.
            let url = format!(
                "http://{}/api/getversioninfo",
                std::net::SocketAddr::new(ip, port)
            );
            let response = gateway.client.get(&url).send().await.expect("reachable");
            assert_eq!(response.status(), 200);
        }
    }
    gateway.shutdown().await;
}

/// On a terminal, `hash-password` prompts twice and never echoes what is typed: run it
/// on a pseudo-terminal, type each line after its prompt as a person would, and read
/// everything the terminal shows.
#[cfg(unix)]
#[test]
fn hash_password_on_a_terminal_does_not_echo() {
    use std::io::{Read as _, Write as _};
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const SECRET: &str = "EchoMarker4711";
    let (mut leader, follower) = {
        let (mut leader, mut follower) = (0, 0);
        // SAFETY: out-parameters for two new descriptors; null name/termios/winsize.
        let made = unsafe {
            libc::openpty(
                &mut leader,
                &mut follower,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(made, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just opened both; each is owned once from here on.
        unsafe {
            (
                std::fs::File::from(OwnedFd::from_raw_fd(leader)),
                OwnedFd::from_raw_fd(follower),
            )
        }
    };
    let child = Command::new(BINARY)
        .arg("hash-password")
        .stdin(Stdio::from(follower.try_clone().expect("dup")))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(follower))
        .spawn()
        .expect("the binary starts");
    // What the terminal shows, read on a thread (reading the leader blocks).
    let mut reader = leader.try_clone().expect("dup leader");
    let (chunks, received) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buffer = [0_u8; 256];
        // Ends with EIO once the child (the last holder of the follower) exits.
        while let Ok(count) = reader.read(&mut buffer) {
            if count == 0 || chunks.send(buffer[..count].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut terminal = String::new();
    let shown_until = |needle: &str, terminal: &mut String| {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !terminal.contains(needle) {
            let left = give_up.saturating_duration_since(Instant::now());
            let chunk = received
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {needle:?} on the terminal: {terminal:?}"));
            terminal.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    shown_until("Password: ", &mut terminal);
    leader
        .write_all(format!("{SECRET}\n").as_bytes())
        .expect("type");
    shown_until("Again: ", &mut terminal);
    leader
        .write_all(format!("{SECRET}\n").as_bytes())
        .expect("type");
    let output = child.wait_with_output().expect("hash-password exits");
    // Whatever else reached the terminal before the child exited.
    while let Ok(chunk) = received.recv_timeout(Duration::from_millis(200)) {
        terminal.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(output.status.success(), "{output:?} {terminal:?}");
    let hash = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(
        business_connector::dashboard::password::verify_password(SECRET, hash.trim()),
        "{hash}"
    );
    assert!(!terminal.contains(SECRET), "echoed: {terminal:?}");
}
