//! `GET /api/status`: the dashboard's per-cluster panel, computed from the gateway's own
//! metrics (the same numbers `/metrics` exports, so the page and Grafana never disagree).
//!
//! Gauges (node health, in flight, cap, queue depth) are read now. Rates need two points
//! in time: a sampler takes a snapshot of the counters every `SAMPLE_EVERY` and keeps
//! `WINDOW` of them; calls/s compares now with the newest snapshot at least `RATE_SPAN`
//! old, answers by code and the cache hit ratio compare now with the oldest one (the last
//! five minutes, or since start when younger). `answers_per_minute` splits the window
//! into minutes, oldest first: each entry compares the snapshots at its two ends (the
//! newest taken at or before each end; the newest entry ends now), so the minutes tile
//! the window without counting a request twice. `seconds` is the span actually covered
//! (short for the oldest minute of a young gateway). Each minute also carries its cache
//! hits (getloggedinuser answered without CUCM; the history records them only with
//! `record_cache_hits`), and `cache_hits_per_minute` is the newest minute's, scaled to a
//! full minute. `code_meanings` says what each code means (`northbound::code_meaning`).
//!
//! ```json
//! {"time":"…Z","instance":"gw1","history":"sqlite","window_seconds":300.0,
//!  "clusters":[{"code":"EU","nodes":[{"node":"cucm-eu-1:8443","up":true}],
//!               "in_flight":2,"max_concurrent":5,"queue_depth":0,"cache_entries":812,
//!               "watched_devices":1200,
//!               "calls_per_second":3.2,"cache_hit_ratio":0.93,"cache_hits_per_minute":4100,
//!               "answers":{"0":512,"1004":3},
//!               "answers_per_minute":[{"ended_seconds_ago":60,"seconds":60,"cache_hits":3900,"answers":{"0":300}},
//!                                     {"ended_seconds_ago":0,"seconds":60,"cache_hits":4100,"answers":{"0":212,"1004":3}}]}],
//!  "unrouted":{"1006":1},
//!  "code_meanings":[{"first":0,"last":0,"meaning":"success"},{"first":31,"last":47,"meaning":"EMCC"},…]}
//! ```
//! `calls_per_second`, `cache_hit_ratio` and `cache_hits_per_minute` are `null` until
//! there is something to divide.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::northbound::code_meaning;

/// How often the sampler snapshots the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How far back "answers by code" and the cache hit ratio look.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The span calls/s is averaged over (short, so the number moves with the load).
const RATE_SPAN: Duration = Duration::from_secs(10);
/// One entry of `answers_per_minute`; the window holds `WINDOW / MINUTE` of them.
const MINUTE: Duration = Duration::from_secs(60);

