//! The EM application (`/emapp/EMAppServlet`) on top of the EMService: faults, the shared
//! "Maximum Concurrent Requests" gate (EMApp ends in EMService), PIN checks, the EMCC
//! visiting side, and the home side of the simulator's own EMCC stand-in (`/_emcc/*`).
//!
//! The PIN is never logged, recorded or counted: only the user ID reaches the call log.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use super::{simulate_latency, EmReply, EmService, BUSY_CODE};
use crate::emapp::{self, code, EmAppAction, Page, Pin};
use crate::emcc::{self, CheckUser, CheckUserAnswer, PeerUrl, VisitEnded};
use crate::state::{Caller, EmError, HomeCheck, PinCheck};
use crate::stats::{CallKind, CallRecord, FaultKind};

/// What the home side answers the transport: HTTP status and JSON body.
pub(crate) struct EmccReply {
    pub status: u16,
    pub body: String,
}

/// Maps an EMService state error to the page EMApp shows for a login.
fn login_error_page(error: EmError) -> Page {
    match error {
        // Real EMApp shows the logout prompt when the phone is occupied.
        EmError::AnotherUserLoggedIn => Page::LogoutPrompt {
            device: String::new(),
            emcc: false,
        },
        EmError::ProfileNotFound => Page::Error {
            code: code::PROFILE_ABSENT,
            logout: false,
        },
        other => Page::Error {
            code: other.code(),
            logout: false,
        },
    }
}

fn error(code: u32) -> Page {
    Page::Error {
        code,
        logout: false,
    }
}

impl EmService {
    /// Handles one EMApp request; `query` is the raw query string, `caller` the peer IP.
    pub async fn handle_emapp(&self, query: Option<&str>, caller: IpAddr) -> EmReply {
        let start = self.stats.now();
        self.stats.count_received(CallKind::EmApp);
        let behavior = self.behavior.borrow().clone();
        if behavior.faults.hang {
            return self.hang().await;
        }
        let parsed = emapp::parse_query(query.unwrap_or(""));
        let mut record = CallRecord {
            seq: 0,
            kind: CallKind::EmApp,
            devices: Vec::new(),
            user: None,
            start,
            end: start,
            code: None,
            fault: None,
        };
        if let Ok(q) = &parsed {
            record.devices = vec![self
                .state
                .device(&q.device)
                .map(|d| d.name.clone())
                .unwrap_or_else(|| q.device.clone())];
            record.user = q.user.clone().filter(|u| !u.is_empty());
        }

        let faults = &behavior.faults;
        let fault = if let Some(status) = faults.http_status {
            Some((EmReply::HttpStatus(status), FaultKind::HttpStatus))
        } else if faults.garbage {
            Some((EmReply::Garbage, FaultKind::Garbage))
        } else {
            None
        };
        if let Some((reply, kind)) = fault {
            self.stats.count_fault();
            record.fault = Some(kind);
            record.end = self.stats.now();
            self.stats.record(record);
            return reply;
        }
        if let Some(code) = faults.fail_code {
            self.stats.count_fault();
            if code == BUSY_CODE {
                self.stats.count_busy();
            }
            record.fault = Some(FaultKind::FailCode);
            return self.page(record, error(code));
        }

        let query = match parsed {
            Ok(query) => query,
            Err(e) => return self.page(record, error(e.code())),
        };
        let trusted = self
            .trusted_ips
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|ips| ips.contains(&caller));
        if !trusted {
            return self.page(record, error(code::UNTRUSTED_IP));
        }

