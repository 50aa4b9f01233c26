//! Control endpoint `/_sim/*` for tests and demos: stats, behaviour (latency/faults), reset.
//! Never subject to faults.

use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};

use crate::config::{Behavior, Faults};
use crate::server::{text_response, HttpResponse, Shared, LISTENER_APPLY_TIMEOUT};

pub(crate) const CONTROL_PREFIX: &str = "/_sim/";

/// Errors of control requests (answered as HTTP 4xx, never as EM failures).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("body is neither a Behavior nor a Faults JSON object: {0}")]
    BadBehavior(serde_json::Error),
    #[error("no such control route")]
    NotFound,
}

pub(crate) async fn handle(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    body: Bytes,
) -> HttpResponse {
    match route(shared, method, uri, body).await {
        Ok(json) => text_response(StatusCode::OK, "application/json", json),
        Err(error @ ControlError::NotFound) => {
            text_response(StatusCode::NOT_FOUND, "text/plain", error.to_string())
        }
        Err(error) => text_response(StatusCode::BAD_REQUEST, "text/plain", error.to_string()),
    }
}

async fn route(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    body: Bytes,
) -> Result<String, ControlError> {
    let name = uri
        .path()
        .trim_start_matches(CONTROL_PREFIX)
        .trim_end_matches('/');
    match (method, name) {
        (&Method::GET, "stats") => {
            // `?log=false` leaves out the (possibly long) call log.
            let with_log = !uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "log=false" || p == "log=0"));
            Ok(to_json(&shared.em.stats.snapshot(with_log)))
        }
        (&Method::GET, "faults") | (&Method::GET, "behavior") => {
            Ok(to_json(&*shared.em.behavior.borrow()))
        }
        (&Method::POST, "faults") | (&Method::POST, "behavior") => {
            let behavior = parse_behavior(&body, &shared.em.behavior.borrow())?;
            let refuse = shared.replace_behavior(behavior);
            if !shared.listener.wait(refuse, LISTENER_APPLY_TIMEOUT).await {
                tracing::warn!(
                    refuse,
                    "listener did not reach the requested refuse state in time"
                );
            }
            Ok(to_json(&*shared.em.behavior.borrow()))
        }
        (&Method::POST, "reset") => {
            shared.em.stats.reset();
            Ok("{\"reset\":true}".to_string())
        }
        _ => Err(ControlError::NotFound),
    }
}

/// A full [`Behavior`] replaces everything; a bare [`Faults`] object (`{"hang":true}`)
/// replaces only the faults and keeps the latency. An empty body turns everything off.
fn parse_behavior(body: &[u8], current: &Behavior) -> Result<Behavior, ControlError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Behavior::default());
    }
    match serde_json::from_slice::<Behavior>(body) {
        Ok(behavior) => Ok(behavior),
        Err(behavior_error) => match serde_json::from_slice::<Faults>(body) {
            Ok(faults) => Ok(Behavior {
                faults,
                ..current.clone()
            }),
            Err(_) => Err(ControlError::BadBehavior(behavior_error)),
        },
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Our own plain data types always serialize.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Latency;
    use std::time::Duration;

    #[test]
    fn behavior_or_bare_faults() {
        let current = Behavior {
            latency: Latency::Fixed(Duration::from_millis(5)),
            ..Behavior::default()
        };
        let b = parse_behavior(br#"{"hang":true}"#, &current).unwrap();
        assert!(b.faults.hang);
        assert_eq!(b.latency, current.latency);
        let b = parse_behavior(br#"{"faults":{"fail_code":0}}"#, &current).unwrap();
        assert_eq!(b.faults.fail_code, Some(0));
        assert_eq!(b.latency, Latency::None);
        assert!(parse_behavior(br#"{"nonsense":1}"#, &current).is_err());
        assert_eq!(parse_behavior(b"", &current).unwrap(), Behavior::default());
    }
}
