//! EM API behaviour over HTTP: request/response documents, codes arising from state,
//! multiple-login modes, percent-encoding, lenient decoding, Cisco's literal examples.

mod common;

use common::*;
use sim::{AppUser, Fixture, FixtureDevice, FixtureUser, MultipleLogin, SimConfig, Simulator};

const D1: &str = "SEP000000000001";
const D2: &str = "SEP000000000002";
const D3: &str = "SEP000000000003";

/// A cluster with the names used in Cisco's EM API examples plus special cases.
fn doc_fixture() -> Fixture {
    let device = |name: &str, em_enabled: bool| FixtureDevice {
        name: name.into(),
        em_enabled,
        last_login: None,
        logged_in: None,
    };
    let user = |id: &str, profiles: &[&str], password: Option<&str>| FixtureUser {
        id: id.into(),
        profiles: profiles.iter().map(|p| p.to_string()).collect(),
        default_profile: None,
        password: password.map(str::to_string),
    };
    Fixture {
        devices: vec![
            device("SEP003094C25B15", true),
            device("SEP003094C25B49", true),
            device("SEP010203040506", true),
            device("SEP402CF4915265", true),
            device("SEPNOEM000001", false),
            FixtureDevice {
                last_login: Some("em".into()),
                ..device("SEPREMEMBERED1", true)
            },
        ],
        users: vec![
            user("john", &["UserDevProf", "JohnOther"], None),
            user(
                "em@cisco.com",
                &["EM-SCCP-Profile-7970", "EM-SCCP-7975-Profile"],
                None,
            ),
            user("noprofile", &[], None),
            user("selfservice", &["selfservice-UDP"], Some("selfpw")),
        ],
        app_users: vec![
            AppUser {
                app_id: "appid".into(),
                app_certificate: "apppasswd".into(),
                proxy_rights: true,
            },
            AppUser {
                app_id: "emproxy".into(),
                app_certificate: "password".into(),
                proxy_rights: true,
            },
            AppUser {
                app_id: "noproxy".into(),
                app_certificate: "np".into(),
                proxy_rights: false,
            },
        ],
    }
}

fn doc_sim(multiple_login: MultipleLogin) -> sim::SimHandle {
    Simulator::start(SimConfig {
        devices: 5,
        users: 5,
        fixture: Some(doc_fixture()),
        multiple_login,
        ..SimConfig::default()
    })
    .expect("simulator starts")
}

#[tokio::test]
async fn literal_url_encoded_request_of_section_1_1() -> anyhow::Result<()> {
    let sim = doc_sim(MultipleLogin::NotAllowed);
    // Cisco's login example, verbatim body. Cisco's "Content-Length: 249" does not match the
    // 236-byte body (doc bug), so the length is computed.
    let body = "xml=%3cquery%3e%3cappInfo%3e%3cappID%3eemproxy%3c%2fappID%3e%3cappCertificate%3epassword%3c%2fappCertificate%3e%3c%2fappInfo%3e%3cdeviceUserQuery%3e%3cdeviceName%3eSEP010203040506%3c%2fdeviceName%3e%3c%2fdeviceUserQuery%3e%3c%2fquery%3e";
    let request = format!(
        "POST /emservice/EMServiceServlet HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nHost: ucmanager:8443\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = Conn::connect(sim.addr()).await?;
    let reply = conn.raw(request.as_bytes()).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/xml; charset=utf-8")
    );
    assert_eq!(
        reply.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><deviceUserResults>\
         <device name=\"SEP010203040506\"><none/><emccDevice>no</emccDevice></device>\
         </deviceUserResults></response>"
    );
    Ok(())
}

