//! One history record and the types of its fields.
//!
//! There is deliberately no field for the application password (`appCertificate`) or the
//! PIN: what the type cannot hold, no code path can write to the database.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Longest `cluster`, `device`, `user`, `node`, `client`, `app` and `instance` kept, in
/// bytes. Longer values are cut at a character boundary: a history row must stay small
/// whatever a client sends.
pub const MAX_FIELD_BYTES: usize = 256;
/// Longest `text` kept, in bytes (CUCM's texts are sentences, not documents).
pub const MAX_TEXT_BYTES: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not an RFC 3339 time: {0}")]
    Time(String),
    #[error("time out of range")]
    TimeRange,
    #[error("unknown operation {0:?} (login, logout, getloggedinuser, getuserdevices, observed)")]
    Operation(String),
    #[error("unknown source {0:?} (cucm, cache, gateway, poll, query)")]
    Source(String),
}

/// A point in time in UTC, in milliseconds since the Unix epoch: the precision the
/// history asks for, and an integer that sorts and indexes cheaply in both SQLite and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcMillis(pub i64);

impl UtcMillis {
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            // A clock before 1970 is a broken clock; 0 keeps the record rather than failing.
            .unwrap_or(0);
        Self(since_epoch)
    }

    /// `2024-05-01T08:55:00.123Z`: always UTC, always three fraction digits, so the
    /// strings sort like the times they name.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(moment) => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                moment.year(),
                u8::from(moment.month()),
                moment.day(),
                moment.hour(),
                moment.minute(),
                moment.second(),
                moment.millisecond()
            ),
            // Only reachable for times beyond year ±9999, which no clock produces; still
            // render something rather than panic.
            Err(_) => self.0.to_string(),
        }
    }

    /// Any RFC 3339 time (any offset, any fraction); sub-millisecond digits are dropped
    /// (rounded towards the past).
    pub fn parse_rfc3339(text: &str) -> Result<Self, RecordError> {
        let moment = OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|_| RecordError::Time(text.chars().take(64).collect()))?;
        let millis = moment.unix_timestamp_nanos().div_euclid(1_000_000);
        i64::try_from(millis)
            .map(Self)
            .map_err(|_| RecordError::TimeRange)
    }

    /// `days` days before this time (saturating: a huge retention means "keep everything").
    pub fn minus_days(self, days: u32) -> Self {
        Self(self.0.saturating_sub(i64::from(days) * 86_400_000))
    }
}

impl fmt::Display for UtcMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// The API call a record is about (its northbound name), or `observed`: a change of a
/// device's user the gateway saw (made at the phone or elsewhere), not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Login,
    Logout,
    GetLoggedInUser,
    GetUserDevices,
    Observed,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Login,
        Operation::Logout,
        Operation::GetLoggedInUser,
        Operation::GetUserDevices,
        Operation::Observed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Login => "login",
            Operation::Logout => "logout",
            Operation::GetLoggedInUser => "getloggedinuser",
            Operation::GetUserDevices => "getuserdevices",
            Operation::Observed => "observed",
        }
    }
}

impl FromStr for Operation {
    type Err = RecordError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Operation::ALL
            .into_iter()
            .find(|operation| operation.as_str() == text)
            .ok_or_else(|| RecordError::Operation(text.chars().take(64).collect()))
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who produced the answer: CUCM itself, the gateway's cache, or the gateway alone
/// (a refusal such as 1002 or 1004, which never reached CUCM). For an `observed`
/// change: what saw it, a watch `poll` or a caller's `query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Cucm,
    Cache,
    Gateway,
    Poll,
    Query,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Cucm,
        Source::Cache,
        Source::Gateway,
        Source::Poll,
        Source::Query,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cucm => "cucm",
            Source::Cache => "cache",
            Source::Gateway => "gateway",
            Source::Poll => "poll",
            Source::Query => "query",
        }
    }
}

impl FromStr for Source {
    type Err = RecordError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Source::ALL
            .into_iter()
            .find(|source| source.as_str() == text)
            .ok_or_else(|| RecordError::Source(text.chars().take(64).collect()))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API request as the history keeps it. Field names are the API's (`user` is the
/// user ID, `client` the client's address, `app` the appID), plus `instance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub time: UtcMillis,
    pub operation: Operation,
    pub cluster: Option<String>,
    pub device: Option<String>,
    pub user: Option<String>,
    pub code: i64,
    pub text: String,
    /// How long the answer took, in microseconds (shown as `duration_ms` with three
    /// decimals).
    pub duration_us: u64,
    pub source: Source,
    pub node: Option<String>,
    pub client: Option<String>,
    pub app: Option<String>,
    /// The gateway instance that answered. `History::record` sets it from the config.
    pub instance: String,
}

