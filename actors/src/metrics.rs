//! The metric catalogue: every series the gateway exports, in one place.
//!
//! A private registry (no process-global state, so tests can run side by side), `bc_`
//! prefix, counters end in `_total`, durations are `_seconds` histograms. Labels are
//! bounded by configuration: cluster, node, operation, code, outcome, reason — never a
//! device, a user or a credential.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets that resolve a sub-millisecond cache hit and a 10+ s CUCM stall alike.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering a metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// All of the gateway's series. Clone the `Arc` around it; each field is cheap to use.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub cucm_calls: IntCounterVec,
    pub cucm_call_duration: HistogramVec,
    pub cucm_in_flight: IntGaugeVec,
    pub cucm_concurrency_limit: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub busy_retries: IntCounterVec,
    pub load_shed: IntCounterVec,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_coalesced: IntCounterVec,
    pub cache_entries: IntGaugeVec,
    pub node_up: IntGaugeVec,
    pub node_failovers: IntCounterVec,
    pub rate_limiter_waits: IntCounterVec,
    pub rejected_credentials: IntCounterVec,
    pub batching_disabled: IntGaugeVec,
    pub batched_queries: IntCounterVec,
    pub discovery: IntCounterVec,
    pub pin_logins: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub coordination_enabled: IntGauge,
    pub coordination_up: IntGauge,
    pub coordination_wait: HistogramVec,
    pub coordination_grants: IntCounterVec,
    pub watched_devices: IntGaugeVec,
    pub watch_polls: IntCounterVec,
    pub watch_dropped: IntCounterVec,
    pub events: IntCounterVec,
    pub event_subscribers: IntGauge,
    pub event_subscribers_dropped: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
                let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, MetricsError> {
                let metric = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };

        let plain_gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };

        let metrics = Self {
            requests: counter(
                "bc_requests_total",
                "Northbound API requests answered, by operation, cluster and the result code the caller got (0 is success).",
                &["operation", "cluster", "code"],
            )?,
            request_duration: histogram(
                "bc_request_duration_seconds",
                "Time from receiving a northbound request to answering it, queueing and CUCM calls included.",
                &["operation", "cluster"],
            )?,
            cucm_calls: counter(
                "bc_cucm_calls_total",
                "HTTP calls made to CUCM EM service nodes, by outcome: success, failure (an EM error code), busy (code 26), timeout, refused, http_error, invalid_response, error.",
                &["cluster", "node", "operation", "outcome"],
            )?,
            cucm_call_duration: histogram(
                "bc_cucm_call_duration_seconds",
                "Time one HTTP call to a CUCM EM service node took, whatever its outcome.",
                &["cluster", "node", "operation"],
            )?,
            cucm_in_flight: gauge(
                "bc_cucm_in_flight",
                "EM calls to the cluster in flight right now; never above bc_cucm_concurrency_limit.",
                &["cluster"],
            )?,
            cucm_concurrency_limit: gauge(
                "bc_cucm_concurrency_limit",
                "The configured cap on EM calls in flight to the cluster (max_concurrent).",
                &["cluster"],
            )?,
            queue_depth: gauge(
                "bc_queue_depth",
                "Operations accepted for the cluster and not yet answered or sent to CUCM (waiting behind their device or for a CUCM slot).",
                &["cluster"],
            )?,
            queue_wait: histogram(
                "bc_queue_wait_seconds",
                "Time an operation waited in the gateway (device order, concurrency cap, rate limit) before its first CUCM call.",
                &["cluster"],
            )?,
            busy_retries: counter(
                "bc_cucm_busy_retries_total",
                "Times CUCM answered code 26 (busy) and the gateway backed off to retry instead of passing it on.",
                &["cluster"],
            )?,
            load_shed: counter(
                "bc_load_shed_total",
                "Requests refused with code 1004 (HTTP 503) to protect the cluster, by reason: queue_full, deadline.",
                &["cluster", "reason"],
            )?,
            cache_hits: counter(
                "bc_cache_hits_total",
                "getloggedinuser requests answered from the logged-in cache without calling CUCM.",
                &["cluster"],
            )?,
            cache_misses: counter(
                "bc_cache_misses_total",
                "getloggedinuser requests the cache could not answer, so a CUCM query was needed or joined.",
                &["cluster"],
            )?,
            cache_coalesced: counter(
                "bc_cache_coalesced_total",
                "getloggedinuser requests that shared another identical request's CUCM query instead of making their own.",
                &["cluster"],
            )?,
            cache_entries: gauge(
                "bc_cache_entries",
                "Devices whose logged-in state the cache holds right now (fresh or awaiting sweep).",
                &["cluster"],
            )?,
            node_up: gauge(
                "bc_node_up",
                "1 when the gateway currently considers the CUCM node usable, 0 while it is skipped after failures.",
                &["cluster", "node"],
            )?,
            node_failovers: counter(
                "bc_node_failovers_total",
                "Times a call moved on from this node to another after the node failed.",
                &["cluster", "node"],
            )?,
            rate_limiter_waits: counter(
                "bc_rate_limiter_waits_total",
                "Times the cluster's rate limiter (max_requests_per_second, burst) made an operation wait for a token.",
                &["cluster"],
            )?,
            rejected_credentials: counter(
                "bc_rejected_credentials_total",
                "Requests answered 3 (invalid application user) without calling CUCM, because CUCM refused the same credentials seconds before.",
                &["cluster"],
            )?,
            batching_disabled: gauge(
                "bc_batching_disabled",
                "1 once the cluster answered a batched deviceUserQuery with a failure or without every device: its queries then go one device at a time (0: batching on, or max_devices_per_query = 1).",
                &["cluster"],
            )?,
            batched_queries: counter(
                "bc_batched_queries_total",
                "Device queries that went to CUCM in a deviceUserQuery together with other devices' queries.",
                &["cluster"],
            )?,
            discovery: counter(
                "bc_discovery_total",
                "Requests without a cluster code whose device's cluster was looked up, by outcome: remembered (from an earlier lookup), found, nowhere (code 11), several (1011), failed (1003), refused (a cluster's own error).",
                &["outcome"],
            )?,
            pin_logins: counter(
                "bc_pin_logins_total",
                "Logins with a PIN (through the cluster's EM application), by cluster and the code the caller got (1007: PIN rejected).",
                &["cluster", "code"],
            )?,
            build_info: gauge(
                "bc_build_info",
                "Always 1; the version label says which build is running.",
                &["version"],
            )?,
            coordination_enabled: plain_gauge(
                "bc_coordination_enabled",
                "1 when the instances share each cluster's allowance through PostgreSQL ([coordination] enabled), else 0.",
            )?,
            coordination_up: plain_gauge(
                "bc_coordination_up",
                "1 while coordination is on and its PostgreSQL answers; 0 while it cannot be reached (each instance then uses its own share: max_concurrent / instances) or coordination is off.",
            )?,
            coordination_wait: histogram(
                "bc_coordination_wait_seconds",
                "Time a CUCM call waited for its grant (a shared slot and rate token, or a local one while PostgreSQL is unreachable).",
                &["cluster"],
            )?,
            coordination_grants: counter(
                "bc_coordination_grants_total",
                "Grants for CUCM calls with coordination on, by outcome: shared (a slot leased in PostgreSQL), local (this instance's share while PostgreSQL is unreachable), expired (no slot until shortly before the deadline; the caller got 1004 and no call was made).",
                &["cluster", "outcome"],
            )?,
            watched_devices: gauge(
                "bc_watched_devices",
                "Devices the cluster keeps fresh with watch polls (named in a request within [watch] ttl_ms, or in devices_file).",
                &["cluster"],
            )?,
            watch_polls: counter(
                "bc_watch_polls_total",
                "Watch polls (batched deviceUserQuery calls) sent to the cluster, by outcome: ok, failed (no answer or an EM error), busy (code 26), refused_credentials (codes 3, 4: polls stop until new credentials arrive).",
                &["cluster", "outcome"],
            )?,
            watch_dropped: counter(
                "bc_watch_dropped_total",
                "Devices no longer watched because the cluster's cap on watched devices was reached (the oldest requested first).",
                &["cluster"],
            )?,
            events: counter(
                "bc_events_total",
                "Changes of a device's logged-in user published on /api/events, by cause: request (through the gateway), observed (seen by a poll or a query).",
                &["cause"],
            )?,
            event_subscribers: {
                let metric = IntGauge::new(
                    "bc_event_subscribers",
                    "Clients connected to /api/events right now.",
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            event_subscribers_dropped: {
                let metric = IntCounter::new(
                    "bc_event_subscribers_dropped_total",
                    "/api/events clients disconnected because they fell too far behind the events (they resume with Last-Event-ID).",
                )?;
                registry.register(Box::new(metric.clone()))?;
                metric
            },
            registry,
        };
        for cause in ["request", "observed"] {
            metrics.events.with_label_values(&[cause]);
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every outcome exists from the start, so dashboards and alerts see zeros.
        for outcome in [
            "remembered",
            "found",
            "nowhere",
            "several",
            "failed",
            "refused",
        ] {
            metrics.discovery.with_label_values(&[outcome]);
        }
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// The registry behind every series, so other parts of the gateway (the history,
    /// the dashboard) can register theirs and appear in the same `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every series.
    /// Adds a series owned elsewhere (the northbound access counters) to the exposition.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), MetricsError> {
        Ok(self.registry.register(collector)?)
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// Per-cluster handles resolved once, so the hot path does no label lookups.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub queue_depth: IntGauge,
    pub queue_wait: Histogram,
    pub in_flight: IntGauge,
    pub busy_retries: prometheus::IntCounter,
    pub shed_queue_full: prometheus::IntCounter,
    pub shed_deadline: prometheus::IntCounter,
    pub cache_hits: prometheus::IntCounter,
    pub cache_misses: prometheus::IntCounter,
    pub cache_coalesced: prometheus::IntCounter,
    pub cache_entries: IntGauge,
    pub rate_limiter_waits: prometheus::IntCounter,
    pub rejected_credentials: prometheus::IntCounter,
    pub batching_disabled: IntGauge,
    pub batched_queries: prometheus::IntCounter,
    pub watched_devices: IntGauge,
    pub watch_dropped: prometheus::IntCounter,
    pub polls_ok: prometheus::IntCounter,
    pub polls_failed: prometheus::IntCounter,
    pub polls_busy: prometheus::IntCounter,
    pub polls_refused_credentials: prometheus::IntCounter,
}

impl ClusterMetrics {
    pub fn new(metrics: &Metrics, cluster: &str, max_concurrent: usize) -> Self {
        let c = &[cluster];
        metrics
            .cucm_concurrency_limit
            .with_label_values(c)
            .set(max_concurrent as i64);
        // Exists from the start, so the dashboard's PIN login panel shows zeros.
        metrics.pin_logins.with_label_values(&[cluster, "0"]);
        // Likewise the coordination panels (zeros with coordination off).
        metrics.coordination_wait.with_label_values(c);
        for outcome in ["shared", "local", "expired"] {
            metrics
                .coordination_grants
                .with_label_values(&[cluster, outcome]);
        }
        Self {
            queue_depth: metrics.queue_depth.with_label_values(c),
            queue_wait: metrics.queue_wait.with_label_values(c),
            in_flight: metrics.cucm_in_flight.with_label_values(c),
            busy_retries: metrics.busy_retries.with_label_values(c),
            shed_queue_full: metrics
                .load_shed
                .with_label_values(&[cluster, "queue_full"]),
            shed_deadline: metrics.load_shed.with_label_values(&[cluster, "deadline"]),
            cache_hits: metrics.cache_hits.with_label_values(c),
            cache_misses: metrics.cache_misses.with_label_values(c),
            cache_coalesced: metrics.cache_coalesced.with_label_values(c),
            cache_entries: metrics.cache_entries.with_label_values(c),
            rate_limiter_waits: metrics.rate_limiter_waits.with_label_values(c),
            rejected_credentials: metrics.rejected_credentials.with_label_values(c),
            batching_disabled: metrics.batching_disabled.with_label_values(c),
            batched_queries: metrics.batched_queries.with_label_values(c),
            watched_devices: metrics.watched_devices.with_label_values(c),
            watch_dropped: metrics.watch_dropped.with_label_values(c),
            polls_ok: metrics.watch_polls.with_label_values(&[cluster, "ok"]),
            polls_failed: metrics.watch_polls.with_label_values(&[cluster, "failed"]),
            polls_busy: metrics.watch_polls.with_label_values(&[cluster, "busy"]),
            polls_refused_credentials: metrics
                .watch_polls
                .with_label_values(&[cluster, "refused_credentials"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_catalogue_with_help_text() {
        let metrics = Metrics::new().unwrap();
        let _ = ClusterMetrics::new(&metrics, "EU", 5);
        metrics
            .requests
            .with_label_values(&["login", "EU", "0"])
            .inc();
        let text = metrics.render();
        assert!(text.contains("# HELP bc_requests_total Northbound API requests"));
        assert!(text.contains("bc_requests_total{cluster=\"EU\",code=\"0\",operation=\"login\"} 1"));
        assert!(text.contains("bc_cucm_concurrency_limit{cluster=\"EU\"} 5"));
        assert!(text.contains("bc_build_info{version=\""));
    }
}
