//! What a CUCM answer means: (operation, EM answer or call error) → (result for the
//! caller, what the cache learns). Every rule about CUCM's codes lives here, as named
//! constants, so the actor only carries results around and a rule is tested without a
//! clock or a socket.

use std::sync::Arc;
use std::time::Duration;

use super::client::{Answered, CallError};
use super::codec::{DeviceState, EmResponse, UserState};
use super::emapp::PageAnswer;
use crate::operation::{DeviceName, OpError, Operation, Outcome, UserId};
use crate::scheduler::CallEnd;

/// CUCM's EM service codes the gateway acts on.
pub mod code {
    /// Code 0 in a `<failure>` is no code at all: CUCM's own "Unknown Error".
    pub const UNKNOWN: u32 = 0;
    pub const INVALID_APP_USER: u32 = 3;
    pub const DEVICE_DOES_NOT_EXIST: u32 = 11;
    pub const ANOTHER_USER_LOGGED_IN: u32 = 18;
    pub const NO_USER_LOGGED_IN: u32 = 19;
    pub const USER_NOT_FOUND: u32 = 23;
    /// "Maximum Concurrent Requests" reached: retry later.
    pub const BUSY: u32 = 26;
    /// The codes an EM application page gives for a PIN that was not accepted: EMCC
    /// authentication error (the home cluster refused it), "please try to login again",
    /// and the local PIN check's refusal.
    pub const PIN_REJECTED: [u32; 3] = [2, 201, 204];
}

/// The CUCM call an operation makes at a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    EmLogin,
    EmLogout,
    EmQuery,
    /// The EM application's login with the PIN.
    EmAppLogin,
    EmUserDevicesQuery,
}

/// A login with a PIN makes three calls, all in the device's turn: who is on the
/// phone (with the caller's credentials, which EMApp does not check), the EMApp
/// login, and who is on the phone now.
pub fn plan(operation: &Operation, stage: usize) -> Plan {
    match (operation, stage) {
        (Operation::Login { .. }, _) => Plan::EmLogin,
        (Operation::Logout { .. }, _) => Plan::EmLogout,
        (Operation::Query { .. }, _) => Plan::EmQuery,
        (Operation::PinLogin { .. }, 1) => Plan::EmAppLogin,
        (Operation::PinLogin { .. }, _) => Plan::EmQuery,
        (Operation::UserDevicesQuery { .. }, _) => Plan::EmUserDevicesQuery,
        // A forced login: try, and on 18 see who is there, log them out, log in.
        (Operation::ForceLogin { .. }, 1) => Plan::EmQuery,
        (Operation::ForceLogin { .. }, 2) => Plan::EmLogout,
        (Operation::ForceLogin { .. }, _) => Plan::EmLogin,
    }
}

/// What one call brought back.
#[derive(Debug, Clone)]
pub enum Exchange {
    Em(Result<Answered, CallError>),
    EmApp(Result<PageAnswer, CallError>),
}

/// After a call: the operation is over, or its next stage must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Interpretation),
    NextStage,
    /// The next stage, and this user is the one a forced login logs out (the actor
    /// records it with [`displace`] so the answer can name them).
    Displacing(UserId),
}

/// Records in a forced login who it logs out.
pub fn displace(operation: &mut Operation, user: UserId) {
    if let Operation::ForceLogin { displaced, .. } = operation {
        *displaced = Some(user);
    }
}

/// A forced login, stage by stage: 0 the plain login; on 18, 1 who is on the phone;
/// 2 that user's logout (19, nobody any more, is as good); 3 the login again.
fn judge_forced(
    device: &DeviceName,
    user: &UserId,
    displaced: &Option<UserId>,
    stage: usize,
    exchange: Exchange,
) -> Verdict {
    let Exchange::Em(result) = exchange else {
        return Verdict::Done(wrong_exchange());
    };
    let as_login = Operation::Login {
        device: device.clone(),
        user: user.clone(),
    };
    match stage {
        0 => {
            let tried = interpret(&as_login, result);
            match &tried.result {
                Err(OpError::Cucm { code, .. }) if *code == code::ANOTHER_USER_LOGGED_IN => {
                    Verdict::NextStage
                }
                _ => Verdict::Done(tried),
            }
        }
        1 => {
            let seen = interpret(
                &Operation::Query {
                    device: device.clone(),
                },
                result,
            );
            match &seen.result {
                Ok(Outcome::CurrentUser(Some(current))) if same_user(current, user) => {
                    Verdict::Done(Interpretation {
                        result: Ok(Outcome::LoggedIn),
                        ..seen
                    })
                }
                Ok(Outcome::CurrentUser(Some(other))) => Verdict::Displacing(other.clone()),
                // Gone meanwhile: the logout will answer 19, which is as good.
                Ok(Outcome::CurrentUser(None)) => Verdict::NextStage,
                _ => Verdict::Done(seen),
            }
        }
        2 => {
            let logout = interpret(
                &Operation::Logout {
                    device: device.clone(),
                },
                result,
            );
            match &logout.result {
                Ok(_) => Verdict::NextStage,
                Err(OpError::Cucm { code, .. }) if *code == code::NO_USER_LOGGED_IN => {
                    Verdict::NextStage
                }
                _ => Verdict::Done(logout),
            }
        }
        _ => {
            let login = interpret(&as_login, result);
            match (&login.result, displaced) {
                (Ok(Outcome::LoggedIn), Some(previous)) => Verdict::Done(Interpretation {
                    result: Ok(Outcome::LoggedInReplacing(previous.clone())),
                    ..login
                }),
                _ => Verdict::Done(login),
            }
        }
    }
}

