//! What the gateway does when CUCM misbehaves (failover between nodes, deadlines):
//! dead and hung nodes, garbage, HTTP errors, busy answers, unknown failures, TLS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sim::Faults;

/// A simulated cluster (2 devices and users) with these faults on from the start.
fn faulty(faults: Faults) -> sim::SimHandle {
    simulator(2, |c| c.behavior = common::faults(faults))
}

#[actix_web::test]
async fn a_dead_first_node_is_skipped() {
    let sim = simulator(2, |_| {});
    let dead = dead_node();
    let gw = Gateway::with_cluster("EU", vec![dead, sim.url()], |_| {}).await;
    gw.login(&device(1), "user1").await.expect(200, 0);
    gw.logout(&device(1)).await.expect(200, 0);
    assert_eq!(sim.stats().calls_login, 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("bc_node_up{cluster=\"EU\",node=\"127.0.0.1:"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bc_node_failovers_total") && !l.ends_with(" 0")),
        "a failover was counted"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bc_node_up") && l.ends_with(" 0")),
        "the dead node is reported down"
    );
    // Readiness holds: one node of the cluster is usable.
    let ready = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[actix_web::test]
async fn every_node_dead_is_1003_and_not_ready() {
    let gw = Gateway::with_cluster("EU", vec![dead_node(), dead_node()], |_| {}).await;
    // Not ready from the start, before any call has failed.
    let ready = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(ready.text().await.unwrap().contains("EU"));
    gw.login("SEP000000000001", "user1").await.expect(200, 1003);
    gw.query("SEP000000000001").await.expect(200, 1003);
    let ready = gw.client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let health = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[actix_web::test]
async fn a_hung_node_times_out_a_login_once_and_queries_fail_over() {
    let hung = faulty(Faults {
        hang: true,
        ..Faults::default()
    });
    let good = simulator(2, |_| {});
    let gw =
        Gateway::with_cluster("EU", vec![hung.url(), good.url()], |c| c.timeout_ms = 300).await;

    // The login reaches the hung node, times out, and is never sent again.
    let started = Instant::now();
    gw.login(&device(1), "user1").await.expect(200, 1003);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered in time"
    );
    assert_eq!(hung.stats().calls_login, 1, "sent exactly once");
    assert_eq!(good.stats().calls_login, 0, "never retried after a timeout");

    // The hung node is now skipped: the next operations go to the good node.
    gw.login(&device(1), "user1").await.expect(200, 0);
    assert_eq!(hung.stats().calls_login, 1);
    assert_eq!(good.logged_in_user(&device(1)).as_deref(), Some("user1"));
}

#[actix_web::test]
async fn a_query_moves_past_a_hung_node() {
    let hung = faulty(Faults {
        hang: true,
        ..Faults::default()
    });
    let good = simulator(2, |_| {});
    good.login_directly(&device(2), "user2");
    let gw =
        Gateway::with_cluster("EU", vec![hung.url(), good.url()], |c| c.timeout_ms = 300).await;
    let answer = gw.query(&device(2)).await;
    answer.expect(200, 0);
    assert_eq!(answer.user.as_deref(), Some("user2"));
    assert_eq!(hung.stats().calls_device_user_query, 1);
}

#[actix_web::test]
async fn a_hung_cluster_does_not_hurt_another() {
    let hung = faulty(Faults {
        hang: true,
        ..Faults::default()
    });
    let fine = simulator(2, |_| {});
    let mut config = business_connector::config::Config::single_cluster(
        actors::ClusterConfig::new("SLOW", vec![hung.url()]),
    );
    config.clusters[0].timeout_ms = 2_000;
    config
        .clusters
        .push(actors::ClusterConfig::new("FAST", vec![fine.url()]));
    let gw = Gateway::start(config).await;
    let creds = format!("<request>{CREDS}</request>");
    let slow_path = format!("/api/login/{}/user1/SLOW", device(1));
    let slow = gw.post_form(&slow_path, &creds);
    let fast = async {
        wait_until(
            "the slow cluster's call is hanging",
            Duration::from_secs(5),
            || hung.stats().hung_calls >= 1,
        )
        .await;
        let started = Instant::now();
        let answer = gw
            .post_form(&format!("/api/login/{}/user1/FAST", device(1)), &creds)
            .await;
        (answer, started.elapsed())
    };
    let (slow, (fast, fast_took)) = tokio::join!(slow, fast);
    slow.expect(200, 1003);
    fast.expect(200, 0);
    assert!(
        fast_took < Duration::from_millis(1_500),
        "the other cluster answered while one hung: {fast_took:?}"
    );
}

#[actix_web::test]
async fn garbage_from_cucm_is_1005() {
    let sim = faulty(Faults {
        garbage: true,
        ..Faults::default()
    });
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    gw.login(&device(1), "user1").await.expect(200, 1005);
    gw.query(&device(1)).await.expect(200, 1005);
}

#[actix_web::test]
async fn http_503_moves_a_login_on_but_500_does_not() {
    let unavailable = faulty(Faults {
        http_status: Some(503),
        ..Faults::default()
    });
    let good = simulator(2, |_| {});
    let gw = Gateway::with_cluster("EU", vec![unavailable.url(), good.url()], |_| {}).await;
    gw.login(&device(1), "user1").await.expect(200, 0);
    assert_eq!(unavailable.stats().calls_total, 1);
    assert_eq!(good.logged_in_user(&device(1)).as_deref(), Some("user1"));
    gw.shutdown().await;

    let broken = faulty(Faults {
        http_status: Some(500),
        ..Faults::default()
    });
    let good = simulator(2, |_| {});
    let gw = Gateway::with_cluster("EU", vec![broken.url(), good.url()], |_| {}).await;
    gw.login(&device(1), "user1").await.expect(200, 1003);
    assert_eq!(
        good.stats().calls_login,
        0,
        "a 500 may have executed: no retry"
    );
    // A query may move on after any failure.
    gw.query(&device(1)).await.expect(200, 0);

    // A single node answering 503: nothing else to try.
    let only = faulty(Faults {
        http_status: Some(503),
        ..Faults::default()
    });
    let gw = Gateway::with_cluster("EU", vec![only.url()], |_| {}).await;
    gw.login(&device(1), "user1").await.expect(200, 1003);
}

#[actix_web::test]
async fn busy_every_other_call_is_never_seen_by_callers() {
    let sim = simulator(20, |c| {
        c.behavior = faults(Faults {
            busy_every: Some(2),
            ..Faults::default()
        })
    });
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    let logins = (1..=10).map(|n| gw.login_seeded(n));
    let answers = futures_util::future::join_all(logins).await;
    for answer in &answers {
        answer.expect(200, 0);
    }
    let stats = sim.stats();
    assert!(
        stats.busy_answers >= 5,
        "CUCM did say busy: {}",
        stats.busy_answers
    );
    assert_eq!(stats.calls_login, 10 + stats.busy_answers);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "bc_cucm_busy_retries_total{cluster=\"EU\"}"),
        stats.busy_answers as f64
    );
}

