//! One cluster's settings, as the `[[cluster]]` table of the TOML config.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use crate::em::emapp::derive_emapp_url;
use crate::em::EmClientSettings;
use crate::shaper::Rate;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key at fault, e.g. `max_concurrent` (the caller adds the table path).
    pub key: &'static str,
    pub message: String,
}

/// A batch's request and answer stay a few tens of KiB.
pub const MAX_DEVICES_PER_QUERY: usize = 200;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster code callers use (case-insensitive).
    pub code: String,
    /// EM service URLs, in order of preference.
    pub nodes: Vec<String>,
    #[serde(default = "defaults::max_concurrent")]
    pub max_concurrent: usize,
    /// 0 turns the rate limit off.
    #[serde(default = "defaults::max_requests_per_second")]
    pub max_requests_per_second: u32,
    #[serde(default = "defaults::burst")]
    pub burst: u32,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// 0 turns the cache off.
    #[serde(default = "defaults::cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    #[serde(default = "defaults::queue_limit")]
    pub queue_limit: usize,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub tls_insecure: bool,
    /// EM application URLs for logins with a PIN; derived from `nodes` when absent
    /// (same scheme, host and port, path `/emapp/EMAppServlet`).
    #[serde(default)]
    pub emapp_nodes: Option<Vec<String>>,
    /// Queries of different devices waiting for a slot leave together in one
    /// `deviceUserQuery` of up to this many devices (1 turns batching off).
    #[serde(default = "defaults::max_devices_per_query")]
    pub max_devices_per_query: usize,
}

pub mod defaults {
    pub fn max_concurrent() -> usize {
        5
    }
    pub fn max_requests_per_second() -> u32 {
        20
    }
    pub fn burst() -> u32 {
        5
    }
    pub fn timeout_ms() -> u64 {
        5_000
    }
    pub fn cache_ttl_ms() -> u64 {
        10_000
    }
    pub fn queue_limit() -> usize {
        10_000
    }
    pub fn max_devices_per_query() -> usize {
        50
    }
}

impl ClusterConfig {
    /// A cluster with every default, for tests and the demo.
    pub fn new(code: &str, nodes: Vec<String>) -> Self {
        Self {
            code: code.to_string(),
            nodes,
            max_concurrent: defaults::max_concurrent(),
            max_requests_per_second: defaults::max_requests_per_second(),
            burst: defaults::burst(),
            timeout_ms: defaults::timeout_ms(),
            cache_ttl_ms: defaults::cache_ttl_ms(),
            queue_limit: defaults::queue_limit(),
            ca_file: None,
            tls_insecure: false,
            emapp_nodes: None,
            max_devices_per_query: defaults::max_devices_per_query(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let code = self.code.trim();
        if code.is_empty()
            || code.len() > 32
            || !code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "code",
                "must be 1-32 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one EM service URL is needed"));
        }
        check_urls("nodes", &self.nodes)?;
        if let Some(emapp_nodes) = &self.emapp_nodes {
            if emapp_nodes.is_empty() {
                return Err(invalid(
                    "emapp_nodes",
                    "leave it out to derive it from nodes, or give at least one URL",
                ));
            }
            check_urls("emapp_nodes", emapp_nodes)?;
        }
        if !(1..=100).contains(&self.max_concurrent) {
            return Err(invalid(
                "max_concurrent",
                "must be 1-100 (CUCM's own range)",
            ));
        }
        if self.max_requests_per_second > 0 && self.burst == 0 {
            return Err(invalid("burst", "must be at least 1 when a rate is set"));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return Err(invalid("timeout_ms", "must be 100-120000"));
        }
        if self.cache_ttl_ms > 3_600_000 {
            return Err(invalid(
                "cache_ttl_ms",
                "must be at most 3600000 (one hour)",
            ));
        }
        if !(1..=1_000_000).contains(&self.queue_limit) {
            return Err(invalid("queue_limit", "must be 1-1000000"));
        }
        if !(1..=MAX_DEVICES_PER_QUERY).contains(&self.max_devices_per_query) {
            return Err(invalid(
                "max_devices_per_query",
                format!("must be 1-{MAX_DEVICES_PER_QUERY} (1 turns batching off)"),
            ));
        }
        if self.tls_insecure && self.ca_file.is_some() {
            return Err(invalid(
                "tls_insecure",
                "cannot be combined with ca_file: pick one",
            ));
        }
        Ok(())
    }

    /// Upper-cased code: codes are case-insensitive.
    pub fn normalized_code(&self) -> String {
        self.code.trim().to_ascii_uppercase()
    }

    pub fn rate(&self) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(self.max_requests_per_second)?,
            burst: NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN),
        })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms)
    }

    /// The EM application URLs: configured, or derived from the EM service nodes.
    pub fn emapp_urls(&self) -> Vec<String> {
        match &self.emapp_nodes {
            Some(urls) => urls.clone(),
            None => self
                .nodes
                .iter()
                .filter_map(|node| derive_emapp_url(node))
                .collect(),
        }
    }

    pub fn client_settings(&self) -> EmClientSettings {
        EmClientSettings {
            timeout: self.timeout(),
            ca_file: self.ca_file.clone(),
            tls_insecure: self.tls_insecure,
        }
    }
}

