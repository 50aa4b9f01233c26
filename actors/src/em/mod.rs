//! The southbound side: CUCM's Extension Mobility API.
//!
//! `codec` reads and writes the EM XML documents; `client` carries them to a
//! cluster's nodes over HTTP(S) with health tracking and failover; `rules` says what an
//! answer means for the caller and the cache; `emapp` is the EM *application*, used for
//! logins with a PIN.

pub mod client;
pub mod codec;
pub mod dispatch;
pub mod emapp;
pub mod rules;

pub use client::{Answered, CallError, EmClient, EmClientError, EmClientSettings};
pub use codec::{DeviceState, DeviceUser, EmRequest, EmResponse};
pub use emapp::{EmAppClient, PageAnswer};
