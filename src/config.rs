//! The TOML configuration: parsing with `deny_unknown_fields`, defaults,
//! and a `validate` step whose errors name the key and its line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actors::config::ConfigError as ClusterConfigError;
use actors::ClusterConfig;
use serde::Deserialize;

use crate::access::AccessConfig;
use crate::tls::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// toml's message names the line, column and key.
    #[error("config: {0}")]
    Parse(String),
    #[error("config: {key}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        key: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Northbound HTTP address (a bad one is a parse error naming the key and line).
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Where requests without a cluster code go (optional with a single cluster;
    /// without it, several clusters are searched for the device).
    #[serde(default)]
    pub default_cluster: Option<String>,
    /// How long a device's cluster, once discovered, is remembered.
    #[serde(default = "defaults::discovery_ttl_ms")]
    pub discovery_ttl_ms: u64,
    /// A whole request's budget, queueing included.
    #[serde(default = "defaults::deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT: how long `/readyz` answers 503 while requests are still
    /// served, so a load balancer stops sending before connections are refused.
    #[serde(default = "defaults::drain_ms")]
    pub drain_ms: u64,
    /// How long in-flight requests may take to finish on SIGTERM/SIGINT (after the
    /// drain); what still waits then is answered 1004 (or 1003 when at CUCM). Absent:
    /// `deadline_ms` + 1 s, so that every request accepted before the stop can finish.
    #[serde(default)]
    pub shutdown_grace_ms: Option<u64>,
    /// HTTP worker threads; 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
    #[serde(default)]
    pub log_format: LogFormat,
    /// A request's headers and body must arrive within this (then 408 or closed).
    #[serde(default = "defaults::client_timeout_ms")]
    pub client_timeout_ms: u64,
    /// Open northbound connections per worker, beyond which new ones wait in the backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Northbound HTTPS; plain HTTP without it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(rename = "cluster", default)]
    pub clusters: Vec<ClusterConfig>,
    /// `[history]`: what is recorded where.
    #[serde(default)]
    pub history: history::HistoryConfig,
    /// `[dashboard]`: who may see the dashboard and the history.
    #[serde(default)]
    pub dashboard: crate::dashboard::DashboardSettings,
    /// `[coordination]`: one CUCM allowance shared by every instance (off by default).
    #[serde(default)]
    pub coordination: crate::coordination::CoordinationSettings,
    /// Test seam: a history opened by the caller, used instead of opening `[history]`.
    /// Never set from a config file.
    #[doc(hidden)]
    #[serde(skip)]
    pub opened_history: Option<crate::history_setup::OpenedHistory>,
    /// `[watch]`: which devices are kept fresh, and the change events.
    #[serde(default)]
    pub watch: crate::watch::WatchConfig,
}

