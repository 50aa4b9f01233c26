//! The metric catalogue under a mixed workload, and the promise that the
//! Grafana dashboard and the alert rules only use series and labels that exist.
//!
//! The expressions are read from `grafana/` itself, so there is no second list to
//! keep in step.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use sim::{Behavior, Faults, Latency};

/// Metric name → every label name seen on its samples.
type Catalogue = BTreeMap<String, BTreeSet<String>>;

fn catalogue(exposition: &str) -> Catalogue {
    let mut families = Catalogue::new();
    for line in exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = families.entry(line[..name_end].to_string()).or_default();
        if let Some(inner) = line.get(name_end..).and_then(|rest| rest.strip_prefix('{')) {
            for pair in inner.split("\",") {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.trim_start_matches(',').trim().to_string());
                }
            }
        }
    }
    families
}

/// Sum of every sample of `name` whose labels contain all of `matching`.
fn total(exposition: &str, name: &str, matching: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| matching.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[actix_web::test]
async fn a_mixed_workload_shows_in_every_family() {
    // One good node behind a dead one; CUCM says busy every third operation.
    let sim = simulator(20, |c| {
        c.behavior = Behavior {
            latency: Latency::Fixed(Duration::from_millis(500)),
            faults: Faults {
                busy_every: Some(3),
                ..Faults::default()
            },
            ..Behavior::default()
        }
    });
    let mut config = business_connector::config::Config::single_cluster(
        actors::ClusterConfig::new("EU", vec![dead_node(), sim.url()]),
    );
    {
        let eu = &mut config.clusters[0];
        eu.max_concurrent = 2;
        eu.queue_limit = 6;
        eu.max_requests_per_second = 50;
        eu.burst = 2;
    }
    // A second cluster with no usable node at all.
    config
        .clusters
        .push(actors::ClusterConfig::new("DOWN", vec![dead_node()]));
    config.default_cluster = Some("EU".into());
    let gw = Gateway::start(config).await;

    // A burst that queues (2 in flight, 6 waiting) and sheds the rest.
    let burst = join_all((1..=10).map(|n| gw.login_seeded(n)));
    let mid_burst = async {
        wait_until("two logins are at CUCM", Duration::from_secs(5), || {
            sim.stats().in_flight_ops == 2
        })
        .await;
        gw.metrics().await
    };
    let (logins, during) = tokio::join!(burst, mid_burst);
    assert_eq!(metric(&during, "bc_cucm_in_flight{cluster=\"EU\"}"), 2.0);
    assert!(
        metric(&during, "bc_queue_depth{cluster=\"EU\"}") >= 1.0,
        "{during}"
    );
    assert!(logins.iter().any(|a| a.code == Some(0)));
    assert!(logins.iter().any(|a| a.code == Some(1004)));

    // Queries: a miss, hits, and identical concurrent ones sharing a call.
    gw.query(&device(1)).await.expect(200, 0);
    gw.query(&device(1)).await.expect(200, 0);
    let nobody_yet = device(15);
    join_all((0..5).map(|_| gw.query(&nobody_yet))).await;
    gw.logout(&device(1)).await;
    gw.post_form(
        &format!("/api/login/{}/user20/DOWN", device(20)),
        &format!("<request>{CREDS}</request>"),
    )
    .await
    .expect(200, 1003);

    let after = gw.metrics().await;
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).ok();
    // Kept for `promtool check metrics` in .ci/run.
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/metrics-sample.prom"),
        &after,
    )
    .unwrap();

    let nonzero = [
        ("bc_requests_total", &["code=\"0\""][..]),
        ("bc_requests_total", &["code=\"1004\""]),
        ("bc_requests_total", &["code=\"1003\"", "cluster=\"DOWN\""]),
        (
            "bc_request_duration_seconds_count",
            &["operation=\"login\""],
        ),
        ("bc_cucm_calls_total", &["outcome=\"success\""]),
        ("bc_cucm_calls_total", &["outcome=\"busy\""]),
        ("bc_cucm_calls_total", &["outcome=\"refused\""]),
        ("bc_cucm_call_duration_seconds_count", &[]),
        ("bc_queue_wait_seconds_count", &[]),
        ("bc_cucm_busy_retries_total", &[]),
        ("bc_load_shed_total", &["reason=\"queue_full\""]),
        ("bc_cache_hits_total", &[]),
        ("bc_cache_misses_total", &[]),
        ("bc_cache_coalesced_total", &[]),
        ("bc_cache_entries", &[]),
        ("bc_node_up", &["cluster=\"EU\""]),
        ("bc_node_failovers_total", &[]),
        ("bc_rate_limiter_waits_total", &[]),
        ("bc_cucm_concurrency_limit", &[]),
        ("bc_build_info", &[]),
        ("process_resident_memory_bytes", &[]),
        ("process_open_fds", &[]),
    ];
    for (name, matching) in nonzero {
        assert!(
            total(&after, name, matching) > 0.0,
            "{name}{matching:?} is zero or missing:\n{after}"
        );
    }
    // Exported even with recording off (as here), so the history alert always has a
    // series to watch.
    for series in [
        "bc_history_dropped_total{lane=\"kept\"}",
        "bc_history_dropped_total{lane=\"best_effort\"}",
        "bc_history_written_total",
        "bc_history_store_up",
        "bc_dashboard_auth_failures_total",
    ] {
        assert!(
            after.contains(&format!("\n{series} ")),
            "{series} is exported"
        );
    }
    // Whole seconds in the prometheus crate: present, but zero for a short test.
    assert!(
        after.contains("\nprocess_cpu_seconds_total "),
        "process CPU is exported"
    );
    assert_eq!(
        total(&after, "bc_node_up", &["cluster=\"DOWN\""]),
        0.0,
        "the dead cluster's node is down"
    );
    // No device, user or credential ever becomes a label.
    for secret_or_unbounded in ["bcsecret", "bcapp", "SEP0000", "user1"] {
        assert!(
            !after.contains(secret_or_unbounded),
            "{secret_or_unbounded} leaked into /metrics"
        );
    }
    // Every family has HELP text.
    for family in catalogue(&after).keys() {
        let base = family
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            after.contains(&format!("# HELP {family} "))
                || after.contains(&format!("# HELP {base} ")),
            "{family} has no HELP"
        );
    }

    check_expressions_use_existing_series(&catalogue(&after));
}

