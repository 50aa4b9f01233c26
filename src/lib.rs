//! Business Connector: a gateway from the Business Connector 1.4 API to Cisco CUCM
//! Extension Mobility. See README.md for the design map.

pub mod access;
pub mod config;
pub mod connections;
pub mod coordination;
pub mod dashboard;
pub mod demo;
pub mod events_api;
pub mod history_setup;
pub mod northbound;
pub mod openapi;
pub mod preflight;
pub mod server;
pub mod tls;
pub mod watch;
