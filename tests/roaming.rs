//! Several clusters: discovery of a device's cluster when the caller gives no cluster
//! code, and logins with a PIN through the cluster's EM application (a visitor from
//! another cluster, the way the phone itself does it). Two or three simulators on
//! port 0 form an EMCC set.

mod common;

use std::time::Duration;

use actors::ClusterConfig;
use business_connector::config::Config;
use common::*;
use futures_util::future::join_all;
use sim::{Faults, Fixture, SimConfig, SimHandle, Simulator};

/// Office A: phones `SEPA0000000N`, home of `alice` (PIN 1111), `ann` and `amy`.
/// Office B: phones `SEPB0000000N`, home of `bob` (PIN 2222), `bea` and `ben`.
/// Users without a PIN of their own have the simulator's 12345.
/// Office C: phones `SEPC0000000N` and one phone also named in A (a duplicate).
struct Offices {
    a: SimHandle,
    b: SimHandle,
    c: SimHandle,
}

fn phone(office: char, n: usize) -> String {
    format!("SEP{office}{n:08}")
}

fn office(letter: char, users: &[&str], extra_devices: &[&str]) -> SimHandle {
    let mut fixture = String::new();
    for n in 1..=6 {
        fixture.push_str(&format!("[[devices]]\nname = \"{}\"\n", phone(letter, n)));
    }
    for device in extra_devices {
        fixture.push_str(&format!("[[devices]]\nname = \"{device}\"\n"));
    }
    for user in users {
        fixture.push_str(&format!(
            "[[users]]\nid = \"{user}\"\nprofiles = [\"{user}-UDP\"]\n"
        ));
    }
    let fixture = Fixture::from_toml_str(&fixture).expect("fixture parses");
    Simulator::start(SimConfig {
        fixture: Some(fixture),
        ..SimConfig::default()
    })
    .expect("simulator starts")
}

fn offices() -> Offices {
    let a = office('A', &["alice", "ann", "amy"], &[]);
    let b = office('B', &["bob", "bea", "ben"], &[]);
    let c = office('C', &["carl"], &[&phone('A', 1)]);
    for (visiting, home) in [(&a, &b), (&b, &a), (&c, &a), (&c, &b), (&a, &c), (&b, &c)] {
        visiting.add_emcc_peer(&home.url()).expect("peer added");
    }
    assert!(a.set_pin("alice", "1111"));
    assert!(b.set_pin("bob", "2222"));
    Offices { a, b, c }
}

