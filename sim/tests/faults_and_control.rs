//! Concurrency gate (26), every fault mode, the control endpoint, statistics and TLS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sim::{Behavior, CallKind, Faults, Latency, SimConfig, SimStats, Simulator};

fn device(i: usize) -> String {
    sim::seeded_device_name(i)
}

fn user(i: usize) -> String {
    sim::seeded_user_id(i)
}

#[tokio::test]
async fn concurrency_gate_answers_26_above_max_concurrent() -> anyhow::Result<()> {
    let latency = Duration::from_millis(400);
    let sim = Simulator::start(SimConfig {
        devices: 20,
        users: 20,
        max_concurrent: 5,
        behavior: Behavior {
            latency: Latency::Fixed(latency),
            ..Behavior::default()
        },
        ..SimConfig::default()
    })?;
    let addr = sim.addr();
    // Connect first so all 20 requests arrive close together.
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(Conn::connect(addr).await?);
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            tokio::spawn(async move {
                let started = Instant::now();
                let reply = conn.em(&login_xml(&device(i + 1), &user(i + 1))).await?;
                anyhow::Ok((reply, started.elapsed()))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for task in tasks {
        let (reply, elapsed) = task.await??;
        match reply.em_code() {
            None => ok += 1,
            Some(26) => {
                busy += 1;
                assert!(reply.body.contains(">Busy, please try again</error>"));
                assert!(
                    elapsed < latency,
                    "26 is answered immediately, took {elapsed:?}"
                );
            }
            other => panic!("unexpected answer {other:?}: {}", reply.body),
        }
    }
    let stats = sim.stats();
    assert_eq!(ok + busy, 20);
    assert!(ok >= 5, "at least the first 5 are admitted, got {ok}");
    assert!(busy >= 1, "some must be refused with 26");
    assert_eq!(stats.busy_answers, busy);
    assert_eq!(stats.max_concurrent_ops, 5);
    assert!(stats.max_concurrent_calls >= 6);
    assert_eq!(stats.calls_login, 20);
    assert_eq!(stats.in_flight_ops, 0);
    assert_eq!(stats.answers_ok, ok);
    Ok(())
}

#[tokio::test]
async fn queries_bypass_the_gate_and_per_device_concurrency_is_tracked() -> anyhow::Result<()> {
    let sim = Simulator::start(SimConfig {
        devices: 2,
        users: 2,
        max_concurrent: 1,
        behavior: Behavior {
            latency: Latency::Fixed(Duration::from_millis(300)),
            query_latency: Some(Latency::Fixed(Duration::from_millis(300))),
            ..Behavior::default()
        },
        ..SimConfig::default()
    })?;
    let addr = sim.addr();
    let d1 = device(1);
    // One login holds the only gate slot while 3 queries on the same device run alongside.
    let login = tokio::spawn({
        let d1 = d1.clone();
        async move { em(addr, &login_xml(&d1, "user1")).await }
    });
    let queries: Vec<_> = (0..3)
        .map(|_| {
            let d1 = d1.clone();
            tokio::spawn(async move { em(addr, &device_user_query(&[&d1])).await })
        })
        .collect();
    assert_eq!(login.await??.body, SUCCESS);
    for q in queries {
        assert!(q.await??.body.contains("<deviceUserResults>"));
    }
    let stats = sim.stats();
    assert_eq!(stats.busy_answers, 0);
    assert_eq!(stats.max_concurrent_ops, 1);
    assert!(stats.max_concurrent_per_device >= 2, "{stats:?}");
    assert_eq!(stats.log.len(), 4);
    // Calls on the device overlapped in time, visible in the log.
    let login_rec = stats
        .log
        .iter()
        .find(|r| r.kind == CallKind::Login)
        .unwrap();
    assert!(stats
        .log
        .iter()
        .filter(|r| r.kind == CallKind::DeviceUserQuery)
        .any(|q| q.start < login_rec.end && login_rec.start < q.end));
    Ok(())
}

#[tokio::test]
async fn call_log_orders_operations_on_one_device() -> anyhow::Result<()> {
    let sim = seeded_sim(1, 2);
    let addr = sim.addr();
    let d1 = device(1);
    let mut conn = Conn::connect(addr).await?;
    conn.em(&login_xml(&d1, "user1")).await?;
    conn.em(&logout_xml(&d1)).await?;
    conn.em(&login_xml(&d1.to_lowercase(), "user2")).await?;
    conn.em(&login_xml(&d1, "user1")).await?;
    let stats = sim.stats();
    let log: Vec<_> = stats.log.iter().collect();
    assert_eq!(log.len(), 4);
    let summary: Vec<_> = log
        .iter()
        .map(|r| (r.kind, r.devices.clone(), r.user.clone(), r.code))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                CallKind::Login,
                vec![d1.clone()],
                Some("user1".into()),
                None
            ),
            (
                CallKind::Logout,
                vec![d1.clone()],
                Some("user1".into()),
                None
            ),
            (
                CallKind::Login,
                vec![d1.clone()],
                Some("user2".into()),
                None
            ),
            (
                CallKind::Login,
                vec![d1.clone()],
                Some("user1".into()),
                Some(18)
            ),
        ]
    );
    for pair in log.windows(2) {
        assert!(pair[0].seq < pair[1].seq);
        assert!(
            pair[0].end <= pair[1].start,
            "sequential calls do not overlap"
        );
    }
    assert_eq!(stats.max_concurrent_per_device, 1);
    sim.reset_stats();
    let stats = sim.stats();
    assert_eq!((stats.calls_total, stats.log.len()), (0, 0));
    Ok(())
}

