//! The northbound contract (the Business Connector 1.4 API) end to end: the real
//! server on port 0 against a simulated CUCM. Every call, every request form, every code and HTTP status.

mod common;

use common::*;
use futures_util::future::join_all;
use sim::{Fixture, FixtureDevice, FixtureUser};

fn fixture() -> Fixture {
    Fixture {
        devices: vec![
            FixtureDevice {
                name: "SEPNOEM0000001".into(),
                em_enabled: false,
                last_login: None,
                logged_in: None,
            },
            FixtureDevice {
                name: "SEPLAST0000001".into(),
                em_enabled: true,
                last_login: Some("user2".into()),
                logged_in: None,
            },
        ],
        users: vec![
            FixtureUser {
                id: "multi.user@example.com".into(),
                profiles: vec!["multi-UDP".into()],
                default_profile: None,
                password: None,
            },
            FixtureUser {
                id: "noprofile".into(),
                profiles: vec![],
                default_profile: None,
                password: None,
            },
        ],
        app_users: vec![],
    }
}

async fn gateway(sim: &sim::SimHandle) -> Gateway {
    Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await
}

#[actix_web::test]
async fn version_info_is_the_vendor_document() {
    let sim = simulator(1, |_| {});
    let gw = gateway(&sim).await;
    for answer in [
        gw.get("/api/getversioninfo").await,
        gw.post_form("/api/getversioninfo", "").await,
    ] {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.content_type, "text/xml; charset=utf-8");
        assert_eq!(
            answer.body,
            "<?xml version='1.0' encoding='UTF-8'?>\n<result>\n<appversion>1.4</appversion>\n<appname>Business Connector</appname>\n</result>\n"
        );
    }
    assert_eq!(sim.stats().calls_total, 0);
}

#[actix_web::test]
async fn login_query_logout_in_every_request_form() {
    let sim = simulator(4, |_| {});
    let gw = gateway(&sim).await;

    // Path form with the credentials in form field `xml`.
    let login = gw.login(&device(1), "user1").await;
    login.expect(200, 0);
    assert_eq!(login.device.as_deref(), Some(device(1).as_str()));
    assert_eq!(login.user.as_deref(), Some("user1"));
    assert_eq!(
        login.text,
        format!("Login successful for user1 on device {}", device(1))
    );
    assert!(login
        .body
        .starts_with("<?xml version='1.0' encoding='UTF-8'?>\n<response>\n<result>"));
    assert_eq!(sim.logged_in_user(&device(1)).as_deref(), Some("user1"));

    // XML-only form, raw body.
    let xml = format!(
        "<request>{CREDS}<deviceName>{}</deviceName><userID>user2</userID><clusterCode>eu</clusterCode></request>",
        device(2)
    );
    gw.post_xml("/api/login", &xml).await.expect(200, 0);
    assert_eq!(sim.logged_in_user(&device(2)).as_deref(), Some("user2"));

    // GET with ?xml= in the query string, lower-case device name.
    let query = format!(
        "<request>{CREDS}<deviceName>{}</deviceName></request>",
        device(2).to_lowercase()
    );
    let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let answer = gw.get(&format!("/api/getloggedinuser?xml={encoded}")).await;
    answer.expect(200, 0);
    assert_eq!(answer.user.as_deref(), Some("user2"));
    assert_eq!(answer.device.as_deref(), Some(device(2).as_str()));

    // XML-only form in form field `xml`.
    let logout = gw
        .post_form(
            "/api/logout",
            &format!(
                "<request>{CREDS}<deviceName>{}</deviceName></request>",
                device(2)
            ),
        )
        .await;
    logout.expect(200, 0);
    assert_eq!(logout.user, None, "logout answers carry no userID");
    assert_eq!(
        logout.text,
        format!("Logout successful for device {}", device(2))
    );
    assert_eq!(sim.logged_in_user(&device(2)), None);

    // Nobody logged in: code 0, empty userID.
    let nobody = gw.query(&device(3)).await;
    nobody.expect(200, 0);
    assert_eq!(nobody.user.as_deref(), Some(""));
    assert!(
        nobody.text.contains("No user is logged in"),
        "{}",
        nobody.text
    );

    // Path with the cluster code (any case) and the user's PIN: a login through the
    // cluster's EM application (the simulator's PINs are 12345).
    gw.post_form(
        &format!("/api/login/{}/user3/eU/12345", device(3)),
        &format!("<request>{CREDS}</request>"),
    )
    .await
    .expect(200, 0);
}

