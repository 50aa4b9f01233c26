//! The dashboard in a real browser: headless Chromium (Debian's
//! `chromium`) loads `/dashboard` from the real server, runs its script against
//! `/api/status` and `/api/history`, and the rendered DOM must show the cluster and a
//! login the test made, with no script error: 24-hour times to the millisecond with the
//! zone named, durations to the microsecond, the latest changes, a user's whereabouts
//! (device, app, client of the login and of what ended it), cache hits per minute, and
//! each code's meaning. A screenshot is saved as `target/dashboard.png`.
//!
//! No WebDriver: `--dump-dom` after `--virtual-time-budget` (the page's timers and
//! fetches run, then the DOM is printed). The page writes every script error into
//! `<pre id="errors">`, so the DOM dump shows them; Chromium's own console log
//! (`--enable-logging=stderr`) is checked for uncaught errors too.
//!
//! Without `chromium` on the PATH the test prints a SKIPPED line (on the real stderr, so
//! cargo shows it) and passes; under `CI=true` it fails (CI installs Chromium).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use actors::ClusterConfig;
use business_connector::config::Config;
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
        common::binary::skip_or_fail(
            "the_dashboard_renders_the_cluster_and_a_fresh_login_in_chromium",
            "`chromium` is not installed (apt-get install -y chromium); the dashboard was not tested in a browser",
        );
        return;
    };
    let sim = simulator(10, |_| {});
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = ClusterConfig::new("EU", vec![sim.url()]);
    cluster.max_requests_per_second = 0;
    let mut config = Config::single_cluster(cluster);
    config.history = history::HistoryConfig::sqlite(dir.path().join("history.sqlite"));
    let gateway = Gateway::start(config).await;

    // A login that a logout ends, for the user's whereabouts; then one still on.
    let desk = device(5);
    gateway.login(&desk, "user7").await.expect(200, 0);
    gateway.logout(&desk).await.expect(200, 0);
    let dev = device(7);
    gateway.login(&dev, "user7").await.expect(200, 0);
    // Another user on an occupied phone: CUCM's 18, which the page must name.
    gateway.login(&dev, "user8").await.expect(200, 18);
    gateway.query(&device(3)).await.expect(200, 0);
    gateway
        .post_form(&format!("/api/logout/{dev}/XX"), "<request></request>")
        .await
        .expect(200, 1006);
    // The page reads the history: wait until the writer has committed the login.
    let give_up = Instant::now() + Duration::from_secs(10);
    while !gateway
        .get(&format!("/api/history?device={dev}&code=18"))
        .await
        .body
        .contains("user8")
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
            format!("{page}#user=user7"),
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
    // Answers by code per minute: the current minute's column holds the four code-0
    // answers (two logins, a query, a logout) the test made, and each code its meaning.
    assert!(
        html.contains(">now</th>") && html.contains("<td class=\"minute\">4</td>"),
        "answers per minute: {html}"
    );
    assert!(
        html.contains("<td class=\"meaning\">another user logged in</td>")
            && html.contains("<td class=\"meaning\">success</td>"),
        "codes are named: {html}"
    );
    assert!(
        html.contains("cache hits / min") && html.contains("<tr class=\"hits\">"),
        "cache hits per minute: {html}"
    );
    // Times: 24-hour to the millisecond, never AM/PM; the zone is named once.
    let times = cells_of(html, "<td class=\"time\"");
    assert!(!times.is_empty(), "{html}");
    for time in &times {
        assert!(is_24_hour_time(time), "time {time:?}");
    }
    assert!(html.contains("times in "), "the zone is named: {html}");
    // Durations: the simulator answers in well under a millisecond, which shows with
    // its fraction, never as a bare 0.
    let durations = cells_of(html, "<td class=\"ms\"");
    assert!(!durations.is_empty(), "{html}");
    assert!(
        durations
            .iter()
            .all(|ms| ms.contains('.') || ms.parse::<u32>().is_ok_and(|n| n >= 100)),
        "durations with their fraction: {durations:?}"
    );
    assert!(!durations.iter().any(|ms| ms == "0"), "{durations:?}");
    // Latest changes: the logins and the logout.
    let changes = html
        .split("<table id=\"changes\">")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .expect("the changes table");
    assert!(
        changes.contains("logged in") && changes.contains("logged out") && changes.contains(&desk),
        "latest changes: {changes}"
    );
    // The user's whereabouts: both logins, the logout that ended the one on `desk`,
    // with the app and client of each.
    let whereabouts = html
        .split("<table id=\"user-whereabouts\">")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .expect("the whereabouts table");
    assert!(html.contains("Where user7 was logged in"), "{html}");
    assert!(
        whereabouts.contains(&dev) && whereabouts.contains(&desk),
        "{whereabouts}"
    );
    assert!(
        whereabouts.contains("still logged in") && whereabouts.matches("bcapp").count() >= 3,
        "login and logout apps: {whereabouts}"
    );
    assert!(whereabouts.contains("127.0.0.1"), "{whereabouts}");
    assert!(html.contains(&dev), "the login's device is listed: {html}");
    assert!(html.contains("user7"), "the login's user is listed: {html}");
    assert!(html.contains("1006"), "refusals are listed: {html}");
    // The login is a change at the phone, and its device is watched.
    let changes = html
        .split("id=\"changes\"")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .expect("the changes table");
    assert!(
        changes.contains(&dev) && changes.contains("logged in"),
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
            "--window-size=1400,1300".into(),
            format!("--screenshot={}", screenshot.display()),
            // A user's whereabouts and a device's history open too, so the screenshot
            // shows every panel.
            format!("{page}#user=user7&device={dev}"),
        ],
    )
    .await;
    let size = std::fs::metadata(&screenshot).map_or(0, |m| m.len());
    assert!(size > 10_000, "screenshot written ({size} bytes)");
    println!("screenshot: {}", screenshot.display());
    gateway.shutdown().await;
}

/// The texts of the cells that start with `opening` (e.g. `<td class="ms"`).
fn cells_of(html: &str, opening: &str) -> Vec<String> {
    html.split(opening)
        .skip(1)
        .filter_map(|rest| {
            let text = rest.split_once('>')?.1;
            Some(text.split("</td>").next()?.to_string())
        })
        .collect()
}

/// `14:03:51.697`, or with the date first (`2026-12-06 14:03:51.697`).
fn is_24_hour_time(text: &str) -> bool {
    let clock = text.rsplit(' ').next().unwrap_or("");
    let digits: Vec<&str> = clock.split([':', '.']).collect();
    digits.len() == 4
        && digits[..3]
            .iter()
            .all(|d| d.len() == 2 && d.bytes().all(|b| b.is_ascii_digit()))
        && digits[3].len() == 3
        && clock[..2].parse::<u32>().is_ok_and(|hour| hour < 24)
        && !text.contains('M')
}
