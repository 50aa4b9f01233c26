//! What reaches the log: one process-wide subscriber at TRACE writes every line of the
//! default text format to a buffer, so forged lines and leaked secrets can be looked for.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log() -> &'static Buffer {
    static LOG: OnceLock<Buffer> = OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    })
}

fn text() -> String {
    String::from_utf8_lossy(&log().0.lock().unwrap()).into_owned()
}

#[actix_web::test]
async fn caller_chosen_newlines_forge_no_log_line_and_secrets_appear_nowhere() {
    log();
    let sim = simulator(4, |_| {});
    let gw = Gateway::with_cluster("EU", vec![sim.url()], |_| {}).await;

    // A newline inside the XML value of a raw text/xml body.
    gw.post_xml(
        "/api/logout",
        &format!("<request>{CREDS}<deviceName>SEP1\nFORGED line one</deviceName></request>"),
    )
    .await
    .expect(200, 1002);
    // CR LF in a path segment (the cluster code).
    gw.post_form(
        &format!("/api/logout/{}/EU%0d%0aFORGED%20line%20two", device(1)),
        &format!("<request>{CREDS}</request>"),
    )
    .await
    .expect(200, 1001);
    // The password and a PIN travel through a whole login and a query.
    let pin_login = "<request><appID>bcapp</appID><appCertificate>bcsecret</appCertificate><pin>86420975318642</pin></request>";
    gw.post_form(&format!("/api/login/{}/user2", device(2)), pin_login)
        .await;
    gw.login_seeded(1).await.expect(200, 0);
    gw.query(&device(1)).await.expect(200, 0);
    let metrics = gw.metrics().await;

    let log = text();
    assert!(log.contains("FORGED"), "the requests were logged");
    for line in log.lines() {
        assert!(!line.starts_with("FORGED"), "forged line: {line}");
    }
    for secret in ["bcsecret", "86420975318642"] {
        assert!(!log.contains(secret), "{secret} in the log");
        assert!(!metrics.contains(secret), "{secret} in the metrics");
    }
}