/// The meaning of a call made at `stage` of `operation`.
pub fn judge(operation: &Operation, stage: usize, exchange: Exchange) -> Verdict {
    match judge_stage(operation, stage, exchange) {
        Verdict::Done(mut meaning) => {
            if operation.mutates() && outcome_unknown(&meaning.result) {
                meaning.cache = CacheEffect::Forget;
            }
            Verdict::Done(meaning)
        }
        next => next,
    }
}

fn judge_stage(operation: &Operation, stage: usize, exchange: Exchange) -> Verdict {
    let (device, user) = match operation {
        Operation::PinLogin { device, user, .. } => (device, user),
        Operation::ForceLogin {
            device,
            user,
            displaced,
        } => return judge_forced(device, user, displaced, stage, exchange),
        _ => {
            return Verdict::Done(match exchange {
                Exchange::Em(result) => interpret(operation, result),
                Exchange::EmApp(_) => wrong_exchange(),
            })
        }
    };
    let as_query = Operation::Query {
        device: device.clone(),
    };
    match (stage, exchange) {
        (0, Exchange::Em(result)) => {
            let seen = interpret(&as_query, result);
            match &seen.result {
                // Nobody on the phone: on to the EM application.
                Ok(Outcome::CurrentUser(None)) => Verdict::NextStage,
                Ok(Outcome::CurrentUser(Some(current))) if same_user(current, user) => {
                    Verdict::Done(Interpretation {
                        result: Ok(Outcome::LoggedIn),
                        ..seen
                    })
                }
                Ok(_) => Verdict::Done(Interpretation {
                    result: Err(OpError::Cucm {
                        code: code::ANOTHER_USER_LOGGED_IN,
                        text: cucm_message(code::ANOTHER_USER_LOGGED_IN).into(),
                    }),
                    ..seen
                }),
                Err(_) => Verdict::Done(seen),
            }
        }
        (1, Exchange::EmApp(Ok(PageAnswer { code: None, .. }))) => Verdict::NextStage,
        (
            1,
            Exchange::EmApp(Ok(PageAnswer {
                code: Some(failed),
                node,
            })),
        ) => {
            let error = if code::PIN_REJECTED.contains(&failed) {
                OpError::PinRejected
            } else {
                OpError::Cucm {
                    code: failed,
                    text: emapp_message(failed).into(),
                }
            };
            Verdict::Done(Interpretation {
                result: Err(error),
                node: Some(node),
                cache: CacheEffect::Unchanged,
                credentials_accepted: false,
            })
        }
        (1, Exchange::EmApp(Err(error))) => Verdict::Done(interpret(&as_query, Err(error))),
        (2, Exchange::Em(result)) => {
            let seen = interpret(&as_query, result);
            match &seen.result {
                Ok(Outcome::CurrentUser(Some(current))) if same_user(current, user) => {
                    Verdict::Done(Interpretation {
                        result: Ok(Outcome::LoggedIn),
                        ..seen
                    })
                }
                Ok(_) => Verdict::Done(Interpretation {
                    result: Err(OpError::InvalidResponse {
                        detail: "the EM application reported no error, but the user is not \
                                 logged in on the device"
                            .into(),
                    }),
                    ..seen
                }),
                Err(_) => Verdict::Done(seen),
            }
        }
        _ => Verdict::Done(wrong_exchange()),
    }
}

/// The meaning of a call after which the operation must end (CUCM stayed busy and the
/// deadline leaves no room for a retry): a stage that would go on ends as a failure.
pub fn judge_last(operation: &Operation, stage: usize, exchange: Exchange) -> Interpretation {
    match judge(operation, stage, exchange) {
        Verdict::Done(meaning) => meaning,
        Verdict::NextStage | Verdict::Displacing(_) => {
            Interpretation::refused(OpError::Unavailable {
                reason: "no time left for the next step".into(),
            })
        }
    }
}

/// CUCM compares user IDs without regard to case.
fn same_user(a: &UserId, b: &UserId) -> bool {
    a.as_str().to_lowercase() == b.as_str().to_lowercase()
}

fn wrong_exchange() -> Interpretation {
    Interpretation::refused(OpError::InvalidResponse {
        detail: "an answer of the wrong kind for this step".into(),
    })
}

/// What the logged-in cache learns from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEffect {
    /// Nothing: the answer says nothing about who is on the device.
    Unchanged,
    /// Who is logged in on the device now (`None`: nobody).
    Set(Option<UserId>),
    /// Nobody knows: a login or logout may or may not have happened.
    Forget,
}

/// The meaning of one CUCM exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpretation {
    pub result: Result<Outcome, OpError>,
    /// The node that answered, when one did.
    pub node: Option<Arc<str>>,
    pub cache: CacheEffect,
    /// CUCM accepted the application user's credentials (a cache hit may then be
    /// served to them).
    pub credentials_accepted: bool,
}

