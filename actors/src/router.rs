//! `Router`: cluster code → the cluster's handle.
//!
//! Built once at start and read-only afterwards, so it needs no actor of its own:
//! routing is a map lookup on the request path.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cluster::{ClusterActor, ClusterError, ClusterHandle};
use crate::config::ClusterConfig;
use crate::metrics::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("Cluster with code [{0}] not found")]
    UnknownCluster(String),
    #[error("No cluster code given and no default cluster configured")]
    NoDefault,
}

#[derive(Debug, Clone)]
pub struct Router {
    clusters: HashMap<String, ClusterHandle>,
    default: Option<String>,
}

impl Router {
    /// Starts one `ClusterActor` per cluster on the current arbiter.
    pub fn launch(
        clusters: &[ClusterConfig],
        default_cluster: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClusterError> {
        let mut handles = HashMap::new();
        for config in clusters {
            let handle = ClusterActor::launch(config, metrics.clone())?;
            handles.insert(config.normalized_code(), handle);
        }
        let default = match default_cluster {
            Some(code) => Some(code.trim().to_ascii_uppercase()),
            None if handles.len() == 1 => handles.keys().next().cloned(),
            None => None,
        };
        Ok(Self {
            clusters: handles,
            default,
        })
    }

    /// The cluster for a request's code (case-insensitive), or the default.
    pub fn route(&self, code: Option<&str>) -> Result<&ClusterHandle, RouteError> {
        match code.map(str::trim).filter(|c| !c.is_empty()) {
            Some(code) => self
                .clusters
                .get(&code.to_ascii_uppercase())
                .ok_or_else(|| RouteError::UnknownCluster(code.to_string())),
            None => self
                .default
                .as_ref()
                .and_then(|d| self.clusters.get(d))
                .ok_or(RouteError::NoDefault),
        }
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterHandle> {
        self.clusters.values()
    }
}