#[actix_web::test]
async fn a_last_login_is_not_the_current_user() {
    let sim = simulator(0, |c| c.fixture = Some(fixture()));
    let gw = gateway(&sim).await;
    let answer = gw.query("SEPLAST0000001").await;
    answer.expect(200, 0);
    assert_eq!(answer.user.as_deref(), Some(""), "{}", answer.body);
}

#[actix_web::test]
async fn path_segments_are_percent_decoded() {
    let sim = simulator(1, |c| c.fixture = Some(fixture()));
    let gw = gateway(&sim).await;
    let login = gw.login(&device(1), "multi.user%40example.com").await;
    login.expect(200, 0);
    assert_eq!(login.user.as_deref(), Some("multi.user@example.com"));
    assert_eq!(
        sim.logged_in_user(&device(1)).as_deref(),
        Some("multi.user@example.com")
    );
    // CUCM percent-encodes it in query results; the caller sees it decoded.
    gw.shutdown().await;
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |c| c.cache_ttl_ms = 0).await;
    let answer = gw.query(&device(1)).await;
    assert_eq!(answer.user.as_deref(), Some("multi.user@example.com"));
}

#[actix_web::test]
async fn cucm_codes_pass_through_with_cucm_text() {
    let sim = simulator(3, |c| c.fixture = Some(fixture()));
    let gw = gateway(&sim).await;
    sim.login_directly(&device(2), "user2");

    // 11: no such device.
    gw.login("SEPFFFFFFFFFFFF", "user1").await.expect(200, 11);
    gw.query("SEPFFFFFFFFFFFF").await.expect(200, 11);
    // 22: EM disabled on the device.
    gw.login("SEPNOEM0000001", "user1").await.expect(200, 22);
    // 23: no such user.
    gw.login(&device(1), "nosuchuser").await.expect(200, 23);
    // 12: user without a device profile.
    gw.login(&device(1), "noprofile").await.expect(200, 12);
    // 18: someone else is logged in on the device.
    let taken = gw.login(&device(2), "user1").await;
    taken.expect(200, 18);
    assert!(!taken.text.is_empty());
    // 25: user2 is already logged in elsewhere.
    gw.login(&device(3), "user2").await.expect(200, 25);
    // 19: logout with nobody logged in.
    gw.logout(&device(1)).await.expect(200, 19);
    // 3: bad application user credentials.
    let bad = gw
        .post_form(
            &format!("/api/logout/{}", device(2)),
            "<request><appID>bcapp</appID><appCertificate>wrong</appCertificate></request>",
        )
        .await;
    bad.expect(200, 3);
    assert_eq!(sim.logged_in_user(&device(2)).as_deref(), Some("user2"));
}