impl Interpretation {
    fn refused(error: OpError) -> Self {
        Self {
            result: Err(error),
            node: None,
            cache: CacheEffect::Unchanged,
            credentials_accepted: false,
        }
    }
}

/// CUCM's answer (or the lack of one) → the caller's result and the cache effect.
pub fn interpret(operation: &Operation, result: Result<Answered, CallError>) -> Interpretation {
    let mut meaning = interpret_answer(operation, result);
    if operation.mutates() && outcome_unknown(&meaning.result) {
        meaning.cache = CacheEffect::Forget;
    }
    meaning
}

/// A failure after which a login or logout may have taken effect or not.
fn outcome_unknown(result: &Result<Outcome, OpError>) -> bool {
    matches!(
        result,
        Err(OpError::Unavailable { .. }
            | OpError::InvalidResponse { .. }
            | OpError::CucmUnknown { .. })
    )
}

/// Whether CUCM refused the application user's credentials.
pub fn refuses_credentials(result: &Result<Outcome, OpError>) -> bool {
    matches!(result, Err(OpError::Cucm { code, .. }) if *code == code::INVALID_APP_USER)
}

fn interpret_answer(operation: &Operation, result: Result<Answered, CallError>) -> Interpretation {
    let answered = match result {
        Ok(answered) => answered,
        Err(CallError::Unavailable(reason)) => {
            return Interpretation::refused(OpError::Unavailable { reason })
        }
        Err(CallError::InvalidResponse(detail)) => {
            return Interpretation::refused(OpError::InvalidResponse { detail })
        }
    };
    let (result, cache, credentials_accepted) = match (operation, answered.response) {
        (_, EmResponse::Failure { code, text }) => {
            // "No user logged in" is knowledge too (a logout of a free phone).
            let cache = if code == Some(code::NO_USER_LOGGED_IN) {
                CacheEffect::Set(None)
            } else {
                CacheEffect::Unchanged
            };
            (Err(failure(code, text)), cache, false)
        }
        (Operation::Login { user, .. }, EmResponse::Success) => (
            Ok(Outcome::LoggedIn),
            CacheEffect::Set(Some(user.clone())),
            true,
        ),
        (Operation::Logout { .. }, EmResponse::Success) => {
            (Ok(Outcome::LoggedOut), CacheEffect::Set(None), true)
        }
        (Operation::UserDevicesQuery { user, .. }, EmResponse::UserDevices(users)) => {
            let entry = match users.len() {
                1 => users.into_iter().next(),
                _ => users
                    .into_iter()
                    .find(|u| u.user.to_lowercase() == user.as_str().to_lowercase()),
            };
            match entry.map(|u| u.state) {
                Some(state) => user_state(state),
                None => (
                    Err(OpError::InvalidResponse {
                        detail: "userDevicesResults without the user asked for".into(),
                    }),
                    CacheEffect::Unchanged,
                    false,
                ),
            }
        }
        (Operation::Query { device }, EmResponse::DeviceUsers(devices)) => {
            let entry = match devices.len() {
                // One device asked, one answered: take it even if CUCM spelled the
                // name differently.
                1 => devices.into_iter().next(),
                _ => devices.into_iter().find(|d| d.device == device.as_str()),
            };
            match entry.map(|d| d.state) {
                Some(state) => query_state(state),
                None => (
                    Err(OpError::InvalidResponse {
                        detail: "deviceUserResults without the device asked for".into(),
                    }),
                    CacheEffect::Unchanged,
                    false,
                ),
            }
        }
        (_, response) => (
            Err(OpError::InvalidResponse {
                detail: format!("an answer of the wrong kind: {}", response_kind(&response)),
            }),
            CacheEffect::Unchanged,
            false,
        ),
    };
    Interpretation {
        result,
        node: Some(answered.node),
        cache,
        credentials_accepted,
    }
}

/// One device's entry in a `deviceUserResults`.
fn query_state(state: DeviceState) -> (Result<Outcome, OpError>, CacheEffect, bool) {
    match state {
        DeviceState::LoggedIn(user) => match UserId::parse(&user) {
            Ok(user) => (
                Ok(Outcome::CurrentUser(Some(user.clone()))),
                CacheEffect::Set(Some(user)),
                true,
            ),
            Err(_) => (
                Err(OpError::InvalidResponse {
                    detail: "CUCM named a user ID that is not valid".into(),
                }),
                CacheEffect::Unchanged,
                false,
            ),
        },
        DeviceState::Nobody => (Ok(Outcome::CurrentUser(None)), CacheEffect::Set(None), true),
        DeviceState::DoesNotExist => (
            Err(OpError::Cucm {
                code: code::DEVICE_DOES_NOT_EXIST,
                text: cucm_message(code::DEVICE_DOES_NOT_EXIST).into(),
            }),
            CacheEffect::Unchanged,
            false,
        ),
        DeviceState::Failure { code, text } => {
            (Err(failure(code, text)), CacheEffect::Unchanged, false)
        }
    }
}

/// What one `deviceUserQuery` for several devices means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    /// One meaning per device asked, in the order asked.
    PerDevice(Vec<Interpretation>),
    /// The cluster does not answer batches properly (a failure for the whole
    /// document, a device left out, another kind of answer): ask each device alone,
    /// and do not batch for this cluster again. The text says why, for the log.
    NotBatching(&'static str),
}

