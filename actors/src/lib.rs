//! The actor core of Business Connector.
//!
//! A request becomes an [`Operation`] routed by the [`Router`] to the
//! [`ClusterActor`](cluster::ClusterActor) of its cluster. The actor only wires: the
//! [`scheduler`] decides what goes to CUCM when (per-device order from
//! [`device_queue`], the clients' fair share from [`fair_line`], slots and rate from
//! [`shaper`], load shedding, busy back-off); the [`em`] client calls CUCM,
//! [`em::rules`] says what an answer means and [`em::steps`] how an operation of several
//! calls goes on; the [`cache`] answers repeated queries. The [`watch`] keeps the state
//! of known devices fresh and publishes each change to the [`events`] hub. Everything
//! observed is counted in [`metrics`].

pub mod backoff;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod coordination;
pub mod device_queue;
pub mod discovery;
pub mod em;
pub mod events;
pub mod everywhere;
pub mod fair_line;
pub mod metrics;
pub mod operation;
pub mod router;
pub mod scheduler;
pub mod shaper;
pub mod watch;
pub mod whereabouts;
pub mod xml;

pub use cluster::{ClusterActor, ClusterHandle, Submit};
pub use config::ClusterConfig;
pub use fair_line::ClientId;
pub use metrics::Metrics;
pub use operation::{
    Credentials, DeviceName, OpError, Operation, Outcome, Pin, QueueKey, Reply, UserId,
};
pub use router::{Route, RouteError, Router};
