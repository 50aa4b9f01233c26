//! Discovery: which cluster a device is registered in, when the caller gave no cluster
//! code and there are several clusters and no default. Every cluster is asked
//! (`deviceUserQuery`, each through its own shaping and cache); the answer is
//! remembered for `discovery_ttl_ms` in the `DeviceDirectory` and forgotten when that
//! cluster later says the device does not exist there.
//!
//! `conclude` is the pure rule that turns the clusters' answers into one outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::em::code;
use crate::everywhere::{unanswered, unknown, Unanswered};
use crate::operation::{DeviceName, OpError, Outcome, Reply};

/// Memory bound: more devices than this are not remembered (they are asked again).
const MAX_REMEMBERED: usize = 500_000;

/// What asking every cluster found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conclusion {
    /// In exactly one cluster (index into the answers), with its query answer.
    Found { index: usize, reply: Reply },
    /// No cluster has the device: CUCM's 11.
    Nowhere,
    /// More than one cluster has it: the caller must name one (1011).
    Several(Vec<usize>),
    /// Not found, and at least one cluster could not answer: unknown (1003).
    Failed(OpError),
    /// Not found, and a cluster refused the question itself (bad credentials, say):
    /// its answer stands.
    Refused(OpError),
}

impl Conclusion {
    /// The bounded `outcome` label of `bc_discovery_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Conclusion::Found { .. } => "found",
            Conclusion::Nowhere => "nowhere",
            Conclusion::Several(_) => "several",
            Conclusion::Failed(_) => "failed",
            Conclusion::Refused(_) => "refused",
        }
    }
}

/// Each cluster's answer to "who is on this device?", in cluster order.
pub fn conclude(answers: Vec<Reply>) -> Conclusion {
    let mut found = Vec::new();
    let mut failed = None;
    let mut refused = None;
    for (index, reply) in answers.into_iter().enumerate() {
        if matches!(reply.result, Ok(Outcome::CurrentUser(_))) {
            found.push((index, reply));
            continue;
        }
        match unanswered(reply.result, code::DEVICE_DOES_NOT_EXIST, "a query") {
            Unanswered::NotHere => {}
            Unanswered::CouldNot(error) => {
                failed.get_or_insert(error);
            }
            Unanswered::Refused(error) => {
                refused.get_or_insert(error);
            }
        }
    }
    match found.len() {
        1 => {
            let (index, reply) = found.remove(0);
            Conclusion::Found { index, reply }
        }
        0 => match (failed, refused) {
            (Some(error), _) => Conclusion::Failed(unknown(error)),
            (None, Some(error)) => Conclusion::Refused(error),
            (None, None) => Conclusion::Nowhere,
        },
        _ => Conclusion::Several(found.into_iter().map(|(index, _)| index).collect()),
    }
}

/// Device → the code of the cluster it was found in, until it expires.
#[derive(Debug)]
pub struct DeviceDirectory {
    ttl: Duration,
    entries: DashMap<DeviceName, (Arc<str>, Instant)>,
}

impl DeviceDirectory {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: DashMap::new(),
        }
    }

    pub fn lookup(&self, device: &DeviceName, now: Instant) -> Option<Arc<str>> {
        let entry = self.entries.get(device)?;
        (entry.1 > now).then(|| entry.0.clone())
    }

    pub fn remember(&self, device: &DeviceName, cluster: Arc<str>, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= MAX_REMEMBERED {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= MAX_REMEMBERED {
                return;
            }
        }
        self.entries
            .insert(device.clone(), (cluster, now + self.ttl));
    }

    /// The cluster said the device does not exist there (any more).
    pub fn forget(&self, device: &DeviceName, cluster: &str) {
        self.entries
            .remove_if(device, |_, (remembered, _)| &**remembered == cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::UserId;

    fn someone() -> Reply {
        Reply {
            result: Ok(Outcome::CurrentUser(Some(UserId::parse("alice").unwrap()))),
            node: Some(Arc::from("n:1")),
            from_cache: false,
        }
    }

    fn error(error: OpError) -> Reply {
        Reply::failed(error)
    }

    fn no_device() -> Reply {
        error(OpError::Cucm {
            code: 11,
            text: "Device does not exist".into(),
        })
    }

    fn down() -> Reply {
        error(OpError::Unavailable {
            reason: "refused".into(),
        })
    }

    #[test]
    fn one_answer_per_outcome() {
        assert!(matches!(
            conclude(vec![no_device(), someone()]),
            Conclusion::Found { index: 1, .. }
        ));
        assert_eq!(
            conclude(vec![no_device(), no_device()]),
            Conclusion::Nowhere
        );
        assert_eq!(
            conclude(vec![someone(), no_device(), someone()]),
            Conclusion::Several(vec![0, 2])
        );
        // Found elsewhere: a failing cluster does not matter.
        assert!(matches!(
            conclude(vec![down(), someone()]),
            Conclusion::Found { index: 1, .. }
        ));
        assert!(matches!(
            conclude(vec![down(), no_device()]),
            Conclusion::Failed(OpError::Unavailable { .. })
        ));
        let bad_credentials = OpError::Cucm {
            code: 3,
            text: "Invalid App User".into(),
        };
        assert_eq!(
            conclude(vec![error(bad_credentials.clone()), no_device()]),
            Conclusion::Refused(bad_credentials)
        );
        assert!(matches!(
            conclude(vec![
                error(OpError::Overloaded {
                    reason: "full",
                    retry_after: Duration::from_secs(1)
                }),
                no_device()
            ]),
            Conclusion::Failed(OpError::Unavailable { .. })
        ));
        assert_eq!(conclude(vec![]), Conclusion::Nowhere);
    }

    #[test]
    fn the_directory_remembers_until_the_ttl_and_forgets_on_request() {
        let directory = DeviceDirectory::new(Duration::from_secs(60));
        let device = DeviceName::parse("sep1").unwrap();
        let now = Instant::now();
        directory.remember(&device, Arc::from("EU"), now);
        assert_eq!(directory.lookup(&device, now).as_deref(), Some("EU"));
        assert_eq!(
            directory.lookup(&device, now + Duration::from_secs(61)),
            None
        );
        directory.forget(&device, "US");
        assert!(
            directory.lookup(&device, now).is_some(),
            "another cluster's word"
        );
        directory.forget(&device, "EU");
        assert_eq!(directory.lookup(&device, now), None);
        let off = DeviceDirectory::new(Duration::ZERO);
        off.remember(&device, Arc::from("EU"), now);
        assert_eq!(off.lookup(&device, now), None);
    }
}
