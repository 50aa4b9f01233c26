//! The southbound side: CUCM's Extension Mobility API.
//!
//! `code` names CUCM's codes and their texts; `codec` reads and writes the EM XML
//! documents; `client` carries them to a cluster's nodes over HTTP(S) with health
//! tracking and failover; `emapp` is the EM *application*, used for logins with a PIN;
//! `rules` says what one answer means for the caller and the cache; `steps` how an
//! operation of several calls goes from one to the next; `dispatch` makes the call a
//! stage needs.

pub mod client;
pub mod code;
pub mod codec;
pub mod dispatch;
pub mod emapp;
#[cfg(test)]
mod fixtures;
pub mod rules;
pub mod steps;

pub use client::{Answered, CallError, EmClient, EmClientError, EmClientSettings};
pub use codec::{DeviceState, DeviceUser, EmRequest, EmResponse};
pub use emapp::{EmAppClient, PageAnswer};