#[actix_web::test]
async fn gateway_codes_and_their_order() {
    let sim = simulator(2, |_| {});
    let gw = gateway(&sim).await;
    let creds = format!("<request>{CREDS}</request>");

    // 404: deviceName missing.
    let missing = gw
        .post_form(
            "/api/login",
            &format!("<request>{CREDS}<userID>u</userID></request>"),
        )
        .await;
    missing.expect(200, 404);
    assert_eq!(missing.text, "Device ID empty");
    // 1001: unknown cluster, named in the text.
    let unknown = gw
        .post_form(&format!("/api/logout/{}/ZZ", device(1)), &creds)
        .await;
    unknown.expect(200, 1001);
    assert_eq!(unknown.text, "Cluster with code [ZZ] not found");
    // 1002: malformed XML, missing userID, invalid device name, invalid user ID.
    gw.post_form(
        &format!("/api/logout/{}", device(1)),
        "<request><appID>x</request>",
    )
    .await
    .expect(200, 1002);
    gw.post_form(&format!("/api/login/{}", device(1)), &creds)
        .await
        .expect(200, 1002);
    gw.post_form("/api/logout/SEP%3Cscript%3E", &creds)
        .await
        .expect(200, 1002);
    gw.post_form(&format!("/api/login/{}/a%0Ab", device(1)), &creds)
        .await
        .expect(200, 1002);
    gw.post_form(
        &format!("/api/login/{}/{}", device(1), "u".repeat(129)),
        &creds,
    )
    .await
    .expect(200, 1002);
    // 1006: no credentials.
    gw.post_form(&format!("/api/logout/{}", device(1)), "<request></request>")
        .await
        .expect(200, 1006);
    gw.get(&format!("/api/getloggedinuser/{}", device(1)))
        .await
        .expect(200, 1006);

    // Several faults: the first in the API's order answers.
    gw.post_form("/api/login", "<request><deviceName>x</request>")
        .await
        .expect(200, 1002); // malformed first
    gw.post_form("/api/login", "<request/>")
        .await
        .expect(200, 404); // device before creds
    gw.post_form("/api/login/SEP%20X", "<request/>")
        .await
        .expect(200, 1002); // invalid value before creds
    gw.post_form(&format!("/api/logout/{}/ZZ", device(1)), "<request/>")
        .await
        .expect(200, 1006); // creds before cluster

    assert_eq!(sim.stats().calls_total, 0, "none of these may reach CUCM");
}

#[actix_web::test]
async fn unknown_paths_methods_and_oversized_bodies() {
    let sim = simulator(1, |_| {});
    let gw = Gateway::start({
        let mut config = business_connector::config::Config::single_cluster(
            actors::ClusterConfig::new("EU", vec![sim.url()]),
        );
        config.max_body_bytes = 4096;
        config
    })
    .await;
    assert_eq!(gw.get("/api/nosuchcall").await.status, 404);
    assert_eq!(gw.get("/nothing/here").await.status, 404);
    assert_eq!(
        gw.get(&format!("/api/logout/{}/EU/extra", device(1)))
            .await
            .status,
        404
    );
    let put = gw.client.put(gw.url("/api/login")).send().await.unwrap();
    assert_eq!(put.status().as_u16(), 405);

    let huge = format!(
        "<request>{CREDS}<deviceName>{}</deviceName><pad>{}</pad></request>",
        device(1),
        "x".repeat(5000)
    );
    let answer = gw.post_xml("/api/logout", &huge).await;
    answer.expect(413, 1002);
    assert!(answer.text.contains("larger than 4096"), "{}", answer.text);
    assert_eq!(sim.stats().calls_total, 0);
}

#[actix_web::test]
async fn an_injection_attempt_reaches_cucm_as_a_literal_value() {
    let sim = simulator(2, |_| {});
    let gw = gateway(&sim).await;
    let hostile = "user1</userID><userID>user2";
    let xml = format!(
        "<request>{CREDS}<deviceName>{}</deviceName><userID>{}</userID></request>",
        device(1),
        actors::xml::escape(hostile)
    );
    let answer = gw.post_xml("/api/login", &xml).await;
    answer.expect(200, 23); // no user by that literal name
    let stats = sim.stats();
    assert_eq!(stats.calls_login, 1);
    assert_eq!(stats.log[0].user.as_deref(), Some(hostile));
    assert_eq!(sim.logged_in_user(&device(1)), None);
    // The echo is escaped: the answer stays well-formed with the literal value.
    assert_eq!(answer.user.as_deref(), Some(hostile));
}

