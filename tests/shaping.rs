//! Shaping, ordering, caching and shedding as the simulator measures them
//!, and graceful shutdown with requests in flight.

mod common;

use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use sim::{Behavior, Latency};

#[actix_web::test]
async fn a_login_burst_never_exceeds_cucms_cap() {
    // CUCM's real protection: 5 at once, 100 ms per login.
    let sim = simulator(50, |c| {
        c.max_concurrent = 5;
        c.behavior = latency_ms(100);
    });
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| c.max_concurrent = 5).await;
    let answers = join_all((1..=50).map(|n| gw.login_seeded(n))).await;
    for answer in &answers {
        answer.expect(200, 0);
    }
    let stats = sim.stats();
    assert_eq!(stats.calls_login, 50, "no retries were needed");
    assert_eq!(stats.busy_answers, 0, "CUCM never had to say busy");
    assert!(
        stats.max_concurrent_ops <= 5,
        "over CUCM's cap: {}",
        stats.max_concurrent_ops
    );
    assert_eq!(stats.max_concurrent_ops, 5, "the cap was used in full");
}

#[actix_web::test]
async fn repeated_queries_cost_one_cucm_call() {
    let sim = simulator(2, |_| {});
    sim.login_directly(&device(1), "user1");
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    for _ in 0..50 {
        let answer = gw.query(&device(1)).await;
        answer.expect(200, 0);
        assert_eq!(answer.user.as_deref(), Some("user1"));
    }
    assert_eq!(sim.stats().calls_device_user_query, 1);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "bc_cache_hits_total{cluster=\"EU\"}"),
        49.0
    );
    assert_eq!(
        metric(&metrics, "bc_cache_misses_total{cluster=\"EU\"}"),
        1.0
    );
}

#[actix_web::test]
async fn concurrent_identical_queries_share_one_call_even_without_cache() {
    let sim = simulator(2, |c| {
        c.behavior = Behavior {
            query_latency: Some(Latency::Fixed(Duration::from_millis(1000))),
            ..Behavior::default()
        }
    });
    sim.login_directly(&device(1), "user1");
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| c.cache_ttl_ms = 0).await;
    let first = device(1);
    let answers = join_all((0..20).map(|_| gw.query(&first))).await;
    for answer in &answers {
        answer.expect(200, 0);
        assert_eq!(answer.user.as_deref(), Some("user1"));
    }
    assert_eq!(sim.stats().calls_device_user_query, 1);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "bc_cache_coalesced_total{cluster=\"EU\"}"),
        19.0
    );
}

#[actix_web::test]
async fn one_device_at_a_time_devices_in_parallel() {
    let sim = simulator(8, |c| c.behavior = latency_ms(30));
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.max_concurrent = 8;
        c.cache_ttl_ms = 0;
    })
    .await;
    // Each device gets a login, a query, a logout and a query, all at once.
    let gw = &gw;
    let work = (1..=8).map(|n| async move {
        let dev = device(n);
        let (login, query, logout, query_again) = tokio::join!(
            gw.login_seeded(n),
            gw.query(&dev),
            gw.logout(&dev),
            gw.query(&dev)
        );
        vec![login, query, logout, query_again]
    });
    let answers: Vec<Answer> = join_all(work).await.into_iter().flatten().collect();
    assert_eq!(answers.len(), 32);
    assert!(answers.iter().all(|a| a.status == 200));
    let stats = sim.stats();
    assert_eq!(
        stats.max_concurrent_per_device, 1,
        "two operations on one device overlapped"
    );
    assert!(
        stats.max_concurrent_calls > 1,
        "devices did not run in parallel"
    );
}

#[actix_web::test]
async fn a_full_queue_sheds_with_1004_and_retry_after() {
    let sim = simulator(10, |c| c.behavior = latency_ms(300));
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.max_concurrent = 1;
        c.queue_limit = 2;
    })
    .await;
    let answers = join_all((1..=8).map(|n| gw.login_seeded(n))).await;
    let shed: Vec<&Answer> = answers.iter().filter(|a| a.code == Some(1004)).collect();
    let done = answers.iter().filter(|a| a.code == Some(0)).count();
    assert_eq!(
        shed.len() + done,
        8,
        "only successes and sheds: {answers:#?}"
    );
    assert!(
        shed.len() >= 5,
        "1 in flight + 2 queued at most; shed {}",
        shed.len()
    );
    for answer in shed {
        assert_eq!(answer.status, 503);
        assert!(answer
            .retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
    }
    assert_eq!(
        sim.stats().calls_login as usize,
        done,
        "a shed request never reached CUCM"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "bc_load_shed_total{cluster=\"EU\",reason=\"queue_full\"}"
        ) >= 5.0
    );
}

#[actix_web::test]
async fn a_wait_beyond_the_deadline_is_shed_not_timed_out() {
    let sim = simulator(10, |c| c.behavior = latency_ms(250));
    let mut config = business_connector::config::Config::single_cluster(
        actors::ClusterConfig::new("EU", vec![sim.url()]),
    );
    config.deadline_ms = 1_000;
    config.clusters[0].max_concurrent = 1;
    config.clusters[0].max_requests_per_second = 0;
    let gw = Gateway::start(config).await;
    // Teach the gateway how long CUCM takes.
    gw.login_seeded(1).await.expect(200, 0);
    let answers = join_all((2..=10).map(|n| gw.login_seeded(n))).await;
    let shed = answers.iter().filter(|a| a.code == Some(1004)).count();
    let done = answers.iter().filter(|a| a.code == Some(0)).count();
    assert_eq!(shed + done, 9, "no timeouts, no other codes: {answers:#?}");
    assert!(shed >= 4, "9 × 250 ms cannot fit in 1 s: shed {shed}");
    assert!(done >= 2, "what fits is done: {done}");
    assert_eq!(sim.stats().calls_login as usize, done + 1);
}

#[actix_web::test]
async fn shutdown_answers_every_request_in_flight() {
    let sim = simulator(5, |c| c.behavior = latency_ms(1000));
    let mut gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    let trigger = gw.take_shutdown_trigger();
    let requests = join_all((1..=5).map(|n| gw.login_seeded(n)));
    let stop_while_in_flight = async {
        wait_until(
            "all five logins are at CUCM",
            Duration::from_secs(5),
            || sim.stats().in_flight_ops == 5,
        )
        .await;
        let _ = trigger.send(());
    };
    let (answers, ()) = tokio::join!(requests, stop_while_in_flight);
    for answer in &answers {
        answer.expect(200, 0);
    }
    gw.finished().await;
    assert_eq!(sim.stats().calls_login, 5);
    assert!(
        gw.client.get(gw.url("/healthz")).send().await.is_err(),
        "no new connections after shutdown"
    );
}
