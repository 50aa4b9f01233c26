//! `[history]` configuration.

use std::fmt;
use std::path::PathBuf;

use crate::priority::WriterPriority;

/// The default file, relative to the gateway's working directory.
pub const DEFAULT_PATH: &str = "business-connector-history.sqlite";
pub const DEFAULT_RETENTION_DAYS: u32 = 90;
/// Records waiting for the writer. At ~300 bytes each, 50,000 is about 15 MB. The writer
/// empties the queue when it is half full, and a write of 25,000 records takes a few
/// hundred milliseconds while requests keep arriving: at the single-core cache-hit peak
/// (~40,000 recorded requests/s) 10,000 dropped records, 50,000 did not.
pub const DEFAULT_QUEUE_CAPACITY: usize = 50_000;
pub const DEFAULT_INSTANCE: &str = "gateway";

#[derive(Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// The SQLite file, used when `url` is absent.
    pub path: PathBuf,
    /// `postgres://user[:password]@host:port/db`: one database shared by every instance,
    /// replacing the file. Masked in `Debug`.
    pub url: Option<String>,
    /// Records older than this many days are deleted (hourly, by the writer). 0 keeps
    /// everything.
    pub retention_days: u32,
    /// Records queued for the writer before `record` starts dropping (at least 1).
    pub queue_capacity: usize,
    /// This gateway instance's name, stored in every record it writes.
    pub instance: String,
    /// The writer thread's CPU priority (default `Idle`: requests first).
    pub writer_priority: WriterPriority,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_PATH),
            url: None,
            retention_days: DEFAULT_RETENTION_DAYS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            instance: DEFAULT_INSTANCE.to_string(),
            writer_priority: WriterPriority::default(),
        }
    }
}

impl fmt::Debug for HistoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryConfig")
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(mask_password))
            .field("retention_days", &self.retention_days)
            .field("queue_capacity", &self.queue_capacity)
            .field("instance", &self.instance)
            .field("writer_priority", &self.writer_priority)
            .finish()
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
    }
}
