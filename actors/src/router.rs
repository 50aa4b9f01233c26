//! `Router`: cluster code → the cluster's handle; without a code, the default cluster,
//! the only cluster, or discovery across all of them.
//!
//! Built once at start and read-only afterwards (the discovery directory is a
//! concurrent map of its own), so it needs no actor: routing is a map lookup on the
//! request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterActor, ClusterError, ClusterHandle};
use crate::config::ClusterConfig;
use crate::coordination::Coordination;
use crate::discovery::{conclude, Conclusion, DeviceDirectory};
use crate::em::code;
use crate::fair_line::ClientId;
use crate::metrics::Metrics;
use crate::operation::{Credentials, DeviceName, OpError, Operation, QueueKey, Reply, UserId};
use crate::watch::Watching;
use crate::whereabouts;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The caller's text (the code is echoed, cut: it is the caller's input).
    #[error("Cluster with code [{}] not found", crate::xml::shorten(.0, 32))]
    UnknownCluster(String),
}

/// Where a request goes.
#[derive(Debug)]
pub enum Route<'a> {
    Cluster(&'a ClusterHandle),
    /// No code, several clusters, no default: find the device's cluster.
    Discover,
}

/// The outcome of discovery for one device.
#[derive(Debug)]
pub enum Located<'a> {
    /// Its cluster, and the query answer when discovery just asked (a
    /// getloggedinuser needs no second call).
    Cluster(&'a ClusterHandle, Option<Reply>),
    /// The answer for the caller: 11 nowhere, 1011 in several, 1003 unknown, or a
    /// cluster's refusal.
    Answer(Reply),
}

#[derive(Debug)]
pub struct Router {
    clusters: HashMap<String, ClusterHandle>,
    /// Cluster codes in configuration order: discovery asks and reports in this order.
    order: Vec<String>,
    default: Option<String>,
    directory: DeviceDirectory,
    metrics: Arc<Metrics>,
}

impl Router {
    /// Starts one `ClusterActor` per cluster on the current arbiter, each watching its
    /// devices as `watching` says.
    pub fn launch(
        clusters: &[ClusterConfig],
        default_cluster: Option<&str>,
        discovery_ttl: Duration,
        metrics: Arc<Metrics>,
        coordination: Option<&Coordination>,
        watching: &Watching,
    ) -> Result<Self, ClusterError> {
        let mut handles = HashMap::new();
        let mut order = Vec::new();
        for config in clusters {
            let handle =
                ClusterActor::launch_watching(config, metrics.clone(), coordination, watching)?;
            order.push(config.normalized_code());
            handles.insert(config.normalized_code(), handle);
        }
        let default = match default_cluster {
            Some(code) => Some(code.trim().to_ascii_uppercase()),
            None if handles.len() == 1 => handles.keys().next().cloned(),
            None => None,
        };
        Ok(Self {
            clusters: handles,
            order,
            default,
            directory: DeviceDirectory::new(discovery_ttl),
            metrics,
        })
    }

