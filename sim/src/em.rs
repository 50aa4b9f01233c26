//! The EMService itself: one EM call from the decoded `xml` parameter to the answer,
//! with faults, the "Maximum Concurrent Requests" gate, latency, state and statistics.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::config::{Behavior, Latency};
use crate::emcc::{self, PeerUrl, VisitEnded};
use crate::protocol::{self, EmRequest, ProtocolError};
use crate::state::{ClusterState, DeviceInfo, EmError, EndedSession};
use crate::stats::{CallKind, CallRecord, FaultKind, StatsCollector};

mod emapp_flow;

/// Code 26 "Busy, please try again".
const BUSY_CODE: u32 = 26;

/// How the transport should answer an EM call.
#[derive(Debug)]
pub(crate) enum EmReply {
    /// HTTP 200, `text/xml` EM response document.
    Xml(String),
    /// Fault `http_status`.
    HttpStatus(u16),
    /// Fault `garbage`: HTTP 200 with a body that is not an EM response.
    Garbage,
    /// Fault `hang` was turned off while this call was held: close the connection unanswered.
    Abandon,
}

/// CUCM's "Maximum Concurrent Requests": login/logout ops above the limit get code 26 at once.
#[derive(Debug)]
pub(crate) struct ConcurrencyGate {
    limit: usize,
    in_flight: AtomicUsize,
}