mod defaults {
    pub fn listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn deadline_ms() -> u64 {
        15_000
    }
    pub fn discovery_ttl_ms() -> u64 {
        3_600_000
    }
    pub fn max_body_bytes() -> usize {
        64 * 1024
    }
    pub fn drain_ms() -> u64 {
        5_000
    }
    /// Beyond the deadline: the time to write the last answers.
    pub const SHUTDOWN_GRACE_BEYOND_DEADLINE_MS: u64 = 1_000;
    pub fn client_timeout_ms() -> u64 {
        5_000
    }
    pub fn max_connections() -> usize {
        25_000
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a whole config document.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(one_line_parse_error(text, &e)))?;
        config.validate().map_err(|(table, key, message)| {
            let line = line_of(text, table, key);
            let key = match table {
                Some(index) => format!("cluster[{index}].{key}"),
                None => key.to_string(),
            };
            ConfigError::Invalid { key, line, message }
        })?;
        Ok(config)
    }

    /// A config for one cluster with every default, listening on a free loopback
    /// port unless the caller sets `listen` (tests, demo).
    pub fn single_cluster(cluster: ClusterConfig) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            default_cluster: None,
            discovery_ttl_ms: defaults::discovery_ttl_ms(),
            deadline_ms: defaults::deadline_ms(),
            max_body_bytes: defaults::max_body_bytes(),
            drain_ms: defaults::drain_ms(),
            shutdown_grace_ms: None,
            workers: 0,
            log_format: LogFormat::Text,
            client_timeout_ms: defaults::client_timeout_ms(),
            max_connections: defaults::max_connections(),
            tls: None,
            access: AccessConfig::default(),
            clusters: vec![cluster],
            // Off: tests run side by side and must not share one file; the demo and
            // the history tests turn it on with a file of their own.
            history: history::HistoryConfig::disabled(),
            dashboard: crate::dashboard::DashboardSettings::default(),
            coordination: crate::coordination::CoordinationSettings::default(),
            opened_history: None,
            watch: crate::watch::WatchConfig::default(),
        }
    }

    /// Errors as (cluster index, key, message).
    fn validate(&self) -> Result<(), (Option<usize>, &'static str, String)> {
        if !(100..=600_000).contains(&self.deadline_ms) {
            return Err((None, "deadline_ms", "must be 100-600000".into()));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err((None, "max_body_bytes", "must be 1024-16777216".into()));
        }
        if self.discovery_ttl_ms > 7 * 24 * 3_600_000 {
            return Err((
                None,
                "discovery_ttl_ms",
                "must be at most 604800000 (a week)".into(),
            ));
        }
        if self.drain_ms > 300_000 {
            return Err((None, "drain_ms", "must be at most 300000".into()));
        }
        if self.shutdown_grace_ms.is_some_and(|grace| grace > 600_000) {
            return Err((None, "shutdown_grace_ms", "must be at most 600000".into()));
        }
        if !(100..=600_000).contains(&self.client_timeout_ms) {
            return Err((None, "client_timeout_ms", "must be 100-600000".into()));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err((None, "max_connections", "must be 1-1000000".into()));
        }
        if let Err((key, message)) = self.access.validate() {
            return Err((None, key, format!("[access] {message}")));
        }
        if self.workers > 256 {
            return Err((None, "workers", "must be at most 256".into()));
        }
        if self.clusters.is_empty() {
            return Err((None, "cluster", "at least one [[cluster]] is needed".into()));
        }
        let mut codes = HashSet::new();
        for (index, cluster) in self.clusters.iter().enumerate() {
            cluster
                .validate()
                .map_err(|ClusterConfigError { key, message }| (Some(index), key, message))?;
            if !codes.insert(cluster.normalized_code()) {
                return Err((
                    Some(index),
                    "code",
                    format!("{:?} is used by two clusters", cluster.code),
                ));
            }
        }
        self.history
            .validate()
            .map_err(|(key, message)| (None, key, message))?;
        self.dashboard
            .validate()
            .map_err(|(key, message)| (None, key, message))?;
        self.coordination
            .validate(self.history.url.as_deref())
            .map_err(|(key, message)| (None, key, message))?;
        self.watch
            .validate()
            .map_err(|(key, message)| (None, key, message))?;
        if let Some(default) = &self.default_cluster {
            if !codes.contains(&default.trim().to_ascii_uppercase()) {
                return Err((
                    None,
                    "default_cluster",
                    format!("{default:?} is not the code of any [[cluster]]"),
                ));
            }
        }
        Ok(())
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn discovery_ttl(&self) -> Duration {
        Duration::from_millis(self.discovery_ttl_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(
            self.shutdown_grace_ms
                .unwrap_or(self.deadline_ms + defaults::SHUTDOWN_GRACE_BEYOND_DEADLINE_MS),
        )
    }
}

/// The line (1-based) where `key` is set: in the top-level table, or in the
/// `index`-th `[[cluster]]` table (its header when the key is left out). Read from the
/// TOML parser's own spans, so quoted keys, dotted keys and inline tables count too.
/// `None` when the key is absent (a default).
/// toml's own message spans several lines (a snippet of the file); a start-up error is
/// one line: "KEY (line L, column C): what is wrong". The key is the text before `=` on
/// that line; the value is not quoted back (it may be a secret).
fn one_line_parse_error(text: &str, error: &toml::de::Error) -> String {
    let message = error
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let Some(span) = error.span() else {
        return message;
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |at| at + 1);
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let key: String = match line_text.split_once('=') {
        Some((key, _)) => key.trim().chars().take(64).collect(),
        None => String::new(),
    };
    if key.is_empty() {
        format!("line {line}, column {column}: {message}")
    } else {
        format!("{key} (line {line}, column {column}): {message}")
    }
}

fn line_of(text: &str, cluster_index: Option<usize>, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let find = |table: &DeTable<'_>| {
        table
            .iter()
            .find(|(name, _)| name.get_ref().as_ref() == key)
            .map(|(name, _)| name.span().start)
    };
    let document = DeTable::parse(text).ok()?;
    let offset = match cluster_index {
        None => find(document.get_ref())?,
        Some(index) => {
            let clusters = document
                .get_ref()
                .iter()
                .find(|(name, _)| name.get_ref().as_ref() == "cluster")?
                .1;
            let DeValue::Array(clusters) = clusters.get_ref() else {
                return None;
            };
            let cluster = clusters.get(index)?;
            match cluster.get_ref() {
                DeValue::Table(table) => find(table).unwrap_or(cluster.span().start),
                _ => cluster.span().start,
            }
        }
    };
    Some(text.get(..offset)?.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/example.toml");
    const SECURE: &str = include_str!("../config/secure.example.toml");

    #[test]
    fn secure_example_config_parses_with_its_values() {
        let config = Config::parse(SECURE).unwrap();
        assert_eq!(config.client_timeout_ms, 5_000);
        assert_eq!(config.max_connections, 25_000);
        let tls = config.tls.as_ref().unwrap();
        assert!(tls.client_ca_file.is_some());
        let access = &config.access;
        assert_eq!((access.allow.len(), access.deny.len()), (3, 1));
        assert_eq!(access.trusted_proxies.len(), 1);
        assert_eq!(
            (access.client_requests_per_second, access.client_burst),
            (10, 20)
        );
        let error = Config::parse("[access]\nallow = [\"10.0.0.0/33\"]\n[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("10.0.0.0/33") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn example_config_parses_with_its_values() {
        let config = Config::parse(EXAMPLE).unwrap();
        assert_eq!(config.default_cluster.as_deref(), Some("EU"));
        assert_eq!(config.clusters.len(), 2);
        assert_eq!(config.clusters[0].nodes.len(), 2);
        assert_eq!(config.clusters[0].max_concurrent, 5);
        assert_eq!(config.watch, crate::watch::WatchConfig::default());
    }

    #[test]
    fn a_bad_watch_key_is_named_and_unknown_ones_refused() {
        let cluster = "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n";
        let error = Config::parse(&format!("[watch]\nrate_share = 1.5\n{cluster}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("rate_share"), "{error}");
        let error = Config::parse(&format!("[watch]\ninterval = 5\n{cluster}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `interval`"), "{error}");
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let config = Config::parse("[[cluster]]\ncode = \"EU\"\nnodes = [\"https://cucm:8443/emservice/EMServiceServlet\"]\n").unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.deadline_ms, 15_000);
        assert_eq!(config.max_body_bytes, 65_536);
        assert_eq!(config.drain_ms, 5_000);
        let cluster = &config.clusters[0];
        assert_eq!(
            (
                cluster.max_concurrent,
                cluster.max_requests_per_second,
                cluster.burst
            ),
            (5, 20, 5)
        );
        assert_eq!(
            (
                cluster.timeout_ms,
                cluster.cache_ttl_ms,
                cluster.queue_limit
            ),
            (5_000, 10_000, 10_000)
        );
        assert!(!cluster.tls_insecure);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let error = Config::parse("listen = \"127.0.0.1:1\"\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("listen_port"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        let error = Config::parse(
            "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\nmax_concurent = 4\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("max_concurent"), "{error}");
        assert!(error.contains("line 4"), "{error}");
    }

    #[test]
    fn invalid_values_name_key_and_line() {
        let text = "deadline_ms = 15000\n\n[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n\n[[cluster]]\ncode = \"US\"\nnodes = [\"http://b\"]\nmax_concurrent = 0\n";
        let error = Config::parse(text).unwrap_err();
        assert_eq!(
            error.to_string(),
            "config: cluster[1].max_concurrent (line 10): must be 1-100 (CUCM's own range)"
        );
        let error = Config::parse(
            "default_cluster = \"XX\"\n[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("default_cluster (line 1)"), "{error}");
        let error = Config::parse("[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n[[cluster]]\ncode = \"eu\"\nnodes = [\"http://b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("cluster[1].code (line 5)"), "{error}");
        let error = Config::parse(
            "[[cluster]]\ncode = \"EU\"\n\"nodes\" = [\"http://a\"]\n\"max_concurrent\" = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("cluster[0].max_concurrent (line 4)"),
            "{error}"
        );
        let error = Config::parse("deadline_ms = 15000\ncluster = [{ code = \"EU\", nodes = [\"http://a\"] },\n  { code = \"US\", nodes = [\"http://b\"], timeout_ms = 0 }]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("cluster[1].timeout_ms (line 3)"), "{error}");
        let error = Config::parse(
            "drain_ms = 300001\n[[cluster]]\ncode = \"EU\"\nnodes = [\"http://a\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("drain_ms (line 1)"), "{error}");
        let error = Config::parse("").unwrap_err().to_string();
        assert!(error.contains("cluster"), "{error}");
    }

    #[test]
    fn a_bad_listen_address_names_key_and_line() {
        let error = Config::parse("deadline_ms = 100\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("listen"), "{error}");
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let error = Config::parse("deadline_ms = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("deadline_ms"), "{error}");
        assert!(error.contains("line 1"), "{error}");
    }
}