fn cluster(code: &str, sim: &SimHandle) -> ClusterConfig {
    let mut cluster = ClusterConfig::new(code, vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    cluster
}

/// Clusters A and B (and C when asked), no default cluster.
async fn gateway(offices: &Offices, with_c: bool) -> Gateway {
    let mut config = Config::single_cluster(cluster("A", &offices.a));
    config.clusters.push(cluster("B", &offices.b));
    if with_c {
        config.clusters.push(cluster("C", &offices.c));
    }
    Gateway::start(config).await
}

async fn pin_login(gw: &Gateway, device: &str, user: &str, code: &str, pin: &str) -> Answer {
    let path = if code.is_empty() {
        format!("/api/login/{device}/{user}")
    } else {
        format!("/api/login/{device}/{user}/{code}/{pin}")
    };
    let xml = if code.is_empty() {
        format!("<request>{CREDS}<pin>{pin}</pin></request>")
    } else {
        format!("<request>{CREDS}</request>")
    };
    gw.post_form(&path, &xml).await
}

#[actix_web::test]
async fn discovery_finds_the_device_and_remembers_its_cluster() {
    let offices = offices();
    let gw = gateway(&offices, true).await;
    let (a, b, c) = (&offices.a, &offices.b, &offices.c);

    // Found in B only: every cluster asked once, the answer comes from B.
    let found = gw.query(&phone('B', 2)).await;
    found.expect(200, 0);
    assert_eq!(found.user.as_deref(), Some(""));
    assert_eq!(
        [
            a.stats().calls_device_user_query,
            b.stats().calls_device_user_query,
            c.stats().calls_device_user_query
        ],
        [1, 1, 1]
    );
    // Within the TTL only B is asked, and a login goes to B.
    gw.login(&phone('B', 2), "bob").await.expect(200, 0);
    assert_eq!(b.logged_in_user(&phone('B', 2)).as_deref(), Some("bob"));
    let again = gw.query(&phone('B', 2)).await;
    again.expect(200, 0);
    assert_eq!(again.user.as_deref(), Some("bob"));
    assert_eq!(a.stats().calls_total, 1);
    assert_eq!(c.stats().calls_total, 1);

    // Nowhere: CUCM's 11. In two clusters: 1011, naming both.
    gw.query("SEPFFFFFFFFFFFF").await.expect(200, 11);
    let several = gw.query(&phone('A', 1)).await;
    several.expect(200, 1011);
    assert!(several.text.contains("A, C"), "{}", several.text);

    // A failing cluster: found elsewhere is still found; found nowhere is unknown.
    c.set_faults(Faults {
        http_status: Some(500),
        ..Faults::default()
    });
    gw.query(&phone('A', 3)).await.expect(200, 0);
    gw.query("SEP0000DEADBEEF").await.expect(200, 1003);

    let metrics = gw.metrics().await;
    for (outcome, at_least) in [
        ("found", 2.0),
        ("remembered", 2.0),
        ("nowhere", 1.0),
        ("several", 1.0),
        ("failed", 1.0),
    ] {
        let seen = metric(
            &metrics,
            &format!("bc_discovery_total{{outcome=\"{outcome}\"}}"),
        );
        assert!(seen >= at_least, "{outcome}: {seen}");
    }
}

#[actix_web::test]
async fn a_visitor_logs_in_with_a_pin_on_a_phone_of_another_cluster() {
    let offices = offices();
    let gw = gateway(&offices, false).await;
    let (a, b) = (&offices.a, &offices.b);

    // alice (home A) on a phone of B, by cluster code in the path.
    let answer = pin_login(&gw, &phone('B', 1), "alice", "B", "1111").await;
    answer.expect(200, 0);
    assert_eq!(answer.user.as_deref(), Some("alice"));
    assert!(b.is_emcc_visitor(&phone('B', 1)));
    assert_eq!(b.stats().emapp_requests, 1);
    assert_eq!(a.stats().emapp_requests, 0);
    let query = gw.query(&phone('B', 1)).await;
    query.expect(200, 0);
    assert_eq!(query.user.as_deref(), Some("alice"));
    gw.logout(&phone('B', 1)).await.expect(200, 0);

    // The same by discovery, the PIN in the XML body.
    let answer = pin_login(&gw, &phone('B', 3), "alice", "", "1111").await;
    answer.expect(200, 0);
    assert_eq!(b.logged_in_user(&phone('B', 3)).as_deref(), Some("alice"));
    assert_eq!(b.stats().emapp_requests, 2);

    // A raw text/xml body with everything in it.
    gw.logout(&phone('B', 3)).await.expect(200, 0);
    gw.post_xml(
        "/api/login",
        &format!(
            "<request>{CREDS}<deviceName>{}</deviceName><userID>alice</userID>\
             <clusterCode>b</clusterCode><pin>1111</pin></request>",
            phone('B', 4)
        ),
    )
    .await
    .expect(200, 0);

    // A local user's PIN is checked too (bob on a phone of his own cluster).
    pin_login(&gw, &phone('B', 5), "bob", "B", "2222")
        .await
        .expect(200, 0);
    let before = b.stats().emapp_requests;
    pin_login(&gw, &phone('B', 6), "bob", "B", "9999")
        .await
        .expect(200, 1007);
    assert_eq!(b.stats().emapp_requests, before + 1);
    assert_eq!(b.logged_in_user(&phone('B', 6)), None);

    // A visitor without a PIN: the plain EM API does not know her there.
    gw.login(&phone('B', 6), "ann").await.expect(200, 23);

    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "bc_pin_logins_total{cluster=\"B\",code=\"0\"}") >= 3.0);
    assert_eq!(
        metric(&metrics, "bc_pin_logins_total{cluster=\"B\",code=\"1007\"}"),
        1.0
    );
}