/// A batch's answer → each device's meaning, as if it had been asked alone. No answer
/// at all (timeout, refused, garbage) is each device's failure, like a single query's:
/// it says nothing about batching. Busy is the scheduler's, before this.
pub fn split_batch(devices: &[DeviceName], result: Result<Answered, CallError>) -> BatchAnswer {
    let answered = match result {
        Ok(answered) => answered,
        Err(error) => {
            return BatchAnswer::PerDevice(
                devices
                    .iter()
                    .map(|device| {
                        interpret(
                            &Operation::Query {
                                device: device.clone(),
                            },
                            Err(error.clone()),
                        )
                    })
                    .collect(),
            )
        }
    };
    let entries = match answered.response {
        EmResponse::DeviceUsers(entries) => entries,
        EmResponse::Failure { .. } => return BatchAnswer::NotBatching("a failure for the batch"),
        _ => return BatchAnswer::NotBatching("an answer of the wrong kind for the batch"),
    };
    let mut meanings = Vec::with_capacity(devices.len());
    for device in devices {
        let Some(entry) = entries.iter().find(|e| e.device == device.as_str()) else {
            return BatchAnswer::NotBatching("an answer without every device of the batch");
        };
        let alone = Answered {
            response: EmResponse::DeviceUsers(vec![entry.clone()]),
            node: answered.node.clone(),
        };
        meanings.push(interpret(
            &Operation::Query {
                device: device.clone(),
            },
            Ok(alone),
        ));
    }
    BatchAnswer::PerDevice(meanings)
}

/// One user's entry in a `userDevicesResults`. The cache (keyed by device) learns
/// nothing: the answer does not say who is on the devices the user is *not* on.
fn user_state(state: UserState) -> (Result<Outcome, OpError>, CacheEffect, bool) {
    match state {
        UserState::Devices(names) => {
            match names
                .iter()
                .map(|n| DeviceName::parse(n))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(devices) => (
                    Ok(Outcome::UserDevices {
                        devices,
                        unanswered: Vec::new(),
                    }),
                    CacheEffect::Unchanged,
                    true,
                ),
                Err(_) => (
                    Err(OpError::InvalidResponse {
                        detail: "CUCM named a device name that is not valid".into(),
                    }),
                    CacheEffect::Unchanged,
                    false,
                ),
            }
        }
        UserState::Nowhere => (
            Ok(Outcome::UserDevices {
                devices: Vec::new(),
                unanswered: Vec::new(),
            }),
            CacheEffect::Unchanged,
            true,
        ),
        UserState::DoesNotExist => (
            Err(OpError::Cucm {
                code: code::USER_NOT_FOUND,
                text: cucm_message(code::USER_NOT_FOUND).into(),
            }),
            CacheEffect::Unchanged,
            false,
        ),
        UserState::Failure { code, text } => {
            (Err(failure(code, text)), CacheEffect::Unchanged, false)
        }
    }
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

/// Whether CUCM answered "busy" (a retry later may succeed).
pub fn is_busy(result: &Result<Answered, CallError>) -> bool {
    matches!(
        result,
        Ok(Answered {
            response: EmResponse::Failure {
                code: Some(code::BUSY),
                ..
            },
            ..
        })
    )
}

/// A `<failure>`: its code passed through (CUCM's message when it sent no text), or
/// an unknown failure when the code is 0 or missing.
fn failure(code: Option<u32>, text: String) -> OpError {
    match code {
        Some(code) if code != code::UNKNOWN => OpError::Cucm {
            code,
            text: if text.is_empty() {
                cucm_message(code).to_string()
            } else {
                text
            },
        },
        _ => OpError::CucmUnknown { text },
    }
}

fn response_kind(response: &EmResponse) -> &'static str {
    match response {
        EmResponse::Success => "success",
        EmResponse::Failure { .. } => "failure",
        EmResponse::DeviceUsers(_) => "deviceUserResults",
        EmResponse::UserDevices(_) => "userDevicesResults",
    }
}

/// CUCM's message for an EM service code, for answers that carry a code without
/// text. The texts are those of Cisco's EM API developer guide.
pub fn cucm_message(code: u32) -> &'static str {
    match code {
        1 => "Error on Parsing",
        2 => "Cannot authorize App user",
        3 => "Invalid App User",
        4 => "Policy Validation error",
        5 => "Device logon disabled",
        6 => "Database Error",
        7 => "Logout Request Error",
        8 => "Query type undetermined",
        9 => "Dir. User Info Error",
        10 => "User lacks app proxy rights",
        11 => "Device does not exist",
        12 => "Dev. Profile not found",
        18 => "Another user logged in",
        19 => "No user logged in",
        20 => "Hoteling flag error",
        21 => "Hoteling Status error",
        22 => "Device logon disabled",
        23 => "User not found",
        25 => "User logged in elsewhere",
        26 => "Busy, please try again",
        27 => "Change Password",
        28 => "Untrusted IP Error",
        29 => "RIS down-contact admin",
        30 => "Proxy not allowed",
        31..=47 => "Extension Mobility Cross Cluster error",
        _ => "CUCM error",
    }
}

