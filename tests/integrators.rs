//! For integrators: getuserdevices (one cluster, and merged across several),
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

/// POST a JSON body; the answer parsed as JSON.
async fn post_json(gw: &Gateway, path: &str, body: &str) -> (u16, String, serde_json::Value) {
    let response = gw
        .client
        .post(gw.url(path))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("gateway reachable");
    read_json(response).await
}

async fn read_json(response: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.text().await.expect("body");
    let value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status, content_type, value)
}

const JSON_CREDS: &str = r#""appID":"bcapp","appCertificate":"bcsecret""#;

#[actix_web::test]
async fn json_in_and_out() {
    let sim = simulator(3, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;

    let (status, content_type, login) = post_json(
        &gw,
        "/api/login",
        &format!(r#"{{{JSON_CREDS},"deviceName":"sep000000000001","userID":"user1"}}"#),
    )
    .await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    assert_eq!(login["code"], 0);
    assert_eq!(login["deviceName"], device(1));
    assert_eq!(login["userID"], "user1");
    assert_eq!(sim.logged_in_user(&device(1)).as_deref(), Some("user1"));

    // Forced, in JSON, with a boolean.
    let (_, _, forced) = post_json(
        &gw,
        "/api/login",
        &format!(
            r#"{{{JSON_CREDS},"deviceName":"{}","userID":"user2","force":true}}"#,
            device(1)
        ),
    )
    .await;
    assert_eq!(forced["code"], 0, "{forced}");
    assert!(forced["text"]
        .as_str()
        .unwrap()
        .contains("logging out user1"));

    // getuserdevices: devices as an array, no deviceName.
    let (_, _, found) = post_json(
        &gw,
        "/api/getuserdevices",
        &format!(r#"{{{JSON_CREDS},"userID":"user2"}}"#),
    )
    .await;
    assert_eq!(found["devices"], serde_json::json!([device(1)]));
    assert!(found.get("deviceName").is_none());

    // A form request that accepts JSON gets JSON; the same codes.
    let response = gw
        .client
        .post(gw.url(&format!("/api/getloggedinuser/{}", device(2))))
        .header("Accept", "application/json")
        .form(&[("xml", creds())])
        .send()
        .await
        .expect("gateway reachable");
    let (status, _, nobody) = read_json(response).await;
    assert_eq!((status, nobody["code"].as_u64()), (200, Some(0)));
    assert_eq!(nobody["userID"], "");

    // Malformed JSON and wrong types: 1002 before anything else; missing device: 404.
    for bad in ["{", "[1]", r#"{"deviceName":7}"#] {
        let (status, _, answer) = post_json(&gw, "/api/logout", bad).await;
        assert_eq!(
            (status, answer["code"].as_u64()),
            (200, Some(1002)),
            "{bad}"
        );
        assert!(answer["text"].as_str().unwrap().contains("JSON"));
    }
    let (_, _, missing) = post_json(&gw, "/api/logout", &format!("{{{JSON_CREDS}}}")).await;
    assert_eq!(missing["code"], 404);
    // Too large: 413 in JSON too.
    let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000));
    let (status, _, too_large) = post_json(&gw, "/api/logout", &huge).await;
    assert_eq!((status, too_large["code"].as_u64()), (413, Some(1002)));
    // Without Accept or a JSON body: XML as always.
    let xml = gw.query(&device(1)).await;
    assert!(xml.content_type.starts_with("text/xml"));
    assert_eq!(xml.user.as_deref(), Some("user2"));

    let (status, _, version) = read_json(
        gw.client
            .get(gw.url("/api/getversioninfo"))
            .header("Accept", "application/json")
            .send()
            .await
            .expect("reachable"),
    )
    .await;
    assert_eq!((status, version["appversion"].as_str()), (200, Some("1.4")));
}

#[actix_web::test]
async fn json_overload_keeps_503_and_retry_after() {
    let sim = simulator(3, |_| {});
    sim.set_faults(sim::Faults {
        hang: true,
        ..Default::default()
    });
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| {
        c.queue_limit = 1;
        c.max_concurrent = 1;
    })
    .await;
    // One hangs at CUCM, one waits in the queue: the third is shed.
    let body = |n: usize| format!(r#"{{{JSON_CREDS},"deviceName":"{}"}}"#, device(n));
    let hung = gw
        .client
        .post(gw.url("/api/logout"))
        .header("Content-Type", "application/json")
        .body(body(1))
        .send();
    let waiting = gw
        .client
        .post(gw.url("/api/logout"))
        .header("Content-Type", "application/json")
        .body(body(2))
        .send();
    let in_background = actix_web::rt::spawn(async move {
        let _ = futures_util::join!(hung, waiting);
    });
    wait_until(
        "one call hangs at CUCM",
        std::time::Duration::from_secs(10),
        || sim.stats().hung_calls >= 1,
    )
    .await;
    let mut shed = None;
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shed.is_none() && std::time::Instant::now() < give_up {
        let response = gw
            .client
            .post(gw.url("/api/logout"))
            .header("Content-Type", "application/json")
            .body(body(3))
            .send()
            .await
            .expect("reachable");
        let retry_after = response.headers().contains_key("retry-after");
        let (status, _, answer) = read_json(response).await;
        if status == 503 {
            shed = Some((retry_after, answer));
        }
    }
    let (retry_after, answer) = shed.expect("the third request is shed");
    assert!(retry_after);
    assert_eq!(answer["code"], 1004);
    sim.set_faults(sim::Faults::default());
    in_background.abort();
}

#[actix_web::test]
async fn openapi_document_is_served() {
    let sim = simulator(1, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;
    let (status, content_type, doc) = read_json(
        gw.client
            .get(gw.url("/openapi.json"))
            .send()
            .await
            .expect("reachable"),
    )
    .await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/getuserdevices/{userID}"]["post"].is_object());
}
