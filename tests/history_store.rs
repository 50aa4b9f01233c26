//! The history's database as the real binary meets it: PostgreSQL unreachable at start
//! (the gateway serves, `/api/history` 503, `bc_history_store_up 0`, records written once
//! it is back), cut under load (no failed answer, no lost record), two instances starting
//! together on an empty database, and two processes sharing one SQLite file (a rolling
//! restart). A `Relay` between gateway and PostgreSQL stands in for the outage, so the
//! shared test server is never stopped; `deploy/chaos-postgres.sh` stops a real one.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::*;
use common::*;
use sim::SimHandle;

const STOP: Duration = Duration::from_secs(30);

fn gateway_config(sim: &SimHandle, history: &str, instance: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nworkers = 2\ndrain_ms = 0\n\
         [history]\n{history}\ninstance = \"{instance}\"\n\
         [[cluster]]\ncode = \"EU\"\nnodes = [\"{}\"]\ncache_ttl_ms = 0\n",
        sim.url()
    )
}

async fn text(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client.get(url).send().await.expect("gateway reachable");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn store_up(client: &reqwest::Client, gateway: &Running) -> f64 {
    let (_, metrics) = text(client, gateway.url("/metrics")).await;
    assert!(
        metrics.contains("bc_history_store_up"),
        "no bc_history_store_up series"
    );
    metric(&metrics, "bc_history_store_up")
}

/// How many records `/api/history?{query}` lists (0 while it answers 503).
async fn listed(client: &reqwest::Client, gateway: &Running, query: &str) -> usize {
    let (status, body) = text(client, gateway.url(&format!("/api/history?{query}"))).await;
    if status != 200 {
        return 0;
    }
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    json["entries"].as_array().map_or(0, Vec::len)
}

async fn post(client: &reqwest::Client, url: String) -> Answer {
    let response = client
        .post(url)
        .form(&[("xml", format!("<request>{CREDS}</request>"))])
        .send()
        .await
        .expect("gateway reachable");
    Answer::read(response).await
}

#[actix_web::test]
async fn postgres_unreachable_at_start_the_gateway_serves_and_writes_once_it_is_back() {
    let test = "postgres_unreachable_at_start_the_gateway_serves_and_writes_once_it_is_back";
    let Some(database) = PostgresDatabase::create(test) else {
        return;
    };
    let relay = Relay::start(postgres_address(&database.url));
    relay.cut();
    let sim = simulator(4, |_| {});
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        directory.path(),
        "gw.toml",
        &gateway_config(
            &sim,
            &format!("url = \"{}\"", database.url_via(relay.addr)),
            "gw-down",
        ),
    );
    let started = Instant::now();
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let start_time = started.elapsed();
    let client = reqwest::Client::new();
    assert_eq!(store_up(&client, &gateway).await, 0.0);
    let (status, body) = text(&client, gateway.url("/api/history")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    for n in 1..=3 {
        post(
            &client,
            gateway.url(&format!("/api/login/{}/user{n}", device(n))),
        )
        .await
        .expect(200, 0);
        post(&client, gateway.url(&format!("/api/logout/{}", device(n))))
            .await
            .expect(200, 0);
    }
    relay.restore();
    eventually!(
        "the store is up",
        Duration::from_secs(20),
        store_up(&client, &gateway).await == 1.0
    );
    eventually!(
        "the six records that waited are listed",
        Duration::from_secs(10),
        listed(&client, &gateway, "").await == 6
    );
    let (status, lines) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    assert_eq!(database.count("instance = 'gw-down'"), 6);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("history database unreachable")),
        "the outage is logged: {lines:#?}"
    );
    eprintln!("started in {start_time:?} with the database unreachable");
}

