//! The EM application (`/emapp/EMAppServlet`): PIN logins and logouts, the pages and
//! their `(NNN)` codes, EMCC sets of simulators (visitors), fault knobs, statistics,
//! and that the PIN never shows up in statistics, call log, Debug output or tracing.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use sim::emapp::page_code;
use sim::{Behavior, CallKind, Faults, Latency, SimConfig, SimHandle, Simulator};

const D1: &str = "SEP000000000001";
const D2: &str = "SEP000000000002";

/// GETs an EMApp query string on a fresh connection.
async fn emapp(sim: &SimHandle, query: &str) -> anyhow::Result<HttpReply> {
    let mut conn = Conn::connect(sim.addr()).await?;
    let path = if query.is_empty() {
        sim::EMAPP_PATH.to_string()
    } else {
        format!("{}?{query}", sim::EMAPP_PATH)
    };
    conn.request("GET", &path, None, b"").await
}

fn login_query(device: &str, user: &str, pin: &str) -> String {
    format!("device={device}&userid={user}&seq={pin}&EMCC=true")
}

/// The `(NNN)` of an EMApp page, after checking it is a 200 text/xml phone page.
fn code_of(reply: &HttpReply) -> Option<u32> {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("text/xml; charset=utf-8")
    );
    page_code(&reply.body)
}

fn sim_with(devices: usize, users: usize) -> SimHandle {
    seeded_sim(devices, users)
}

/// A home simulator (users, no devices) and a visiting one (devices, no users),
/// visiting → home as EMCC peer.
fn emcc_pair() -> (SimHandle, SimHandle) {
    let home = sim_with(1, 3);
    let visiting = sim_with(3, 0);
    visiting.add_emcc_peer(&home.url()).expect("peer url");
    (home, visiting)
}

async fn device_user(sim: &SimHandle, device: &str) -> anyhow::Result<String> {
    Ok(em(sim.addr(), &device_user_query(&[device])).await?.body)
}

#[tokio::test]
async fn local_pin_login_right_and_wrong() -> anyhow::Result<()> {
    let sim = sim_with(2, 2);
    let form = emapp(&sim, &format!("device={D1}")).await?;
    assert_eq!(code_of(&form), None);
    assert!(form.body.contains("<CiscoIPPhoneInput>"), "{}", form.body);

    let wrong = emapp(&sim, &login_query(D1, "user1", "99999")).await?;
    assert_eq!(code_of(&wrong), Some(204), "{}", wrong.body);
    assert!(wrong.body.contains("Login is unavailable (204)"));
    assert_eq!(sim.logged_in_user(D1), None);

    let ok = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&ok), None, "{}", ok.body);
    assert!(ok.body.contains("Login successful"));
    assert_eq!(sim.logged_in_user(D1).as_deref(), Some("user1"));
    let query = device_user(&sim, D1).await?;
    assert!(query.contains("<userID>user1</userID>"), "{query}");
    assert!(query.contains("<emccDevice>no</emccDevice>"));

    // Multiple Login Behavior applies as for an EM API login.
    let elsewhere = emapp(&sim, &login_query(D2, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&elsewhere), Some(25));

    let stats = sim.stats();
    assert_eq!(stats.emapp_requests, 4);
    assert_eq!(stats.calls_login, 0, "EMApp is not counted as EM API calls");
    assert_eq!(stats.calls_total, 1, "only the deviceUserQuery");
    assert_eq!(stats.emapp_answers_ok, 2);
    assert_eq!(stats.emapp_answers_by_code.get(&204), Some(&1));
    let emapp_log: Vec<_> = stats
        .log
        .iter()
        .filter(|r| r.kind == CallKind::EmApp)
        .map(|r| (r.devices.clone(), r.user.clone(), r.code))
        .collect();
    assert_eq!(
        emapp_log,
        vec![
            (vec![D1.to_string()], None, None),
            (vec![D1.to_string()], Some("user1".to_string()), Some(204)),
            (vec![D1.to_string()], Some("user1".to_string()), None),
            (vec![D2.to_string()], Some("user1".to_string()), Some(25)),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn set_pin_and_fixture_pins() -> anyhow::Result<()> {
    let sim = sim_with(2, 2);
    assert!(sim.set_pin("user1", "4711"));
    assert!(!sim.set_pin("nobody", "1"));
    let old = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&old), Some(204));
    let new = emapp(&sim, &login_query(D1, "user1", "4711")).await?;
    assert_eq!(code_of(&new), None);

    let pins = sim::Fixture::pins_from_toml_str("[[users]]\nid = \"user2\"\npin = \"2468\"\n")?;
    let sim = Simulator::start(SimConfig {
        devices: 1,
        users: 2,
        pins,
        ..SimConfig::default()
    })?;
    let reply = emapp(&sim, &login_query(D1, "user2", "2468")).await?;
    assert_eq!(code_of(&reply), None);
    Ok(())
}