/// The EM application's message for a code shown on the phone (its own 201-216, or
/// an EM service code it passes on).
pub fn emapp_message(code: u32) -> &'static str {
    match code {
        201 => "EM application: please try to login again (EMCC not activated, or wrong PIN)",
        202 => "EM application: blank user ID or PIN",
        204 => "EM application: the PIN was rejected",
        207 => "EM application: device name missing",
        208 => "EM application: the cluster could not reach the user's home cluster",
        211 => "EM application: PSTN access not activated for EMCC",
        212 => "EM application: invalid cluster ID",
        213 => "EM application: the device does not support EMCC",
        215 => "EM application: invalid login type",
        216 => "EM application: the DN has multiple users",
        203 | 205 | 206 | 209 | 210 | 214 => "EM application error",
        other => cucm_message(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::em::codec::DeviceUser;
    use crate::operation::DeviceName;

    fn device() -> DeviceName {
        DeviceName::parse("SEP1").unwrap()
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn login() -> Operation {
        Operation::Login {
            device: device(),
            user: user("alice"),
        }
    }

    fn logout() -> Operation {
        Operation::Logout { device: device() }
    }

    fn query() -> Operation {
        Operation::Query { device: device() }
    }

    fn answered(response: EmResponse) -> Result<Answered, CallError> {
        Ok(Answered {
            response,
            node: Arc::from("cucm-1:8443"),
        })
    }

    fn failed(code: Option<u32>, text: &str) -> Result<Answered, CallError> {
        answered(EmResponse::Failure {
            code,
            text: text.into(),
        })
    }

    fn one_device(name: &str, state: DeviceState) -> Result<Answered, CallError> {
        answered(EmResponse::DeviceUsers(vec![DeviceUser {
            device: name.into(),
            state,
        }]))
    }

    fn cucm(code: u32, text: &str) -> Result<Outcome, OpError> {
        Err(OpError::Cucm {
            code,
            text: text.into(),
        })
    }

    type Row = (
        &'static str,
        Operation,
        Result<Answered, CallError>,
        Result<Outcome, OpError>,
        CacheEffect,
        bool,
    );

    /// One row per rule: operation, what came back, what the caller gets, the cache
    /// effect, whether the credentials count as accepted.
    #[test]
    fn every_code_rule() {
        use CacheEffect::{Forget, Set, Unchanged};
        let rows: Vec<Row> = vec![
            (
                "login ok",
                login(),
                answered(EmResponse::Success),
                Ok(Outcome::LoggedIn),
                Set(Some(user("alice"))),
                true,
            ),
            (
                "logout ok",
                logout(),
                answered(EmResponse::Success),
                Ok(Outcome::LoggedOut),
                Set(None),
                true,
            ),
            (
                "3 bad app user",
                login(),
                failed(Some(3), "Invalid App User"),
                cucm(3, "Invalid App User"),
                Unchanged,
                false,
            ),
            (
                "11 no device",
                login(),
                failed(Some(11), ""),
                cucm(11, "Device does not exist"),
                Unchanged,
                false,
            ),
            (
                "18 occupied",
                login(),
                failed(Some(18), "Another user logged in"),
                cucm(18, "Another user logged in"),
                Unchanged,
                false,
            ),
            (
                "19 nobody on logout",
                logout(),
                failed(Some(19), "No user logged in"),
                cucm(19, "No user logged in"),
                Set(None),
                false,
            ),
            (
                "23 unknown user",
                login(),
                failed(Some(23), ""),
                cucm(23, "User not found"),
                Unchanged,
                false,
            ),
            (
                "25 elsewhere",
                login(),
                failed(Some(25), "x"),
                cucm(25, "x"),
                Unchanged,
                false,
            ),
            (
                "26 busy passes when not retried",
                login(),
                failed(Some(26), ""),
                cucm(26, "Busy, please try again"),
                Unchanged,
                false,
            ),
            (
                "0 is no code",
                login(),
                failed(Some(0), "Unknown Error"),
                Err(OpError::CucmUnknown {
                    text: "Unknown Error".into(),
                }),
                Forget,
                false,
            ),
            (
                "missing code",
                logout(),
                failed(None, "odd"),
                Err(OpError::CucmUnknown { text: "odd".into() }),
                Forget,
                false,
            ),
            (
                "query someone",
                query(),
                one_device("SEP1", DeviceState::LoggedIn("bob".into())),
                Ok(Outcome::CurrentUser(Some(user("bob")))),
                Set(Some(user("bob"))),
                true,
            ),
            (
                "query other spelling",
                query(),
                one_device("sep1", DeviceState::Nobody),
                Ok(Outcome::CurrentUser(None)),
                Set(None),
                true,
            ),
            (
                "query no device",
                query(),
                one_device("SEP1", DeviceState::DoesNotExist),
                cucm(11, "Device does not exist"),
                Unchanged,
                false,
            ),
            (
                "query per-device failure",
                query(),
                one_device(
                    "SEP1",
                    DeviceState::Failure {
                        code: Some(3),
                        text: String::new(),
                    },
                ),
                cucm(3, "Invalid App User"),
                Unchanged,
                false,
            ),
            (
                "query invalid user",
                query(),
                one_device("SEP1", DeviceState::LoggedIn("a\u{1}b".into())),
                Err(OpError::InvalidResponse {
                    detail: "CUCM named a user ID that is not valid".into(),
                }),
                Unchanged,
                false,
            ),
            (
                "query whole failure",
                query(),
                failed(Some(19), ""),
                cucm(19, "No user logged in"),
                Set(None),
                false,
            ),
            (
                "login answered with results",
                login(),
                one_device("SEP1", DeviceState::Nobody),
                Err(OpError::InvalidResponse {
                    detail: "an answer of the wrong kind: deviceUserResults".into(),
                }),
                Forget,
                false,
            ),
            (
                "query answered success",
                query(),
                answered(EmResponse::Success),
                Err(OpError::InvalidResponse {
                    detail: "an answer of the wrong kind: success".into(),
                }),
                Unchanged,
                false,
            ),
            (
                "unavailable",
                login(),
                Err(CallError::Unavailable("down".into())),
                Err(OpError::Unavailable {
                    reason: "down".into(),
                }),
                Forget,
                false,
            ),
            (
                "query unavailable",
                query(),
                Err(CallError::Unavailable("down".into())),
                Err(OpError::Unavailable {
                    reason: "down".into(),
                }),
                Unchanged,
                false,
            ),
            (
                "garbage",
                query(),
                Err(CallError::InvalidResponse("junk".into())),
                Err(OpError::InvalidResponse {
                    detail: "junk".into(),
                }),
                Unchanged,
                false,
            ),
        ];
        for (name, operation, result, expected, cache, accepted) in rows {
            let called = result.is_ok();
            let meaning = interpret(&operation, result);
            assert_eq!(meaning.result, expected, "{name}");
            assert_eq!(meaning.cache, cache, "{name}");
            assert_eq!(meaning.credentials_accepted, accepted, "{name}");
            assert_eq!(meaning.node.is_some(), called, "{name}");
        }
    }

    #[test]
    fn several_devices_answered_are_matched_by_name() {
        let result = answered(EmResponse::DeviceUsers(vec![
            DeviceUser {
                device: "SEP9".into(),
                state: DeviceState::LoggedIn("x".into()),
            },
            DeviceUser {
                device: "SEP1".into(),
                state: DeviceState::Nobody,
            },
        ]));
        assert_eq!(
            interpret(&query(), result).result,
            Ok(Outcome::CurrentUser(None))
        );
        let missing = answered(EmResponse::DeviceUsers(vec![]));
        assert!(matches!(
            interpret(&query(), missing).result,
            Err(OpError::InvalidResponse { .. })
        ));
    }

    fn pin_login() -> Operation {
        Operation::PinLogin {
            device: device(),
            user: user("alice"),
            pin: crate::operation::Pin::parse("1234").unwrap(),
        }
    }

    fn page(code: Option<u32>) -> Exchange {
        Exchange::EmApp(Ok(PageAnswer {
            code,
            node: Arc::from("cucm-1:8443"),
        }))
    }

    fn done(verdict: Verdict) -> Interpretation {
        match verdict {
            Verdict::Done(meaning) => meaning,
            other => panic!("expected the operation to be over, got {other:?}"),
        }
    }

    #[test]
    fn a_pin_login_runs_three_stages() {
        let op = pin_login();
        assert_eq!(
            [plan(&op, 0), plan(&op, 1), plan(&op, 2)],
            [Plan::EmQuery, Plan::EmAppLogin, Plan::EmQuery]
        );
        let nobody = Exchange::Em(one_device("SEP1", DeviceState::Nobody));
        assert_eq!(judge(&op, 0, nobody), Verdict::NextStage);
        assert_eq!(judge(&op, 1, page(None)), Verdict::NextStage);
        let confirmed = done(judge(
            &op,
            2,
            Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("Alice".into()))),
        ));
        assert_eq!(confirmed.result, Ok(Outcome::LoggedIn));
        assert_eq!(confirmed.cache, CacheEffect::Set(Some(user("Alice"))));
        assert!(confirmed.credentials_accepted);
    }

    /// One row per rule of the first and last stage, and per EMApp code.
    #[test]
    fn every_pin_login_rule() {
        let op = pin_login();
        let rows: Vec<(&str, usize, Exchange, Result<Outcome, OpError>)> = vec![
            ("already on: nothing else sent", 0, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("alice".into()))), Ok(Outcome::LoggedIn)),
            ("another user: 18, no EMApp", 0, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into()))), cucm(18, "Another user logged in")),
            ("bad app user: 3, no EMApp", 0, Exchange::Em(failed(Some(3), "Invalid App User")), cucm(3, "Invalid App User")),
            ("no device: 11, no EMApp", 0, Exchange::Em(one_device("SEP1", DeviceState::DoesNotExist)), cucm(11, "Device does not exist")),
            ("visitor PIN refused at home", 1, page(Some(2)), Err(OpError::PinRejected)),
            ("try again", 1, page(Some(201)), Err(OpError::PinRejected)),
            ("local PIN refused", 1, page(Some(204)), Err(OpError::PinRejected)),
            ("unknown everywhere passes", 1, page(Some(23)), cucm(23, "User not found")),
            ("home unreachable passes", 1, page(Some(208)), cucm(208, "EM application: the cluster could not reach the user's home cluster")),
            ("EMApp unreachable", 1, Exchange::EmApp(Err(CallError::Unavailable("refused".into()))), Err(OpError::Unavailable { reason: "refused".into() })),
            ("not logged in after all", 2, Exchange::Em(one_device("SEP1", DeviceState::Nobody)), Err(OpError::InvalidResponse { detail: "the EM application reported no error, but the user is not logged in on the device".into() })),
            ("someone else after all", 2, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into()))), Err(OpError::InvalidResponse { detail: "the EM application reported no error, but the user is not logged in on the device".into() })),
            ("wrong kind", 1, Exchange::Em(answered(EmResponse::Success)), Err(OpError::InvalidResponse { detail: "an answer of the wrong kind for this step".into() })),
        ];
        for (name, stage, exchange, expected) in rows {
            assert_eq!(done(judge(&op, stage, exchange)).result, expected, "{name}");
        }
    }

    #[test]
    fn a_pin_login_that_may_have_happened_forgets_the_device() {
        let op = pin_login();
        let lost = Exchange::EmApp(Err(CallError::Unavailable("timed out".into())));
        assert_eq!(done(judge(&op, 1, lost)).cache, CacheEffect::Forget);
        assert_eq!(
            done(judge(&op, 1, page(Some(204)))).cache,
            CacheEffect::Unchanged
        );
        assert!(refuses_credentials(&cucm(3, "Invalid App User")));
        assert!(!refuses_credentials(&cucm(18, "x")));
    }

    #[test]
    fn plain_operations_are_judged_by_the_em_rules() {
        let meaning = done(judge(
            &login(),
            0,
            Exchange::Em(answered(EmResponse::Success)),
        ));
        assert_eq!(meaning.result, Ok(Outcome::LoggedIn));
        assert_eq!(plan(&logout(), 0), Plan::EmLogout);
    }

    fn user_query() -> Operation {
        Operation::user_devices(user("em@cisco.com"))
    }

    fn user_answer(id: &str, state: UserState) -> Result<Answered, CallError> {
        answered(EmResponse::UserDevices(vec![
            crate::em::codec::UserDevices {
                user: id.into(),
                state,
            },
        ]))
    }

    #[test]
    fn every_user_devices_rule() {
        type UserRow = (
            &'static str,
            Result<Answered, CallError>,
            Result<Outcome, OpError>,
        );
        let rows: Vec<UserRow> = vec![
            (
                "two devices",
                user_answer(
                    "em@cisco.com",
                    UserState::Devices(vec!["SEP1".into(), "SEP2".into()]),
                ),
                Ok(Outcome::UserDevices {
                    devices: vec![device(), DeviceName::parse("SEP2").unwrap()],
                    unanswered: vec![],
                }),
            ),
            (
                "nowhere",
                user_answer("em@cisco.com", UserState::Nowhere),
                Ok(Outcome::UserDevices {
                    devices: vec![],
                    unanswered: vec![],
                }),
            ),
            (
                "unknown user: 23",
                user_answer("em@cisco.com", UserState::DoesNotExist),
                cucm(23, "User not found"),
            ),
            (
                "invalid device name",
                user_answer("x", UserState::Devices(vec!["SEP 1".into()])),
                Err(OpError::InvalidResponse {
                    detail: "CUCM named a device name that is not valid".into(),
                }),
            ),
            (
                "whole failure",
                failed(Some(3), "bad app"),
                cucm(3, "bad app"),
            ),
            (
                "wrong kind",
                one_device("SEP1", DeviceState::Nobody),
                Err(OpError::InvalidResponse {
                    detail: "an answer of the wrong kind: deviceUserResults".into(),
                }),
            ),
            (
                "no entry",
                answered(EmResponse::UserDevices(vec![])),
                Err(OpError::InvalidResponse {
                    detail: "userDevicesResults without the user asked for".into(),
                }),
            ),
        ];
        for (name, result, expected) in rows {
            let meaning = interpret(&user_query(), result);
            assert_eq!(meaning.result, expected, "{name}");
            assert_eq!(meaning.cache, CacheEffect::Unchanged, "{name}");
        }
        assert_eq!(plan(&user_query(), 0), Plan::EmUserDevicesQuery);
        assert_eq!(user_query().device().as_str(), "@em@cisco.com");
        assert!(!user_query().mutates());
    }

    fn forced() -> Operation {
        Operation::ForceLogin {
            device: device(),
            user: user("alice"),
            displaced: None,
        }
    }

    #[test]
    fn a_forced_login_logs_the_other_user_out_first() {
        let mut op = forced();
        let plans: Vec<Plan> = (0..4).map(|stage| plan(&op, stage)).collect();
        assert_eq!(
            plans,
            [Plan::EmLogin, Plan::EmQuery, Plan::EmLogout, Plan::EmLogin]
        );
        // Free phone: one call, like a plain login.
        let meaning = done(judge(&op, 0, Exchange::Em(answered(EmResponse::Success))));
        assert_eq!(meaning.result, Ok(Outcome::LoggedIn));
        assert_eq!(meaning.cache, CacheEffect::Set(Some(user("alice"))));
        // 18: see who, log them out, log in; the answer names them.
        assert_eq!(
            judge(
                &op,
                0,
                Exchange::Em(failed(Some(18), "Another user logged in"))
            ),
            Verdict::NextStage
        );
        let bob = Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into())));
        let Verdict::Displacing(who) = judge(&op, 1, bob) else {
            panic!("expected bob to be displaced");
        };
        assert_eq!(who, user("bob"));
        displace(&mut op, who);
        assert_eq!(
            judge(&op, 2, Exchange::Em(answered(EmResponse::Success))),
            Verdict::NextStage
        );
        let meaning = done(judge(&op, 3, Exchange::Em(answered(EmResponse::Success))));
        assert_eq!(meaning.result, Ok(Outcome::LoggedInReplacing(user("bob"))));
        assert_eq!(meaning.cache, CacheEffect::Set(Some(user("alice"))));
    }

    #[test]
    fn every_forced_login_rule() {
        let op = forced();
        /// `None`: the operation goes on to its next stage.
        type ForcedRow = (
            &'static str,
            usize,
            Exchange,
            Option<Result<Outcome, OpError>>,
        );
        let rows: Vec<ForcedRow> = vec![
            (
                "other failure ends it",
                0,
                Exchange::Em(failed(Some(23), "")),
                Some(cucm(23, "User not found")),
            ),
            (
                "already the user",
                1,
                Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("ALICE".into()))),
                Some(Ok(Outcome::LoggedIn)),
            ),
            (
                "gone meanwhile: go on",
                1,
                Exchange::Em(one_device("SEP1", DeviceState::Nobody)),
                None,
            ),
            (
                "query fails",
                1,
                Exchange::Em(failed(Some(3), "x")),
                Some(cucm(3, "x")),
            ),
            (
                "logout 19 is fine",
                2,
                Exchange::Em(failed(Some(19), "")),
                None,
            ),
            (
                "logout fails",
                2,
                Exchange::Em(failed(Some(6), "db")),
                Some(cucm(6, "db")),
            ),
            (
                "login again 18",
                3,
                Exchange::Em(failed(Some(18), "again")),
                Some(cucm(18, "again")),
            ),
            (
                "no displaced user: plain success",
                3,
                Exchange::Em(answered(EmResponse::Success)),
                Some(Ok(Outcome::LoggedIn)),
            ),
            (
                "EMApp never",
                0,
                page(None),
                Some(Err(OpError::InvalidResponse {
                    detail: "an answer of the wrong kind for this step".into(),
                })),
            ),
        ];
        for (name, stage, exchange, expected) in rows {
            match (judge(&op, stage, exchange), expected) {
                (Verdict::Done(meaning), Some(expected)) => {
                    assert_eq!(meaning.result, expected, "{name}")
                }
                (Verdict::NextStage, None) => {}
                (other, expected) => panic!("{name}: {other:?} vs {expected:?}"),
            }
        }
    }

    #[test]
    fn a_batch_answer_is_split_per_device() {
        let devices = [device(), DeviceName::parse("SEP2").unwrap()];
        let entry = |name: &str, state: DeviceState| DeviceUser {
            device: name.into(),
            state,
        };
        let both = answered(EmResponse::DeviceUsers(vec![
            entry("SEP2", DeviceState::LoggedIn("bob".into())),
            entry("SEP1", DeviceState::Nobody),
        ]));
        let BatchAnswer::PerDevice(meanings) = split_batch(&devices, both) else {
            panic!("a full answer splits");
        };
        assert_eq!(meanings[0].result, Ok(Outcome::CurrentUser(None)));
        assert_eq!(meanings[0].cache, CacheEffect::Set(None));
        assert_eq!(
            meanings[1].result,
            Ok(Outcome::CurrentUser(Some(user("bob"))))
        );
        assert!(meanings.iter().all(|m| m.node.is_some()));
        // A device's own failure inside the results is that device's answer.
        let one_unknown = answered(EmResponse::DeviceUsers(vec![
            entry("SEP1", DeviceState::DoesNotExist),
            entry("SEP2", DeviceState::Nobody),
        ]));
        let BatchAnswer::PerDevice(meanings) = split_batch(&devices, one_unknown) else {
            panic!("per-device states split");
        };
        assert_eq!(meanings[0].result, cucm(11, "Device does not exist"));
        // Not batching: only the first device answered, a failure, another kind.
        let rows = [
            answered(EmResponse::DeviceUsers(vec![entry(
                "SEP1",
                DeviceState::Nobody,
            )])),
            failed(Some(1), "Error on Parsing"),
            answered(EmResponse::Success),
        ];
        for result in rows {
            assert!(matches!(
                split_batch(&devices, result),
                BatchAnswer::NotBatching(_)
            ));
        }
        // No answer at all: every device fails as it would alone.
        let BatchAnswer::PerDevice(meanings) =
            split_batch(&devices, Err(CallError::Unavailable("down".into())))
        else {
            panic!("no answer is each device's failure");
        };
        assert_eq!(meanings.len(), 2);
        assert!(meanings
            .iter()
            .all(|m| matches!(m.result, Err(OpError::Unavailable { .. }))));
    }

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

    #[test]
    fn only_code_26_is_busy() {
        assert!(is_busy(&failed(Some(code::BUSY), "")));
        assert!(!is_busy(&failed(Some(25), "")));
        assert!(!is_busy(&answered(EmResponse::Success)));
        assert!(!is_busy(&Err(CallError::Unavailable("x".into()))));
    }

    #[test]
    fn every_documented_code_has_its_message() {
        assert_eq!(cucm_message(code::BUSY), "Busy, please try again");
        assert_eq!(cucm_message(40), "Extension Mobility Cross Cluster error");
        assert_eq!(cucm_message(999), "CUCM error");
    }
}
