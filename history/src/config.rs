//! `[history]` configuration: the one type the gateway's config file deserializes into
//! and the history is opened with.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// The default file, relative to the gateway's working directory.
pub const DEFAULT_PATH: &str = "business-connector-history.sqlite";
pub const DEFAULT_RETENTION_DAYS: u32 = 90;
/// Records waiting for the writer, per lane (see `history`'s `Lane`). At ~300 bytes each,
/// 50,000 is about 15 MB. The kept lane holds what CUCM's own rate bounds (tens per second
/// per cluster), so it only fills when the database stops answering; the cache-hit lane
/// (only with `record_cache_hits`) fills at the cache-hit peak and then drops.
pub const DEFAULT_QUEUE_CAPACITY: usize = 50_000;
/// The most records a lane may hold: 1M records is about 300 MB, past which a stalled
/// database should rather drop than eat the host's memory.
pub const MAX_QUEUE_CAPACITY: usize = 1_000_000;
/// The instance name when neither the config nor the host name gives one.
pub const DEFAULT_INSTANCE: &str = "gateway";

/// `[history]`: whether, what and where requests are recorded.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Off: nothing is recorded and `/api/history` answers 503 (tests, benchmarks).
    pub enabled: bool,
    /// The SQLite file, used when `url` is absent.
    pub path: PathBuf,
    /// `postgres://user[:password]@host:port/db`: one database shared by every instance,
    /// replacing the file. Masked in `Debug`.
    pub url: Option<String>,
    /// Records older than this many days are deleted (hourly, by the writer). 0 keeps
    /// everything.
    pub retention_days: u32,
    /// Records queued for the writer, per lane, before `record` starts dropping (at least
    /// 1).
    pub queue_capacity: usize,
    /// This gateway instance's name, stored in every record it writes; default the host
    /// name (see [`HistoryConfig::instance_name`]).
    pub instance: Option<String>,
    /// Record every getloggedinuser answered from the cache one by one (default off: they
    /// are counted per cluster in the metrics and on the dashboard instead). Such records
    /// may be dropped (counted) when the machine is saturated; no other record is.
    pub record_cache_hits: bool,
    /// Accepted and ignored, so that configs written for earlier versions still start:
    /// the writer always runs at the normal CPU priority now (what it writes is bounded by
    /// CUCM's rate, and a starved writer would lose logins). The gateway logs a warning
    /// naming the key; see [`HistoryConfig::deprecated_keys`].
    #[serde(rename = "writer_priority")]
    pub deprecated_writer_priority: Option<String>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from(DEFAULT_PATH),
            url: None,
            retention_days: DEFAULT_RETENTION_DAYS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            instance: None,
            record_cache_hits: false,
            deprecated_writer_priority: None,
        }
    }
}

impl fmt::Debug for HistoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryConfig")
            .field("enabled", &self.enabled)
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(mask_password))
            .field("retention_days", &self.retention_days)
            .field("queue_capacity", &self.queue_capacity)
            .field("instance", &self.instance)
            .field("record_cache_hits", &self.record_cache_hits)
            .finish_non_exhaustive()
    }
}

impl HistoryConfig {
    /// Recording off: for tests and benchmarks that do not look at the history, and
    /// that must not share a file when run side by side.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// On, in the SQLite file `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// Errors as (key, message), for the gateway's config check.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err((
                "history.queue_capacity",
                format!("must be 1-{MAX_QUEUE_CAPACITY}"),
            ));
        }
        if self.retention_days > 36_500 {
            return Err((
                "history.retention_days",
                "must be at most 36500 (0 keeps everything)".into(),
            ));
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err((
                    "history.url",
                    "must be a postgres://user@host:port/db URL".into(),
                ));
            }
        } else if self.path.as_os_str().is_empty() {
            return Err(("history.path", "must not be empty".into()));
        }
        if let Some(instance) = &self.instance {
            if instance.trim().is_empty() || instance.len() > 256 {
                return Err(("history.instance", "must be 1-256 bytes".into()));
            }
        }
        Ok(())
    }

    /// `instance`, else the host name (what operators call the machine), else
    /// `"gateway"`.
    pub fn instance_name(&self) -> String {
        if let Some(instance) = &self.instance {
            return instance.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| DEFAULT_INSTANCE.to_string())
    }

    /// Keys set in the config that no longer do anything, with what to do instead: the
    /// gateway logs one warning for each at start.
    pub fn deprecated_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut keys = Vec::new();
        if self.deprecated_writer_priority.is_some() {
            keys.push((
                "history.writer_priority",
                "ignored: the history writer always runs at normal priority; remove the key",
            ));
        }
        keys
    }
}

const MASK: &str = "***";