#[tokio::test]
async fn literal_documents_of_section_2() -> anyhow::Result<()> {
    let sim = doc_sim(MultipleLogin::NotAllowed);
    let addr = sim.addr();
    // Cisco's example (EM API guide 2.2) Login, verbatim.
    let login = r#"<request>
  <appInfo>
    <appID>appid</appID>
    <appCertificate>apppasswd</appCertificate>
  </appInfo>
  <login>
    <deviceName>SEP003094C25B15</deviceName>
    <userID>john</userID>
    <deviceProfile>UserDevProf</deviceProfile>
    <exclusiveDuration>
      <time>60</time>
    </exclusiveDuration>
  </login>
</request>"#;
    assert_eq!(em(addr, login).await?.body, SUCCESS);
    assert_eq!(
        sim.logged_in_user("SEP003094C25B15").as_deref(),
        Some("john")
    );

    // Cisco's example (EM API guide 2.5) deviceUserQuery, verbatim.
    let device_query = r#"<query>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <deviceUserQuery>
    <deviceName>SEP003094C25B15</deviceName>
  </deviceUserQuery>
</query>"#;
    let reply = em(addr, device_query).await?;
    assert!(
        reply.body.contains(
            "<device name=\"SEP003094C25B15\"><userID>john</userID><lastlogin>john</lastlogin>\
             <emccDevice>no</emccDevice></device>"
        ),
        "{}",
        reply.body
    );

    // Cisco's example (EM API guide 2.6) userDevicesQuery, verbatim.
    let user_query = r#"<query>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <userDevicesQuery>
    <userID>john</userID>
  </userDevicesQuery>
</query>"#;
    let reply = em(addr, user_query).await?;
    assert!(
        reply.body.contains(
            "<userDevicesResults><user id=\"john\"><deviceName>SEP003094C25B15</deviceName></user>"
        ),
        "{}",
        reply.body
    );

    // Cisco's example (EM API guide 2.3) Logout, verbatim.
    let logout = r#"<request>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <logout>
    <deviceName>SEP003094C25B15</deviceName>
  </logout>
</request>"#;
    assert_eq!(em(addr, logout).await?.body, SUCCESS);
    assert_eq!(sim.logged_in_user("SEP003094C25B15"), None);

    // Cisco's example (EM API guide 2.2) indefinite variant (real client form).
    let indefinite = r#"<request>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <login>
    <deviceName>SEP003094C25B15</deviceName>
    <userID>john</userID>
    <exclusiveDuration>
      <indefinite></indefinite>
    </exclusiveDuration>
  </login>
</request>"#;
    assert_eq!(em(addr, indefinite).await?.body, SUCCESS);

    // Cisco's example (EM API guide 2.4) LogoutAll, verbatim.
    let logout_all = r#"<request>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <logoutAll></logoutAll>
</request>"#;
    assert_eq!(em(addr, logout_all).await?.body, SUCCESS);
    assert_eq!(sim.logged_in_user("SEP003094C25B15"), None);

    // Cisco's example (EM API guide 2.7) userDeviceProfileQuery, verbatim (with john, then em@cisco.com).
    let profile_query = r#"<query>
  <appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate></appInfo>
  <userDeviceProfileQuery>
    <userID>john</userID>
  </userDeviceProfileQuery>
</query>"#;
    let reply = em(addr, profile_query).await?;
    assert!(
        reply.body.contains(
            "<deviceProfileResults><user id=\"john\"><deviceProfile><deviceProfileName>UserDevProf\
             </deviceProfileName><isDefaultDeviceProfile>t</isDefaultDeviceProfile></deviceProfile>\
             <deviceProfile><deviceProfileName>JohnOther</deviceProfileName>\
             <isDefaultDeviceProfile>f</isDefaultDeviceProfile></deviceProfile></user>"
        ),
        "{}",
        reply.body
    );
    let reply = em(
        addr,
        &device_profile_query("deviceProfileQuery", &["em@cisco.com"]),
    )
    .await?;
    assert!(
        reply.body.contains(
            "<user id=\"em%40cisco.com\"><deviceProfile><deviceProfileName>EM-SCCP-Profile-7970"
        ),
        "{}",
        reply.body
    );
    Ok(())
}