#[tokio::test]
async fn visitor_logs_in_through_its_home() -> anyhow::Result<()> {
    let (home, visiting) = emcc_pair();
    let ok = emapp(&visiting, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&ok), None, "{}", ok.body);
    assert_eq!(visiting.logged_in_user(D1).as_deref(), Some("user1"));
    assert!(visiting.is_emcc_visitor(D1));
    let query = device_user(&visiting, D1).await?;
    assert!(query.contains("<userID>user1</userID>"), "{query}");
    assert!(query.contains("<emccDevice>yes</emccDevice>"), "{query}");

    // The home counts the visit as "logged in elsewhere".
    assert_eq!(home.emcc_visits_of_user("user1"), vec![D1.to_string()]);
    let at_home = em(home.addr(), &login_xml(D1, "user1")).await?;
    assert_eq!(at_home.em_code(), Some(25));
    // ...and so does the visiting simulator for a second phone.
    let again = emapp(&visiting, &login_query(D2, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&again), Some(25));

    // The EM API has no EMCC: a login of a non-local user still answers 23.
    let api = em(visiting.addr(), &login_xml(D3, "user2")).await?;
    assert_eq!(api.em_code(), Some(23));

    // EM API logout of the device logs the visitor out and tells the home.
    let out = em(visiting.addr(), &logout_xml(D1)).await?;
    assert_eq!(out.body, SUCCESS);
    assert_eq!(visiting.logged_in_user(D1), None);
    assert!(home.emcc_visits_of_user("user1").is_empty());
    let query = device_user(&visiting, D1).await?;
    assert!(query.contains("<none/>") && query.contains("<emccDevice>no</emccDevice>"));

    let (h, v) = (home.stats(), visiting.stats());
    assert_eq!(v.emapp_requests, 2);
    assert_eq!(h.emapp_requests, 0);
    assert!(h.emcc_requests >= 2, "check + visit ended: {h:?}");
    assert_eq!(v.emcc_peer_calls, h.emcc_requests);
    assert!(h.log.iter().any(|r| r.kind == CallKind::Emcc));
    Ok(())
}

const D3: &str = "SEP000000000003";

#[tokio::test]
async fn visitor_errors_2_23_208() -> anyhow::Result<()> {
    let (home, visiting) = emcc_pair();
    let wrong = emapp(&visiting, &login_query(D1, "user1", "0000")).await?;
    assert_eq!(code_of(&wrong), Some(2), "{}", wrong.body);
    assert!(home.emcc_visits_of_user("user1").is_empty());

    let unknown = emapp(&visiting, &login_query(D1, "ghost", "1234")).await?;
    assert_eq!(code_of(&unknown), Some(23));
    assert!(unknown.body.contains("Login is unavailable(23)"));

    // Without EMCC=true EMApp does not look beyond its own cluster.
    let no_emcc = emapp(
        &visiting,
        &format!("device={D1}&userid=user1&seq={}", sim::DEFAULT_PIN),
    )
    .await?;
    assert_eq!(code_of(&no_emcc), Some(23));

    // No peer reachable → 208; a second, reachable peer that has the user wins.
    home.set_faults(Faults {
        refuse: true,
        ..Faults::default()
    });
    let down = emapp(&visiting, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&down), Some(208));
    let other_home = sim_with(0, 1);
    visiting.add_emcc_peer(&other_home.addr().to_string())?;
    let ok = emapp(&visiting, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&ok), None);
    assert_eq!(
        other_home.emcc_visits_of_user("user1"),
        vec![D1.to_string()]
    );

    // A simulator without peers: unknown user → 23.
    let lonely = sim_with(1, 0);
    let reply = emapp(&lonely, &login_query(D1, "user1", "1")).await?;
    assert_eq!(code_of(&reply), Some(23));
    Ok(())
}

