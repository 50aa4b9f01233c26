//! SPEC §11, for integrators: getuserdevices (one cluster, and merged across several),
//! forced logins (also racing a query on the same phone), JSON in and out.

mod common;

use actors::ClusterConfig;
use business_connector::config::Config;
use common::*;
use futures_util::future::join_all;

/// The `<deviceName>`s inside `<devices>` of a getuserdevices answer.
fn devices(answer: &Answer) -> Vec<String> {
    let root = actors::xml::parse(&answer.body).expect("well-formed answer");
    let result = root.descendant("result").expect("a result");
    assert!(
        result.child("deviceName").is_none(),
        "no deviceName of its own: {}",
        answer.body
    );
    result
        .child("devices")
        .expect("a devices element")
        .children_named("deviceName")
        .map(|d| d.text.clone())
        .collect()
}

fn creds() -> String {
    format!("<request>{CREDS}</request>")
}

fn cluster(code: &str, url: String) -> ClusterConfig {
    let mut cluster = ClusterConfig::new(code, vec![url]);
    cluster.max_requests_per_second = 0;
    cluster
}

#[actix_web::test]
async fn getuserdevices_on_one_cluster() {
    let sim = simulator(4, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    assert!(sim.login_directly(&device(2), "user2"));

    let on_one = gw.post_form("/api/getuserdevices/user2", &creds()).await;
    on_one.expect(200, 0);
    assert_eq!(devices(&on_one), vec![device(2)]);
    assert_eq!(on_one.user.as_deref(), Some("user2"));
    assert!(on_one.text.contains("1 device"), "{}", on_one.text);

    // The XML form with the cluster code, the path form with it.
    let xml = gw
        .post_xml(
            "/api/getuserdevices",
            &format!(
                "<request>{CREDS}<userID>user2</userID><clusterCode>eu</clusterCode></request>"
            ),
        )
        .await;
    assert_eq!(devices(xml.expect(200, 0)), vec![device(2)]);
    let nowhere = gw.post_form("/api/getuserdevices/user3/EU", &creds()).await;
    assert!(devices(nowhere.expect(200, 0)).is_empty());
    assert!(nowhere.text.contains("not logged in on any device"));

    // CUCM's answers and the gateway's own codes.
    gw.post_form("/api/getuserdevices/nobody", &creds())
        .await
        .expect(200, 23);
    gw.post_form("/api/getuserdevices", &creds())
        .await
        .expect(200, 1002);
    gw.post_form("/api/getuserdevices/user2/XX", &creds())
        .await
        .expect(200, 1001);
    gw.post_form("/api/getuserdevices/user2", "<request/>")
        .await
        .expect(200, 1006);
    gw.post_form(
        "/api/getuserdevices/user2",
        &format!("<request>{CREDS}<pin>1234</pin></request>"),
    )
    .await
    .expect(200, 1002);
    assert_eq!(sim.stats().calls_user_devices_query, 4);
    let metrics = gw.metrics().await;
    assert!(metrics.contains("operation=\"getuserdevices\""), "counted");
}

#[actix_web::test]
async fn getuserdevices_asks_every_cluster_and_merges() {
    let a = simulator(3, |_| {});
    let b = simulator(3, |c| {
        // B's phones are named apart from A's.
        c.devices = 0;
        c.fixture = Some(
            sim::Fixture::from_toml_str(
                "[[devices]]\nname = \"SEPB00000001\"\n[[users]]\nid = \"user1\"\nprofiles = [\"user1-UDP\"]\n",
            )
            .expect("fixture"),
        );
    });
    assert!(a.login_directly(&device(1), "user1"));
    assert!(b.login_directly("SEPB00000001", "user1"));
    let mut config = Config::single_cluster(cluster("A", a.url()));
    config.clusters.push(cluster("B", b.url()));
    config.clusters.push(cluster("DOWN", dead_node()));
    let gw = Gateway::start(config).await;

    // Found in A and B; DOWN could not be asked and is named.
    let both = gw.post_form("/api/getuserdevices/user1", &creds()).await;
    assert_eq!(
        devices(both.expect(200, 0)),
        vec![device(1), "SEPB00000001".to_string()]
    );
    assert!(
        both.text.contains("could not be asked: DOWN"),
        "{}",
        both.text
    );
    // Logged in nowhere while a cluster is down: unknown, 1003.
    gw.post_form("/api/getuserdevices/user2", &creds())
        .await
        .expect(200, 1003);
    // Each cluster was asked through its own actor.
    assert_eq!(a.stats().calls_user_devices_query, 2);
    assert_eq!(b.stats().calls_user_devices_query, 2);
}

#[actix_web::test]
async fn getuserdevices_unknown_in_every_cluster_is_23() {
    let a = simulator(2, |_| {});
    let b = simulator(2, |_| {});
    let mut config = Config::single_cluster(cluster("A", a.url()));
    config.clusters.push(cluster("B", b.url()));
    let gw = Gateway::start(config).await;
    let unknown = gw.post_form("/api/getuserdevices/ghost", &creds()).await;
    unknown.expect(200, 23);
    assert!(unknown.text.contains("any cluster"));
    let free = gw.post_form("/api/getuserdevices/user2", &creds()).await;
    assert!(devices(free.expect(200, 0)).is_empty());
}

fn force_login(user: &str, device_name: &str) -> String {
    format!(
        "<request>{CREDS}<deviceName>{device_name}</deviceName><userID>{user}</userID>\
         <force>true</force></request>"
    )
}

#[actix_web::test]
async fn a_forced_login_logs_the_other_user_out_first() {
    let sim = simulator(3, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    assert!(sim.login_directly(&device(1), "user2"));

    gw.login(&device(1), "user1").await.expect(200, 18);
    let forced = gw
        .post_xml("/api/login", &force_login("user1", &device(1)))
        .await;
    forced.expect(200, 0);
    assert!(
        forced.text.contains("after logging out user2"),
        "{}",
        forced.text
    );
    assert_eq!(forced.user.as_deref(), Some("user1"));
    assert_eq!(sim.logged_in_user(&device(1)).as_deref(), Some("user1"));
    let stats = sim.stats();
    // The failed plain login, then: login (18), query, logout, login.
    assert_eq!(
        (
            stats.calls_login,
            stats.calls_logout,
            stats.calls_device_user_query
        ),
        (3, 1, 1)
    );
    // A free phone: one call, like a plain login.
    let free = gw
        .post_xml("/api/login", &force_login("user3", &device(3)))
        .await;
    free.expect(200, 0);
    assert!(!free.text.contains("logging out"));
    // Afterwards the cache knows the new user.
    let query = gw.query(&device(1)).await;
    assert_eq!(query.expect(200, 0).user.as_deref(), Some("user1"));
    // A bad force value is refused before CUCM.
    gw.post_xml(
        "/api/login",
        &force_login("user1", &device(2)).replace(">true<", ">maybe<"),
    )
    .await
    .expect(200, 1002);
}

#[actix_web::test]
async fn a_forced_login_racing_queries_on_the_same_phone() {
    let sim = simulator(2, |_| {});
    sim.set_behavior(latency_ms(20));
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| c.cache_ttl_ms = 0).await;
    for round in 0..3 {
        let (before, after) = if round % 2 == 0 {
            ("user2", "user1")
        } else {
            ("user1", "user2")
        };
        if round == 0 {
            assert!(sim.login_directly(&device(1), before));
        }
        let phone = device(1);
        let message = force_login(after, &phone);
        let force = gw.post_xml("/api/login", &message);
        let queries = join_all((0..4).map(|_| gw.query(&phone)));
        let (forced, answers) = futures_util::join!(force, queries);
        forced.expect(200, 0);
        assert!(forced.text.contains(&format!("logging out {before}")));
        for answer in answers {
            // Serialized with the forced login: before or after it, never between.
            let user = answer.expect(200, 0).user.clone().unwrap_or_default();
            assert!(
                user == before || user == after,
                "saw {user:?} in round {round}"
            );
        }
        assert_eq!(sim.logged_in_user(&device(1)).as_deref(), Some(after));
    }
    assert_eq!(
        sim.stats().max_concurrent_ops,
        1,
        "one phone, one call at a time"
    );
}
