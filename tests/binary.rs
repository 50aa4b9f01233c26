//! The `business-connector` binary as operators run it: config check, demo mode,
//! SIGTERM with requests in flight, and the drain before it stops.

mod common;

use std::process::Command;
use std::time::Duration;

use common::binary::*;
use common::*;
use futures_util::future::join_all;

/// A config file for one cluster over `node`, with `extra` top-level keys (no drain
/// unless `extra` sets `drain_ms`: no balancer watches these gateways).
/// The binary's tests record no history: the default file would land in the source tree.
const NO_HISTORY: &str = "[history]\nenabled = false\n";

fn config_file(name: &str, node: &str, extra: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("bc-{name}-{}.toml", std::process::id()));
    let drain = if extra.contains("drain_ms") {
        ""
    } else {
        "drain_ms = 0\n"
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\nworkers = 1\n{drain}{extra}\n{NO_HISTORY}[[cluster]]\ncode = \"EU\"\nnodes = [\"{node}\"]\n"
    );
    std::fs::write(&path, text).expect("temp config written");
    path
}

async fn login(client: &reqwest::Client, url: String) -> Answer {
    let response = client
        .post(url)
        .form(&[("xml", format!("<request>{CREDS}</request>"))])
        .send()
        .await
        .expect("gateway reachable");
    Answer::read(response).await
}

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let output = Command::new(BINARY)
        .args(["--config", example, "--check-config"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("config OK: 2 cluster(s)"));

    let bad = std::env::temp_dir().join(format!("bc-bad-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://cucm\"]\nqueue_limit = 0\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster[0].queue_limit (line 4)"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_is_one_line_with_key_line_and_reason_and_no_backtrace() {
    let bad = std::env::temp_dir().join(format!("bc-bad-run-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "deadline_ms = 15000\n[[cluster]]\ncode = \"EU\"\nnodes = [\"http://cucm\"]\n\"max_concurrent\" = 0\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    for backtrace in [None, Some("1"), Some("full")] {
        let mut command = Command::new(BINARY);
        command.args(["--config", bad.to_str().unwrap()]);
        match backtrace {
            Some(value) => command.env("RUST_BACKTRACE", value),
            None => command.env_remove("RUST_BACKTRACE"),
        };
        let output = command.output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            stderr,
            "business-connector: config: cluster[0].max_concurrent (line 5): must be 1-100 (CUCM's own range)\n"
        );
        seen.push(stderr);
    }
    let _ = std::fs::remove_file(&bad);
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
}

#[actix_web::test]
async fn demo_mode_serves_an_embedded_cluster() {
    let running = Running::start(&["--listen", "127.0.0.1:0"]);
    let client = reqwest::Client::new();
    let version = client
        .get(running.url("/api/getversioninfo"))
        .send()
        .await
        .unwrap();
    assert_eq!(version.status().as_u16(), 200);
    login(
        &client,
        running.url("/api/login/SEP000000000001/user1/demo"),
    )
    .await
    .expect(200, 0);
    let query = client
        .get(running.url(&format!(
                "/api/getloggedinuser/SEP000000000001?xml={}",
                form_urlencoded::byte_serialize(format!("<request>{CREDS}</request>").as_bytes())
                    .collect::<String>()
            )))
        .send()
        .await
        .unwrap();
    let answer = Answer::read(query).await;
    answer.expect(200, 0);
    assert_eq!(answer.user.as_deref(), Some("user1"));
    let logged: Vec<String> = running.lines.try_iter().collect();
    assert!(
        logged.iter().any(|l| l.contains("curl -s")),
        "the demo logs how to call it"
    );
    let dashboard = running.url("/dashboard");
    assert!(
        logged.iter().any(|l| l.contains(&dashboard)),
        "the demo names its dashboard ({dashboard}): {logged:#?}"
    );
}

/// A `[history]` table written for an earlier version (with `writer_priority`) still
/// starts; the key is named in a warning; changes are recorded, cache hits are not.
#[actix_web::test]
async fn an_earlier_history_config_starts_warns_and_records_changes_not_cache_hits() {
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bc.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 1\ndrain_ms = 0\n\n[history]\npath = \"{}\"\n\
             writer_priority = \"idle\"\n\n[[cluster]]\ncode = \"EU\"\nnodes = [\"{}\"]\n\
             max_requests_per_second = 0\n",
            dir.path().join("history.sqlite").display(),
            sim.url()
        ),
    )
    .expect("config written");
    let running = Running::start(&["--config", path.to_str().expect("UTF-8 path")]);
    let client = reqwest::Client::new();
    login(&client, running.url("/api/login/SEP000000000001/user1"))
        .await
        .expect(200, 0);
    let query = running.url(&format!(
        "/api/getloggedinuser/SEP000000000001?xml={}",
        form_urlencoded::byte_serialize(format!("<request>{CREDS}</request>").as_bytes())
            .collect::<String>()
    ));
    for _ in 0..3 {
        let answer = Answer::read(client.get(&query).send().await.expect("query")).await;
        answer.expect(200, 0);
    }
    let history = running.url("/api/history?limit=100");
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let text = client
            .get(&history)
            .send()
            .await
            .expect("history")
            .text()
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let entries = body["entries"].as_array().cloned().unwrap_or_default();
        if entries.iter().any(|e| e["operation"] == "login") {
            break entries;
        }
        assert!(std::time::Instant::now() < give_up, "no login recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !entries.iter().any(|e| e["source"] == "cache"),
        "cache hits are counted, not recorded: {entries:#?}"
    );
    // The warning comes before the serving line (the history is opened first).
    let logged: Vec<String> = running
        .early_lines
        .iter()
        .cloned()
        .chain(running.lines.try_iter())
        .collect();
    assert!(
        logged
            .iter()
            .any(|l| l.contains("WARN") && l.contains("history.writer_priority")),
        "the ignored key is named: {logged:#?}"
    );
}

#[actix_web::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let sim = simulator(5, |c| c.behavior = latency_ms(1000));
    let config = config_file("sigterm", &sim.url(), "");
    let mut running = Running::start(&["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let client = reqwest::Client::new();
    let logins = join_all((1..=5).map(|n| {
        login(
            &client,
            running.url(&format!("/api/login/{}/user{n}", device(n))),
        )
    }));
    let terminate = async {
        wait_until("five logins are at CUCM", Duration::from_secs(10), || {
            sim.stats().in_flight_ops == 5
        })
        .await;
        running.terminate();
    };
    let (answers, ()) = tokio::join!(logins, terminate);
    for answer in &answers {
        answer.expect(200, 0);
    }
    let status = running.child.wait().expect("the gateway exits");
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    assert_eq!(sim.stats().calls_login, 5);
}

#[actix_web::test]
async fn json_logs_carry_one_line_per_request_and_no_credential() {
    let sim = simulator(2, |_| {});
    let config = config_file("json", &sim.url(), "log_format = \"json\"");
    let mut running = Running::start(&["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let client = reqwest::Client::new();
    login(
        &client,
        running.url(&format!("/api/login/{}/user1", device(1))),
    )
    .await
    .expect(200, 0);
    running.terminate();
    running.child.wait().expect("exits");
    // The child has exited: the reader thread ends at its end of output, so every line
    // is here (try_iter could miss lines the thread had not forwarded yet).
    let lines: Vec<String> = running.lines.iter().collect();
    assert!(
        lines.iter().all(|l| !l.contains("bcsecret")),
        "the appCertificate reached a log line"
    );
    let request = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "request")
        .unwrap_or_else(|| panic!("no request line in {lines:#?}"));
    assert_eq!(request["operation"], "login");
    assert_eq!(request["cluster"], "EU");
    assert_eq!(request["device"], device(1).as_str());
    assert_eq!(request["user"], "user1");
    assert_eq!(request["code"], 0);
    assert!(request["duration_ms"].as_f64().is_some());
    assert!(request["node"]
        .as_str()
        .is_some_and(|n| n.starts_with("127.0.0.1:")));
}

#[actix_web::test]
async fn a_pin_reaches_no_log_line_at_trace_level_and_no_metric() {
    const PIN: &str = "97531864";
    const WRONG_PIN: &str = "86420975";
    let home = simulator(2, |_| {});
    let phones = simulator(4, |c| c.users = 0);
    phones.add_emcc_peer(&home.url()).expect("peer");
    assert!(home.set_pin("user1", PIN));
    let path = std::env::temp_dir().join(format!("bc-pin-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 1\n{NO_HISTORY}[[cluster]]\ncode = \"HOME\"\nnodes = [\"{}\"]\n\
             [[cluster]]\ncode = \"PHONES\"\nnodes = [\"{}\"]\n",
            home.url(),
            phones.url()
        ),
    )
    .unwrap();
    let mut running = Running::start_logging(&["--config", path.to_str().unwrap()], "trace");
    let _ = std::fs::remove_file(&path);
    let client = reqwest::Client::new();
    let post = |path: String, xml: String| {
        let client = client.clone();
        let url = running.url(&path);
        async move {
            let response = client.post(url).form(&[("xml", xml)]).send().await.unwrap();
            Answer::read(response).await
        }
    };
    let on_phone = |n: usize| format!("SEP{n:012X}");
    // Wrong PIN, right PIN (by code and by discovery), a malformed PIN that contains
    // the real one, and a PIN where none is taken.
    let plain = format!("<request>{CREDS}</request>");
    let with_pin = |pin: &str| format!("<request>{CREDS}<pin>{pin}</pin></request>");
    let steps = [
        (
            format!("/api/login/{}/user1/PHONES/{WRONG_PIN}", on_phone(1)),
            plain.clone(),
            1007,
        ),
        (
            format!("/api/login/{}/user1/PHONES/{PIN}", on_phone(1)),
            plain.clone(),
            0,
        ),
        (
            format!("/api/logout/{}/PHONES", on_phone(1)),
            plain.clone(),
            0,
        ),
        (
            format!("/api/login/{}/user1", on_phone(3)),
            with_pin(PIN),
            0,
        ),
        (
            format!("/api/login/{}/user1", on_phone(4)),
            with_pin(&format!("{PIN}x")),
            1002,
        ),
        (format!("/api/logout/{}", on_phone(3)), with_pin(PIN), 1002),
    ];
    let mut answers = Vec::new();
    for (path, xml, code) in steps {
        let answer = post(path, xml).await;
        answer.expect(200, code);
        answers.push(answer);
    }
    let metrics = client
        .get(running.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("bc_pin_logins_total"));
    running.terminate();
    running.child.wait().expect("exits");
    // The reader thread ends at the child's end of output: every line is here.
    let lines: Vec<String> = running.lines.iter().collect();
    assert!(
        lines.len() > 20,
        "trace logging was on: {} lines",
        lines.len()
    );
    for secret in [PIN, WRONG_PIN] {
        assert!(!metrics.contains(secret), "a PIN reached /metrics");
        let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "a PIN reached the log: {leaked:#?}");
        assert!(
            answers.iter().all(|a| !a.body.contains(secret)),
            "a PIN was quoted back"
        );
    }
    assert_eq!(
        phones.logged_in_user(&on_phone(3)).as_deref(),
        Some("user1")
    );
}

/// On SIGTERM `/readyz` turns 503 at once while the API is still served for
/// `drain_ms` (the balancer notices); then the server stops by itself.
#[actix_web::test]
async fn sigterm_drains_then_stops() {
    const DRAIN: Duration = Duration::from_millis(3000);
    let sim = simulator(5, |c| c.behavior = latency_ms(50));
    let config = config_file(
        "drain",
        &sim.url(),
        &format!("drain_ms = {}", DRAIN.as_millis()),
    );
    let mut running = Running::start(&["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    let client = reqwest::Client::new();
    let readyz = |client: &reqwest::Client| {
        let request = client.get(running.url("/readyz")).send();
        async move {
            let response = request.await.expect("gateway reachable");
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(readyz(&client).await.0, 200, "ready before SIGTERM");

    let signalled = std::time::Instant::now();
    running.terminate();
    // "At once": the first answers after the signal may still be 200 only until the
    // signal task has run; poll with a deadline well inside the drain.
    let give_up = signalled + DRAIN / 2;
    let (status, body) = loop {
        let (status, body) = readyz(&client).await;
        if status == 503 || std::time::Instant::now() > give_up {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(status, 503, "readyz during the drain: {body}");
    assert!(body.contains("draining"), "{body}");
    let turned = signalled.elapsed();

    // New work is still served while the balancer notices.
    login(
        &client,
        running.url(&format!("/api/login/{}/user1", device(1))),
    )
    .await
    .expect(200, 0);
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "still running after a request served during the drain"
    );
    assert!(
        signalled.elapsed() < DRAIN,
        "the checks above must fall inside the drain to prove anything (took {:?})",
        signalled.elapsed()
    );

    // Then it stops by itself: not before the drain, and well within drain + grace.
    let give_up = signalled + DRAIN + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = running.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "still running 15 s after the drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped = signalled.elapsed();
    assert!(status.success(), "clean exit after the drain: {status:?}");
    assert!(
        stopped >= DRAIN,
        "stopped after {stopped:?}, before the {DRAIN:?} drain ended"
    );
    assert!(
        client.get(running.url("/healthz")).send().await.is_err(),
        "no connections accepted after the stop"
    );
    assert_eq!(sim.stats().calls_login, 1);
    let lines: Vec<String> = running.lines.iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("draining")),
        "the drain is logged: {lines:#?}"
    );
    eprintln!("readyz 503 after {turned:?}; stopped after {stopped:?}");
}

/// systemd's `ExecReload` sends SIGHUP: the gateway logs it and keeps serving.
#[actix_web::test]
async fn sighup_does_not_stop_the_gateway() {
    let sim = simulator(2, |_| {});
    let config = config_file("sighup", &sim.url(), "");
    let mut running = Running::start(&["--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    // SAFETY: plain kill(2) on our own child's pid.
    let result = unsafe { libc::kill(running.child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(result, 0, "SIGHUP delivered");
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("SIGHUP")) {
        let left = give_up.saturating_duration_since(std::time::Instant::now());
        match running.lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no log line about SIGHUP; saw {seen:#?}"),
        }
    }
    assert!(running.child.try_wait().unwrap().is_none(), "still running");
    let client = reqwest::Client::new();
    login(
        &client,
        running.url(&format!("/api/login/{}/user1", device(1))),
    )
    .await
    .expect(200, 0);
}