/// A database URL or key=value connection string with every password replaced by `***`,
/// for logs and `Debug`: the password in `postgres://user:secret@host/db`, a
/// `?password=secret` URL parameter, and `password=secret` / `password='se cret'` in the
/// key=value form.
pub fn mask_password(connection: &str) -> String {
    let mut masked = match connection.split_once("://") {
        Some((scheme, rest)) => {
            // The authority ends at the first '/', '?' or '#'; userinfo at its last '@'.
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:{MASK}@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{tail}")
        }
        None => connection.to_string(),
    };
    masked = mask_password_parameters(&masked);
    masked
}

/// Replace the value after every `password=` (any case), up to `&`, whitespace or the
/// end, or the whole single-quoted value.
fn mask_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut position = 0;
    while let Some(found) = lower[position..].find(KEY) {
        let value_start = position + found + KEY.len();
        out.push_str(&text[position..value_start]);
        let value = &text[value_start..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // Up to the closing quote that is not escaped by a backslash.
            let mut escaped = false;
            let mut end = value.len();
            for (index, character) in quoted.char_indices() {
                match character {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = index + 2;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            end
        } else {
            value
                .find(|character: char| character == '&' || character.is_whitespace())
                .unwrap_or(value.len())
        };
        out.push_str(MASK);
        position = value_start + value_len;
    }
    out.push_str(&text[position..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_form_of_password() {
        let cases = [
            (
                "postgres://bc:s3cret@db:5432/history",
                "postgres://bc:***@db:5432/history",
            ),
            ("postgresql://bc@db/history", "postgresql://bc@db/history"),
            ("postgres://db/history", "postgres://db/history"),
            (
                "postgres://bc:p@ss@db/history",
                "postgres://bc:***@db/history",
            ),
            (
                "postgres://bc@db/history?password=s3cret&sslmode=disable",
                "postgres://bc@db/history?password=***&sslmode=disable",
            ),
            (
                "host=db user=bc password=s3cret dbname=h",
                "host=db user=bc password=*** dbname=h",
            ),
            (
                "host=db PASSWORD='a b\\' c' dbname=h",
                "host=db PASSWORD=*** dbname=h",
            ),
            ("host=db password=", "host=db password=***"),
        ];
        for (input, expected) in cases {
            assert_eq!(mask_password(input), expected, "{input}");
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let config = HistoryConfig {
            url: Some("postgres://bc:TopSecret42@db:5432/history".into()),
            ..HistoryConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("TopSecret42"), "{debug}");
        assert!(
            debug.contains("postgres://bc:***@db:5432/history"),
            "{debug}"
        );
    }

    #[test]
    fn defaults_are_the_spec_ones() {
        let config = HistoryConfig::default();
        assert_eq!(
            config.path,
            PathBuf::from("business-connector-history.sqlite")
        );
        assert_eq!(config.retention_days, 90);
        assert!(config.url.is_none());
        assert!(config.queue_capacity > 0);
        assert!(config.enabled);
        assert!(
            !config.record_cache_hits,
            "cache hits are counted, not recorded"
        );
    }

    fn parse(text: &str) -> Result<HistoryConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn the_table_parses_and_refuses_unknown_keys() {
        let config = parse(
            "record_cache_hits = true\nqueue_capacity = 10\ninstance = \"gw1\"\n\
             url = \"postgres://bc@db/h\"\nretention_days = 7\nenabled = false\n",
        )
        .expect("parses");
        assert!(config.record_cache_hits && !config.enabled);
        assert_eq!(config.instance_name(), "gw1");
        assert_eq!(config.url.as_deref(), Some("postgres://bc@db/h"));
        let error = parse("record_cache_hit = true\n").expect_err("a typo is refused");
        assert!(error.to_string().contains("record_cache_hit"), "{error}");
    }

    #[test]
    fn writer_priority_is_accepted_and_reported_as_ignored() {
        for value in ["idle", "normal"] {
            let config = parse(&format!("writer_priority = \"{value}\"\n")).expect("parses");
            let keys: Vec<&str> = config.deprecated_keys().iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, ["history.writer_priority"]);
        }
        assert!(HistoryConfig::default().deprecated_keys().is_empty());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                HistoryConfig {
                    queue_capacity: 0,
                    ..HistoryConfig::default()
                },
                "history.queue_capacity",
            ),
            (
                HistoryConfig {
                    queue_capacity: MAX_QUEUE_CAPACITY + 1,
                    ..HistoryConfig::default()
                },
                "history.queue_capacity",
            ),
            (
                HistoryConfig {
                    url: Some("mysql://x".into()),
                    ..HistoryConfig::default()
                },
                "history.url",
            ),
            (
                HistoryConfig {
                    instance: Some(" ".into()),
                    ..HistoryConfig::default()
                },
                "history.instance",
            ),
            (
                HistoryConfig {
                    retention_days: 40_000,
                    ..HistoryConfig::default()
                },
                "history.retention_days",
            ),
        ];
        for (config, key) in cases {
            assert_eq!(config.validate().map_err(|(k, _)| k), Err(key));
        }
        assert!(HistoryConfig::default().validate().is_ok());
    }
}