    /// The cluster for a request's code (case-insensitive), the default, or discovery.
    pub fn route(&self, code: Option<&str>) -> Result<Route<'_>, RouteError> {
        match code.map(str::trim).filter(|c| !c.is_empty()) {
            Some(code) => self
                .clusters
                .get(&code.to_ascii_uppercase())
                .map(Route::Cluster)
                .ok_or_else(|| RouteError::UnknownCluster(code.to_string())),
            None => Ok(self
                .default
                .as_ref()
                .and_then(|d| self.clusters.get(d))
                .map_or(Route::Discover, Route::Cluster)),
        }
    }

    /// Runs an operation where `route` says: on the cluster named, or on the one
    /// discovery finds (a user query without a cluster asks them all). Returns the
    /// cluster that answered (none when discovery itself answered).
    pub async fn carry_out(
        &self,
        route: Route<'_>,
        operation: Operation,
        credentials: Credentials,
        deadline: Instant,
        client: ClientId,
    ) -> (Option<Arc<str>>, Reply) {
        let (cluster, device) = match (route, operation.queue_key()) {
            (Route::Cluster(cluster), _) => {
                let reply = cluster
                    .submit(operation, credentials, deadline, client)
                    .await;
                return (Some(cluster.code.clone()), reply);
            }
            (Route::Discover, QueueKey::User(user)) => {
                let reply = self
                    .user_devices_everywhere(&user, &credentials, deadline, client)
                    .await;
                return (None, reply);
            }
            (Route::Discover, QueueKey::Device(device)) => {
                match self.locate(&device, &credentials, deadline, client).await {
                    Located::Answer(reply) => return (None, reply),
                    // Discovery just asked this cluster who is on the device.
                    Located::Cluster(cluster, Some(reply)) if !operation.mutates() => {
                        return (Some(cluster.code.clone()), reply)
                    }
                    Located::Cluster(cluster, _) => (cluster, device),
                }
            }
        };
        let reply = cluster
            .submit(operation, credentials, deadline, client)
            .await;
        self.learn(&device, cluster, &reply);
        (Some(cluster.code.clone()), reply)
    }

    /// Finds the device's cluster: remembered, else by asking every cluster at once.
    async fn locate(
        &self,
        device: &DeviceName,
        credentials: &Credentials,
        deadline: Instant,
        client: ClientId,
    ) -> Located<'_> {
        if let Some(cluster) = self
            .directory
            .lookup(device, Instant::now())
            .and_then(|code| self.clusters.get(&*code))
        {
            self.count("remembered");
            return Located::Cluster(cluster, None);
        }
        let handles: Vec<&ClusterHandle> = self.clusters_in_order().collect();
        let questions = handles.iter().map(|cluster| {
            let query = Operation::Query {
                device: device.clone(),
            };
            cluster.submit(query, credentials.clone(), deadline, client)
        });
        let answers = futures_util::future::join_all(questions).await;
        let conclusion = conclude(answers);
        self.count(conclusion.label());
        match conclusion {
            Conclusion::Found { index, reply } => {
                let cluster = handles[index];
                self.directory
                    .remember(device, cluster.code.clone(), Instant::now());
                Located::Cluster(cluster, Some(reply))
            }
            Conclusion::Nowhere => Located::Answer(Reply::failed(OpError::Cucm {
                code: code::DEVICE_DOES_NOT_EXIST,
                text: "Device does not exist in any cluster".into(),
            })),
            Conclusion::Several(indexes) => {
                Located::Answer(Reply::failed(OpError::InSeveralClusters {
                    clusters: indexes
                        .into_iter()
                        .map(|i| handles[i].code.to_string())
                        .collect(),
                }))
            }
            Conclusion::Failed(error) | Conclusion::Refused(error) => {
                Located::Answer(Reply::failed(error))
            }
        }
    }

    /// A user query with no cluster to go to: every cluster is asked at once, each
    /// through its own shaping, and the answers merged (`whereabouts::merge`).
    async fn user_devices_everywhere(
        &self,
        user: &UserId,
        credentials: &Credentials,
        deadline: Instant,
        client: ClientId,
    ) -> Reply {
        let handles: Vec<&ClusterHandle> = self.clusters_in_order().collect();
        let questions = handles.iter().map(|cluster| {
            cluster.submit(
                Operation::user_devices(user.clone()),
                credentials.clone(),
                deadline,
                client,
            )
        });
        let answers = futures_util::future::join_all(questions).await;
        whereabouts::merge(
            handles
                .iter()
                .map(|c| c.code.to_string())
                .zip(answers)
                .collect(),
        )
    }

    /// A cluster answered for a device found by discovery: an 11 means it moved.
    fn learn(&self, device: &DeviceName, cluster: &ClusterHandle, reply: &Reply) {
        if let Err(OpError::Cucm { code, .. }) = &reply.result {
            if *code == code::DEVICE_DOES_NOT_EXIST {
                self.directory.forget(device, &cluster.code);
            }
        }
    }

    fn count(&self, outcome: &str) {
        self.metrics.discovery.with_label_values(&[outcome]).inc();
    }

    fn clusters_in_order(&self) -> impl Iterator<Item = &ClusterHandle> {
        self.order.iter().filter_map(|code| self.clusters.get(code))
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterHandle> {
        self.clusters_in_order()
    }

    /// The end of the shutdown grace: every cluster answers what still waits (see
    /// [`ClusterHandle::close`]).
    pub fn close(&self) {
        for cluster in self.clusters_in_order() {
            cluster.close();
        }
    }

    /// Hands the always-watched devices to their clusters: all to the default (or
    /// only) cluster; with several clusters and no default, each to the cluster
    /// discovery finds for it, asked with `credentials` (without them, none can be
    /// placed). A device found nowhere is not watched. Returns how many were placed.
    pub async fn watch_always(
        &self,
        devices: Vec<DeviceName>,
        credentials: Option<Credentials>,
        wait_each: Duration,
    ) -> usize {
        let mut lists: HashMap<&str, Vec<DeviceName>> = self
            .clusters
            .keys()
            .map(|code| (code.as_str(), Vec::new()))
            .collect();
        let mut placed = 0;
        if let Some(default) = self.default.as_deref() {
            placed = devices.len();
            lists.insert(default, devices);
        } else if let Some(credentials) = credentials {
            for device in devices {
                let deadline = Instant::now() + wait_each;
                if let Located::Cluster(cluster, _) = self
                    .locate(&device, &credentials, deadline, ClientId::default())
                    .await
                {
                    if let Some(list) = lists.get_mut(&*cluster.code) {
                        list.push(device);
                        placed += 1;
                    }
                }
            }
        }
        for (code, list) in lists {
            if let Some(cluster) = self.clusters.get(code) {
                cluster.watch_always(list);
            }
        }
        placed
    }
}
