//! Batched queries: queries of different devices waiting for the same
//! cluster leave together in one deviceUserQuery; a cluster that does not answer a
//! batch properly is asked one device at a time and remembered as not batching.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use sim::{Behavior, Latency};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// getloggedinuser for devices `range`, all at once.
async fn ask(gw: &Gateway, range: std::ops::RangeInclusive<usize>) -> Vec<Answer> {
    let names: Vec<String> = range.map(device).collect();
    join_all(names.iter().map(|name| gw.query(name))).await
}

fn slow_queries(ms: u64) -> Behavior {
    Behavior {
        query_latency: Some(Latency::Fixed(Duration::from_millis(ms))),
        ..Behavior::default()
    }
}

#[actix_web::test]
async fn queries_of_many_devices_share_few_cucm_calls() {
    let sim = simulator(40, |_| {});
    sim.set_behavior(slow_queries(50));
    for n in (1..=40).step_by(3) {
        assert!(sim.login_directly(&device(n), &format!("user{n}")));
    }
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| c.max_concurrent = 1).await;
    let answers = ask(&gw, 1..=40).await;
    for (n, answer) in (1..=40).zip(&answers) {
        let expected = if n % 3 == 1 {
            format!("user{n}")
        } else {
            String::new()
        };
        assert_eq!(
            answer.expect(200, 0).user.as_deref(),
            Some(&*expected),
            "{n}"
        );
        assert_eq!(answer.device.as_deref(), Some(&*device(n)));
    }
    // The first query leaves alone (nothing else waits yet); the rest ride in
    // batches of up to 50 while the single slot is busy.
    let calls = sim.stats().calls_device_user_query;
    assert!(calls <= 3, "{calls} CUCM calls for 40 devices");
    // Every device got its own cache entry.
    let again = ask(&gw, 1..=40).await;
    assert!(again.iter().all(|a| a.code == Some(0)));
    assert_eq!(
        sim.stats().calls_device_user_query,
        calls,
        "all from the cache"
    );
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "bc_batched_queries_total{cluster=\"EU\"}") >= 38.0);
    assert_eq!(
        metric(&metrics, "bc_batching_disabled{cluster=\"EU\"}"),
        0.0
    );
}

#[actix_web::test]
async fn max_devices_per_query_1_turns_it_off() {
    let sim = simulator(10, |_| {});
    sim.set_behavior(slow_queries(20));
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.max_concurrent = 1;
        c.max_devices_per_query = 1;
    })
    .await;
    let answers = ask(&gw, 1..=10).await;
    assert!(answers.iter().all(|a| a.code == Some(0)));
    assert_eq!(sim.stats().calls_device_user_query, 10);
}

#[actix_web::test]
async fn batches_hold_their_callers_deadlines() {
    let sim = simulator(10, |_| {});
    let mut cluster = actors::ClusterConfig::new("EU", vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    cluster.max_concurrent = 1;
    cluster.timeout_ms = 20_000;
    let mut config = business_connector::config::Config::single_cluster(cluster);
    config.deadline_ms = 800;
    let gw = Gateway::start(config).await;
    // A hung cluster: every caller of a batch is answered by its own deadline, not
    // after the 20 s call timeout.
    sim.set_faults(sim::Faults {
        hang: true,
        ..Default::default()
    });
    let started = Instant::now();
    let answers = ask(&gw, 1..=10).await;
    let took = started.elapsed();
    for answer in &answers {
        let code = answer.code.expect("a result");
        assert!(code == 1003 || code == 1004, "{}", answer.body);
    }
    assert!(took < Duration::from_millis(2500), "{took:?}");
    sim.set_faults(sim::Faults::default());
}

/// What the tiny non-batching server saw: devices per call, in order.
type Seen = Arc<Mutex<Vec<usize>>>;

/// An EM service that answers only the first device of every deviceUserQuery, as a
/// cluster that does not batch might. Nobody is logged in anywhere.
async fn first_device_only() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    actix_web::rt::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            actix_web::rt::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buffer).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break body.to_string();
                    }
                };
                let xml = form_urlencoded::parse(body.as_bytes())
                    .find(|(k, _)| k == "xml")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let names: Vec<String> = actors::xml::parse(&xml)
                    .ok()
                    .and_then(|root| {
                        let query = root.descendant("deviceUserQuery")?;
                        Some(
                            query
                                .children_named("deviceName")
                                .map(|d| d.text.clone())
                                .collect(),
                        )
                    })
                    .unwrap_or_default();
                log.lock().unwrap().push(names.len());
                let answer = match names.first() {
                    Some(first) => format!(
                        "<response><deviceUserResults><device name=\"{first}\"><none/></device>\
                         </deviceUserResults></response>"
                    ),
                    None => "<response><failure><error code=\"1\">Error on Parsing</error>\
                             </failure></response>"
                        .to_string(),
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/emservice/EMServiceServlet"), seen)
}

#[actix_web::test]
async fn a_cluster_answering_only_the_first_device_is_asked_one_by_one() {
    let (url, seen) = first_device_only().await;
    let gw = Gateway::with_cluster("EU", vec![url], |c| c.max_concurrent = 1).await;
    let answers = ask(&gw, 1..=10).await;
    for (n, answer) in (1..=10).zip(&answers) {
        answer.expect(200, 0);
        assert_eq!(answer.device.as_deref(), Some(&*device(n)));
        assert_eq!(answer.user.as_deref(), Some(""));
    }
    let calls = seen.lock().unwrap().clone();
    let batches = calls.iter().filter(|&&devices| devices > 1).count();
    assert_eq!(batches, 1, "one failed batch, then singles: {calls:?}");
    assert_eq!(calls.iter().filter(|&&d| d == 1).count(), 10, "{calls:?}");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "bc_batching_disabled{cluster=\"EU\"}"),
        1.0
    );
    // Remembered: later queries go alone from the start.
    let later = ask(&gw, 11..=14).await;
    assert!(later.iter().all(|a| a.code == Some(0)));
    assert!(seen.lock().unwrap()[calls.len()..].iter().all(|&d| d == 1));
}

#[actix_web::test]
async fn a_cold_storm_under_a_rate_limit_is_answered_in_batches() {
    // 300 devices at once, 20 calls/s with a burst of 5, 100 ms per call, the default
    // deadline: one by one that is 15 s of calls (the tail would be shed with 1004).
    let sim = simulator(300, |_| {});
    sim.set_behavior(slow_queries(100));
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.max_requests_per_second = 20;
        c.burst = 5;
    })
    .await;
    let started = Instant::now();
    let answers = ask(&gw, 1..=300).await;
    let took = started.elapsed();
    assert!(answers.iter().all(|a| a.code == Some(0)), "none shed");
    let calls = sim.stats().calls_device_user_query;
    // While requests are still arriving, a free token carries whatever waits (no
    // caller is held back to fill a batch); then one full batch per token. 300
    // one by one: 300 calls.
    assert!(calls <= 20, "{calls} calls");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