        let action = query.action();
        // Blank credentials are caught by EMApp itself, before EMService (no gate).
        if let EmAppAction::Login { user, pin } = &action {
            if user.trim().is_empty() || pin.is_blank() {
                return self.page(record, error(code::BLANK_CREDENTIALS));
            }
        }
        let page = match action {
            EmAppAction::Show => {
                // EMApp asks EMService deviceUserQuery: a query, not gated.
                simulate_latency(behavior.latency_for_query()).await;
                self.show(&query.device, query.emcc)
            }
            EmAppAction::Logout | EmAppAction::Login { .. } => {
                let logout = action == EmAppAction::Logout;
                let n = self.op_counter.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(every) = faults.busy_every.filter(|e| *e > 0) {
                    if n % u64::from(every) == 0 {
                        self.stats.count_fault();
                        self.stats.count_busy();
                        record.fault = Some(FaultKind::BusyEvery);
                        let page = Page::Error {
                            code: BUSY_CODE,
                            logout,
                        };
                        return self.page(record, page);
                    }
                }
                let Some(_pass) = self.gate.try_enter() else {
                    // `page` counts the busy answer.
                    let page = Page::Error {
                        code: BUSY_CODE,
                        logout,
                    };
                    return self.page(record, page);
                };
                let _op = self.stats.enter_op();
                simulate_latency(behavior.latency).await;
                match action {
                    EmAppAction::Login { user, pin } => {
                        self.login(&query.device, &user, &pin, query.emcc).await
                    }
                    _ => self.logout(&query.device, query.emcc).await,
                }
            }
        };
        // Pages that link back to the servlet name the device as requested.
        let page = match page {
            Page::LogoutPrompt { .. } => Page::LogoutPrompt {
                device: query.device.clone(),
                emcc: query.emcc,
            },
            other => other,
        };
        self.page(record, page)
    }

    /// Only `device`: the login form on a free phone, the logout prompt on an occupied one.
    fn show(&self, device: &str, emcc: bool) -> Page {
        match self.state.emapp_device(device) {
            Err(e) => error(e.code()),
            Ok(name) => match self.state.logged_in_user(&name) {
                Some(_) => Page::LogoutPrompt { device: name, emcc },
                None => Page::LoginForm { device: name, emcc },
            },
        }
    }

    async fn logout(&self, device: &str, emcc: bool) -> Page {
        match self.state.logout_session(&Caller::ProxyApp, device) {
            Ok(ended) => {
                self.notify_homes(std::slice::from_ref(&ended)).await;
                Page::LogoutOk
            }
            // Nobody logged in: the phone would simply show the login form (UNCONFIRMED).
            Err(EmError::NoUserLoggedIn) => Page::LoginForm {
                device: device.to_ascii_uppercase(),
                emcc,
            },
            Err(e) => Page::Error {
                code: e.code(),
                logout: true,
            },
        }
    }

    async fn login(&self, device: &str, user: &str, pin: &Pin, emcc: bool) -> Page {
        let name = match self.state.emapp_device(device) {
            Ok(name) => name,
            Err(e) => return error(e.code()),
        };
        // EMApp looks at the phone first: occupied by someone else → logout prompt,
        // before the PIN is checked (so no lockout count).
        if let Some(current) = self.state.logged_in_user(&name) {
            if current != user {
                return login_error_page(EmError::AnotherUserLoggedIn);
            }
        }
        match self.state.check_pin(user, pin) {
            PinCheck::Rejected => error(code::PIN_REJECTED),
            PinCheck::Accepted(id) => {
                if !self.state.has_profile(&id) {
                    return error(code::PROFILE_ABSENT);
                }
                match self.state.login(&Caller::ProxyApp, &name, &id, None) {
                    Ok(()) => Page::LoginOk,
                    Err(e) => login_error_page(e),
                }
            }
            PinCheck::UnknownUser if !emcc => error(code::USER_NOT_FOUND),
            PinCheck::UnknownUser => self.visitor_login(&name, user, pin).await,
        }
    }

    /// EMCC visiting side: find the user's home among the peers, let it check the PIN
    /// (and record the visit), then log the visitor in here.
    async fn visitor_login(&self, device: &str, user: &str, pin: &Pin) -> Page {
        let peers: Vec<PeerUrl> = self.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        if peers.is_empty() {
            // No remote cluster at all: "not found in any of the remote clusters".
            return error(code::USER_NOT_FOUND);
        }
        let any_peer = &peers[0];
        // Local rules first (18/25 on this simulator), so the home records no visit
        // that cannot happen.
        if let Err(e) = self.state.login_visitor(device, user, any_peer, true) {
            return login_error_page(e);
        }
        let check = CheckUser {
            user: user.to_string(),
            pin: pin.clone(),
            device: device.to_string(),
            login: true,
        };
        let mut unreachable = false;
        for peer in &peers {
            self.stats.count_emcc_peer_call();
            match emcc::call::<_, CheckUserAnswer>(peer, emcc::CHECK_USER_PATH, &check).await {
                Ok(CheckUserAnswer::Unknown) => {}
                Ok(CheckUserAnswer::PinRejected) => return error(code::EMCC_AUTH),
                Ok(CheckUserAnswer::LoggedInElsewhere) => return error(code::LOGGED_IN_ELSEWHERE),
                Ok(CheckUserAnswer::Ok) => {
                    return match self.state.login_visitor(device, user, peer, false) {
                        Ok(()) => Page::LoginOk,
                        Err(e) => {
                            // Raced with another login here: undo the visit at home.
                            self.tell_home(peer, user, device).await;
                            login_error_page(e)
                        }
                    };
                }
                Err(e) => {
                    tracing::debug!(error = %e, "EMCC peer unreachable");
                    unreachable = true;
                }
            }
        }
        if unreachable {
            error(code::EMSERVICE_CONNECTION)
        } else {
            error(code::USER_NOT_FOUND)
        }
    }

    async fn tell_home(&self, home: &PeerUrl, user: &str, device: &str) {
        self.stats.count_emcc_peer_call();
        let notice = VisitEnded {
            user: user.to_string(),
            device: device.to_string(),
        };
        if let Err(error) =
            emcc::call::<_, serde_json::Value>(home, emcc::LOGOUT_PATH, &notice).await
        {
            tracing::debug!(%error, "EMCC home not told about the end of a visit");
        }
    }

    fn page(&self, mut record: CallRecord, page: Page) -> EmReply {
        let code = match &page {
            Page::Error { code, .. } => Some(*code),
            _ => None,
        };
        if code == Some(BUSY_CODE) && record.fault.is_none() {
            self.stats.count_busy();
        }
        self.stats.count_emapp_answer(code);
        record.code = code;
        record.end = self.stats.now();
        self.stats.record(record);
        EmReply::Xml(emapp::render(&page))
    }

    /// Home side of the EMCC stand-in: `POST /_emcc/checkUser` and `/_emcc/logout`.
    /// While any of hang/http_status/garbage is on, the "home EMService" is down: 503.
    pub async fn handle_emcc(&self, path: &str, body: &[u8]) -> EmccReply {
        let start = self.stats.now();
        self.stats.count_received(CallKind::Emcc);
        let mut record = CallRecord {
            seq: 0,
            kind: CallKind::Emcc,
            devices: Vec::new(),
            user: None,
            start,
            end: start,
            code: None,
            fault: None,
        };
        let faults = self.behavior.borrow().faults;
        if faults.hang || faults.http_status.is_some() || faults.garbage {
            self.stats.count_fault();
            record.fault = Some(FaultKind::HttpStatus);
            record.end = self.stats.now();
            self.stats.record(record);
            return EmccReply {
                status: 503,
                body: "{}".into(),
            };
        }
        let bad_request = EmccReply {
            status: 400,
            body: "{}".into(),
        };
        let answer = if path == emcc::CHECK_USER_PATH {
            let Ok(check) = serde_json::from_slice::<CheckUser>(body) else {
                return bad_request;
            };
            record.devices = vec![check.device.to_ascii_uppercase()];
            record.user = Some(check.user.clone());
            let answer =
                match self
                    .state
                    .home_check(&check.user, &check.pin, &check.device, check.login)
                {
                    HomeCheck::Unknown => CheckUserAnswer::Unknown,
                    HomeCheck::PinRejected => CheckUserAnswer::PinRejected,
                    HomeCheck::LoggedInElsewhere => CheckUserAnswer::LoggedInElsewhere,
                    HomeCheck::Ok => CheckUserAnswer::Ok,
                };
            record.code = match answer {
                CheckUserAnswer::Unknown => Some(code::USER_NOT_FOUND),
                CheckUserAnswer::PinRejected => Some(code::EMCC_AUTH),
                CheckUserAnswer::LoggedInElsewhere => Some(code::LOGGED_IN_ELSEWHERE),
                CheckUserAnswer::Ok => None,
            };
            serde_json::to_string(&answer).unwrap_or_else(|_| "\"unknown\"".into())
        } else if path == emcc::LOGOUT_PATH {
            let Ok(ended) = serde_json::from_slice::<VisitEnded>(body) else {
                return bad_request;
            };
            record.devices = vec![ended.device.to_ascii_uppercase()];
            record.user = Some(ended.user.clone());
            self.state.home_visit_ended(&ended.user, &ended.device);
            "{}".to_string()
        } else {
            return EmccReply {
                status: 404,
                body: "{}".into(),
            };
        };
        record.end = self.stats.now();
        self.stats.record(record);
        EmccReply {
            status: 200,
            body: answer,
        }
    }
}