/// One series of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The series of a Prometheus text exposition (comments skipped, unparsable lines too:
/// this reads our own output, and a line it does not understand is simply not shown).
pub fn parse_exposition(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let (head, value) = line.trim_end().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head, Vec::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Series {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` → pairs, undoing the exposition's `\\`, `\"` and `\n` escapes.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (index, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break index,
                other => value.push(other),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// The counters one snapshot keeps, per cluster.
#[derive(Debug, Clone, Default, PartialEq)]
struct ClusterTotals {
    cucm_calls: f64,
    cache_hits: f64,
    cache_misses: f64,
    answers: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    clusters: BTreeMap<String, ClusterTotals>,
    /// Requests that never reached a cluster (cluster label "none"), by code.
    unrouted: BTreeMap<String, f64>,
}

impl Totals {
    fn from_series(series: &[Series]) -> Self {
        let mut totals = Totals::default();
        for one in series {
            let Some(cluster) = one.label("cluster") else {
                continue;
            };
            match one.name.as_str() {
                "bc_requests_total" => {
                    let code = one.label("code").unwrap_or("?").to_string();
                    let answers = if cluster == "none" {
                        &mut totals.unrouted
                    } else {
                        &mut totals
                            .clusters
                            .entry(cluster.to_string())
                            .or_default()
                            .answers
                    };
                    *answers.entry(code).or_default() += one.value;
                }
                "bc_cucm_calls_total" => {
                    totals.cluster(cluster).cucm_calls += one.value;
                }
                "bc_cache_hits_total" => totals.cluster(cluster).cache_hits += one.value,
                "bc_cache_misses_total" => totals.cluster(cluster).cache_misses += one.value,
                _ => {}
            }
        }
        totals
    }

    fn cluster(&mut self, code: &str) -> &mut ClusterTotals {
        self.clusters.entry(code.to_string()).or_default()
    }
}

/// Counter snapshots over the last `WINDOW`.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

impl Sampler {
    /// Take a snapshot of `exposition` now (the sampler task calls this every
    /// `SAMPLE_EVERY`).
    pub fn sample(&self, exposition: &str) {
        self.sample_at(Instant::now(), exposition);
    }

    fn sample_at(&self, at: Instant, exposition: &str) {
        let totals = Totals::from_series(&parse_exposition(exposition));
        let mut samples = self.lock();
        samples.push_back((at, totals));
        while samples
            .front()
            .is_some_and(|(taken, _)| at.saturating_duration_since(*taken) > WINDOW)
        {
            samples.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Totals)>> {
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `/api/status` document for the exposition as it is now.
    pub fn status(&self, exposition: &str, instance: &str, history: &str) -> Value {
        self.status_at(Instant::now(), exposition, instance, history)
    }

    fn status_at(&self, now: Instant, exposition: &str, instance: &str, history: &str) -> Value {
        let series = parse_exposition(exposition);
        let current = Totals::from_series(&series);
        let samples = self.lock();
        let oldest = samples.front();
        let rate_base = samples
            .iter()
            .rev()
            .find(|(taken, _)| now.saturating_duration_since(*taken) >= RATE_SPAN)
            .or(oldest);
        let empty = Totals::default();
        let (window_base, window) = match oldest {
            Some((taken, totals)) => (totals, now.saturating_duration_since(*taken)),
            None => (&empty, Duration::ZERO),
        };

        let minutes = minute_spans(&samples, now, &current);

        // Clusters are the ones with a concurrency cap: every configured cluster sets it
        // at start, whether or not it has seen traffic.
        let mut clusters: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        for one in series
            .iter()
            .filter(|s| s.name == "bc_cucm_concurrency_limit")
        {
            if let Some(code) = one.label("cluster") {
                let mut cluster = Map::new();
                cluster.insert("code".into(), json!(code));
                cluster.insert("nodes".into(), json!([]));
                cluster.insert("max_concurrent".into(), json!(one.value as i64));
                clusters.insert(code, cluster);
            }
        }
        for one in &series {
            let Some(cluster) = one.label("cluster").and_then(|c| clusters.get_mut(c)) else {
                continue;
            };
            let key = match one.name.as_str() {
                "bc_cucm_in_flight" => "in_flight",
                "bc_queue_depth" => "queue_depth",
                "bc_cache_entries" => "cache_entries",
                "bc_watched_devices" => "watched_devices",
                "bc_node_up" => {
                    if let Some(Value::Array(nodes)) = cluster.get_mut("nodes") {
                        nodes.push(json!({
                            "node": one.label("node").unwrap_or(""),
                            "up": one.value >= 1.0,
                        }));
                    }
                    continue;
                }
                _ => continue,
            };
            cluster.insert(key.into(), json!(one.value as i64));
        }
        let zero = ClusterTotals::default();
        for (code, cluster) in &mut clusters {
            let now_totals = current.clusters.get(*code).unwrap_or(&zero);
            let calls_per_second = rate_base.and_then(|(taken, base)| {
                let span = now.saturating_duration_since(*taken).as_secs_f64();
                let before = base.clusters.get(*code).map_or(0.0, |t| t.cucm_calls);
                (span >= 0.5).then(|| round2((now_totals.cucm_calls - before).max(0.0) / span))
            });
            let before = window_base.clusters.get(*code).unwrap_or(&zero);
            let hits = now_totals.cache_hits - before.cache_hits;
            let misses = now_totals.cache_misses - before.cache_misses;
            let ratio = (hits + misses > 0.0).then(|| round2(hits / (hits + misses)));
            cluster.insert("calls_per_second".into(), json!(calls_per_second));
            cluster.insert("cache_hit_ratio".into(), json!(ratio));
            cluster.insert(
                "answers".into(),
                json!(difference(&now_totals.answers, &before.answers)),
            );
            let per_minute: Vec<Value> = minutes
                .iter()
                .map(|span| {
                    let end = span.end.clusters.get(*code).unwrap_or(&zero);
                    let start = span.start.clusters.get(*code).unwrap_or(&zero);
                    json!({
                        "ended_seconds_ago": span.ended_ago.as_secs(),
                        "seconds": span.covered.as_secs(),
                        "cache_hits": count_between(start.cache_hits, end.cache_hits),
                        "answers": difference(&end.answers, &start.answers),
                    })
                })
                .collect();
            // The newest minute, scaled to 60 s (it is shorter on a young gateway).
            let hits_per_minute = minutes.last().and_then(|span| {
                let end = span.end.clusters.get(*code).unwrap_or(&zero);
                let start = span.start.clusters.get(*code).unwrap_or(&zero);
                let seconds = span.covered.as_secs_f64();
                (seconds >= 1.0).then(|| {
                    let hits = count_between(start.cache_hits, end.cache_hits) as f64;
                    (hits * MINUTE.as_secs_f64() / seconds).round() as u64
                })
            });
            cluster.insert("cache_hits_per_minute".into(), json!(hits_per_minute));
            cluster.insert("answers_per_minute".into(), json!(per_minute));
        }
        json!({
            "time": history::UtcMillis::now().to_rfc3339(),
            "instance": instance,
            "history": history,
            "window_seconds": window.as_secs(),
            "clusters": clusters.into_values().collect::<Vec<_>>(),
            "unrouted": difference(&current.unrouted, &window_base.unrouted),
            "code_meanings": code_meanings(),
        })
    }
}

/// One minute of `answers_per_minute`: the snapshots at its two ends.
struct MinuteSpan<'a> {
    ended_ago: Duration,
    covered: Duration,
    start: &'a Totals,
    end: &'a Totals,
}

/// The window's minutes, oldest first, as pairs of snapshots. A minute's end is the
/// newest snapshot taken at or before it (the newest minute ends with `current`); its
/// start is the same for the minute before, so no request falls in two minutes. The
/// oldest minute may be partial (a young gateway); minutes with no snapshot before them
/// are left out.
fn minute_spans<'a>(
    samples: &'a VecDeque<(Instant, Totals)>,
    now: Instant,
    current: &'a Totals,
) -> Vec<MinuteSpan<'a>> {
    let at_or_before = |moment: Instant| samples.iter().rev().find(|(taken, _)| *taken <= moment);
    let count = (WINDOW.as_secs() / MINUTE.as_secs()).max(1);
    let mut spans = Vec::new();
    for index in 0..count {
        let ended_ago = MINUTE * u32::try_from(index).unwrap_or(u32::MAX);
        let Some(end_moment) = now.checked_sub(ended_ago) else {
            break;
        };
        let (end_taken, end) = if index == 0 {
            (now, current)
        } else {
            match at_or_before(end_moment) {
                Some((taken, totals)) => (*taken, totals),
                None => break,
            }
        };
        let start = end_moment
            .checked_sub(MINUTE)
            .and_then(at_or_before)
            .or_else(|| samples.front());
        let Some((start_taken, start)) = start else {
            break;
        };
        if *start_taken >= end_taken {
            break;
        }
        spans.push(MinuteSpan {
            ended_ago,
            covered: end_taken.saturating_duration_since(*start_taken),
            start,
            end,
        });
    }
    spans.reverse();
    spans
}

/// Every documented code's meaning, for the page's "answers by code" and its tables.
fn code_meanings() -> Value {
    code_meaning::MEANINGS
        .iter()
        .map(|entry| json!({"first": entry.first, "last": entry.last, "meaning": entry.meaning}))
        .collect()
}

/// A counter's growth between two snapshots (0 if it went back, as after a restart).
fn count_between(before: f64, after: f64) -> u64 {
    (after - before).max(0.0) as u64
}

/// Per code, how many more now than before (codes with none left out).
fn difference(
    now: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, u64> {
    now.iter()
        .filter_map(|(code, count)| {
            let delta = count - before.get(code).copied().unwrap_or(0.0);
            (delta >= 1.0).then(|| (code.clone(), delta as u64))
        })
        .collect()
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP bc_node_up x\n\
        bc_cucm_concurrency_limit{cluster=\"EU\"} 5\n\
        bc_node_up{cluster=\"EU\",node=\"cucm-eu-1:8443\"} 1\n\
        bc_node_up{cluster=\"EU\",node=\"cucm-eu-2:8443\"} 0\n\
        bc_cucm_in_flight{cluster=\"EU\"} 2\n\
        bc_queue_depth{cluster=\"EU\"} 7\n\
        bc_cucm_calls_total{cluster=\"EU\",node=\"a\",operation=\"login\",outcome=\"success\"} 100\n\
        bc_cache_hits_total{cluster=\"EU\"} 10\n\
        bc_cache_misses_total{cluster=\"EU\"} 10\n\
        bc_requests_total{cluster=\"EU\",code=\"0\",operation=\"login\"} 50\n\
        bc_requests_total{cluster=\"none\",code=\"1006\",operation=\"login\"} 1\n";

    #[test]
    fn parses_labels_with_escapes() {
        let series = parse_exposition("m{a=\"x\\\"y\",b=\"p\\\\q\\nr\"} 2.5\nplain 3\n# c\n");
        assert_eq!(series.len(), 2);
        assert_eq!(
            series[0].labels,
            vec![
                ("a".to_string(), "x\"y".to_string()),
                ("b".to_string(), "p\\q\nr".to_string())
            ]
        );
        assert_eq!(series[0].value, 2.5);
        assert_eq!(series[1].name, "plain");
    }

    #[test]
    fn status_has_gauges_rates_and_answers_over_the_window() {
        let sampler = Sampler::default();
        let start = Instant::now();
        sampler.sample_at(start, BEFORE);
        let after = BEFORE
            .replace("outcome=\"success\"} 100", "outcome=\"success\"} 150")
            .replace(
                "bc_cache_hits_total{cluster=\"EU\"} 10",
                "bc_cache_hits_total{cluster=\"EU\"} 40",
            )
            .replace(
                "code=\"0\",operation=\"login\"} 50",
                "code=\"0\",operation=\"login\"} 53",
            )
            + "bc_requests_total{cluster=\"EU\",code=\"1004\",operation=\"login\"} 2\n";
        let status = sampler.status_at(start + Duration::from_secs(10), &after, "gw1", "sqlite");
        let eu = &status["clusters"][0];
        assert_eq!(eu["code"], "EU");
        assert_eq!(eu["max_concurrent"], 5);
        assert_eq!(eu["in_flight"], 2);
        assert_eq!(eu["queue_depth"], 7);
        assert_eq!(eu["nodes"][0]["up"], true);
        assert_eq!(eu["nodes"][1]["up"], false);
        assert_eq!(eu["calls_per_second"], 5.0);
        assert_eq!(eu["cache_hit_ratio"], 1.0);
        assert_eq!(eu["answers"], json!({"0": 3, "1004": 2}));
        assert_eq!(status["unrouted"], json!({}));
        assert_eq!(status["window_seconds"], 10);
        assert_eq!(status["instance"], "gw1");
        // 30 hits in 10 s: 180 a minute.
        assert_eq!(eu["cache_hits_per_minute"], 180);
        assert_eq!(eu["answers_per_minute"][0]["cache_hits"], 30);
        let meanings = status["code_meanings"].as_array().expect("meanings");
        assert!(meanings
            .iter()
            .any(|m| m["first"] == 18 && m["meaning"] == "another user logged in"));
    }

    #[test]
    fn without_samples_rates_are_null() {
        let status = Sampler::default().status(BEFORE, "gw", "off");
        assert!(status["clusters"][0]["calls_per_second"].is_null());
        assert!(status["clusters"][0]["cache_hits_per_minute"].is_null());
        assert_eq!(status["clusters"][0]["cache_hit_ratio"], 0.5);
        assert_eq!(status["unrouted"], json!({"1006": 1}));
    }

    #[test]
    fn answers_per_minute_tile_the_window_oldest_first() {
        let sampler = Sampler::default();
        let start = Instant::now();
        let with_ok = |count: u32| {
            BEFORE.replace(
                "code=\"0\",operation=\"login\"} 50",
                &format!("code=\"0\",operation=\"login\"}} {count}"),
            )
        };
        // 50 at start, 60 a minute later, 65 two minutes later; 66 now (2.5 min).
        sampler.sample_at(start, &with_ok(50));
        sampler.sample_at(start + Duration::from_secs(60), &with_ok(60));
        sampler.sample_at(start + Duration::from_secs(120), &with_ok(65));
        let status = sampler.status_at(start + Duration::from_secs(150), &with_ok(66), "gw", "off");
        let minutes = &status["clusters"][0]["answers_per_minute"];
        // Now-60 s..now: from the snapshot at 60 s (the newest at or before 90 s) to now.
        // Before that: 0 s..60 s. Nothing older: the gateway is 2.5 minutes old.
        assert_eq!(
            minutes,
            &json!([
                {"ended_seconds_ago": 60, "seconds": 60, "cache_hits": 0, "answers": {"0": 10}},
                {"ended_seconds_ago": 0, "seconds": 90, "cache_hits": 0, "answers": {"0": 6}},
            ])
        );
        // Together they are the window's total.
        assert_eq!(status["clusters"][0]["answers"], json!({"0": 16}));
    }

    #[test]
    fn a_young_gateway_has_one_partial_minute() {
        let sampler = Sampler::default();
        let start = Instant::now();
        sampler.sample_at(start, BEFORE);
        let status = sampler.status_at(start + Duration::from_secs(20), BEFORE, "gw", "off");
        assert_eq!(
            status["clusters"][0]["answers_per_minute"],
            json!([{"ended_seconds_ago": 0, "seconds": 20, "cache_hits": 0, "answers": {}}])
        );
        let empty = Sampler::default().status(BEFORE, "gw", "off");
        assert_eq!(empty["clusters"][0]["answers_per_minute"], json!([]));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let sampler = Sampler::default();
        let start = Instant::now();
        sampler.sample_at(start, BEFORE);
        sampler.sample_at(start + WINDOW + Duration::from_secs(1), BEFORE);
        assert_eq!(sampler.lock().len(), 1);
    }
}