#[tokio::test]
async fn occupied_phone_gets_the_logout_prompt_and_do_logout_frees_it() -> anyhow::Result<()> {
    let sim = sim_with(2, 2);
    assert!(sim.login_directly(D1, "user2"));
    for query in [
        format!("device={D1}"),
        login_query(D1, "user1", sim::DEFAULT_PIN),
        // Even a wrong PIN: the phone is looked at before the PIN is checked.
        login_query(D1, "user1", "0"),
    ] {
        let prompt = emapp(&sim, &query).await?;
        assert_eq!(code_of(&prompt), None, "{}", prompt.body);
        assert!(prompt.body.contains("<CiscoIPPhoneText>"));
        assert!(prompt.body.contains("doLogout=true"), "{}", prompt.body);
    }
    assert_eq!(sim.logged_in_user(D1).as_deref(), Some("user2"));

    let out = emapp(&sim, &format!("device={D1}&doLogout=true")).await?;
    assert_eq!(code_of(&out), None);
    assert!(out.body.contains("Logout successful"));
    assert_eq!(sim.logged_in_user(D1), None);
    // Logging out a free phone shows the login form again (no code).
    let again = emapp(&sim, &format!("device={D1}&doLogout=true")).await?;
    assert_eq!(code_of(&again), None);
    assert!(again.body.contains("<CiscoIPPhoneInput>"));
    Ok(())
}

#[tokio::test]
async fn request_errors_202_207_215_and_unknown_device() -> anyhow::Result<()> {
    let sim = sim_with(1, 1);
    let cases = [
        ("", 207),
        ("userid=user1&seq=12345", 207),
        (&*format!("device={D1}&userid=&seq=12345"), 202),
        (&*format!("device={D1}&userid=user1"), 202),
        (&*format!("device={D1}&userid=user1&seq=%20"), 202),
        (&*format!("device={D1}&loginType=XYZ"), 215),
        ("device=SEPNOSUCHPHONE&userid=user1&seq=12345", 11),
        ("device=SEPNOSUCHPHONE", 11),
    ];
    for (query, expected) in cases {
        let reply = emapp(&sim, query).await?;
        assert_eq!(code_of(&reply), Some(expected), "{query}: {}", reply.body);
    }
    // Over-long values are refused without touching state.
    let long = "1".repeat(500);
    let reply = emapp(&sim, &login_query(D1, "user1", &long)).await?;
    assert_eq!(code_of(&reply), Some(1));
    // Percent-decoding and unknown parameters.
    let reply = emapp(
        &sim,
        &format!(
            "device={}&userid=user%31&seq=12345&EMCC=true&lang=en",
            D1.to_lowercase()
        ),
    )
    .await?;
    assert_eq!(code_of(&reply), None, "{}", reply.body);
    assert_eq!(sim.logged_in_user(D1).as_deref(), Some("user1"));
    assert_eq!(sim.stats().emapp_requests, 10);
    Ok(())
}

#[tokio::test]
async fn fault_knobs_apply_to_emapp() -> anyhow::Result<()> {
    let sim = sim_with(2, 2);
    let login = login_query(D1, "user1", sim::DEFAULT_PIN);

    sim.set_faults(Faults {
        http_status: Some(503),
        ..Faults::default()
    });
    assert_eq!(emapp(&sim, &login).await?.status, 503);
    sim.set_faults(Faults {
        garbage: true,
        ..Faults::default()
    });
    let garbage = emapp(&sim, &login).await?;
    assert_eq!(garbage.status, 200);
    assert!(garbage.body.contains("<html>"));
    sim.set_faults(Faults {
        fail_code: Some(23),
        ..Faults::default()
    });
    assert_eq!(code_of(&emapp(&sim, &login).await?), Some(23));
    sim.set_faults(Faults {
        busy_every: Some(1),
        ..Faults::default()
    });
    assert_eq!(code_of(&emapp(&sim, &login).await?), Some(26));
    assert_eq!(sim.logged_in_user(D1), None, "no fault changed state");

    // hang: held until turned off, then the connection is closed unanswered.
    sim.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let pending = tokio::spawn({
        let addr = sim.addr();
        let login = login.clone();
        async move {
            let mut conn = Conn::connect(addr).await?;
            conn.request("GET", &format!("{}?{login}", sim::EMAPP_PATH), None, b"")
                .await
        }
    });
    while sim.stats().hung_calls < 1 {
        tokio::task::yield_now().await;
    }
    sim.set_faults(Faults::default());
    assert!(pending.await?.is_err());

    // refuse: nothing listens.
    sim.set_faults(Faults {
        refuse: true,
        ..Faults::default()
    });
    assert!(emapp(&sim, &login).await.is_err());
    sim.set_faults(Faults::default());

    let stats = sim.stats();
    assert_eq!(stats.emapp_requests, 5, "the refused one never arrived");
    assert_eq!(stats.faults_served, 5);
    assert_eq!(stats.calls_total, 0);
    assert_eq!(code_of(&emapp(&sim, &login).await?), None);
    Ok(())
}

