//! Counters and the bounded call log. Atomics on the hot path; only the call log takes a
//! (short, uncontended in practice) mutex.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many call records the log keeps (oldest dropped first).
pub const CALL_LOG_CAPACITY: usize = 10_000;

/// Kind of an EM call, as classified after parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    Login,
    Logout,
    LogoutAll,
    DeviceUserQuery,
    UserDevicesQuery,
    DeviceProfileQuery,
    /// Missing `xml`, unparsable document (code 1) or unknown query type (code 8).
    Invalid,
    /// A request to the EM application `/emapp/EMAppServlet` (not an EM API call).
    EmApp,
    /// An EMCC check or visit-ended call served by this simulator as a user's home.
    Emcc,
}

impl CallKind {
    /// Login/logout operations are what CUCM's "Maximum Concurrent Requests" gates.
    pub fn is_operation(self) -> bool {
        matches!(
            self,
            CallKind::Login | CallKind::Logout | CallKind::LogoutAll
        )
    }
}

/// Which injected fault answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    HttpStatus,
    Garbage,
    FailCode,
    BusyEvery,
}

/// One answered EM call. Hung calls (fault `hang`) are never answered and not logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Order in which calls were answered (1-based, not reset by `reset_stats`).
    pub seq: u64,
    pub kind: CallKind,
    /// Device names of the request (upper-case as stored when the device exists).
    pub devices: Vec<String>,
    /// Login: the requested user; logout: the user logged out; user queries: first user.
    /// EMApp/EMCC: the user ID of the request (never the PIN).
    pub user: Option<String>,
    /// Since simulator start: request received.
    pub start: Duration,
    /// Since simulator start: response produced.
    pub end: Duration,
    /// EM error code; `None` = success (or query results, or a non-XML fault).
    /// EMApp: the `(NNN)` of the page; `None` = a page without a code.
    pub code: Option<u32>,
    pub fault: Option<FaultKind>,
}

/// Snapshot of the counters (since start or the last reset) plus the call log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    pub calls_login: u64,
    pub calls_logout: u64,
    pub calls_logout_all: u64,
    pub calls_device_user_query: u64,
    pub calls_user_devices_query: u64,
    pub calls_device_profile_query: u64,
    pub calls_invalid: u64,
    /// Sum of all `calls_*`.
    pub calls_total: u64,
    /// EM calls in progress right now (hung calls excluded).
    pub in_flight_calls: u64,
    /// Login/logout ops admitted by the gate and in progress right now.
    pub in_flight_ops: u64,
    /// Calls currently held by the `hang` fault.
    pub hung_calls: u64,
    /// Highest number of EM calls of any kind in progress at once.
    pub max_concurrent_calls: u64,
    /// Highest number of admitted login/logout/logoutAll ops in progress at once
    /// (never above `max_concurrent`; calls answered 26 are not admitted).
    pub max_concurrent_ops: u64,
    /// Highest number of calls in progress at once naming the same device.
    pub max_concurrent_per_device: u64,
    /// Code 26 answers (concurrency gate and `busy_every`).
    pub busy_answers: u64,
    /// Calls answered (or held) by an injected fault: hang, http_status, garbage,
    /// fail_code, busy_every.
    pub faults_served: u64,
    /// EM answers that were `<success/>` or query results.
    pub answers_ok: u64,
    /// EM `<failure>` answers by code (includes fail_code and 26).
    pub answers_by_code: BTreeMap<u32, u64>,
    /// Requests to `/emapp/EMAppServlet` (also faulted ones); not part of `calls_total`.
    pub emapp_requests: u64,
    /// EMApp pages without a `(NNN)` code (success, login form, logout prompt).
    pub emapp_answers_ok: u64,
    /// EMApp pages by their `(NNN)` code.
    pub emapp_answers_by_code: BTreeMap<u32, u64>,
    /// EMCC peer calls this simulator served as a possible home (`/_emcc/*`).
    pub emcc_requests: u64,
    /// EMCC peer calls this simulator sent as the visiting side.
    pub emcc_peer_calls: u64,
    /// Last `CALL_LOG_CAPACITY` answered calls, oldest first.
    pub log: Vec<CallRecord>,
}

