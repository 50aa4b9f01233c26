//! What the EM tests build over and over: a device, a user, CUCM's answers.

use std::sync::Arc;

use super::client::{Answered, CallError};
use super::codec::{DeviceState, DeviceUser, EmResponse};
use super::emapp::PageAnswer;
use super::rules::Exchange;
use crate::operation::{DeviceName, OpError, Outcome, UserId};

pub fn device() -> DeviceName {
    DeviceName::parse("SEP1").unwrap()
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

pub fn answered(response: EmResponse) -> Result<Answered, CallError> {
    Ok(Answered {
        response,
        node: Arc::from("cucm-1:8443"),
    })
}

pub fn failed(code: Option<u32>, text: &str) -> Result<Answered, CallError> {
    answered(EmResponse::Failure {
        code,
        text: text.into(),
    })
}

pub fn one_device(name: &str, state: DeviceState) -> Result<Answered, CallError> {
    answered(EmResponse::DeviceUsers(vec![DeviceUser {
        device: name.into(),
        state,
    }]))
}

/// The EM application's page, with the code of a failure or none.
pub fn page(code: Option<u32>) -> Exchange {
    Exchange::EmApp(Ok(PageAnswer {
        code,
        node: Arc::from("cucm-1:8443"),
    }))
}

pub fn cucm(code: u32, text: &str) -> Result<Outcome, OpError> {
    Err(OpError::Cucm {
        code,
        text: text.into(),
    })
}
