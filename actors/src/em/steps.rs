//! How an operation steps through its CUCM calls. Most operations make one call; a
//! login with a PIN and a forced login make several, all in the device's turn. Each
//! of those has an enum of its stages, and a stage carries what the earlier calls
//! taught it (whom a forced login logs out), so the actor only hands the next stage
//! back to the scheduler. What one answer means is [`super::rules`]'.

use super::code;
use super::emapp::PageAnswer;
use super::rules::{
    interpret, outcome_unknown, same_user, wrong_exchange, CacheEffect, Exchange, Interpretation,
};
use crate::operation::{DeviceName, OpError, Operation, Outcome, UserId};

/// Where an operation stands: the call it makes next, and what it has learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// The one call of a login, logout, device query or user query.
    Single,
    Pin(PinStage),
    Forced(ForcedStage),
}

/// A login with a PIN: who is on the phone (with the caller's credentials, which
/// the EM application does not check), the EM application's login, and who is on
/// the phone now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinStage {
    /// Nobody may be on the phone, and the credentials must be good.
    CheckPhone,
    /// The EM application's login with the PIN.
    EmAppLogin,
    /// The EM application's page alone does not prove the login: the phone does.
    Confirm,
}

/// A forced login: the plain login; on CUCM's 18 (another user), who is on the
/// phone, that user's logout, and the login again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForcedStage {
    Login,
    WhoIsOn,
    /// The logout of whoever is on the phone (`None`: nobody any more, and CUCM's 19
    /// for this logout is as good as a success).
    LogOut {
        displaced: Option<UserId>,
    },
    /// The login again; the answer names the user it displaced.
    LogInAgain {
        displaced: Option<UserId>,
    },
}

impl Stage {
    /// The stage an operation starts at.
    pub fn first(operation: &Operation) -> Self {
        match operation {
            Operation::PinLogin { .. } => Stage::Pin(PinStage::CheckPhone),
            Operation::ForceLogin { .. } => Stage::Forced(ForcedStage::Login),
            _ => Stage::Single,
        }
    }
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

pub fn plan(operation: &Operation, stage: &Stage) -> Plan {
    match (stage, operation) {
        (Stage::Pin(PinStage::EmAppLogin), _) => Plan::EmAppLogin,
        (Stage::Pin(_) | Stage::Forced(ForcedStage::WhoIsOn), _) => Plan::EmQuery,
        (Stage::Forced(ForcedStage::LogOut { .. }), _) => Plan::EmLogout,
        (Stage::Forced(_), _) => Plan::EmLogin,
        (Stage::Single, Operation::Login { .. } | Operation::ForceLogin { .. }) => Plan::EmLogin,
        (Stage::Single, Operation::Logout { .. }) => Plan::EmLogout,
        (Stage::Single, Operation::Query { .. } | Operation::PinLogin { .. }) => Plan::EmQuery,
        (Stage::Single, Operation::UserDevicesQuery { .. }) => Plan::EmUserDevicesQuery,
    }
}

/// After a call: the operation is over, or it goes on at this stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Interpretation),
    Next(Stage),
}