const CODE_SLOTS: usize = 64;

/// Live counters shared by all connections.
#[derive(Debug)]
pub(crate) struct StatsCollector {
    started: Instant,
    calls: [AtomicU64; 7],
    in_flight_calls: AtomicU64,
    in_flight_ops: AtomicU64,
    hung_calls: AtomicU64,
    max_concurrent_calls: AtomicU64,
    max_concurrent_ops: AtomicU64,
    max_concurrent_per_device: AtomicU64,
    busy_answers: AtomicU64,
    faults_served: AtomicU64,
    answers_ok: AtomicU64,
    answers_by_code: [AtomicU64; CODE_SLOTS],
    /// Codes beyond the array (fail_code can be anything).
    answers_other_codes: Mutex<BTreeMap<u32, u64>>,
    seq: AtomicU64,
    log: Mutex<VecDeque<CallRecord>>,
    emapp_requests: AtomicU64,
    emapp_answers_ok: AtomicU64,
    emapp_answers_by_code: Mutex<BTreeMap<u32, u64>>,
    emcc_requests: AtomicU64,
    emcc_peer_calls: AtomicU64,
}

/// Slot of an EM API call kind in `calls`; EMApp/EMCC are counted separately.
fn kind_slot(kind: CallKind) -> Option<usize> {
    Some(match kind {
        CallKind::Login => 0,
        CallKind::Logout => 1,
        CallKind::LogoutAll => 2,
        CallKind::DeviceUserQuery => 3,
        CallKind::UserDevicesQuery => 4,
        CallKind::DeviceProfileQuery => 5,
        CallKind::Invalid => 6,
        CallKind::EmApp | CallKind::Emcc => return None,
    })
}

impl StatsCollector {
    pub fn new() -> Self {
        StatsCollector {
            started: Instant::now(),
            calls: Default::default(),
            in_flight_calls: AtomicU64::new(0),
            in_flight_ops: AtomicU64::new(0),
            hung_calls: AtomicU64::new(0),
            max_concurrent_calls: AtomicU64::new(0),
            max_concurrent_ops: AtomicU64::new(0),
            max_concurrent_per_device: AtomicU64::new(0),
            busy_answers: AtomicU64::new(0),
            faults_served: AtomicU64::new(0),
            answers_ok: AtomicU64::new(0),
            answers_by_code: std::array::from_fn(|_| AtomicU64::new(0)),
            answers_other_codes: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
            log: Mutex::new(VecDeque::with_capacity(1024)),
            emapp_requests: AtomicU64::new(0),
            emapp_answers_ok: AtomicU64::new(0),
            emapp_answers_by_code: Mutex::new(BTreeMap::new()),
            emcc_requests: AtomicU64::new(0),
            emcc_peer_calls: AtomicU64::new(0),
        }
    }