#[tokio::test]
async fn codes_arising_from_state() -> anyhow::Result<()> {
    let sim = doc_sim(MultipleLogin::NotAllowed);
    let addr = sim.addr();
    let code = |xml: String| async move { em(addr, &xml).await.map(|r| r.em_code()) };

    // 1: unparsable, and a missing xml parameter (still HTTP 200).
    assert_eq!(code("<request><appInfo>".into()).await?, Some(1));
    let mut conn = Conn::connect(addr).await?;
    let reply = conn
        .request(
            "POST",
            sim::EM_PATH,
            Some("application/x-www-form-urlencoded"),
            b"foo=bar",
        )
        .await?;
    assert_eq!((reply.status, reply.em_code()), (200, Some(1)));
    assert!(reply
        .body
        .contains("<error code=\"1\">Error on Parsing</error>"));
    // 3: bad appCertificate / unknown appID, for ops and queries.
    assert_eq!(
        code(login_as(("bcapp", "wrong"), D1, "user1")).await?,
        Some(3)
    );
    let reply = em(addr, &device_user_query(&[D1]).replace("bcsecret", "nope")).await?;
    assert_eq!(reply.em_code(), Some(3));
    assert!(reply.body.contains(">Invalid App User</error>"));
    // 8: unknown query type.
    let check_user = format!(
        "<query>{}<checkUser><userID>john</userID></checkUser></query>",
        app_info(APP)
    );
    assert_eq!(code(check_user).await?, Some(8));
    // 10: app user without proxy rights; end user acting for someone else.
    assert_eq!(
        code(login_as(("noproxy", "np"), D1, "user1")).await?,
        Some(10)
    );
    assert_eq!(
        code(login_as(("selfservice", "selfpw"), D1, "user1")).await?,
        Some(10)
    );
    assert_eq!(
        code(login_as(("selfservice", "selfpw"), D2, "selfservice")).await?,
        None
    );
    assert_eq!(code(logout_as(("selfservice", "selfpw"), D2)).await?, None);
    // 11: unknown device (login and logout).
    assert_eq!(code(login_xml("SEPFFFFFFFFFFFF", "user1")).await?, Some(11));
    assert_eq!(code(logout_xml("SEPFFFFFFFFFFFF")).await?, Some(11));
    // 22: EM disabled on the device.
    assert_eq!(code(login_xml("SEPNOEM000001", "user1")).await?, Some(22));
    // 23: unknown user.
    assert_eq!(code(login_xml(D1, "nosuchuser")).await?, Some(23));
    // 12: no profile at all, or a named profile that is not theirs.
    assert_eq!(code(login_xml(D1, "noprofile")).await?, Some(12));
    assert_eq!(
        code(login_with_profile(D1, "user1", "user2-UDP")).await?,
        Some(12)
    );
    assert_eq!(
        code(login_with_profile(D1, "john", "JohnOther")).await?,
        None
    );
    // 18: another user on the device; the same user again is idempotent success.
    assert_eq!(code(login_xml(D1, "user2")).await?, Some(18));
    assert_eq!(code(login_xml(D1, "john")).await?, None);
    // 25: user logged in elsewhere (default: multiple logins not allowed).
    assert_eq!(code(login_xml(D2, "john")).await?, Some(25));
    // 19: logout of an empty device.
    assert_eq!(code(logout_xml(D2)).await?, Some(19));
    assert_eq!(code(logout_xml(D1)).await?, None);
    assert_eq!(code(logout_xml(D1)).await?, Some(19));

    let stats = sim.stats();
    assert!(stats.calls_invalid >= 3);
    assert_eq!(stats.answers_by_code.get(&25), Some(&1));
    Ok(())
}

#[tokio::test]
async fn check_order_for_login() -> anyhow::Result<()> {
    let sim = doc_sim(MultipleLogin::NotAllowed);
    let addr = sim.addr();
    // Everything wrong at once → credentials first, then device, then EM enabled, then user.
    let all_wrong = login_as(("bcapp", "x"), "SEPNOPE", "nobody");
    assert_eq!(em(addr, &all_wrong).await?.em_code(), Some(3));
    assert_eq!(
        em(addr, &login_xml("SEPNOPE", "nobody")).await?.em_code(),
        Some(11)
    );
    assert_eq!(
        em(addr, &login_xml("SEPNOEM000001", "nobody"))
            .await?
            .em_code(),
        Some(22)
    );
    assert_eq!(
        em(addr, &login_xml(D1, "nobody")).await?.em_code(),
        Some(23)
    );
    // Busy device (18) is reported before the user being elsewhere (25).
    assert!(sim.login_directly(D1, "user1"));
    assert!(sim.login_directly(D2, "user2"));
    assert_eq!(em(addr, &login_xml(D1, "user2")).await?.em_code(), Some(18));
    Ok(())
}