#[tokio::test]
async fn fault_hang_is_observed_with_a_client_timeout() -> anyhow::Result<()> {
    let sim = seeded_sim(1, 1);
    sim.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let mut conn = Conn::connect(sim.addr()).await?;
    let waited = tokio::time::timeout(
        Duration::from_millis(300),
        conn.em(&device_user_query(&[&device(1)])),
    )
    .await;
    assert!(waited.is_err(), "no answer while hang is on");
    let stats = sim.stats();
    assert_eq!((stats.hung_calls, stats.faults_served), (1, 1));
    assert_eq!(stats.calls_device_user_query, 1);

    // A second hung call, then hang off: it is released by closing its connection.
    let mut conn = Conn::connect(sim.addr()).await?;
    let pending = tokio::spawn(async move { conn.em(&device_user_query(&["SEPX"])).await });
    // Observe (not sleep) until the sim holds it.
    while sim.stats().hung_calls < 2 {
        tokio::task::yield_now().await;
    }
    sim.set_faults(Faults::default());
    assert!(pending.await?.is_err(), "hung call ends unanswered");
    let reply = em(sim.addr(), &device_user_query(&[&device(1)])).await?;
    assert!(reply.body.contains("<deviceUserResults>"));
    Ok(())
}

#[tokio::test]
async fn fault_http_status_and_garbage() -> anyhow::Result<()> {
    let sim = seeded_sim(1, 1);
    let addr = sim.addr();
    for status in [503u16, 500] {
        sim.set_faults(Faults {
            http_status: Some(status),
            ..Faults::default()
        });
        let reply = em(addr, &login_xml(&device(1), "user1")).await?;
        assert_eq!(reply.status, status);
        assert_eq!(reply.em_code(), None);
    }
    assert_eq!(
        sim.logged_in_user(&device(1)),
        None,
        "faulted calls change nothing"
    );
    sim.set_faults(Faults {
        garbage: true,
        ..Faults::default()
    });
    let reply = em(addr, &device_user_query(&[&device(1)])).await?;
    assert_eq!(reply.status, 200);
    assert!(reply.body.starts_with("<html>"));
    assert!(!reply.body.contains("<response>"));
    // The control endpoint is never faulted.
    let stats = control(addr, "GET", "/_sim/stats?log=false", "").await?;
    assert_eq!(stats.status, 200);
    let stats: SimStats = serde_json::from_str(&stats.body)?;
    assert_eq!(stats.faults_served, 3);
    assert!(stats.log.is_empty());
    Ok(())
}

