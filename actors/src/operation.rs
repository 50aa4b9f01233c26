//! What a caller asks a cluster to do, and what comes back.
//!
//! Values are validated at construction, so everything behind this module (queues,
//! cache, EM client) can trust them: a `DeviceName` is upper-case and within CUCM's
//! alphabet, a `UserId` has no control characters, and a `Credentials` never prints
//! its certificate.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const MAX_DEVICE_NAME_LEN: usize = 50;
pub const MAX_USER_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("device name must be 1-{MAX_DEVICE_NAME_LEN} characters of A-Z a-z 0-9 . _ -")]
    DeviceName,
    #[error("user ID must be 1-{MAX_USER_ID_LEN} characters without control characters")]
    UserId,
    #[error("PIN must be 1-{MAX_PIN_DIGITS} digits")]
    Pin,
}

/// A CUCM device name, upper-cased (CUCM compares them case-insensitively).
/// Cheap to clone: queues, cache and shaper all hold it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(Arc<str>);

impl DeviceName {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let valid = !raw.is_empty()
            && raw.len() <= MAX_DEVICE_NAME_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(InvalidValue::DeviceName);
        }
        Ok(Self(Arc::from(raw.to_ascii_uppercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A CUCM user ID as given (CUCM owns its case rules).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let chars = raw.chars().count();
        // U+FFFE and U+FFFF are not characters XML 1.0 allows: CUCM's parser would
        // refuse the EM request, so they are an invalid user ID here, not a 1005 later.
        let illegal = |c: char| c.is_control() || matches!(c, '\u{fffe}' | '\u{ffff}');
        if chars == 0 || chars > MAX_USER_ID_LEN || raw.chars().any(illegal) {
            return Err(InvalidValue::UserId);
        }
        Ok(Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

pub const MAX_PIN_DIGITS: usize = 32;

/// A user's EM PIN: 1-32 digits. Never printed (its Debug is masked, it has no
/// Display); the only way to the digits is `expose`, for the one EM application call.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(Secret);

impl Pin {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let valid =
            (1..=MAX_PIN_DIGITS).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit());
        if !valid {
            return Err(InvalidValue::Pin);
        }
        Ok(Self(Secret::new(raw)))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(***)")
    }
}

/// A string that must never reach a log line or a Debug dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to the value: named so that every use is easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The CUCM application user a caller passes through (appID / appCertificate).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    app_id: String,
    app_certificate: Secret,
    fingerprint: u64,
}

impl Credentials {
    pub fn new(app_id: impl Into<String>, app_certificate: impl Into<String>) -> Self {
        let app_id = app_id.into();
        let app_certificate = Secret::new(app_certificate);
        let fingerprint = fingerprint(&app_id, app_certificate.expose());
        Self {
            app_id,
            app_certificate,
            fingerprint,
        }
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    pub fn app_certificate(&self) -> &Secret {
        &self.app_certificate
    }

    /// A keyed hash of the pair: lets the cache and coalescing tell callers apart
    /// without keeping the certificate. The key is random per process, so the value
    /// is useless outside it.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("app_id", &self.app_id)
            .field("app_certificate", &self.app_certificate)
            .finish()
    }
}

fn fingerprint(app_id: &str, app_certificate: &str) -> u64 {
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut hasher = KEY.get_or_init(Default::default).build_hasher();
    hasher.write(app_id.as_bytes());
    hasher.write_u8(0xff);
    hasher.write(app_certificate.as_bytes());
    hasher.finish()
}

/// What a caller can ask of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Login {
        device: DeviceName,
        user: UserId,
    },
    /// A login with the user's PIN, done through the EM application the way the phone
    /// does it: the only way CUCM logs a user in on a phone of another cluster.
    PinLogin {
        device: DeviceName,
        user: UserId,
        pin: Pin,
    },
    Logout {
        device: DeviceName,
    },
    Query {
        device: DeviceName,
    },
    /// Which devices a user is logged in on (`userDevicesQuery`). It concerns no
    /// device, so it is serialized under its user (see [`QueueKey`]).
    UserDevicesQuery {
        user: UserId,
    },
    /// A login that, when another user is on the phone (CUCM's 18), logs that user out
    /// and the requested one in: four calls at most, all in the device's turn.
    ForceLogin {
        device: DeviceName,
        user: UserId,
    },
}

/// What an operation waits its turn under: one at a time per key, in arrival order.
/// A device's operations queue under the device; a user query under its user, so
/// identical user queries meet in one queue and share one CUCM call (it goes through
/// the same slots and rate as everything else).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueueKey {
    Device(DeviceName),
    User(UserId),
}

impl Operation {
    /// A user query.
    pub fn user_devices(user: UserId) -> Self {
        Operation::UserDevicesQuery { user }
    }

    /// The device it concerns (a user query concerns none).
    pub fn device(&self) -> Option<&DeviceName> {
        match self {
            Operation::Login { device, .. }
            | Operation::PinLogin { device, .. }
            | Operation::ForceLogin { device, .. }
            | Operation::Logout { device }
            | Operation::Query { device } => Some(device),
            Operation::UserDevicesQuery { .. } => None,
        }
    }