fn check_urls(key: &'static str, urls: &[String]) -> Result<(), ConfigError> {
    for url in urls {
        let parsed = reqwest::Url::parse(url).ok();
        let usable = parsed.as_ref().is_some_and(|url| {
            matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|h| !h.is_empty())
        });
        if !usable {
            return Err(invalid(
                key,
                format!("{url:?} is not an http:// or https:// URL with a host"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterConfig {
        ClusterConfig::new(
            "eu",
            vec!["https://cucm:8443/emservice/EMServiceServlet".into()],
        )
    }

    #[test]
    fn defaults_are_valid_and_code_is_normalized() {
        assert_eq!(cluster().validate(), Ok(()));
        assert_eq!(cluster().normalized_code(), "EU");
        assert_eq!(cluster().rate().unwrap().per_second.get(), 20);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        type Mutation = fn(&mut ClusterConfig);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.code = "".into(), "code"),
            (|c| c.code = "E U".into(), "code"),
            (|c| c.nodes.clear(), "nodes"),
            (|c| c.nodes = vec!["cucm:8443".into()], "nodes"),
            (|c| c.nodes = vec!["https://".into()], "nodes"),
            (|c| c.nodes = vec!["https://cucm:99999/x".into()], "nodes"),
            (|c| c.nodes = vec!["ftp://cucm/x".into()], "nodes"),
            (|c| c.emapp_nodes = Some(vec![]), "emapp_nodes"),
            (
                |c| c.emapp_nodes = Some(vec!["emapp".into()]),
                "emapp_nodes",
            ),
            (|c| c.max_concurrent = 0, "max_concurrent"),
            (|c| c.burst = 0, "burst"),
            (|c| c.timeout_ms = 5, "timeout_ms"),
            (|c| c.queue_limit = 0, "queue_limit"),
            (|c| c.max_devices_per_query = 0, "max_devices_per_query"),
            (|c| c.max_devices_per_query = 201, "max_devices_per_query"),
            (
                |c| {
                    c.tls_insecure = true;
                    c.ca_file = Some("ca.pem".into())
                },
                "tls_insecure",
            ),
        ];
        for (mutate, key) in cases {
            let mut config = cluster();
            mutate(&mut config);
            assert_eq!(config.validate().unwrap_err().key, key);
        }
    }

    #[test]
    fn emapp_urls_are_derived_unless_configured() {
        let mut config = cluster();
        assert_eq!(
            config.emapp_urls(),
            ["https://cucm:8443/emapp/EMAppServlet"]
        );
        config.emapp_nodes = Some(vec!["https://other:8443/emapp/EMAppServlet".into()]);
        assert_eq!(
            config.emapp_urls(),
            ["https://other:8443/emapp/EMAppServlet"]
        );
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let mut config = cluster();
        config.max_requests_per_second = 0;
        config.burst = 0;
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.rate(), None);
    }
}