#[actix_web::test]
async fn the_em_application_is_asked_once_and_only_when_it_may_help() {
    let offices = offices();
    let gw = gateway(&offices, false).await;
    let b = &offices.b;

    // Wrong visitor PIN: 1007, exactly one EMApp request, nobody logged in.
    pin_login(&gw, &phone('B', 1), "alice", "B", "0000")
        .await
        .expect(200, 1007);
    assert_eq!(b.stats().emapp_requests, 1);
    assert_eq!(b.logged_in_user(&phone('B', 1)), None);

    // Occupied phone: 18, no EMApp request.
    assert!(b.login_directly(&phone('B', 2), "bob"));
    let occupied = pin_login(&gw, &phone('B', 2), "alice", "B", "1111").await;
    occupied.expect(200, 18);
    // The same user already there: 0, nothing sent to EMApp.
    pin_login(&gw, &phone('B', 2), "bob", "B", "2222")
        .await
        .expect(200, 0);
    assert_eq!(b.stats().emapp_requests, 1);

    // Bad application credentials: 3 from the EM API, no EMApp request.
    gw.post_form(
        &format!("/api/login/{}/alice/B/1111", phone('B', 3)),
        "<request><appID>bcapp</appID><appCertificate>wrong</appCertificate></request>",
    )
    .await
    .expect(200, 3);
    assert_eq!(b.stats().emapp_requests, 1);

    // Bad PIN input: 1002 before any CUCM call.
    let calls = b.stats().calls_total;
    pin_login(&gw, &phone('B', 3), "alice", "B", "12ab")
        .await
        .expect(200, 1002);
    gw.post_form(
        &format!("/api/logout/{}/B", phone('B', 3)),
        &format!("<request>{CREDS}<pin>1111</pin></request>"),
    )
    .await
    .expect(200, 1002);
    gw.post_form(
        &format!("/api/getloggedinuser/{}/B", phone('B', 3)),
        &format!("<request>{CREDS}<pin>1111</pin></request>"),
    )
    .await
    .expect(200, 1002);
    assert_eq!(b.stats().calls_total, calls);
    assert_eq!(b.stats().emapp_requests, 1);
}

#[actix_web::test]
async fn an_unreachable_em_application_fails_pin_logins_only() {
    let offices = offices();
    // B's EM application is configured at an address where nothing listens.
    let mut b = cluster("B", &offices.b);
    b.emapp_nodes =
        Some(vec![dead_node().replace(
            "/emservice/EMServiceServlet",
            "/emapp/EMAppServlet",
        )]);
    let mut config = Config::single_cluster(cluster("A", &offices.a));
    config.clusters.push(b);
    let gw = Gateway::start(config).await;
    pin_login(&gw, &phone('B', 1), "alice", "B", "1111")
        .await
        .expect(200, 1003);
    gw.post_form(
        &format!("/api/login/{}/bob/B", phone('B', 1)),
        &format!("<request>{CREDS}</request>"),
    )
    .await
    .expect(200, 0);
    assert_eq!(offices.b.stats().emapp_requests, 0);
}

#[actix_web::test]
async fn pin_logins_in_a_burst_keep_device_order_and_the_cap() {
    let offices = offices();
    let b = &offices.b;
    b.set_behavior(sim::Behavior {
        latency: sim::Latency::Fixed(Duration::from_millis(20)),
        ..sim::Behavior::default()
    });
    let gw = gateway(&offices, false).await;
    // Per phone: PIN login, query, logout, PIN login, query — many phones at once.
    let per_phone = (1..=6).map(|n| {
        let gw = &gw;
        async move {
            let device = phone('B', n);
            // Locals and visitors alternate; each phone its own user.
            let user = ["bob", "alice", "bea", "ann", "ben", "amy"][n - 1];
            let pin = match user {
                "alice" => "1111",
                "bob" => "2222",
                _ => "12345",
            };
            let mut codes = Vec::new();
            codes.push(pin_login(gw, &device, user, "B", pin).await.code);
            codes.push(gw.query(&device).await.code);
            codes.push(gw.logout(&device).await.code);
            codes.push(pin_login(gw, &device, user, "B", pin).await.code);
            let last = gw.query(&device).await;
            codes.push(last.code);
            (codes, last.user)
        }
    });
    // A second wave on the same phones at the same time: plain queries.
    let queries = (1..=6).map(|n| {
        let gw = &gw;
        async move { gw.query(&phone('B', n)).await.code }
    });
    let (results, query_codes) = futures_util::join!(join_all(per_phone), join_all(queries));
    for (n, (codes, last_user)) in results.into_iter().enumerate() {
        assert_eq!(codes, vec![Some(0); 5], "phone {}", n + 1);
        let expected = ["bob", "alice", "bea", "ann", "ben", "amy"][n];
        assert_eq!(last_user.as_deref(), Some(expected));
    }
    assert!(query_codes.iter().all(|c| *c == Some(0)), "{query_codes:?}");
    let stats = b.stats();
    assert!(stats.max_concurrent_per_device <= 1, "{stats:?}");
    assert!(stats.max_concurrent_calls <= 5, "{stats:?}");
    assert_eq!(stats.answers_by_code.get(&26), None);
}