    pub fn queue_key(&self) -> QueueKey {
        match self {
            Operation::Login { device, .. }
            | Operation::PinLogin { device, .. }
            | Operation::ForceLogin { device, .. }
            | Operation::Logout { device }
            | Operation::Query { device } => QueueKey::Device(device.clone()),
            Operation::UserDevicesQuery { user } => QueueKey::User(user.clone()),
        }
    }

    /// Whether it changes who is logged in (then it is never sent twice).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Operation::Query { .. } | Operation::UserDevicesQuery { .. }
        )
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    LoggedIn,
    LoggedOut,
    /// Who is logged in on the device; `None` when nobody is.
    CurrentUser(Option<UserId>),
    /// The devices a user is logged in on (empty: none). `unanswered` names clusters
    /// that could not be asked when several were (the list may then miss theirs).
    UserDevices {
        devices: Vec<DeviceName>,
        unanswered: Vec<String>,
    },
    /// Logged in after logging this other user out (a forced login).
    LoggedInReplacing(UserId),
}

/// Why an operation did not succeed. Each variant maps to exactly one northbound code
/// (the mapping lives in the HTTP layer, in one place).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// CUCM's own EM failure code (1-47), passed through with its text.
    #[error("CUCM answered code {code}: {text}")]
    Cucm { code: u32, text: String },
    /// CUCM reported a failure without a usable code (its code 0, or none).
    #[error("CUCM reported a failure without a usable code: {text}")]
    CucmUnknown { text: String },
    /// Every node failed or timed out.
    #[error("CUCM unavailable: {reason}")]
    Unavailable { reason: String },
    /// HTTP 200 with a body that is not an EM API response.
    #[error("CUCM answered with an invalid EM response: {detail}")]
    InvalidResponse { detail: String },
    /// The EM application said the user's PIN is wrong (checked at the home cluster).
    #[error("PIN rejected")]
    PinRejected,
    /// No cluster code was given and the device exists in more than one cluster.
    #[error("the device exists in several clusters")]
    InSeveralClusters { clusters: Vec<String> },
    /// The cluster's queue is full or the wait would exceed the deadline.
    #[error("overloaded: {reason}")]
    Overloaded {
        reason: &'static str,
        retry_after: Duration,
    },
}

/// What the cluster hands back for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub result: Result<Outcome, OpError>,
    /// The CUCM node that answered, for the request log (bounded: from config).
    pub node: Option<Arc<str>>,
    /// Answered from the logged-in cache, without calling CUCM.
    pub from_cache: bool,
}

impl Reply {
    /// Refused or failed without a CUCM answer.
    pub fn failed(error: OpError) -> Self {
        Self {
            result: Err(error),
            node: None,
            from_cache: false,
        }
    }

    /// Who is logged in, from the cache.
    pub fn cached(user: Option<UserId>) -> Self {
        Self {
            result: Ok(Outcome::CurrentUser(user)),
            node: None,
            from_cache: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_upper_cased_and_validated() {
        assert_eq!(
            DeviceName::parse("sep1ce6c79baf1f").unwrap().as_str(),
            "SEP1CE6C79BAF1F"
        );
        assert!(DeviceName::parse("a.b_c-D9").is_ok());
        assert!(DeviceName::parse("").is_err());
        assert!(DeviceName::parse("SEP 1").is_err());
        assert!(DeviceName::parse("SEP<x>").is_err());
        assert!(DeviceName::parse(&"A".repeat(50)).is_ok());
        assert!(DeviceName::parse(&"A".repeat(51)).is_err());
    }

    #[test]
    fn user_ids_reject_control_characters_and_length() {
        assert!(UserId::parse("multi.user@example.com").is_ok());
        assert!(UserId::parse("o'brien <x>").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse(&"é".repeat(128)).is_ok());
        assert!(UserId::parse(&"é".repeat(129)).is_err());
        // Not legal in XML 1.0: refused before they could make an EM request invalid.
        assert!(UserId::parse("a\u{fffe}b").is_err());
        assert!(UserId::parse("a\u{ffff}").is_err());
    }

    #[test]
    fn pins_are_digits_and_never_printed() {
        let pin = Pin::parse("0042").unwrap();
        assert_eq!(pin.expose(), "0042");
        assert_eq!(format!("{pin:?}"), "Pin(***)");
        let op = Operation::PinLogin {
            device: DeviceName::parse("SEP1").unwrap(),
            user: UserId::parse("alice").unwrap(),
            pin,
        };
        assert!(!format!("{op:?}").contains("0042"));
        for bad in ["", "12a4", " 1234", "１２３", &"1".repeat(33)] {
            assert_eq!(Pin::parse(bad), Err(InvalidValue::Pin), "{bad:?}");
        }
        assert!(Pin::parse(&"9".repeat(32)).is_ok());
    }

    #[test]
    fn credentials_never_print_the_certificate() {
        let creds = Credentials::new("bcapp", "hunter2-secret");
        let shown = format!("{creds:?}");
        assert!(shown.contains("bcapp"));
        assert!(!shown.contains("hunter2"));
        assert_eq!(
            creds.fingerprint(),
            Credentials::new("bcapp", "hunter2-secret").fingerprint()
        );
        assert_ne!(
            creds.fingerprint(),
            Credentials::new("bcapp", "other").fingerprint()
        );
    }
}
