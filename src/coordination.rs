//! `[coordination]`: the instances share each cluster's CUCM allowance through the
//! PostgreSQL database of `[history] url`.
//!
//! ```toml
//! [coordination]
//! enabled = true   # needs [history] url = "postgres://..."
//! instances = 2    # while PostgreSQL is unreachable, each instance uses 1/instances
//! ```

use actors::coordination::{Coordination, StoreError};
use actors::metrics::Metrics;
use actors::ClusterConfig;
use serde::Deserialize;

/// The most instances one allowance is split between (a bound on a typo).
const MAX_INSTANCES: usize = 64;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CoordinationSettings {
    /// Off by default: each instance has its clusters' whole allowance to itself.
    #[serde(default)]
    pub enabled: bool,
    /// How many instances share the allowance: each one's part while PostgreSQL is
    /// unreachable.
    #[serde(default = "one")]
    pub instances: usize,
}

fn one() -> usize {
    1
}

impl Default for CoordinationSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            instances: 1,
        }
    }
}

impl CoordinationSettings {
    /// Errors as (key, message). `history_url` is `[history] url`.
    pub fn validate(&self, history_url: Option<&str>) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_INSTANCES).contains(&self.instances) {
            return Err((
                "coordination.instances",
                format!("must be 1-{MAX_INSTANCES}"),
            ));
        }
        if self.enabled && history_url.is_none() {
            return Err((
                "coordination.enabled",
                "needs [history] url = \"postgres://...\": the instances coordinate through that database".into(),
            ));
        }
        Ok(())
    }

    /// Starts the coordination thread when enabled (it connects on its own).
    pub fn start(
        &self,
        history_url: Option<&str>,
        clusters: &[ClusterConfig],
        metrics: &Metrics,
    ) -> Result<Option<Coordination>, StoreError> {
        match (self.enabled, history_url) {
            (true, Some(url)) => {
                Coordination::start(url, self.instances, clusters, metrics).map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_a_postgres_history_and_at_least_one_instance() {
        let on = CoordinationSettings {
            enabled: true,
            instances: 2,
        };
        assert!(on.validate(None).is_err());
        assert!(on.validate(Some("postgres://bc@db/bc")).is_ok());
        let zero = CoordinationSettings {
            enabled: false,
            instances: 0,
        };
        assert_eq!(zero.validate(None).unwrap_err().0, "coordination.instances");
        assert!(CoordinationSettings::default().validate(None).is_ok());
    }

    const CLUSTER: &str =
        "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://127.0.0.1:1/emservice\"]\n";

    #[test]
    fn the_config_file_names_the_key_and_refuses_unknown_ones() {
        let parse = |text: &str| crate::config::Config::parse(&format!("{text}\n{CLUSTER}"));
        let error = parse("[coordination]\nenabled = true")
            .unwrap_err()
            .to_string();
        assert!(error.contains("coordination.enabled"), "{error}");
        assert!(error.contains("[history] url"), "{error}");
        let error = parse("[coordination]\nenabeld = true")
            .unwrap_err()
            .to_string();
        assert!(error.contains("enabeld"), "{error}");
        let config = parse(
            "[history]\nurl = \"postgres://bc@db/bc\"\n[coordination]\nenabled = true\ninstances = 2",
        )
        .expect("valid");
        assert_eq!(
            config.coordination,
            CoordinationSettings {
                enabled: true,
                instances: 2
            }
        );
        assert_eq!(
            parse("").expect("valid").coordination,
            CoordinationSettings::default(),
            "off by default"
        );
    }
}