#[tokio::test]
async fn fault_refuse_closes_and_rebinds_the_same_address() -> anyhow::Result<()> {
    let sim = seeded_sim(1, 1);
    let addr = sim.addr();
    let mut keep_alive = Conn::connect(addr).await?;
    assert!(keep_alive
        .em(&device_user_query(&[&device(1)]))
        .await
        .is_ok());

    sim.set_faults(Faults {
        refuse: true,
        ..Faults::default()
    });
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert!(
        keep_alive.is_closed_by_server().await,
        "keep-alive connection closed"
    );
    // The control address still answers, and turns refuse off again.
    let reply = control(
        sim.control_addr(),
        "POST",
        "/_sim/faults",
        r#"{"refuse":false}"#,
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(sim.addr(), addr);
    let reply = em(addr, &device_user_query(&[&device(1)])).await?;
    assert!(reply.body.contains("<deviceUserResults>"));

    // And on again through the control address.
    control(
        sim.control_addr(),
        "POST",
        "/_sim/faults",
        r#"{"refuse":true}"#,
    )
    .await?;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    sim.set_faults(Faults::default());
    assert!(em(addr, &device_user_query(&[&device(1)])).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn fault_busy_every_and_fail_code() -> anyhow::Result<()> {
    let sim = seeded_sim(6, 6);
    let addr = sim.addr();
    sim.set_faults(Faults {
        busy_every: Some(3),
        ..Faults::default()
    });
    let mut codes = Vec::new();
    for i in 1..=6 {
        codes.push(em(addr, &login_xml(&device(i), &user(i))).await?.em_code());
    }
    assert_eq!(codes, vec![None, None, Some(26), None, None, Some(26)]);
    // Queries are not counted by busy_every.
    assert_eq!(
        em(addr, &device_user_query(&[&device(1)])).await?.em_code(),
        None
    );
    let stats = sim.stats();
    assert_eq!((stats.busy_answers, stats.faults_served), (2, 2));

    for code in [0u32, 6, 26] {
        sim.set_faults(Faults {
            fail_code: Some(code),
            ..Faults::default()
        });
        let reply = em(addr, &logout_xml(&device(1))).await?;
        assert_eq!((reply.status, reply.em_code()), (200, Some(code)));
        let reply = em(addr, &device_user_query(&[&device(1)])).await?;
        assert_eq!(reply.em_code(), Some(code));
    }
    let reply = {
        sim.set_faults(Faults {
            fail_code: Some(0),
            ..Faults::default()
        });
        em(addr, &login_xml(&device(3), &user(3))).await?
    };
    assert_eq!(
        reply.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><failure><error code=\"0\">Unknown Error</error></failure></response>"
    );
    assert_eq!(
        sim.logged_in_user(&device(1)).as_deref(),
        Some("user1"),
        "fail_code changes nothing"
    );
    Ok(())
}

#[tokio::test]
async fn control_endpoint_stats_faults_reset() -> anyhow::Result<()> {
    let sim = seeded_sim(2, 2);
    let addr = sim.addr();
    em(addr, &login_xml(&device(1), "user1")).await?;
    em(addr, &device_user_query(&[&device(1)])).await?;
    em(addr, "<broken").await?;

    let reply = control(addr, "GET", "/_sim/stats", "").await?;
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let stats: SimStats = serde_json::from_str(&reply.body)?;
    assert_eq!(
        (
            stats.calls_login,
            stats.calls_device_user_query,
            stats.calls_invalid
        ),
        (1, 1, 1)
    );
    assert_eq!(stats.log.len(), 3);
    assert_eq!(stats.log[2].code, Some(1));

    // Full Behavior JSON, with latency forms.
    let body = r#"{"latency":{"fixed_ms":20},"query_latency":{"min_ms":1,"max_ms":2},"faults":{"fail_code":0}}"#;
    let reply = control(addr, "POST", "/_sim/faults", body).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let behavior = sim.behavior();
    assert_eq!(behavior.latency, Latency::Fixed(Duration::from_millis(20)));
    assert_eq!(behavior.faults.fail_code, Some(0));
    assert_eq!(
        em(addr, &device_user_query(&[&device(1)])).await?.em_code(),
        Some(0)
    );
    // A bare Faults object keeps the latency.
    control(addr, "POST", "/_sim/faults", r#"{"http_status":503}"#).await?;
    assert_eq!(sim.behavior().faults.http_status, Some(503));
    assert_eq!(
        sim.behavior().latency,
        Latency::Fixed(Duration::from_millis(20))
    );
    assert_eq!(
        em(addr, &device_user_query(&[&device(1)])).await?.status,
        503
    );
    let bad = control(addr, "POST", "/_sim/faults", r#"{"nonsense":true}"#).await?;
    assert_eq!(bad.status, 400);
    let current = control(addr, "GET", "/_sim/faults", "").await?;
    let current: Behavior = serde_json::from_str(&current.body)?;
    assert_eq!(current, sim.behavior());
    // `{}` turns everything off.
    control(addr, "POST", "/_sim/faults", "{}").await?;
    assert_eq!(sim.behavior(), Behavior::default());

    let reply = control(addr, "POST", "/_sim/reset", "").await?;
    assert_eq!(reply.status, 200);
    let stats = sim.stats();
    assert_eq!(
        (stats.calls_total, stats.faults_served, stats.log.len()),
        (0, 0, 0)
    );
    assert_eq!(
        sim.logged_in_user(&device(1)).as_deref(),
        Some("user1"),
        "reset keeps state"
    );
    assert_eq!(control(addr, "GET", "/_sim/nope", "").await?.status, 404);
    Ok(())
}

#[tokio::test]
async fn tls_with_the_returned_ca_pem() -> anyhow::Result<()> {
    let sim = Simulator::start(SimConfig {
        devices: 1,
        users: 1,
        tls: true,
        ..SimConfig::default()
    })?;
    assert!(sim.url().starts_with("https://127.0.0.1:"));
    let pem = sim.ca_pem().expect("a certificate when tls");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    for name in ["localhost", "127.0.0.1"] {
        let mut conn = connect_tls(sim.addr(), &pem, name).await?;
        let reply = conn.em(&login_xml(&device(1), "user1")).await?;
        assert_eq!(reply.body, SUCCESS);
        let reply = conn.em(&logout_xml(&device(1))).await?;
        assert_eq!(reply.body, SUCCESS, "keep-alive over TLS");
    }
    // A client that does not trust the certificate fails the handshake.
    let other = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::default()
    })?;
    let other_pem = other.ca_pem().expect("pem");
    assert!(connect_tls(sim.addr(), &other_pem, "localhost")
        .await
        .is_err());
    assert!(seeded_sim(0, 0).ca_pem().is_none());
    Ok(())
}

#[test]
fn stop_ends_hung_calls_and_frees_the_port() {
    let sim = seeded_sim(1, 1);
    let addr = sim.addr();
    sim.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let client = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        let body = "xml=%3Cquery%2F%3E";
        write!(
            stream,
            "POST /emservice/EMServiceServlet HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut buf = Vec::new();
        // Returns when the simulator stops and the connection is dropped.
        let _ = stream.read_to_end(&mut buf);
        buf
    });
    while sim.stats().hung_calls == 0 {
        std::thread::yield_now();
    }
    sim.stop();
    let answer = client.join().expect("client thread");
    assert!(answer.is_empty(), "hung call never answered");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener closed after stop"
    );
}
