//! The northbound side: the Business Connector 1.4 API over HTTP.
//!
//! `message` picks the message out of the body, form or query string; `code_meaning` says
//! what each answer code means (OpenAPI, dashboard); `request` reads the XML message and path and validates it; `response` renders
//! answers and maps every failure to its code in one place; `record` is what one
//! request was and how it was answered (metrics and the log line are written from it);
//! `handlers` wires them to actix-web and the cluster actors.

pub mod code_meaning;
pub mod handlers;
pub mod json;
pub mod message;
pub mod record;
pub mod request;
pub mod response;