impl Record {
    /// A record stamped now, with every optional field empty; fill in the rest.
    pub fn new(operation: Operation, code: i64, source: Source) -> Self {
        Self {
            time: UtcMillis::now(),
            operation,
            cluster: None,
            device: None,
            user: None,
            code,
            text: String::new(),
            duration_us: 0,
            source,
            node: None,
            client: None,
            app: None,
            instance: String::new(),
        }
    }

    /// Cut every string to its bound (`MAX_FIELD_BYTES`, `MAX_TEXT_BYTES` for `text`).
    pub fn bound(&mut self) {
        for field in [
            &mut self.cluster,
            &mut self.device,
            &mut self.user,
            &mut self.node,
            &mut self.client,
            &mut self.app,
        ]
        .into_iter()
        .flatten()
        {
            truncate_at_char_boundary(field, MAX_FIELD_BYTES);
        }
        truncate_at_char_boundary(&mut self.instance, MAX_FIELD_BYTES);
        truncate_at_char_boundary(&mut self.text, MAX_TEXT_BYTES);
    }
}

/// Shorten `text` to at most `max_bytes` bytes without splitting a UTF-8 character.
pub fn truncate_at_char_boundary(text: &mut String, max_bytes: usize) {
    if text.len() <= max_bytes {
        return;
    }
    let mut cut = max_bytes;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc3339_with_milliseconds_and_z() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_714_553_700_123, "2024-05-01T08:55:00.123Z"),
            (1_714_553_700_007, "2024-05-01T08:55:00.007Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
        ];
        for (millis, expected) in cases {
            assert_eq!(UtcMillis(millis).to_rfc3339(), expected, "{millis}");
        }
    }

    #[test]
    fn parses_rfc3339_in_any_offset() {
        let cases = [
            ("2024-05-01T08:55:00.123Z", 1_714_553_700_123),
            ("2024-05-01T08:55:00Z", 1_714_553_700_000),
            ("2024-05-01T10:55:00.123+02:00", 1_714_553_700_123),
            ("2024-05-01T08:55:00.123999Z", 1_714_553_700_123),
        ];
        for (text, millis) in cases {
            assert_eq!(
                UtcMillis::parse_rfc3339(text),
                Ok(UtcMillis(millis)),
                "{text}"
            );
        }
        for bad in ["", "2024-05-01", "yesterday", "2024-05-01T08:55:00"] {
            assert!(UtcMillis::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trips_through_text() {
        let now = UtcMillis::now();
        assert_eq!(UtcMillis::parse_rfc3339(&now.to_rfc3339()), Ok(now));
    }

    #[test]
    fn operations_and_sources_round_trip() {
        for operation in Operation::ALL {
            assert_eq!(operation.as_str().parse::<Operation>(), Ok(operation));
        }
        for source in Source::ALL {
            assert_eq!(source.as_str().parse::<Source>(), Ok(source));
        }
        assert!("LOGIN".parse::<Operation>().is_err());
        assert!("db".parse::<Source>().is_err());
    }

    #[test]
    fn truncates_at_a_char_boundary() {
        let mut ascii = "abcdef".to_string();
        truncate_at_char_boundary(&mut ascii, 4);
        assert_eq!(ascii, "abcd");
        // "é" is two bytes: a cut in its middle moves back before it.
        let mut accented = "aé".to_string();
        truncate_at_char_boundary(&mut accented, 2);
        assert_eq!(accented, "a");
        let mut short = "ok".to_string();
        truncate_at_char_boundary(&mut short, 10);
        assert_eq!(short, "ok");
    }

    #[test]
    fn bound_cuts_every_string() {
        let mut record = Record::new(Operation::Login, 0, Source::Cucm);
        record.device = Some("D".repeat(1000));
        record.user = Some("ü".repeat(1000));
        record.text = "t".repeat(5000);
        record.instance = "i".repeat(1000);
        record.bound();
        assert_eq!(
            record.device.as_deref().map(str::len),
            Some(MAX_FIELD_BYTES)
        );
        assert_eq!(record.user.as_deref().map(str::len), Some(MAX_FIELD_BYTES));
        assert_eq!(record.text.len(), MAX_TEXT_BYTES);
        assert_eq!(record.instance.len(), MAX_FIELD_BYTES);
    }

    #[test]
    fn minus_days_saturates() {
        assert_eq!(UtcMillis(86_400_000).minus_days(1), UtcMillis(0));
        assert_eq!(UtcMillis(i64::MIN + 1).minus_days(10), UtcMillis(i64::MIN));
    }
}
