//! Where is a user logged in, across every cluster: when a getuserdevices names no
//! cluster and there are several clusters and no default, each cluster is asked
//! (`userDevicesQuery`, through its own actor and shaping) and `merge` turns their
//! answers into one.
//!
//! The rule, in order:
//! - devices found anywhere: code 0 with all of them (cluster order, no duplicates);
//!   clusters that could not answer are named (`unanswered`), because the list may
//!   miss their devices — what was found is still true, and a caller looking for the
//!   user's phones is better served by them than by an error;
//! - else any cluster unable to answer (down, overloaded, garbage): 1003, since
//!   "nowhere" cannot be known;
//! - else a cluster that knows the user: code 0 with no devices;
//! - else a cluster that refused the question (bad credentials, say): its answer;
//! - else (every cluster said 23): user not found.

use crate::em::code;
use crate::everywhere::{self, Unanswered};
use crate::operation::{OpError, Outcome, Reply};

/// Each cluster's code and answer, in cluster order.
pub fn merge(answers: Vec<(String, Reply)>) -> Reply {
    let mut devices = Vec::new();
    let mut found = false;
    let mut knows_user = false;
    let mut unanswered = Vec::new();
    let mut failed = None;
    let mut refused = None;
    let mut node = None;
    for (cluster, reply) in answers {
        let here = match reply.result {
            Ok(Outcome::UserDevices { devices: here, .. }) => here,
            other => {
                match everywhere::unanswered(other, code::USER_NOT_FOUND, "a user query") {
                    Unanswered::NotHere => {}
                    Unanswered::CouldNot(error) => {
                        unanswered.push(cluster);
                        failed.get_or_insert(error);
                    }
                    Unanswered::Refused(error) => {
                        refused.get_or_insert(error);
                    }
                }
                continue;
            }
        };
        knows_user = true;
        if !here.is_empty() {
            found = true;
            node = node.or(reply.node);
        }
        for device in here {
            if !devices.contains(&device) {
                devices.push(device);
            }
        }
    }
    let result = if found {
        Ok(Outcome::UserDevices {
            devices,
            unanswered,
        })
    } else if let Some(error) = failed {
        Err(everywhere::unknown(error))
    } else if knows_user {
        Ok(Outcome::UserDevices {
            devices,
            unanswered,
        })
    } else if let Some(error) = refused {
        Err(error)
    } else {
        Err(OpError::Cucm {
            code: code::USER_NOT_FOUND,
            text: "User not found in any cluster".into(),
        })
    };
    Reply {
        result,
        node,
        from_cache: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operation::DeviceName;
    use std::time::Duration;

    fn on(devices: &[&str]) -> Reply {
        Reply {
            result: Ok(Outcome::UserDevices {
                devices: devices
                    .iter()
                    .map(|d| DeviceName::parse(d).unwrap())
                    .collect(),
                unanswered: vec![],
            }),
            node: None,
            from_cache: false,
        }
    }

    fn err(error: OpError) -> Reply {
        Reply::failed(error)
    }

    fn unknown_user() -> Reply {
        err(OpError::Cucm {
            code: 23,
            text: "User not found".into(),
        })
    }

    fn down() -> Reply {
        err(OpError::Unavailable {
            reason: "down".into(),
        })
    }

    fn devices(reply: &Reply) -> (Vec<String>, Vec<String>) {
        match &reply.result {
            Ok(Outcome::UserDevices {
                devices,
                unanswered,
            }) => (
                devices.iter().map(|d| d.to_string()).collect(),
                unanswered.clone(),
            ),
            other => panic!("expected devices, got {other:?}"),
        }
    }

    fn named(replies: Vec<Reply>) -> Vec<(String, Reply)> {
        ["A", "B", "C"]
            .iter()
            .map(|c| c.to_string())
            .zip(replies)
            .collect()
    }

    #[test]
    fn devices_of_every_cluster_are_merged_in_order() {
        let merged = merge(named(vec![
            on(&["SEP2"]),
            unknown_user(),
            on(&["SEP1", "SEP2"]),
        ]));
        assert_eq!(
            devices(&merged),
            (vec!["SEP2".into(), "SEP1".into()], vec![])
        );
    }

    #[test]
    fn a_failing_cluster_is_named_when_devices_were_found_elsewhere() {
        let merged = merge(named(vec![on(&["SEP1"]), down()]));
        assert_eq!(devices(&merged), (vec!["SEP1".into()], vec!["B".into()]));
    }

    #[test]
    fn nowhere_cannot_be_known_while_a_cluster_is_down() {
        let merged = merge(named(vec![on(&[]), down()]));
        assert!(matches!(merged.result, Err(OpError::Unavailable { .. })));
        let overloaded = err(OpError::Overloaded {
            reason: "full",
            retry_after: Duration::from_secs(1),
        });
        assert!(matches!(
            merge(named(vec![unknown_user(), overloaded])).result,
            Err(OpError::Unavailable { .. })
        ));
    }

    #[test]
    fn logged_in_nowhere_unknown_everywhere_and_refused() {
        assert_eq!(
            devices(&merge(named(vec![unknown_user(), on(&[])]))),
            (vec![], vec![])
        );
        assert!(matches!(
            merge(named(vec![unknown_user(), unknown_user()])).result,
            Err(OpError::Cucm { code: 23, .. })
        ));
        let bad_app = err(OpError::Cucm {
            code: 3,
            text: "Invalid App User".into(),
        });
        assert!(matches!(
            merge(named(vec![unknown_user(), bad_app])).result,
            Err(OpError::Cucm { code: 3, .. })
        ));
    }
}