pub(crate) struct GatePass<'a>(&'a AtomicUsize);

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConcurrencyGate {
    pub fn new(limit: usize) -> Self {
        ConcurrencyGate {
            limit,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Admits an op unless `limit` ops are already in progress; never overshoots.
    pub fn try_enter(&self) -> Option<GatePass<'_>> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| GatePass(&self.in_flight))
    }
}

/// Counts a call on each named, existing device while it is in progress.
struct DeviceCallGuard {
    devices: Vec<Arc<DeviceInfo>>,
}

impl Drop for DeviceCallGuard {
    fn drop(&mut self) {
        for device in &self.devices {
            device.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub(crate) struct EmService {
    pub state: Arc<ClusterState>,
    pub stats: StatsCollector,
    pub behavior: watch::Sender<Behavior>,
    gate: ConcurrencyGate,
    /// Login/logout ops seen, for `busy_every` (EMApp logins/logouts count too).
    op_counter: AtomicU64,
    /// EMCC peers asked about users not defined here.
    pub peers: RwLock<Vec<PeerUrl>>,
    /// EMApp "Validate IP Address": `Some` = only these callers (else code 28).
    pub trusted_ips: RwLock<Option<Vec<IpAddr>>>,
}

/// Sleeps for one sample of `latency`; zero latency does not touch the timer at all
/// (keeps the zero-latency query path cheap for benchmarks).
async fn simulate_latency(latency: Latency) {
    let delay = latency.sample();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn kind_of(parsed: &Result<EmRequest, ProtocolError>) -> CallKind {
    match parsed {
        Ok(EmRequest::Login { .. }) => CallKind::Login,
        Ok(EmRequest::Logout { .. }) => CallKind::Logout,
        Ok(EmRequest::LogoutAll { .. }) => CallKind::LogoutAll,
        Ok(EmRequest::DeviceUserQuery { .. }) => CallKind::DeviceUserQuery,
        Ok(EmRequest::UserDevicesQuery { .. }) => CallKind::UserDevicesQuery,
        Ok(EmRequest::DeviceProfileQuery { .. }) => CallKind::DeviceProfileQuery,
        Err(_) => CallKind::Invalid,
    }
}

impl EmService {
    pub fn new(state: Arc<ClusterState>, max_concurrent: usize, behavior: Behavior) -> Self {
        EmService {
            state,
            stats: StatsCollector::new(),
            behavior: watch::Sender::new(behavior),
            gate: ConcurrencyGate::new(max_concurrent),
            op_counter: AtomicU64::new(0),
            peers: RwLock::new(Vec::new()),
            trusted_ips: RwLock::new(None),
        }
    }

    /// Tells the homes of EMCC visitors that their visit ended (best effort: a home
    /// that does not answer keeps counting the visit; logged at debug).
    async fn notify_homes(&self, ended: &[EndedSession]) {
        for session in ended {
            let Some(home) = &session.home else { continue };
            self.stats.count_emcc_peer_call();
            let notice = VisitEnded {
                user: session.user.clone(),
                device: session.device.clone(),
            };
            if let Err(error) =
                emcc::call::<_, serde_json::Value>(home, emcc::LOGOUT_PATH, &notice).await
            {
                tracing::debug!(%error, "EMCC home not told about the end of a visit");
            }
        }
    }

    /// Handles one EM call; `xml` is the decoded `xml` parameter (`None` when missing).
    pub async fn handle(&self, xml: Option<String>) -> EmReply {
        let start = self.stats.now();
        let parsed = match xml {
            Some(xml) => protocol::parse_em_request(&xml),
            None => Err(ProtocolError::Parse("missing xml parameter".into())),
        };
        let kind = kind_of(&parsed);
        self.stats.count_received(kind);
        let behavior = self.behavior.borrow().clone();

        if behavior.faults.hang {
            return self.hang().await;
        }

        let _call = self.stats.enter_call();
        let (devices, _device_guard) = self.enter_devices(&parsed);
        let mut record = CallRecord {
            seq: 0,
            kind,
            devices,
            user: None,
            start,
            end: start,
            code: None,
            fault: None,
        };

        if let Some(reply) = self.injected_fault(&behavior, &mut record) {
            return reply;
        }

        let request = match parsed {
            Ok(request) => request,
            Err(error) => {
                simulate_latency(behavior.latency_for_query()).await;
                let code = error.code();
                return self.answer(record, Some(code), protocol::render_failure(code));
            }
        };

        if kind.is_operation() {
            self.operation(request, &behavior, record).await
        } else {
            simulate_latency(behavior.latency_for_query()).await;
            self.query(request, record)
        }
    }

    /// Fault `hang`: hold the call until the fault is turned off (then drop the connection)
    /// or the simulator stops.
    async fn hang(&self) -> EmReply {
        self.stats.count_fault();
        let _hung = self.stats.enter_hang();
        let mut behavior = self.behavior.subscribe();
        // An Err means the sender is gone: the simulator is stopping.
        let _ = behavior.wait_for(|b| !b.faults.hang).await;
        EmReply::Abandon
    }

    fn enter_devices(
        &self,
        parsed: &Result<EmRequest, ProtocolError>,
    ) -> (Vec<String>, DeviceCallGuard) {
        let requested: &[String] = match parsed {
            Ok(EmRequest::Login { device, .. }) | Ok(EmRequest::Logout { device, .. }) => {
                std::slice::from_ref(device)
            }
            Ok(EmRequest::DeviceUserQuery { devices, .. }) => devices,
            _ => &[],
        };
        let mut names = Vec::with_capacity(requested.len());
        let mut known = Vec::with_capacity(requested.len());
        for name in requested {
            match self.state.device(name) {
                Some(device) => {
                    // A batch naming the same device twice counts it once.
                    if !known
                        .iter()
                        .any(|d: &Arc<DeviceInfo>| Arc::ptr_eq(d, device))
                    {
                        let now = device.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                        self.stats.observe_device_concurrency(u64::from(now));
                        known.push(device.clone());
                    }
                    names.push(device.name.clone());
                }
                None => names.push(name.clone()),
            }
        }
        (names, DeviceCallGuard { devices: known })
    }

    fn injected_fault(&self, behavior: &Behavior, record: &mut CallRecord) -> Option<EmReply> {
        let faults = &behavior.faults;
        let (reply, fault, code) = if let Some(status) = faults.http_status {
            (EmReply::HttpStatus(status), FaultKind::HttpStatus, None)
        } else if faults.garbage {
            (EmReply::Garbage, FaultKind::Garbage, None)
        } else if let Some(code) = faults.fail_code {
            self.stats.count_answer(Some(code));
            if code == BUSY_CODE {
                self.stats.count_busy();
            }
            let body = protocol::render_failure(code);
            (EmReply::Xml(body), FaultKind::FailCode, Some(code))
        } else {
            return None;
        };
        self.stats.count_fault();
        record.fault = Some(fault);
        record.code = code;
        record.end = self.stats.now();
        self.stats.record(record.clone());
        Some(reply)
    }

    /// Login, logout, logoutAll: `busy_every`, the gate, latency, then the state change.
    async fn operation(
        &self,
        request: EmRequest,
        behavior: &Behavior,
        mut record: CallRecord,
    ) -> EmReply {
        let n = self.op_counter.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(every) = behavior.faults.busy_every.filter(|e| *e > 0) {
            if n % u64::from(every) == 0 {
                self.stats.count_fault();
                self.stats.count_busy();
                record.fault = Some(FaultKind::BusyEvery);
                return self.answer(record, Some(BUSY_CODE), protocol::render_failure(BUSY_CODE));
            }
        }
        let Some(_pass) = self.gate.try_enter() else {
            self.stats.count_busy();
            return self.answer(record, Some(BUSY_CODE), protocol::render_failure(BUSY_CODE));
        };
        let _op = self.stats.enter_op();
        simulate_latency(behavior.latency).await;

        let state = &self.state;
        let mut ended = Vec::new();
        let result = state
            .authenticate(request.app())
            .and_then(|caller| match &request {
                EmRequest::Login {
                    device,
                    user,
                    profile,
                    ..
                } => {
                    record.user = Some(user.clone());
                    // A user of another simulator gets 23 here: the EM API has no EMCC.
                    state.login(&caller, device, user, profile.as_deref())
                }
                EmRequest::Logout { device, .. } => {
                    state.logout_session(&caller, device).map(|session| {
                        record.user = Some(session.user.clone());
                        ended.push(session);
                    })
                }
                EmRequest::LogoutAll { .. } => state
                    .logout_all_sessions(&caller)
                    .map(|sessions| ended = sessions),
                _ => Ok(()),
            });
        self.notify_homes(&ended).await;
        let code = result.err().map(EmError::code);
        let body = match code {
            Some(code) => protocol::render_failure(code),
            None => protocol::render_success(),
        };
        self.answer(record, code, body)
    }

    fn query(&self, request: EmRequest, mut record: CallRecord) -> EmReply {
        let state = &self.state;
        if let Err(error) = state.authenticate(request.app()) {
            let code = error.code();
            return self.answer(record, Some(code), protocol::render_failure(code));
        }
        let body = match &request {
            EmRequest::DeviceUserQuery { devices, .. } => {
                protocol::render_device_user_results(&state.device_user_query(devices))
            }
            EmRequest::UserDevicesQuery { users, .. } => {
                record.user = users.first().cloned();
                protocol::render_user_devices_results(&state.user_devices_query(users))
            }
            EmRequest::DeviceProfileQuery { users, .. } => {
                record.user = users.first().cloned();
                protocol::render_device_profile_results(&state.device_profile_query(users))
            }
            _ => protocol::render_failure(0),
        };
        self.answer(record, None, body)
    }

    fn answer(&self, mut record: CallRecord, code: Option<u32>, body: String) -> EmReply {
        self.stats.count_answer(code);
        record.code = code;
        record.end = self.stats.now();
        self.stats.record(record);
        EmReply::Xml(body)
    }
}