#[tokio::test]
async fn multiple_login_modes() -> anyhow::Result<()> {
    let allowed = doc_sim(MultipleLogin::Allowed);
    assert_eq!(
        em(allowed.addr(), &login_xml(D1, "user1")).await?.body,
        SUCCESS
    );
    assert_eq!(
        em(allowed.addr(), &login_xml(D2, "user1")).await?.body,
        SUCCESS
    );
    let reply = em(allowed.addr(), &user_devices_query(&["user1"])).await?;
    assert!(reply.body.contains(&format!(
        "<user id=\"user1\"><deviceName>{D1}</deviceName><deviceName>{D2}</deviceName></user>"
    )));

    let auto = doc_sim(MultipleLogin::AutoLogout);
    assert_eq!(
        em(auto.addr(), &login_xml(D1, "user1")).await?.body,
        SUCCESS
    );
    assert_eq!(
        em(auto.addr(), &login_xml(D2, "user1")).await?.body,
        SUCCESS
    );
    assert_eq!(auto.logged_in_user(D1), None);
    assert_eq!(auto.logged_in_user(D2).as_deref(), Some("user1"));

    let strict = doc_sim(MultipleLogin::NotAllowed);
    assert_eq!(
        em(strict.addr(), &login_xml(D1, "user1")).await?.body,
        SUCCESS
    );
    assert_eq!(
        em(strict.addr(), &login_xml(D2, "user1")).await?.em_code(),
        Some(25)
    );
    assert_eq!(strict.logged_in_user(D2), None);
    Ok(())
}

#[tokio::test]
async fn query_results_batches_and_percent_encoding() -> anyhow::Result<()> {
    let sim = doc_sim(MultipleLogin::NotAllowed);
    let addr = sim.addr();
    assert_eq!(
        em(addr, &login_xml("SEP402CF4915265", "em@cisco.com"))
            .await?
            .body,
        SUCCESS
    );
    // Several names in one query → one <device> each; lower-case names answered upper-case.
    let reply = em(
        addr,
        &device_user_query(&["sep402cf4915265", "SEPUNKNOWN1", D3, "SEPREMEMBERED1"]),
    )
    .await?;
    assert_eq!(
        reply.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><deviceUserResults>\
         <device name=\"SEP402CF4915265\"><userID>em%40cisco.com</userID>\
         <lastlogin>em%40cisco.com</lastlogin><emccDevice>no</emccDevice></device>\
         <device name=\"SEPUNKNOWN1\"><doesNotExist/></device>\
         <device name=\"SEP000000000003\"><none/><emccDevice>no</emccDevice></device>\
         <device name=\"SEPREMEMBERED1\"><none/><lastlogin>em</lastlogin><emccDevice>no</emccDevice></device>\
         </deviceUserResults></response>"
    );
    // userDevicesQuery: logged in, not logged in, unknown; percent-encoded IDs accepted too.
    let reply = em(
        addr,
        &user_devices_query(&["em%40cisco.com", "user1", "ghost@x"]),
    )
    .await?;
    assert_eq!(
        reply.body,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><userDevicesResults>\
         <user id=\"em%40cisco.com\"><deviceName>SEP402CF4915265</deviceName></user>\
         <user id=\"user1\"><none/></user>\
         <user id=\"ghost%40x\"><doesNotExist/></user>\
         </userDevicesResults></response>"
    );
    // After logout the device shows <none/> plus the remembered last login.
    assert_eq!(
        em(addr, &logout_xml("SEP402CF4915265")).await?.body,
        SUCCESS
    );
    let reply = em(addr, &device_user_query(&["SEP402CF4915265"])).await?;
    assert!(reply
        .body
        .contains("<device name=\"SEP402CF4915265\"><none/><lastlogin>em%40cisco.com</lastlogin>"));
    // Device profile query: unknown user and user without profiles get a nested failure.
    let reply = em(
        addr,
        &device_profile_query("deviceProfileQuery", &["user2", "noprofile", "ghost"]),
    )
    .await?;
    assert!(reply.body.contains(
        "<user id=\"user2\"><deviceProfile><deviceProfileName>user2-UDP</deviceProfileName>\
         <isDefaultDeviceProfile>t</isDefaultDeviceProfile></deviceProfile></user>"
    ));
    assert!(reply.body.contains(
        "<user id=\"noprofile\"><failure><error code=\"12\">Dev. Profile not found</error></failure></user>"
    ));
    assert!(reply.body.contains(
        "<user id=\"ghost\"><failure><error code=\"23\">User not found</error></failure></user>"
    ));

    let stats = sim.stats();
    assert_eq!(stats.calls_login, 1);
    assert_eq!(stats.calls_logout, 1);
    assert_eq!(stats.calls_device_user_query, 2);
    assert_eq!(stats.calls_user_devices_query, 1);
    assert_eq!(stats.calls_device_profile_query, 1);
    Ok(())
}