#[actix_web::test]
async fn cluster_routing_default_and_case() {
    let eu = simulator(2, |_| {});
    let us = simulator(2, |_| {});
    let mut config = business_connector::config::Config::single_cluster(
        actors::ClusterConfig::new("EU", vec![eu.url()]),
    );
    config
        .clusters
        .push(actors::ClusterConfig::new("us", vec![us.url()]));
    let gw = Gateway::start(config.clone()).await;
    // Two clusters, no default, the device in both: the caller must name one.
    let both = gw.login(&device(1), "user1").await;
    both.expect(200, 1011);
    assert!(both.text.contains("(EU, US)"), "{}", both.text);
    gw.post_form(
        &format!("/api/login/{}/user1/US", device(1)),
        &format!("<request>{CREDS}</request>"),
    )
    .await
    .expect(200, 0);
    assert_eq!(us.logged_in_user(&device(1)).as_deref(), Some("user1"));
    assert_eq!(eu.logged_in_user(&device(1)), None);
    gw.shutdown().await;

    config.default_cluster = Some("eu".into());
    let gw = Gateway::start(config).await;
    gw.login(&device(2), "user2").await.expect(200, 0);
    assert_eq!(eu.logged_in_user(&device(2)).as_deref(), Some("user2"));
}

const WRONG_CREDS: &str = "<appID>bcapp</appID><appCertificate>wrong</appCertificate>";

#[actix_web::test]
async fn a_flood_of_wrong_credentials_costs_cucm_one_call() {
    let sim = simulator(4, |_| {});
    let gw = gateway(&sim).await;
    let wrong = format!("<request>{WRONG_CREDS}</request>");
    let answers = join_all((0..20).map(|i| {
        let path = format!("/api/getloggedinuser/{}", device(1 + i % 4));
        let gw = &gw;
        let wrong = &wrong;
        async move { gw.post_form(&path, wrong).await }
    }))
    .await;
    // The first answers may be in flight together; after CUCM's first 3 the rest are
    // answered from memory.
    assert!(answers.iter().all(|a| a.code == Some(3)));
    let first_wave = sim.stats().calls_total;
    assert!(first_wave <= 4, "{first_wave} CUCM calls for 20 requests");
    for _ in 0..10 {
        gw.post_form(&format!("/api/logout/{}", device(1)), &wrong)
            .await
            .expect(200, 3);
    }
    assert_eq!(sim.stats().calls_total, first_wave);
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, "bc_rejected_credentials_total{cluster=\"EU\"}") >= 10.0);
    // The right credentials are not affected.
    gw.login_seeded(1).await.expect(200, 0);
}

#[actix_web::test]
async fn a_logout_with_wrong_credentials_keeps_the_cached_state() {
    let sim = simulator(2, |_| {});
    let gw = gateway(&sim).await;
    gw.login_seeded(1).await.expect(200, 0);
    gw.query(&device(1)).await.expect(200, 0);
    let queries = sim.stats().calls_device_user_query;
    gw.post_form(
        &format!("/api/logout/{}", device(1)),
        &format!("<request>{WRONG_CREDS}</request>"),
    )
    .await
    .expect(200, 3);
    // CUCM refused the change: the device's entry still answers, without a query.
    let after = gw.query(&device(1)).await;
    after.expect(200, 0);
    assert_eq!(after.user.as_deref(), Some("user1"));
    assert_eq!(sim.stats().calls_device_user_query, queries);
    assert_eq!(sim.logged_in_user(&device(1)).as_deref(), Some("user1"));
}

#[actix_web::test]
async fn characters_xml_forbids_never_reach_an_answer() {
    let sim = simulator(2, |_| {});
    let gw = gateway(&sim).await;
    for path in [
        "/api/logout/%01",
        "/api/getloggedinuser/A%00B",
        "/api/login/SEP1/%EF%BF%BF",
    ] {
        let answer = gw
            .post_form(path, &format!("<request>{CREDS}</request>"))
            .await;
        answer.expect(200, 1002);
        assert!(
            answer.body.chars().all(actors::xml::is_xml_char),
            "{path}: {:?}",
            answer.body
        );
        actors::xml::parse(&answer.body).expect("a well-formed answer");
    }
    // A NUL inside the body's XML is malformed XML, and the text does not quote it.
    let nul = gw.post_xml("/api/login", "</\u{0}>").await;
    nul.expect(200, 1002);
    assert!(
        nul.body.chars().all(actors::xml::is_xml_char),
        "{:?}",
        nul.body
    );
    assert_eq!(sim.stats().calls_total, 0);
}
