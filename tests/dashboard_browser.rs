//! The dashboard in a real browser: headless Chromium (Debian's
//! `chromium`) loads `/dashboard` from the real server, runs its script against
//! `/api/status` and `/api/history`, and the rendered DOM must show the cluster and a
//! login the test made, with no script error. A screenshot is saved as
//! `target/dashboard.png`.
//!
//! No WebDriver: `--dump-dom` after `--virtual-time-budget` (the page's timers and
//! fetches run, then the DOM is printed). The page writes every script error into
//! `<pre id="errors">`, so the DOM dump shows them; Chromium's own console log
//! (`--enable-logging=stderr`) is checked for uncaught errors too.
//!
//! Without `chromium` on the PATH the test prints a notice and passes (CI installs it).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use actors::ClusterConfig;
use business_connector::config::Config;
use business_connector::history_api::HistorySettings;
use common::*;

/// Longest one Chromium run may take before it is killed and the test fails.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

fn chromium() -> Option<PathBuf> {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    found.then(|| PathBuf::from("chromium"))
}

struct Run {
    stdout: String,
    stderr: String,
}

/// One headless Chromium run with a fresh profile; `extra` are the run's own flags.
async fn run_chromium(binary: PathBuf, extra: Vec<String>) -> Run {
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("profile dir");
        let out = tempfile::tempdir().expect("output dir");
        let (stdout_path, stderr_path) = (out.path().join("stdout"), out.path().join("stderr"));
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("chromium starts");
        let give_up = Instant::now() + CHROMIUM_TIMEOUT;
        loop {
            match child.try_wait().expect("wait for chromium") {
                Some(_) => break,
                None if Instant::now() >= give_up => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?}");
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Run {
            stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        }
    })
    .await
    .expect("chromium task")
}

#[actix_web::test]
async fn the_dashboard_renders_the_cluster_and_a_fresh_login_in_chromium() {
    let Some(chromium) = chromium() else {
        println!(
            "skipped: `chromium` is not installed (apt-get install -y chromium); \
             the dashboard was not tested in a browser"
        );
        return;
    };
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = ClusterConfig::new("EU", vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    let mut config = Config::single_cluster(cluster);
    config.history = HistorySettings::sqlite(dir.path().join("history.sqlite"));
    let gateway = Gateway::start(config).await;

    let dev = device(7);
    gateway.login(&dev, "user7").await.expect(200, 0);
    gateway.query(&device(3)).await.expect(200, 0);
    gateway
        .post_form(&format!("/api/logout/{dev}/XX"), "<request></request>")
        .await
        .expect(200, 1006);
    // The page reads the history: wait until the writer has committed the login.
    let give_up = Instant::now() + Duration::from_secs(10);
    while !gateway
        .get(&format!("/api/history?device={dev}&operation=login"))
        .await
        .body
        .contains("user7")
    {
        assert!(
            Instant::now() < give_up,
            "the login never reached the history"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let page = gateway.url("/dashboard");
    let dom = run_chromium(
        chromium.clone(),
        vec![
            "--enable-logging=stderr".into(),
            "--v=0".into(),
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            page.clone(),
        ],
    )
    .await;
    let html = &dom.stdout;
    assert!(html.contains("<h1>Business Connector</h1>"), "{html}");
    assert!(
        html.contains("data-cluster=\"EU\""),
        "the cluster panel shows EU: {html}"
    );
    assert!(html.contains("0 / 5"), "in flight against the cap: {html}");
    // Answers by code per minute: the current minute's column holds the two answers
    // (login and query, code 0) the test made.
    assert!(
        html.contains(">now</th>") && html.contains("<td class=\"minute\">2</td>"),
        "answers per minute: {html}"
    );
    assert!(html.contains(&dev), "the login's device is listed: {html}");
    assert!(html.contains("user7"), "the login's user is listed: {html}");
    assert!(html.contains("1006"), "refusals are listed: {html}");
    // The login is a change at the phone, and its device is watched.
    let changes = html
        .split("id=\"changes\"")
        .nth(1)
        .expect("the changes table");
    assert!(
        changes.contains(&dev) && changes.contains("request"),
        "the login is in the latest changes: {changes}"
    );
    assert!(html.contains("watched devices"), "{html}");
    let errors = html
        .split("<pre id=\"errors\"")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .expect("the errors box is in the page");
    assert!(
        errors.ends_with('>'),
        "the page reported errors: {errors:?}"
    );
    for line in dom.stderr.lines() {
        assert!(
            !(line.contains("Uncaught") || line.contains(":ERROR:CONSOLE")),
            "console error: {line}"
        );
    }

    let screenshot = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target"));
    std::fs::create_dir_all(&screenshot).expect("target dir");
    let screenshot = screenshot.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    run_chromium(
        chromium,
        vec![
            "--virtual-time-budget=5000".into(),
            "--hide-scrollbars".into(),
            "--window-size=1280,900".into(),
            format!("--screenshot={}", screenshot.display()),
            // A device's history open too, so the screenshot shows every panel.
            format!("{page}#device={dev}"),
        ],
    )
    .await;
    let size = std::fs::metadata(&screenshot).map_or(0, |m| m.len());
    assert!(size > 10_000, "screenshot written ({size} bytes)");
    println!("screenshot: {}", screenshot.display());
    gateway.shutdown().await;
}