/// Every metric and label in the dashboard's and the alert rules' expressions exists.
fn check_expressions_use_existing_series(families: &Catalogue) {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut expressions = Vec::new();
    let dashboards =
        std::fs::read_dir(format!("{root}/grafana/dashboards")).expect("grafana/dashboards exists");
    for entry in dashboards {
        let path = entry.unwrap().path();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        collect_queries(&json, &mut expressions);
    }
    let rules = std::fs::read_to_string(format!("{root}/grafana/alerts.yml"))
        .expect("grafana/alerts.yml exists");
    let alert_exprs: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().trim_matches(['"', '\'']).to_string())
        .collect();
    assert!(alert_exprs.len() >= 5, "five alert rules or more");
    assert!(
        !alert_exprs.iter().any(|e| e == "|" || e == ">"),
        "one-line exprs only"
    );
    expressions.extend(alert_exprs);
    assert!(
        expressions.len() >= 20,
        "the dashboard has its panels: {}",
        expressions.len()
    );

    for expression in &expressions {
        let used = used_series(expression);
        assert!(!used.is_empty(), "no metric in {expression:?}");
        let mut labels_of_expression = BTreeSet::new();
        for (metric, labels) in &used {
            let known = families
                .get(metric)
                .unwrap_or_else(|| panic!("{metric} (in {expression:?}) is not exported"));
            for label in labels {
                assert!(
                    known.contains(label),
                    "{metric} has no label {label:?} (in {expression:?})"
                );
            }
            labels_of_expression.extend(known.iter().cloned());
        }
        for label in grouping_labels(expression) {
            assert!(
                labels_of_expression.contains(&label),
                "`by ({label})` names a label none of its metrics has (in {expression:?})"
            );
        }
    }
}

fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(text)
                        if (key == "expr" || key == "query") && text.contains("_") =>
                    {
                        out.push(text.clone())
                    }
                    other => collect_queries(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_queries(item, out)),
        _ => {}
    }
}

/// `bc_…` / `process_…` metric names in an expression, with the labels matched on them.
fn used_series(expression: &str) -> Vec<(String, Vec<String>)> {
    let bytes = expression.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        let rest = &expression[i..];
        if starts_word && (rest.starts_with("bc_") || rest.starts_with("process_")) {
            let end = i + rest.bytes().take_while(|b| is_ident(*b)).count();
            let name = expression[i..end].to_string();
            let mut labels = Vec::new();
            if expression[end..].starts_with('{') {
                let close = expression[end..]
                    .find('}')
                    .map_or(expression.len(), |c| end + c);
                for matcher in split_matchers(&expression[end + 1..close]) {
                    let label: String = matcher
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !label.is_empty() {
                        labels.push(label);
                    }
                }
                i = close;
            } else {
                i = end;
            }
            // label_values(metric, label)
            if expression[..found_start(expression, &name, i)]
                .trim_end()
                .ends_with("label_values(")
            {
                if let Some(label) = expression[i..].split([',', ')']).nth(1) {
                    labels.push(label.trim().to_string());
                }
            }
            found.push((name, labels));
        }
        i += 1;
    }
    found
}

fn found_start(expression: &str, name: &str, before: usize) -> usize {
    expression[..before.min(expression.len())]
        .rfind(name)
        .unwrap_or(0)
}

/// Splits `a="x,y", b=~"z"` on the commas outside quotes.
fn split_matchers(inner: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (index, c) in inner.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&inner[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
}

/// Label names in `by (…)` and `without (…)` clauses.
fn grouping_labels(expression: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in ["by", "without"] {
        let mut rest = expression;
        while let Some(at) = rest.find(keyword) {
            let before_ok = at == 0
                || !rest.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && rest.as_bytes()[at - 1] != b'_';
            let after = rest[at + keyword.len()..].trim_start();
            if before_ok && after.starts_with('(') {
                if let Some(close) = after.find(')') {
                    labels.extend(
                        after[1..close]
                            .split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                }
            }
            rest = &rest[at + keyword.len()..];
        }
    }
    labels.retain(|l| l != "le");
    labels
}

#[test]
fn the_expression_reader_finds_metrics_labels_and_groupings() {
    let used = used_series(
        "sum by (cluster, code) (rate(bc_requests_total{cluster=~\"$cluster\", code!=\"0\"}[$__rate_interval])) / ignoring(code) bc_cucm_in_flight",
    );
    assert_eq!(
        used,
        vec![
            (
                "bc_requests_total".to_string(),
                vec!["cluster".to_string(), "code".to_string()]
            ),
            ("bc_cucm_in_flight".to_string(), vec![]),
        ]
    );
    assert_eq!(
        grouping_labels("max by (cluster) (bc_node_up) == 0"),
        vec!["cluster"]
    );
    assert_eq!(
        used_series("label_values(bc_requests_total, cluster)"),
        vec![("bc_requests_total".to_string(), vec!["cluster".to_string()])]
    );
    let families = catalogue("# HELP x y\nbc_node_up{cluster=\"EU\",node=\"a:1\"} 1\nbc_build_info{version=\"0.1.0\"} 1\n");
    assert_eq!(
        families["bc_node_up"],
        BTreeSet::from(["cluster".to_string(), "node".to_string()])
    );
}
