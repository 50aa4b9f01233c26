//! From an operation's stage to the CUCM call that carries it out: the EM service
//! (login, logout, deviceUserQuery, userDevicesQuery) or the EM application (the PIN
//! login); and how that call ended, as far as the scheduler cares.

use std::time::{Duration, Instant};

use super::rules::{is_busy, Exchange};
use super::steps::{plan, Plan, Stage};
use super::{CallError, EmAppClient, EmClient, EmRequest};
use crate::operation::{Credentials, Operation};

/// How a CUCM call ended, as far as scheduling cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// CUCM answered after `took` (a busy answer is `busy`).
    Answered { took: Duration, busy: bool },
    /// No answer (refused, garbage): teaches nothing about CUCM's speed.
    NoAnswer,
    /// The call timed out: CUCM may still be working on it, so its slot stays taken
    /// for a further call timeout (see `Scheduler::hold_slots_after_timeout`).
    TimedOut,
}

/// Makes the call `operation` needs at `stage`, never past `deadline`.
pub async fn exchange(
    em: &EmClient,
    emapp: &EmAppClient,
    operation: &Operation,
    stage: &Stage,
    credentials: &Credentials,
    deadline: Instant,
) -> Exchange {
    let request = match (plan(operation, stage), operation) {
        (Plan::EmAppLogin, Operation::PinLogin { device, user, pin }) => {
            return Exchange::EmApp(emapp.login(device, user, pin, deadline).await)
        }
        (_, Operation::UserDevicesQuery { user }) => EmRequest::UserDevicesQuery { user },
        (
            Plan::EmLogin,
            Operation::Login { device, user } | Operation::ForceLogin { device, user },
        ) => EmRequest::Login { device, user },
        (
            plan,
            Operation::Login { device, .. }
            | Operation::PinLogin { device, .. }
            | Operation::ForceLogin { device, .. }
            | Operation::Logout { device }
            | Operation::Query { device },
        ) => match plan {
            Plan::EmLogout => EmRequest::Logout { device },
            _ => EmRequest::DeviceUserQuery {
                devices: std::slice::from_ref(device),
            },
        },
    };
    Exchange::Em(em.call(request, credentials, deadline).await)
}

/// How a call ended, for the scheduler: answered (busy or not), timed out (the client
/// used its whole budget: CUCM may still be working, so its slot stays taken), or no
/// answer for another reason.
pub fn call_end(exchange: &Exchange, took: Duration, budget: Duration) -> CallEnd {
    // A timer's granularity: a failure this close to the budget is its timeout.
    const TIMER_SLACK: Duration = Duration::from_millis(5);
    let (answered, busy, unavailable) = match exchange {
        Exchange::Em(result) => (
            result.is_ok(),
            is_busy(result),
            matches!(result, Err(CallError::Unavailable(_))),
        ),
        Exchange::EmApp(result) => (
            result.is_ok(),
            false,
            matches!(result, Err(CallError::Unavailable(_))),
        ),
    };
    if answered {
        CallEnd::Answered { took, busy }
    } else if unavailable && took + TIMER_SLACK >= budget {
        CallEnd::TimedOut
    } else {
        CallEnd::NoAnswer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::em::fixtures::{failed, page};

    #[test]
    fn a_failure_that_used_the_whole_budget_is_a_timeout() {
        let budget = Duration::from_secs(2);
        let down = || Exchange::Em(Err(CallError::Unavailable("x".into())));
        assert_eq!(call_end(&down(), budget, budget), CallEnd::TimedOut);
        assert_eq!(
            call_end(&down(), Duration::from_millis(30), budget),
            CallEnd::NoAnswer
        );
        let garbage = Exchange::Em(Err(CallError::InvalidResponse("x".into())));
        assert_eq!(call_end(&garbage, budget, budget), CallEnd::NoAnswer);
        let busy = Exchange::Em(failed(Some(26), ""));
        assert_eq!(
            call_end(&busy, Duration::from_millis(7), budget),
            CallEnd::Answered {
                took: Duration::from_millis(7),
                busy: true
            }
        );
        assert_eq!(
            call_end(&page(None), Duration::from_millis(7), budget),
            CallEnd::Answered {
                took: Duration::from_millis(7),
                busy: false
            }
        );
    }
}
