//! The occupancy watch and `/api/events`, with the `business-connector` binary as an
//! operator runs it (a config file) against the CUCM simulator: changes made directly
//! at CUCM arrive as `observed` events and in the history, logins through the gateway
//! as `request` events at once, `Last-Event-ID` resumes, and polls cost a handful of
//! CUCM calls however many devices are watched.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::binary;
use common::*;
use serde_json::Value;

/// The binary on a config of this test's own, in a directory removed afterwards.
struct Running {
    gateway: binary::Running,
    dir: PathBuf,
}

impl Running {
    /// Writes `config` (plus a listen address) into a fresh directory and starts the
    /// gateway on it; `files` are written beside it first.
    fn start(name: &str, config: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("bc-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("file written");
        }
        let config = config.replace("{dir}", dir.to_str().expect("utf-8 temp dir"));
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            format!("listen = \"127.0.0.1:0\"\nworkers = 1\ndrain_ms = 0\n{config}"),
        )
        .expect("config written");
        let gateway = binary::Running::start(&["--config", path.to_str().expect("utf-8 path")]);
        Self { gateway, dir }
    }

    fn url(&self, path: &str) -> String {
        self.gateway.url(path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The gateway first: it writes into the directory.
        let _ = self.gateway.child.kill();
        let _ = self.gateway.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `[[cluster]]` over the simulator.
fn cluster(node: &str) -> String {
    format!("[[cluster]]\ncode = \"EU\"\nnodes = [\"{node}\"]\n")
}

/// One Server-Sent Event as the client sees it.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// A client reading `/api/events`.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(gateway: &Running, last_event_id: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(gateway.url("/api/events"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("events reachable");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` if none comes within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Sse> {
        let give_up = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        sse.event = value.into();
                        any = true;
                    } else if let Some(value) = line.strip_prefix("id: ") {
                        sse.id = Some(value.into());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        sse.data.push_str(value);
                        any = true;
                    }
                }
                if any {
                    return Some(sse);
                }
            }
            let chunk = tokio::time::timeout_at(give_up, self.response.chunk())
                .await
                .ok()?
                .expect("stream readable")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// The next `change` event, failing the test if none comes within `timeout`.
    async fn change(&mut self, timeout: Duration) -> Value {
        let sse = self.next(timeout).await.expect("a change event in time");
        assert_eq!(sse.event, "change", "{sse:?}");
        let json = sse.json();
        assert_eq!(sse.id.as_deref(), Some(json["id"].to_string().as_str()));
        json
    }
}

async fn post(gateway: &Running, path: &str) -> String {
    reqwest::Client::new()
        .post(gateway.url(path))
        .form(&[("xml", format!("<request>{CREDS}</request>"))])
        .send()
        .await
        .expect("gateway reachable")
        .text()
        .await
        .expect("body")
}

