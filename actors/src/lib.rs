//! The actor core of Business Connector.
//!
//! A request becomes an [`Operation`] routed by the [`Router`] to the
//! [`ClusterActor`](cluster::ClusterActor) of its cluster, which serializes work per
//! device ([`device_queue`]), shapes CUCM calls ([`shaper`]), answers from and feeds
//! the [`cache`], and calls CUCM through the [`em`] client. Everything it observes is
//! counted in [`metrics`].

pub mod cache;
pub mod cluster;
pub mod config;
pub mod device_queue;
pub mod em;
pub mod metrics;
pub mod operation;
pub mod router;
pub mod shaper;
pub mod xml;

pub use cluster::{ClusterActor, ClusterHandle, Submit};
pub use config::ClusterConfig;
pub use metrics::Metrics;
pub use operation::{Credentials, DeviceName, OpError, Operation, Outcome, Reply, UserId};
pub use router::{RouteError, Router};
