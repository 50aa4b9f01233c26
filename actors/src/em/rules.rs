//! What one CUCM answer means: (operation, EM answer or call error) → (result for the
//! caller, what the cache learns). The actor only carries results around, and a rule
//! is tested without a clock or a socket. How an operation of several calls goes from
//! one to the next is [`super::steps`]'; the codes and their texts are [`super::code`].

use std::sync::Arc;

use super::client::{Answered, CallError};
use super::code::{self, cucm_message};
use super::codec::{DeviceState, EmResponse, UserState};
use super::emapp::PageAnswer;
use crate::operation::{DeviceName, OpError, Operation, Outcome, UserId};

/// What one call brought back.
#[derive(Debug, Clone)]
pub enum Exchange {
    Em(Result<Answered, CallError>),
    EmApp(Result<PageAnswer, CallError>),
}

/// CUCM compares user IDs without regard to case.
pub(crate) fn same_user(a: &UserId, b: &UserId) -> bool {
    a.as_str().to_lowercase() == b.as_str().to_lowercase()
}

pub(crate) fn wrong_exchange() -> Interpretation {
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
    pub(crate) fn refused(error: OpError) -> Self {
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
pub(crate) fn outcome_unknown(result: &Result<Outcome, OpError>) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::em::codec::DeviceUser;
    use crate::em::fixtures::{answered, cucm, device, failed, one_device, user};

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
        assert_eq!(user_query().device(), None);
        assert_eq!(
            user_query().queue_key(),
            crate::operation::QueueKey::User(user("em@cisco.com"))
        );
        assert!(!user_query().mutates());
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
    fn only_code_26_is_busy() {
        assert!(is_busy(&failed(Some(code::BUSY), "")));
        assert!(!is_busy(&failed(Some(25), "")));
        assert!(!is_busy(&answered(EmResponse::Success)));
        assert!(!is_busy(&Err(CallError::Unavailable("x".into()))));
    }
}