#[tokio::test]
async fn emapp_shares_the_concurrency_gate_and_login_latency() -> anyhow::Result<()> {
    let sim = Simulator::start(SimConfig {
        devices: 2,
        users: 2,
        max_concurrent: 1,
        behavior: Behavior {
            latency: Latency::Fixed(Duration::from_millis(400)),
            query_latency: Some(Latency::None),
            ..Behavior::default()
        },
        ..SimConfig::default()
    })?;
    let addr = sim.addr();
    // An EM API login holds the only slot...
    let held = tokio::spawn(async move { em(addr, &login_xml(D2, "user2")).await });
    while sim.stats().in_flight_ops < 1 {
        tokio::task::yield_now().await;
    }
    // ...so the EMApp login is answered (26) at once.
    let started = std::time::Instant::now();
    let busy = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&busy), Some(26));
    assert!(started.elapsed() < Duration::from_millis(400));
    // The login form is a query: not gated.
    assert_eq!(code_of(&emapp(&sim, &format!("device={D1}")).await?), None);
    assert_eq!(held.await??.body, SUCCESS);

    let started = std::time::Instant::now();
    let ok = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&ok), None);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "login latency"
    );
    let stats = sim.stats();
    assert_eq!(stats.busy_answers, 1);
    assert_eq!(stats.max_concurrent_ops, 1);
    Ok(())
}

#[tokio::test]
async fn trusted_ip_check_answers_28() -> anyhow::Result<()> {
    let sim = sim_with(1, 1);
    sim.set_emapp_trusted_ips(Some(vec!["10.9.9.9".parse()?]));
    let reply = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&reply), Some(28));
    sim.set_emapp_trusted_ips(Some(vec!["127.0.0.1".parse()?]));
    let reply = emapp(&sim, &login_query(D1, "user1", sim::DEFAULT_PIN)).await?;
    assert_eq!(code_of(&reply), None);
    Ok(())
}

#[tokio::test]
async fn emapp_and_emcc_over_tls() -> anyhow::Result<()> {
    let home = Simulator::start(SimConfig {
        users: 1,
        tls: true,
        ..SimConfig::default()
    })?;
    let visiting = Simulator::start(SimConfig {
        devices: 1,
        tls: true,
        emcc_peers: vec![home.url()],
        ..SimConfig::default()
    })?;
    assert!(visiting.emapp_url().starts_with("https://"));
    let ca = visiting.ca_pem().expect("tls");
    let mut conn = connect_tls(visiting.addr(), &ca, "localhost").await?;
    let path = format!(
        "{}?{}",
        sim::EMAPP_PATH,
        login_query(D1, "user1", sim::DEFAULT_PIN)
    );
    let reply = conn.request("GET", &path, None, b"").await?;
    assert_eq!(code_of(&reply), None, "{}", reply.body);
    assert!(visiting.is_emcc_visitor(D1));
    Ok(())
}

/// Captures everything the simulators log (at every level) in this test binary.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        buffer
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_pin_is_never_stored_or_logged() -> anyhow::Result<()> {
    let logs = captured_logs();
    const SECRET: &str = "8642097531";
    const WRONG: &str = "1357924680";
    let (home, visiting) = emcc_pair();
    assert!(home.set_pin("user1", SECRET));
    let local = sim_with(1, 1);
    assert!(local.set_pin("user1", SECRET));
    for (sim, pin) in [
        (&local, WRONG),
        (&local, SECRET),
        (&visiting, WRONG),
        (&visiting, SECRET),
    ] {
        emapp(sim, &login_query(D1, "user1", pin)).await?;
    }
    // A peer that is down (the error path of the EMCC client logs at debug).
    home.set_faults(Faults {
        http_status: Some(500),
        ..Faults::default()
    });
    emapp(&visiting, &login_query(D2, "user1", WRONG)).await?;
    emapp(&visiting, &format!("device={D1}&doLogout=true")).await?;

    assert_eq!(local.logged_in_user(D1).as_deref(), Some("user1"));
    for sim in [&home, &visiting, &local] {
        let stats = sim.stats();
        let json = serde_json::to_string(&stats)?;
        let control = control(sim.control_addr(), "GET", "/_sim/stats", "").await?;
        let debug = format!("{stats:?} {sim:?}");
        for text in [&json, &control.body, &debug] {
            assert!(!text.contains(SECRET) && !text.contains(WRONG), "{text}");
        }
    }
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logged.contains("EMCC"), "the capture works: {logged}");
    assert!(
        !logged.contains(SECRET) && !logged.contains(WRONG),
        "{logged}"
    );
    Ok(())
}