#[tokio::test]
async fn lenient_transport_forms() -> anyhow::Result<()> {
    let sim = seeded_sim(2, 2);
    let addr = sim.addr();
    let query = device_user_query(&[D1]);
    // Raw, unencoded `xml=<query>…`.
    let mut conn = Conn::connect(addr).await?;
    let raw = format!("xml={query}");
    let reply = conn
        .request(
            "POST",
            sim::EM_PATH,
            Some("application/x-www-form-urlencoded"),
            raw.as_bytes(),
        )
        .await?;
    assert!(reply.body.contains("<deviceUserResults>"), "{}", reply.body);
    // A bare XML body without `xml=` (same keep-alive connection).
    let reply = conn
        .request("POST", sim::EM_PATH, Some("text/xml"), query.as_bytes())
        .await?;
    assert!(reply.body.contains("<deviceUserResults>"), "{}", reply.body);
    // GET with ?xml=.
    let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let reply = conn
        .request("GET", &format!("{}?xml={encoded}", sim::EM_PATH), None, b"")
        .await?;
    assert!(reply.body.contains("<deviceUserResults>"), "{}", reply.body);
    // logoutAll wrapped in <query> (seen in a real client) is accepted.
    assert!(sim.login_directly(D1, "user1"));
    let reply = conn
        .em(&format!("<query>{}<logoutAll/></query>", app_info(APP)))
        .await?;
    assert_eq!(reply.body, SUCCESS);
    assert_eq!(sim.logged_in_user(D1), None);
    // Values with XML specials are escaped in answers.
    let reply = conn.em(&device_user_query(&["A&amp;B&lt;"])).await?;
    assert!(
        reply
            .body
            .contains("<device name=\"A&amp;B&lt;\"><doesNotExist/>"),
        "{}",
        reply.body
    );
    // Other paths are 404, unknown methods 405.
    assert_eq!(conn.request("GET", "/nope", None, b"").await?.status, 404);
    assert_eq!(
        conn.request("PUT", sim::EM_PATH, None, b"").await?.status,
        405
    );
    let stats = sim.stats();
    assert_eq!(stats.calls_device_user_query, 4);
    assert_eq!(stats.calls_logout_all, 1);
    Ok(())
}

#[test]
fn seeding_scheme_and_plain_test_usage() {
    // Works from a plain #[test]: the simulator brings its own runtime.
    let sim = seeded_sim(300, 3);
    assert!(sim.url().starts_with("http://127.0.0.1:"));
    assert!(sim.url().ends_with("/emservice/EMServiceServlet"));
    assert!(sim.login_directly("SEP0000000000FF", "user3"));
    assert!(sim.login_directly("sep00000000012c", "user2"));
    assert_eq!(
        sim.logged_in_user("SEP0000000000ff").as_deref(),
        Some("user3")
    );
    assert_eq!(
        sim.logged_in_user("SEP00000000012C").as_deref(),
        Some("user2")
    );
    assert!(
        !sim.login_directly("SEP00000000012D", "user1"),
        "device 301 does not exist"
    );
    assert!(
        !sim.login_directly("SEP000000000001", "user4"),
        "user4 does not exist"
    );
    assert_eq!(
        sim.devices_of_user("user3"),
        vec!["SEP0000000000FF".to_string()]
    );
    assert!(sim.logout_directly("SEP0000000000FF"));
    sim.stop();
}

#[tokio::test]
async fn multi_threaded_runtime_serves_concurrent_queries() -> anyhow::Result<()> {
    let sim = Simulator::start(SimConfig {
        devices: 4,
        users: 4,
        threads: 2,
        ..SimConfig::default()
    })?;
    assert!(sim.login_directly(D2, "user2"));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let addr = sim.addr();
            tokio::spawn(async move { em(addr, &device_user_query(&[D1, D2])).await })
        })
        .collect();
    for task in tasks {
        let reply = task.await??;
        assert!(
            reply.body.contains("<userID>user2</userID>"),
            "{}",
            reply.body
        );
    }
    assert_eq!(sim.stats().calls_device_user_query, 16);
    sim.stop();
    Ok(())
}
