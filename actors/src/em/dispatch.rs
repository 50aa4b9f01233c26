//! From an operation's stage to the CUCM call that carries it out: the EM service
//! (login, logout, deviceUserQuery, userDevicesQuery) or the EM application (the PIN
//! login).

use std::time::Instant;

use super::rules::{plan, Exchange, Plan};
use super::{EmAppClient, EmClient, EmRequest};
use crate::operation::{Credentials, Operation};

/// Makes the call `operation` needs at `stage`, never past `deadline`.
pub async fn exchange(
    em: &EmClient,
    emapp: &EmAppClient,
    operation: &Operation,
    stage: usize,
    credentials: &Credentials,
    deadline: Instant,
) -> Exchange {
    let devices = [operation.device().clone()];
    let request = match (plan(operation, stage), operation) {
        (Plan::EmAppLogin, Operation::PinLogin { device, user, pin }) => {
            return Exchange::EmApp(emapp.login(device, user, pin, deadline).await)
        }
        (
            Plan::EmLogin,
            Operation::Login { device, user } | Operation::ForceLogin { device, user, .. },
        ) => EmRequest::Login { device, user },
        (Plan::EmUserDevicesQuery, Operation::UserDevicesQuery { user, .. }) => {
            EmRequest::UserDevicesQuery { user }
        }
        (Plan::EmLogout, _) => EmRequest::Logout {
            device: &devices[0],
        },
        _ => EmRequest::DeviceUserQuery { devices: &devices },
    };
    Exchange::Em(em.call(request, credentials, deadline).await)
}