async fn metrics(gateway: &Running) -> String {
    reqwest::get(gateway.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body")
}

#[actix_web::test]
async fn changes_at_the_phone_and_through_the_gateway_arrive_as_events_and_in_the_history() {
    let sim = simulator(10, |_| {});
    let config = format!(
        "[history]\npath = \"{{dir}}/history.sqlite\"\n[watch]\ninterval_ms = 1000\n{}",
        cluster(&sim.url())
    );
    let gateway = Running::start("observed", &config, &[]);
    let mut events = Stream::open(&gateway, None).await;

    // A login through the gateway: a `request` event as soon as CUCM confirmed it.
    let answer = post(&gateway, &format!("/api/login/{}/user1", device(1))).await;
    assert!(
        answer.contains("<code>0</code>") || answer.contains("success"),
        "{answer}"
    );
    let login = events.change(Duration::from_secs(1)).await;
    assert_eq!(login["cause"], "request");
    assert_eq!(login["device"], device(1));
    assert_eq!(login["after"], "user1");
    assert_eq!(login["cluster"], "EU");

    // The user logs out at the phone: no request tells the gateway, a poll does
    // (with the credentials CUCM accepted for the login: none are configured).
    assert!(sim.logout_directly(&device(1)));
    let changed_at = Instant::now();
    let observed = events.change(Duration::from_secs(3)).await;
    let took = changed_at.elapsed();
    assert_eq!(observed["cause"], "observed");
    assert_eq!(observed["source"], "poll");
    assert_eq!(observed["device"], device(1));
    assert_eq!(observed["before"], "user1");
    assert_eq!(observed["after"], Value::Null);
    assert!(
        took <= Duration::from_millis(2000),
        "observed after {took:?}, more than interval_ms + 1 s"
    );
    assert!(observed["id"].as_u64() > login["id"].as_u64());

    // ... and it is in the history, as `observed` from a `poll`.
    let give_up = Instant::now() + Duration::from_secs(10);
    let entry = loop {
        let body = reqwest::get(gateway.url("/api/history?operation=observed"))
            .await
            .expect("history reachable")
            .text()
            .await
            .expect("history body");
        let history: Value = serde_json::from_str(&body).expect("history JSON");
        if let Some(entry) = history["entries"].as_array().and_then(|e| e.first()) {
            break entry.clone();
        }
        assert!(
            Instant::now() < give_up,
            "no observed record in the history"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entry["operation"], "observed");
    assert_eq!(entry["source"], "poll");
    assert_eq!(entry["device"], device(1));

    // The dashboard's latest changes: newest first.
    let body = reqwest::get(gateway.url("/api/events/latest"))
        .await
        .expect("latest reachable")
        .text()
        .await
        .expect("body");
    let latest: Value = serde_json::from_str(&body).expect("latest JSON");
    assert_eq!(latest["events"][0]["id"], observed["id"]);
    assert_eq!(latest["events"][1]["id"], login["id"]);

    let exposition = metrics(&gateway).await;
    assert!(metric(&exposition, "bc_events_total{cause=\"request\"}") >= 1.0);
    assert!(metric(&exposition, "bc_events_total{cause=\"observed\"}") >= 1.0);
    assert!(
        metric(
            &exposition,
            "bc_watch_polls_total{cluster=\"EU\",outcome=\"ok\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(&exposition, "bc_watched_devices{cluster=\"EU\"}"),
        1.0
    );
    assert_eq!(metric(&exposition, "bc_event_subscribers"), 1.0);
}

#[actix_web::test]
async fn last_event_id_replays_what_was_missed_and_a_client_behind_the_ring_is_reset() {
    let sim = simulator(10, |_| {});
    let config = format!(
        "[history]\nenabled = false\n[watch]\nevent_buffer = 3\n{}",
        cluster(&sim.url())
    );
    let gateway = Running::start("resume", &config, &[]);
    let mut events = Stream::open(&gateway, None).await;
    let mut ids = Vec::new();
    for n in 1..=4 {
        post(&gateway, &format!("/api/login/{}/user{n}", device(n))).await;
        ids.push(events.change(Duration::from_secs(2)).await["id"].clone());
    }
    drop(events);

    // Resuming after the second: the third and the fourth, then live events.
    let mut resumed = Stream::open(&gateway, Some(&ids[1].to_string())).await;
    assert_eq!(resumed.change(Duration::from_secs(2)).await["id"], ids[2]);
    assert_eq!(resumed.change(Duration::from_secs(2)).await["id"], ids[3]);
    post(&gateway, &format!("/api/logout/{}", device(4))).await;
    let live = resumed.change(Duration::from_secs(2)).await;
    assert_eq!(live["device"], device(4));
    assert_eq!(live["after"], Value::Null);

    // After the first: the ring (3 events) no longer holds the second: reset first,
    // then what is kept.
    let mut behind = Stream::open(&gateway, Some(&ids[0].to_string())).await;
    let reset = behind.next(Duration::from_secs(2)).await.expect("a reset");
    assert_eq!(reset.event, "reset");
    assert_eq!(behind.change(Duration::from_secs(2)).await["id"], ids[2]);
}

#[actix_web::test]
async fn a_hundred_watched_devices_at_one_second_cost_a_handful_of_calls() {
    let sim = simulator(100, |_| {});
    let devices: String = (1..=100).map(|n| format!("{}\n", device(n))).collect();
    let config = format!(
        "[history]\nenabled = false\n[watch]\ninterval_ms = 1000\ndevices_file = \"{{dir}}/desks.txt\"\napp_id = \"bcapp\"\napp_certificate_file = \"{{dir}}/app.secret\"\n{}",
        cluster(&sim.url())
    );
    let gateway = Running::start(
        "hundred",
        &config,
        &[
            ("desks.txt", &format!("# the desks of floor 3\n{devices}")),
            ("app.secret", "bcsecret\n"),
        ],
    );
    let polls = "bc_watch_polls_total{cluster=\"EU\",outcome=\"ok\"}";
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let exposition = metrics(&gateway).await;
        if metric(&exposition, "bc_watched_devices{cluster=\"EU\"}") == 100.0
            && metric(&exposition, polls) >= 2.0
        {
            break;
        }
        assert!(Instant::now() < give_up, "the devices file was not watched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A measurement over a window, not a synchronization: 3 s of polling.
    sim.reset_stats();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let calls = sim.stats().calls_device_user_query;
    let per_second = calls as f64 / window.as_secs_f64();
    // 100 devices in batches of 50, each asked every second: 2 calls a second.
    assert!(
        (1.0..=5.0).contains(&per_second),
        "{calls} deviceUserQuery calls in {window:?}"
    );
    // Every one of them is asked: a change at any phone shows.
    let mut events = Stream::open(&gateway, None).await;
    assert!(sim.login_directly(&device(77), "user77"));
    let observed = events.change(Duration::from_secs(3)).await;
    assert_eq!(observed["device"], device(77));
    assert_eq!(observed["after"], "user77");
    assert_eq!(observed["before"], Value::Null);
}

#[actix_web::test]
async fn refused_poll_credentials_stop_the_polls_until_sighup_brings_good_ones() {
    let sim = simulator(10, |_| {});
    let config = format!(
        "[history]\nenabled = false\n[watch]\ninterval_ms = 1000\ndevices_file = \"{{dir}}/desks.txt\"\napp_id = \"bcapp\"\napp_certificate_file = \"{{dir}}/app.secret\"\n{}",
        cluster(&sim.url())
    );
    let gateway = Running::start(
        "refused",
        &config,
        &[
            ("desks.txt", &format!("{}\n{}\n", device(1), device(2))),
            ("app.secret", "not-the-password\n"),
        ],
    );
    let refused = "bc_watch_polls_total{cluster=\"EU\",outcome=\"refused_credentials\"}";
    let ok = "bc_watch_polls_total{cluster=\"EU\",outcome=\"ok\"}";
    let give_up = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&gateway).await, refused) < 1.0 {
        assert!(Instant::now() < give_up, "no refused poll");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Polls stopped: over three intervals, no further poll reaches CUCM.
    sim.reset_stats();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sim.stats().calls_device_user_query, 0);
    let exposition = metrics(&gateway).await;
    assert_eq!(metric(&exposition, refused), 1.0, "counted once");
    assert!(!exposition.contains("not-the-password"));

    // The right password, and SIGHUP: the polls resume.
    std::fs::write(gateway.dir.join("app.secret"), "bcsecret\n").expect("secret written");
    // SAFETY: plain kill(2) on our own child's pid.
    let result = unsafe { libc::kill(gateway.gateway.child.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(result, 0, "SIGHUP delivered");
    let give_up = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(&gateway).await, ok) < 1.0 {
        assert!(
            Instant::now() < give_up,
            "polls did not resume after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn the_events_are_for_the_history_readers_only() {
    let sim = simulator(2, |_| {});
    let hash =
        business_connector::dashboard::password::hash_password("correct horse").expect("hash");
    let config = format!(
        "[history]\nenabled = false\n[dashboard]\nusers = [{{ name = \"ops\", password_hash = \"{hash}\" }}]\n{}",
        cluster(&sim.url())
    );
    let gateway = Running::start("access", &config, &[]);
    let client = reqwest::Client::new();
    for path in ["/api/events", "/api/events/latest"] {
        let refused = client
            .get(gateway.url(path))
            .send()
            .await
            .expect("reachable");
        assert_eq!(refused.status(), 401, "{path}");
        let wrong = client
            .get(gateway.url(path))
            .basic_auth("ops", Some("wrong"))
            .send()
            .await
            .expect("reachable");
        assert_eq!(wrong.status(), 401, "{path}");
        let allowed = client
            .get(gateway.url(path))
            .basic_auth("ops", Some("correct horse"))
            .send()
            .await
            .expect("reachable");
        assert_eq!(allowed.status(), 200, "{path}");
    }
}

#[actix_web::test]
async fn always_watched_devices_are_placed_in_their_cluster_by_discovery() {
    // Device 4 exists only in the second cluster; there is no default cluster.
    let small = simulator(2, |_| {});
    let large = simulator(5, |_| {});
    let config = format!(
        "[history]\nenabled = false\n[watch]\ndevices_file = \"{{dir}}/desks.txt\"\napp_id = \"bcapp\"\napp_certificate_file = \"{{dir}}/app.secret\"\n[[cluster]]\ncode = \"A\"\nnodes = [\"{}\"]\n[[cluster]]\ncode = \"B\"\nnodes = [\"{}\"]\n",
        small.url(),
        large.url()
    );
    let gateway = Running::start(
        "placed",
        &config,
        &[
            ("desks.txt", &format!("{}\n", device(4))),
            ("app.secret", "bcsecret\n"),
        ],
    );
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let exposition = metrics(&gateway).await;
        let a = metric(&exposition, "bc_watched_devices{cluster=\"A\"}");
        let b = metric(&exposition, "bc_watched_devices{cluster=\"B\"}");
        if a == 0.0 && b == 1.0 && small.stats().calls_device_user_query >= 1 {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "device 4 not watched in B alone (A {a}, B {b})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_query_that_sees_another_user_is_an_observed_change_recorded_as_query() {
    let sim = simulator(3, |_| {});
    // No poll within the test (interval one hour), no cache: the query asks CUCM.
    let config = format!(
        "[history]\npath = \"{{dir}}/history.sqlite\"\n[watch]\ninterval_ms = 3600000\n[[cluster]]\ncode = \"EU\"\nnodes = [\"{}\"]\ncache_ttl_ms = 0\n",
        sim.url()
    );
    let gateway = Running::start("query", &config, &[]);
    let mut events = Stream::open(&gateway, None).await;
    post(&gateway, &format!("/api/login/{}/user2", device(2))).await;
    assert_eq!(
        events.change(Duration::from_secs(2)).await["cause"],
        "request"
    );
    assert!(sim.logout_directly(&device(2)));
    assert!(sim.login_directly(&device(2), "user3"));
    let answer = post(&gateway, &format!("/api/getloggedinuser/{}", device(2))).await;
    assert!(answer.contains("user3"), "{answer}");
    let observed = events.change(Duration::from_secs(2)).await;
    assert_eq!(observed["cause"], "observed");
    assert_eq!(observed["source"], "query");
    assert_eq!(observed["before"], "user2");
    assert_eq!(observed["after"], "user3");
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let body = reqwest::get(gateway.url("/api/history?operation=observed"))
            .await
            .expect("history reachable")
            .text()
            .await
            .expect("history body");
        let history: Value = serde_json::from_str(&body).expect("history JSON");
        if let Some(entry) = history["entries"].as_array().and_then(|e| e.first()) {
            assert_eq!(entry["source"], "query");
            assert_eq!(entry["user"], "user3");
            assert_eq!(entry["text"], "was user2");
            break;
        }
        assert!(
            Instant::now() < give_up,
            "no observed record in the history"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