    /// Time since simulator start.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn count_received(&self, kind: CallKind) {
        match kind_slot(kind) {
            Some(slot) => self.calls[slot].fetch_add(1, Ordering::Relaxed),
            None if kind == CallKind::EmApp => self.emapp_requests.fetch_add(1, Ordering::Relaxed),
            None => self.emcc_requests.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn count_emcc_peer_call(&self) {
        self.emcc_peer_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an EMApp page: `None` = no `(NNN)`.
    pub fn count_emapp_answer(&self, code: Option<u32>) {
        match code {
            None => {
                self.emapp_answers_ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(code) => {
                let mut by_code = self
                    .emapp_answers_by_code
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *by_code.entry(code).or_default() += 1;
            }
        }
    }

    pub fn count_fault(&self) {
        self.faults_served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_busy(&self) {
        self.busy_answers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_answer(&self, code: Option<u32>) {
        match code {
            None => {
                self.answers_ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(code) if (code as usize) < CODE_SLOTS => {
                self.answers_by_code[code as usize].fetch_add(1, Ordering::Relaxed);
            }
            Some(code) => {
                let mut other = self
                    .answers_other_codes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *other.entry(code).or_default() += 1;
            }
        }
    }

    /// Marks an EM call as in progress until the guard drops.
    pub fn enter_call(&self) -> InFlight<'_> {
        let now = self.in_flight_calls.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_concurrent_calls.fetch_max(now, Ordering::Relaxed);
        InFlight(&self.in_flight_calls)
    }

    /// Marks a gate-admitted operation as in progress until the guard drops.
    pub fn enter_op(&self) -> InFlight<'_> {
        let now = self.in_flight_ops.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_concurrent_ops.fetch_max(now, Ordering::Relaxed);
        InFlight(&self.in_flight_ops)
    }

    pub fn enter_hang(&self) -> InFlight<'_> {
        self.hung_calls.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.hung_calls)
    }

    pub fn observe_device_concurrency(&self, in_flight_on_device: u64) {
        self.max_concurrent_per_device
            .fetch_max(in_flight_on_device, Ordering::Relaxed);
    }

    pub fn record(&self, mut record: CallRecord) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        // Assigned under the lock so the log is ordered by seq.
        record.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        if log.len() >= CALL_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(record);
    }

    pub fn snapshot(&self, with_log: bool) -> SimStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let calls: Vec<u64> = self.calls.iter().map(get).collect();
        let mut answers_by_code: BTreeMap<u32, u64> = self
            .answers_by_code
            .iter()
            .enumerate()
            .filter(|(_, n)| get(n) > 0)
            .map(|(code, n)| (code as u32, get(n)))
            .collect();
        answers_by_code.extend(
            self.answers_other_codes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (*k, *v)),
        );
        let log = if with_log {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            log.iter().cloned().collect()
        } else {
            Vec::new()
        };
        SimStats {
            calls_login: calls[0],
            calls_logout: calls[1],
            calls_logout_all: calls[2],
            calls_device_user_query: calls[3],
            calls_user_devices_query: calls[4],
            calls_device_profile_query: calls[5],
            calls_invalid: calls[6],
            calls_total: calls.iter().sum(),
            in_flight_calls: get(&self.in_flight_calls),
            in_flight_ops: get(&self.in_flight_ops),
            hung_calls: get(&self.hung_calls),
            max_concurrent_calls: get(&self.max_concurrent_calls),
            max_concurrent_ops: get(&self.max_concurrent_ops),
            max_concurrent_per_device: get(&self.max_concurrent_per_device),
            busy_answers: get(&self.busy_answers),
            faults_served: get(&self.faults_served),
            answers_ok: get(&self.answers_ok),
            answers_by_code,
            emapp_requests: get(&self.emapp_requests),
            emapp_answers_ok: get(&self.emapp_answers_ok),
            emapp_answers_by_code: self
                .emapp_answers_by_code
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            emcc_requests: get(&self.emcc_requests),
            emcc_peer_calls: get(&self.emcc_peer_calls),
            log,
        }
    }

    /// Zeroes counters and maxima and clears the log; in-flight gauges are left alone.
    pub fn reset(&self) {
        let zero = |a: &AtomicU64| a.store(0, Ordering::Relaxed);
        self.calls.iter().for_each(zero);
        self.answers_by_code.iter().for_each(zero);
        for a in [
            &self.max_concurrent_calls,
            &self.max_concurrent_ops,
            &self.max_concurrent_per_device,
            &self.busy_answers,
            &self.faults_served,
            &self.answers_ok,
            &self.emapp_requests,
            &self.emapp_answers_ok,
            &self.emcc_requests,
            &self.emcc_peer_calls,
        ] {
            zero(a);
        }
        self.answers_other_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.emapp_answers_by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Decrements an in-progress gauge on drop (also when a client disconnects mid-call).
#[must_use]
pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
