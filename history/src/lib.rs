//! Request history of Business Connector.
//!
//! - [`History`]: `record` (never blocks; two lanes, so that a flood of cache hits can
//!   never crowd out a login record; drops and counts only when a lane is full), `query`,
//!   `flush`, `shutdown`, over SQLite or a shared PostgreSQL database.
//! - [`HistoryConfig`]: the `[history]` table of the gateway's config file.
//! - [`parse_filter`]: `GET /api/history` query string → [`Filter`] (errors name the
//!   parameter, for an HTTP 400).
//! - [`to_json`] / [`to_csv`]: the answer bodies.
//!
//! No secret can be recorded: [`Record`] has no field for the appCertificate or the PIN.

pub mod config;
pub mod filter;
pub mod history;
pub mod link;
pub mod postgres;
pub mod record;
pub mod render;
pub mod sqlite;
pub mod store;

pub use config::HistoryConfig;
pub use filter::{parse_filter, Filter, FilterError, Format};
pub use history::{History, HistoryError, HistoryMetrics, Lane, WriterPause};
pub use record::{Operation, Record, Source, UtcMillis};
pub use render::{to_csv, to_json};
pub use store::{Store, StoreError};
