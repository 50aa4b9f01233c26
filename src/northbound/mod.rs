//! The northbound side: the Business Connector 1.4 API over HTTP.
//!
//! `request` reads the XML message and path and validates it; `response` renders
//! answers and maps every failure to its code in one place; `handlers` wires both to
//! actix-web and the cluster actors.

pub mod handlers;
pub mod request;
pub mod response;