/// The meaning of a call made at `stage` of `operation`.
pub fn judge(operation: &Operation, stage: &Stage, exchange: Exchange) -> Verdict {
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

/// The meaning of a call after which the operation must end (CUCM stayed busy and the
/// deadline leaves no room for a retry): a stage that would go on ends as a failure.
pub fn judge_last(operation: &Operation, stage: &Stage, exchange: Exchange) -> Interpretation {
    match judge(operation, stage, exchange) {
        Verdict::Done(meaning) => meaning,
        Verdict::Next(_) => Interpretation::refused(OpError::Unavailable {
            reason: "no time left for the next step".into(),
        }),
    }
}

fn judge_stage(operation: &Operation, stage: &Stage, exchange: Exchange) -> Verdict {
    match (operation, stage) {
        (Operation::PinLogin { device, user, .. }, Stage::Pin(stage)) => {
            judge_pin(device, user, *stage, exchange)
        }
        (Operation::ForceLogin { device, user }, Stage::Forced(stage)) => {
            judge_forced(device, user, stage, exchange)
        }
        (Operation::PinLogin { .. } | Operation::ForceLogin { .. }, _) => {
            Verdict::Done(wrong_exchange())
        }
        (_, _) => Verdict::Done(match exchange {
            Exchange::Em(result) => interpret(operation, result),
            Exchange::EmApp(_) => wrong_exchange(),
        }),
    }
}

fn judge_pin(device: &DeviceName, user: &UserId, stage: PinStage, exchange: Exchange) -> Verdict {
    let as_query = Operation::Query {
        device: device.clone(),
    };
    match (stage, exchange) {
        (PinStage::CheckPhone, Exchange::Em(result)) => {
            let seen = interpret(&as_query, result);
            match &seen.result {
                // Nobody on the phone: on to the EM application.
                Ok(Outcome::CurrentUser(None)) => Verdict::Next(Stage::Pin(PinStage::EmAppLogin)),
                Ok(Outcome::CurrentUser(Some(current))) if same_user(current, user) => {
                    Verdict::Done(Interpretation {
                        result: Ok(Outcome::LoggedIn),
                        ..seen
                    })
                }
                Ok(_) => Verdict::Done(Interpretation {
                    result: Err(OpError::Cucm {
                        code: code::ANOTHER_USER_LOGGED_IN,
                        text: code::cucm_message(code::ANOTHER_USER_LOGGED_IN).into(),
                    }),
                    ..seen
                }),
                Err(_) => Verdict::Done(seen),
            }
        }
        (PinStage::EmAppLogin, Exchange::EmApp(Ok(PageAnswer { code: None, .. }))) => {
            Verdict::Next(Stage::Pin(PinStage::Confirm))
        }
        (
            PinStage::EmAppLogin,
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
                    text: code::emapp_message(failed).into(),
                }
            };
            Verdict::Done(Interpretation {
                result: Err(error),
                node: Some(node),
                cache: CacheEffect::Unchanged,
                credentials_accepted: false,
            })
        }
        (PinStage::EmAppLogin, Exchange::EmApp(Err(error))) => {
            Verdict::Done(interpret(&as_query, Err(error)))
        }
        (PinStage::Confirm, Exchange::Em(result)) => {
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

fn judge_forced(
    device: &DeviceName,
    user: &UserId,
    stage: &ForcedStage,
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
        ForcedStage::Login => {
            let tried = interpret(&as_login, result);
            match &tried.result {
                Err(OpError::Cucm { code, .. }) if *code == code::ANOTHER_USER_LOGGED_IN => {
                    Verdict::Next(Stage::Forced(ForcedStage::WhoIsOn))
                }
                _ => Verdict::Done(tried),
            }
        }
        ForcedStage::WhoIsOn => {
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
                Ok(Outcome::CurrentUser(other)) => {
                    // Gone meanwhile (`None`): the logout will answer 19, as good.
                    Verdict::Next(Stage::Forced(ForcedStage::LogOut {
                        displaced: other.clone(),
                    }))
                }
                _ => Verdict::Done(seen),
            }
        }
        ForcedStage::LogOut { displaced } => {
            let logout = interpret(
                &Operation::Logout {
                    device: device.clone(),
                },
                result,
            );
            match &logout.result {
                Ok(_) => {}
                Err(OpError::Cucm { code, .. }) if *code == code::NO_USER_LOGGED_IN => {}
                _ => return Verdict::Done(logout),
            }
            Verdict::Next(Stage::Forced(ForcedStage::LogInAgain {
                displaced: displaced.clone(),
            }))
        }
        ForcedStage::LogInAgain { displaced } => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::em::client::CallError;
    use crate::em::codec::{DeviceState, EmResponse};
    use crate::em::fixtures::{answered, cucm, device, failed, one_device, page, user};
    use crate::em::rules::refuses_credentials;

    fn pin_login() -> Operation {
        Operation::PinLogin {
            device: device(),
            user: user("alice"),
            pin: crate::operation::Pin::parse("1234").unwrap(),
        }
    }

    fn done(verdict: Verdict) -> Interpretation {
        match verdict {
            Verdict::Done(meaning) => meaning,
            other => panic!("expected the operation to be over, got {other:?}"),
        }
    }

    const CHECK: Stage = Stage::Pin(PinStage::CheckPhone);
    const EMAPP: Stage = Stage::Pin(PinStage::EmAppLogin);
    const CONFIRM: Stage = Stage::Pin(PinStage::Confirm);

    #[test]
    fn a_pin_login_runs_three_stages() {
        let op = pin_login();
        assert_eq!(Stage::first(&op), CHECK);
        assert_eq!(
            [plan(&op, &CHECK), plan(&op, &EMAPP), plan(&op, &CONFIRM)],
            [Plan::EmQuery, Plan::EmAppLogin, Plan::EmQuery]
        );
        let nobody = Exchange::Em(one_device("SEP1", DeviceState::Nobody));
        assert_eq!(judge(&op, &CHECK, nobody), Verdict::Next(EMAPP));
        assert_eq!(judge(&op, &EMAPP, page(None)), Verdict::Next(CONFIRM));
        let confirmed = done(judge(
            &op,
            &CONFIRM,
            Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("Alice".into()))),
        ));
        assert_eq!(confirmed.result, Ok(Outcome::LoggedIn));
        assert_eq!(confirmed.cache, CacheEffect::Set(Some(user("Alice"))));
        assert!(confirmed.credentials_accepted);
    }

    /// One row per rule of the first and last stage, and per EMApp code.
    #[test]
    #[rustfmt::skip]
    fn every_pin_login_rule() {
        let op = pin_login();
        let rows: Vec<(&str, Stage, Exchange, Result<Outcome, OpError>)> = vec![
            ("already on: nothing else sent", CHECK, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("alice".into()))), Ok(Outcome::LoggedIn)),
            ("another user: 18, no EMApp", CHECK, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into()))), cucm(18, "Another user logged in")),
            ("bad app user: 3, no EMApp", CHECK, Exchange::Em(failed(Some(3), "Invalid App User")), cucm(3, "Invalid App User")),
            ("no device: 11, no EMApp", CHECK, Exchange::Em(one_device("SEP1", DeviceState::DoesNotExist)), cucm(11, "Device does not exist")),
            ("visitor PIN refused at home", EMAPP, page(Some(2)), Err(OpError::PinRejected)),
            ("try again", EMAPP, page(Some(201)), Err(OpError::PinRejected)),
            ("local PIN refused", EMAPP, page(Some(204)), Err(OpError::PinRejected)),
            ("unknown everywhere passes", EMAPP, page(Some(23)), cucm(23, "User not found")),
            ("home unreachable passes", EMAPP, page(Some(208)), cucm(208, "EM application: the cluster could not reach the user's home cluster")),
            ("EMApp unreachable", EMAPP, Exchange::EmApp(Err(CallError::Unavailable("refused".into()))), Err(OpError::Unavailable { reason: "refused".into() })),
            ("not logged in after all", CONFIRM, Exchange::Em(one_device("SEP1", DeviceState::Nobody)), Err(OpError::InvalidResponse { detail: "the EM application reported no error, but the user is not logged in on the device".into() })),
            ("someone else after all", CONFIRM, Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into()))), Err(OpError::InvalidResponse { detail: "the EM application reported no error, but the user is not logged in on the device".into() })),
            ("wrong kind", EMAPP, Exchange::Em(answered(EmResponse::Success)), Err(OpError::InvalidResponse { detail: "an answer of the wrong kind for this step".into() })),
            ("a stage of another operation", Stage::Single, page(None), Err(OpError::InvalidResponse { detail: "an answer of the wrong kind for this step".into() })),
        ];
        for (name, stage, exchange, expected) in rows {
            assert_eq!(done(judge(&op, &stage, exchange)).result, expected, "{name}");
        }
    }

    #[test]
    fn a_pin_login_that_may_have_happened_forgets_the_device() {
        let op = pin_login();
        let lost = Exchange::EmApp(Err(CallError::Unavailable("timed out".into())));
        assert_eq!(done(judge(&op, &EMAPP, lost)).cache, CacheEffect::Forget);
        assert_eq!(
            done(judge(&op, &EMAPP, page(Some(204)))).cache,
            CacheEffect::Unchanged
        );
        assert!(refuses_credentials(&cucm(3, "Invalid App User")));
        assert!(!refuses_credentials(&cucm(18, "x")));
    }

    #[test]
    fn plain_operations_are_judged_by_the_em_rules() {
        let login = Operation::Login {
            device: device(),
            user: user("alice"),
        };
        assert_eq!(Stage::first(&login), Stage::Single);
        let meaning = done(judge(
            &login,
            &Stage::Single,
            Exchange::Em(answered(EmResponse::Success)),
        ));
        assert_eq!(meaning.result, Ok(Outcome::LoggedIn));
        let logout = Operation::Logout { device: device() };
        assert_eq!(plan(&logout, &Stage::Single), Plan::EmLogout);
        let user_query = Operation::user_devices(user("em@cisco.com"));
        assert_eq!(
            plan(&user_query, &Stage::first(&user_query)),
            Plan::EmUserDevicesQuery
        );
    }

    fn forced() -> Operation {
        Operation::ForceLogin {
            device: device(),
            user: user("alice"),
        }
    }

    fn forced_stage(stage: ForcedStage) -> Stage {
        Stage::Forced(stage)
    }

    #[test]
    fn a_forced_login_logs_the_other_user_out_first() {
        let op = forced();
        let first = Stage::first(&op);
        assert_eq!(first, forced_stage(ForcedStage::Login));
        assert_eq!(plan(&op, &first), Plan::EmLogin);
        // Free phone: one call, like a plain login.
        let meaning = done(judge(
            &op,
            &first,
            Exchange::Em(answered(EmResponse::Success)),
        ));
        assert_eq!(meaning.result, Ok(Outcome::LoggedIn));
        assert_eq!(meaning.cache, CacheEffect::Set(Some(user("alice"))));
        // 18: see who, log them out, log in; the answer names them.
        let Verdict::Next(who_is_on) = judge(
            &op,
            &first,
            Exchange::Em(failed(Some(18), "Another user logged in")),
        ) else {
            panic!("18 goes on");
        };
        assert_eq!(who_is_on, forced_stage(ForcedStage::WhoIsOn));
        assert_eq!(plan(&op, &who_is_on), Plan::EmQuery);
        let bob = Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("bob".into())));
        let Verdict::Next(log_out) = judge(&op, &who_is_on, bob) else {
            panic!("bob is logged out next");
        };
        assert_eq!(
            log_out,
            forced_stage(ForcedStage::LogOut {
                displaced: Some(user("bob"))
            })
        );
        assert_eq!(plan(&op, &log_out), Plan::EmLogout);
        let Verdict::Next(again) =
            judge(&op, &log_out, Exchange::Em(answered(EmResponse::Success)))
        else {
            panic!("the login again is next");
        };
        assert_eq!(plan(&op, &again), Plan::EmLogin);
        let meaning = done(judge(
            &op,
            &again,
            Exchange::Em(answered(EmResponse::Success)),
        ));
        assert_eq!(meaning.result, Ok(Outcome::LoggedInReplacing(user("bob"))));
        assert_eq!(meaning.cache, CacheEffect::Set(Some(user("alice"))));
    }

    #[test]
    fn every_forced_login_rule() {
        let op = forced();
        let log_out = forced_stage(ForcedStage::LogOut {
            displaced: Some(user("bob")),
        });
        let again = forced_stage(ForcedStage::LogInAgain { displaced: None });
        /// `None`: the operation goes on to its next stage.
        type ForcedRow = (
            &'static str,
            Stage,
            Exchange,
            Option<Result<Outcome, OpError>>,
        );
        let rows: Vec<ForcedRow> = vec![
            (
                "other failure ends it",
                forced_stage(ForcedStage::Login),
                Exchange::Em(failed(Some(23), "")),
                Some(cucm(23, "User not found")),
            ),
            (
                "already the user",
                forced_stage(ForcedStage::WhoIsOn),
                Exchange::Em(one_device("SEP1", DeviceState::LoggedIn("ALICE".into()))),
                Some(Ok(Outcome::LoggedIn)),
            ),
            (
                "gone meanwhile: go on",
                forced_stage(ForcedStage::WhoIsOn),
                Exchange::Em(one_device("SEP1", DeviceState::Nobody)),
                None,
            ),
            (
                "query fails",
                forced_stage(ForcedStage::WhoIsOn),
                Exchange::Em(failed(Some(3), "x")),
                Some(cucm(3, "x")),
            ),
            (
                "logout 19 is fine",
                log_out.clone(),
                Exchange::Em(failed(Some(19), "")),
                None,
            ),
            (
                "logout fails",
                log_out,
                Exchange::Em(failed(Some(6), "db")),
                Some(cucm(6, "db")),
            ),
            (
                "login again 18",
                again.clone(),
                Exchange::Em(failed(Some(18), "again")),
                Some(cucm(18, "again")),
            ),
            (
                "no displaced user: plain success",
                again,
                Exchange::Em(answered(EmResponse::Success)),
                Some(Ok(Outcome::LoggedIn)),
            ),
            (
                "EMApp never",
                forced_stage(ForcedStage::Login),
                page(None),
                Some(Err(OpError::InvalidResponse {
                    detail: "an answer of the wrong kind for this step".into(),
                })),
            ),
        ];
        for (name, stage, exchange, expected) in rows {
            match (judge(&op, &stage, exchange), expected) {
                (Verdict::Done(meaning), Some(expected)) => {
                    assert_eq!(meaning.result, expected, "{name}")
                }
                (Verdict::Next(_), None) => {}
                (other, expected) => panic!("{name}: {other:?} vs {expected:?}"),
            }
        }
        // Nobody on the phone any more: the logout displaces no one.
        let gone = judge(
            &op,
            &forced_stage(ForcedStage::WhoIsOn),
            Exchange::Em(one_device("SEP1", DeviceState::Nobody)),
        );
        assert_eq!(
            gone,
            Verdict::Next(forced_stage(ForcedStage::LogOut { displaced: None }))
        );
    }
}