#[actix_web::test]
async fn postgres_cut_under_load_fails_no_request_and_loses_no_record() {
    let test = "postgres_cut_under_load_fails_no_request_and_loses_no_record";
    let Some(database) = PostgresDatabase::create(test) else {
        return;
    };
    let relay = Relay::start(postgres_address(&database.url));
    let sim = simulator(16, |_| {});
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        directory.path(),
        "gw.toml",
        &gateway_config(
            &sim,
            &format!("url = \"{}\"", database.url_via(relay.addr)),
            "gw-cut",
        ),
    );
    let gateway = Running::start(&["--config", config.to_str().unwrap()]);
    let client = reqwest::Client::new();
    assert_eq!(store_up(&client, &gateway).await, 1.0);

    // Eight clients, each logging its own device in and out as fast as answered.
    let running = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let mut clients = Vec::new();
    for n in 1..=8 {
        let (client, running, answered, failures, slowest) = (
            client.clone(),
            running.clone(),
            answered.clone(),
            failures.clone(),
            slowest.clone(),
        );
        let login = gateway.url(&format!("/api/login/{}/user{n}", device(n)));
        let logout = gateway.url(&format!("/api/logout/{}", device(n)));
        clients.push(actix_web::rt::spawn(async move {
            while running.load(Ordering::Relaxed) {
                for url in [&login, &logout] {
                    let sent = Instant::now();
                    let answer = post(&client, url.clone()).await;
                    let took = sent.elapsed();
                    answered.fetch_add(1, Ordering::Relaxed);
                    if (answer.status, answer.code) != (200, Some(0)) {
                        failures.lock().unwrap().push(answer.body.clone());
                    }
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(took);
                }
            }
        }));
    }
    let answers = |at_least: u64| {
        let answered = answered.clone();
        async move {
            let give_up = Instant::now() + Duration::from_secs(30);
            while answered.load(Ordering::Relaxed) < at_least {
                assert!(Instant::now() < give_up, "load stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    answers(100).await;
    let before_cut = *slowest.lock().unwrap();
    relay.cut();
    let cut_at = answered.load(Ordering::Relaxed);
    eventually!(
        "the gateway notices the outage",
        Duration::from_secs(10),
        store_up(&client, &gateway).await == 0.0
    );
    // The outage lasts while 300 more requests are answered.
    answers(cut_at + 300).await;
    relay.restore();
    let restored_at = answered.load(Ordering::Relaxed);
    eventually!(
        "the store is up again",
        Duration::from_secs(20),
        store_up(&client, &gateway).await == 1.0
    );
    answers(answered.load(Ordering::Relaxed) + 100).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }
    let total = answered.load(Ordering::Relaxed);
    let failed = failures.lock().unwrap().clone();
    let slowest = *slowest.lock().unwrap();
    let (status, _) = gateway.stop(STOP);
    assert!(status.success(), "{status:?}");
    assert!(failed.is_empty(), "failed answers: {failed:#?}");
    let stored = database.count("instance = 'gw-cut'");
    eprintln!(
        "{total} answers ({} during the cut), 0 failed, slowest {slowest:?} (before the cut {before_cut:?}), {stored} records stored",
        restored_at - cut_at
    );
    // At least once: a batch whose commit the cut acknowledgement hid would be written
    // again (not seen so far; it would show here as more records than answers).
    let stored = u64::try_from(stored).unwrap();
    assert!(stored >= total, "{} records lost", total - stored);
    assert!(
        stored - total <= 20_000,
        "more duplicates than one batch: {}",
        stored - total
    );
}

#[actix_web::test]
async fn two_gateways_starting_together_on_an_empty_postgres_both_come_up() {
    let test = "two_gateways_starting_together_on_an_empty_postgres_both_come_up";
    let Some(database) = PostgresDatabase::create(test) else {
        return;
    };
    let history = format!("url = \"{}\"", database.url);
    two_gateways_share_one_history(&history, Some(&database)).await;
}

#[actix_web::test]
async fn two_gateways_share_one_sqlite_file() {
    let directory = tempfile::tempdir().expect("temp dir");
    let history = format!(
        "path = \"{}\"",
        directory.path().join("shared.sqlite").display()
    );
    two_gateways_share_one_history(&history, None).await;
}

/// Both started at the same instant; each records, each lists both; both stop cleanly.
async fn two_gateways_share_one_history(history: &str, database: Option<&PostgresDatabase>) {
    let sim = simulator(4, |_| {});
    let directory = tempfile::tempdir().expect("temp dir");
    let configs: Vec<_> = ["gw-one", "gw-two"]
        .iter()
        .map(|instance| {
            write_config(
                directory.path(),
                &format!("{instance}.toml"),
                &gateway_config(&sim, history, instance),
            )
        })
        .collect();
    let starting: Vec<Starting> = configs
        .iter()
        .map(|config| Running::spawn(&["--config", config.to_str().unwrap()], "info"))
        .collect();
    let gateways: Vec<Running> = starting.into_iter().map(Starting::wait_serving).collect();
    let client = reqwest::Client::new();
    for (n, gateway) in gateways.iter().enumerate() {
        assert_eq!(store_up(&client, gateway).await, 1.0, "gateway {n}");
        post(
            &client,
            gateway.url(&format!("/api/login/{}/user{}", device(n + 1), n + 1)),
        )
        .await
        .expect(200, 0);
    }
    for gateway in &gateways {
        eventually!(
            "each gateway lists both records",
            Duration::from_secs(10),
            listed(&client, gateway, "operation=login").await == 2
        );
    }
    for gateway in gateways {
        let (status, _) = gateway.stop(STOP);
        assert!(status.success(), "{status:?}");
    }
    if let Some(database) = database {
        assert_eq!(database.count("operation = 'login'"), 2);
    }
}