#[actix_web::test]
async fn cucm_failure_code_0_is_1008_never_success() {
    let sim = faulty(Faults {
        fail_code: Some(0),
        ..Faults::default()
    });
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    let login = gw.login(&device(1), "user1").await;
    login.expect(200, 1008);
    assert!(login.text.contains("Unknown Error"), "{}", login.text);
    gw.logout(&device(1)).await.expect(200, 1008);
    gw.query(&device(1)).await.expect(200, 1008);
    sim.set_faults(Faults {
        fail_code: Some(6),
        ..Faults::default()
    });
    gw.login(&device(1), "user1").await.expect(200, 6);
}

#[actix_web::test]
async fn refused_then_back() {
    let sim = simulator(2, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    gw.query(&device(1)).await.expect(200, 0);
    sim.set_faults(Faults {
        refuse: true,
        ..Faults::default()
    });
    gw.login(&device(1), "user1").await.expect(200, 1003);
    sim.set_faults(Faults::default());
    gw.login(&device(1), "user1").await.expect(200, 0);
}

#[actix_web::test]
async fn tls_with_a_ca_file_or_insecure_mode() {
    let sim = simulator(3, |c| c.tls = true);
    assert!(sim.url().starts_with("https://"));
    let pem = sim.ca_pem().expect("a self-signed certificate");
    let ca_file = std::env::temp_dir().join(format!(
        "bc-test-ca-{}-{}.pem",
        std::process::id(),
        sim.addr().port()
    ));
    std::fs::write(&ca_file, pem).unwrap();

    let trusted = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.ca_file = Some(ca_file.display().to_string())
    })
    .await;
    trusted.login(&device(1), "user1").await.expect(200, 0);

    let insecure = Gateway::with_cluster("EU", vec![sim.url()], |c| c.tls_insecure = true).await;
    insecure.login(&device(2), "user2").await.expect(200, 0);

    // Neither: the self-signed certificate is not trusted, so CUCM is unreachable.
    let untrusted = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    untrusted.login(&device(3), "user3").await.expect(200, 1003);
    assert_eq!(sim.logged_in_user(&device(3)), None);
    let _ = std::fs::remove_file(ca_file);
}

#[actix_web::test]
async fn a_cucm_busy_until_the_deadline_answers_1004_never_26() {
    let sim = simulator(4, |c| {
        c.behavior = faults(Faults {
            busy_every: Some(1),
            ..Faults::default()
        })
    });
    let mut config = business_connector::config::Config::single_cluster(
        actors::ClusterConfig::new("EU", vec![sim.url()]),
    );
    config.clusters[0].max_requests_per_second = 0;
    config.deadline_ms = 1000;
    let gw = Gateway::start(config).await;
    let started = Instant::now();
    let answers = futures_util::future::join_all((1..=4).map(|n| gw.login_seeded(n))).await;
    for answer in &answers {
        answer.expect(503, 1004);
        assert!(answer.retry_after.is_some());
    }
    assert!(
        started.elapsed() < Duration::from_millis(1600),
        "{:?}",
        started.elapsed()
    );
    // It kept trying while a retry fitted: more than one busy answer per login.
    assert!(
        sim.stats().busy_answers > 4,
        "{:?}",
        sim.stats().busy_answers
    );
}
