//! Asking every cluster (discovery of a device, a user's devices): what one cluster's
//! answer means when it is not the answer looked for. Both questions classify a
//! cluster's failure the same way, and turn "not found, and some cluster could not
//! answer" into the same unknown.

use crate::operation::{OpError, Outcome};

/// A cluster's answer other than the one looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unanswered {
    /// The cluster does not have it (CUCM's 11 for a device, 23 for a user).
    NotHere,
    /// The cluster could not answer (down, overloaded, garbage): it may have it.
    CouldNot(OpError),
    /// The cluster refused the question itself (bad credentials, say).
    Refused(OpError),
}

/// Classifies a cluster's answer that is not the one looked for. `not_here` is the
/// code by which CUCM says it does not have it; `question` names the question for
/// the text of an answer of the wrong kind.
pub fn unanswered(result: Result<Outcome, OpError>, not_here: u32, question: &str) -> Unanswered {
    match result {
        Err(OpError::Cucm { code, .. }) if code == not_here => Unanswered::NotHere,
        Err(
            error @ (OpError::Unavailable { .. }
            | OpError::InvalidResponse { .. }
            | OpError::Overloaded { .. }),
        ) => Unanswered::CouldNot(error),
        Err(error) => Unanswered::Refused(error),
        Ok(_) => Unanswered::CouldNot(OpError::InvalidResponse {
            detail: format!("{question} answered with something else"),
        }),
    }
}

/// Nothing was found, and this is why a cluster could not answer: "nowhere" cannot
/// be known, so the caller is told CUCM is unavailable (1003).
pub fn unknown(error: OpError) -> OpError {
    match error {
        OpError::Unavailable { .. } => error,
        other => OpError::Unavailable {
            reason: format!("a cluster could not be asked ({other})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_kind_of_answer_that_was_not_looked_for() {
        let cucm = |code| {
            Err(OpError::Cucm {
                code,
                text: "x".into(),
            })
        };
        assert_eq!(unanswered(cucm(11), 11, "a query"), Unanswered::NotHere);
        assert!(matches!(
            unanswered(cucm(3), 11, "a query"),
            Unanswered::Refused(_)
        ));
        let overloaded = OpError::Overloaded {
            reason: "full",
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(
            unanswered(Err(overloaded.clone()), 11, "a query"),
            Unanswered::CouldNot(overloaded.clone())
        );
        assert_eq!(
            unanswered(Ok(Outcome::LoggedOut), 23, "a user query"),
            Unanswered::CouldNot(OpError::InvalidResponse {
                detail: "a user query answered with something else".into()
            })
        );
        assert_eq!(
            unknown(overloaded),
            OpError::Unavailable {
                reason: "a cluster could not be asked (overloaded: full)".into()
            }
        );
        let down = OpError::Unavailable {
            reason: "down".into(),
        };
        assert_eq!(unknown(down.clone()), down);
    }
}
