//! `[watch]`: which devices the gateway keeps fresh and with which credentials, read
//! from the config and the files it names (at start, and again on SIGHUP).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actors::watch::{WatchSettings, Watching, MAX_WATCHED_PER_CLUSTER};
use actors::{Credentials, DeviceName, Router};
use serde::Deserialize;

/// Largest `devices_file` or `app_certificate_file` read (a list of 100,000 names fits).
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// How long finding the cluster of one always-watched device may take.
const LOCATE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("[watch] cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("[watch] {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("[watch] {path} line {line}: not a device name (1-50 of A-Z a-z 0-9 . _ -)")]
    DeviceName { path: String, line: usize },
    #[error("[watch] {path}: more than {max} devices")]
    TooManyDevices { path: String, max: usize },
    #[error("[watch] {path}: the application certificate is empty")]
    EmptyCertificate { path: String },
}

/// `[watch]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    pub enabled: bool,
    /// A device named in a request is watched this long after its last request.
    pub ttl_ms: u64,
    /// Each watched device is asked at least this often.
    pub interval_ms: u64,
    /// The part of a cluster's `max_requests_per_second` polls may use.
    pub rate_share: f64,
    /// Devices watched always: one name per line, `#` starts a comment.
    pub devices_file: Option<PathBuf>,
    /// The application user for polls (with `app_certificate_file`); without it, the
    /// latest credentials CUCM accepted on the cluster.
    pub app_id: Option<String>,
    /// A file holding the application user's password.
    pub app_certificate_file: Option<PathBuf>,
    /// Events kept for clients resuming with `Last-Event-ID`.
    pub event_buffer: usize,
    /// Most devices one cluster watches.
    pub max_devices_per_cluster: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_ms: 86_400_000,
            interval_ms: 60_000,
            rate_share: 0.25,
            devices_file: None,
            app_id: None,
            app_certificate_file: None,
            event_buffer: 10_000,
            max_devices_per_cluster: 50_000,
        }
    }
}

impl fmt::Debug for WatchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchConfig")
            .field("enabled", &self.enabled)
            .field("ttl_ms", &self.ttl_ms)
            .field("interval_ms", &self.interval_ms)
            .field("rate_share", &self.rate_share)
            .field("devices_file", &self.devices_file)
            .field("app_id", &self.app_id)
            .field("app_certificate_file", &self.app_certificate_file)
            .field("event_buffer", &self.event_buffer)
            .field("max_devices_per_cluster", &self.max_devices_per_cluster)
            .finish()
    }
}

impl WatchConfig {
    /// Errors as (key, message), for `Config::validate`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1_000..=30 * 86_400_000).contains(&self.ttl_ms) {
            return Err(("ttl_ms", "[watch] must be 1000-2592000000 (30 days)".into()));
        }
        if !(1_000..=86_400_000).contains(&self.interval_ms) {
            return Err(("interval_ms", "[watch] must be 1000-86400000".into()));
        }
        if !(self.rate_share > 0.0 && self.rate_share <= 1.0) {
            return Err((
                "rate_share",
                "[watch] must be more than 0 and at most 1".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.event_buffer) {
            return Err(("event_buffer", "[watch] must be 1-1000000".into()));
        }
        if !(1..=MAX_WATCHED_PER_CLUSTER).contains(&self.max_devices_per_cluster) {
            return Err((
                "max_devices_per_cluster",
                format!("[watch] must be 1-{MAX_WATCHED_PER_CLUSTER}"),
            ));
        }
        match (&self.app_id, &self.app_certificate_file) {
            (Some(app_id), Some(_)) => {
                if app_id.is_empty() || app_id.len() > 128 || app_id.chars().any(char::is_control) {
                    return Err((
                        "app_id",
                        "[watch] must be 1-128 characters, no control characters".into(),
                    ));
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err((
                    "app_certificate_file",
                    "[watch] is needed with app_id".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    "app_id",
                    "[watch] is needed with app_certificate_file".into(),
                ))
            }
        }
        Ok(())
    }

    pub fn settings(&self) -> WatchSettings {
        WatchSettings {
            enabled: self.enabled,
            ttl: Duration::from_millis(self.ttl_ms),
            interval: Duration::from_millis(self.interval_ms),
            rate_share: self.rate_share,
            max_per_cluster: self.max_devices_per_cluster,
        }
    }

    /// The configured poll credentials (the certificate file read now).
    pub fn credentials(&self) -> Result<Option<Credentials>, WatchError> {
        let (Some(app_id), Some(path)) = (&self.app_id, &self.app_certificate_file) else {
            return Ok(None);
        };
        let text = read_bounded(path)?;
        // A trailing line end is the editor's, not the password's.
        let secret = text.trim_end_matches(['\r', '\n']);
        if secret.is_empty() {
            return Err(WatchError::EmptyCertificate {
                path: path.display().to_string(),
            });
        }
        Ok(Some(Credentials::new(app_id.clone(), secret)))
    }

    /// The always-watched devices (the file read now; none without one).
    pub fn always_watched(&self) -> Result<Vec<DeviceName>, WatchError> {
        match &self.devices_file {
            Some(path) => parse_devices(path, &read_bounded(path)?, MAX_WATCHED_PER_CLUSTER),
            None => Ok(Vec::new()),
        }
    }
}

fn read_bounded(path: &Path) -> Result<String, WatchError> {
    let read_error = |source| WatchError::Read {
        path: path.display().to_string(),
        source,
    };
    let length = std::fs::metadata(path).map_err(read_error)?.len();
    if length > MAX_FILE_BYTES {
        return Err(WatchError::TooLarge {
            path: path.display().to_string(),
        });
    }
    std::fs::read_to_string(path).map_err(read_error)
}

/// One device name per line; blank lines and `#` comments (whole or trailing) skipped;
/// names are upper-cased (CUCM's are case-insensitive), duplicates kept once.
fn parse_devices(path: &Path, text: &str, max: usize) -> Result<Vec<DeviceName>, WatchError> {
    let mut devices = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let device = DeviceName::parse(name).map_err(|_| WatchError::DeviceName {
            path: path.display().to_string(),
            line: index + 1,
        })?;
        if seen.insert(device.clone()) {
            devices.push(device);
        }
        if devices.len() > max {
            return Err(WatchError::TooManyDevices {
                path: path.display().to_string(),
                max,
            });
        }
    }
    Ok(devices)
}

/// What start-up read for `[watch]`: the shared watch state the clusters use, and the
/// always-watched list to hand them once they run.
pub struct Loaded {
    pub watching: Watching,
    pub always: Vec<DeviceName>,
}

/// Reads the files `[watch]` names; any error stops the start.
pub fn load(
    config: &WatchConfig,
    hub: Arc<actors::events::EventHub>,
) -> Result<Loaded, WatchError> {
    let watching = Watching::new(config.settings(), hub);
    watching.set_credentials(config.credentials()?);
    let always = if config.enabled {
        config.always_watched()?
    } else {
        Vec::new()
    };
    Ok(Loaded { watching, always })
}

/// Hands the always-watched list to the clusters (discovery may take a while with
/// several clusters, so this runs in the background).
pub fn place_always_watched(router: Arc<Router>, watching: Watching, devices: Vec<DeviceName>) {
    if !watching.settings.enabled {
        return;
    }
    actix_web::rt::spawn(async move {
        let count = devices.len();
        let placed = router
            .watch_always(
                devices,
                watching.configured_credentials().map(|c| (*c).clone()),
                LOCATE_WAIT,
            )
            .await;
        if placed < count {
            tracing::warn!(
                listed = count,
                placed,
                "[watch] some always-watched devices were found in no cluster (or no [watch] app_id to look for them with): they are not watched"
            );
        } else if count > 0 {
            tracing::info!(devices = count, "[watch] always-watched devices placed");
        }
    });
}

/// On SIGHUP: re-reads the certificate file and the devices file. A file that cannot
/// be read keeps what was read before (and is logged).
#[cfg(unix)]
pub fn reload_on_sighup(config: WatchConfig, router: Arc<Router>, watching: Watching) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("[watch] cannot listen for SIGHUP: the watch files are read at start only");
        return;
    };
    actix_web::rt::spawn(async move {
        while hangup.recv().await.is_some() {
            match config.credentials() {
                Ok(credentials) => watching.set_credentials(credentials),
                Err(error) => {
                    tracing::warn!(%error, "SIGHUP: keeping the poll credentials read before")
                }
            }
            if config.enabled && config.devices_file.is_some() {
                match config.always_watched() {
                    Ok(devices) => place_always_watched(router.clone(), watching.clone(), devices),
                    Err(error) => {
                        tracing::warn!(%error, "SIGHUP: keeping the always-watched devices read before")
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_devices_file_skips_comments_and_names_the_bad_line() {
        let path = Path::new("devices.txt");
        let text =
            "# desks, floor 3\nSEP001122334455\n\n  sep001122334455  # again\nSEP0A0B0C0D0E0F\n";
        let devices = parse_devices(path, text, 10).unwrap();
        assert_eq!(
            devices.iter().map(DeviceName::as_str).collect::<Vec<_>>(),
            ["SEP001122334455", "SEP0A0B0C0D0E0F"]
        );
        let error = parse_devices(path, "SEP1\nnot a device\n", 10).unwrap_err();
        assert_eq!(
            error.to_string(),
            "[watch] devices.txt line 2: not a device name (1-50 of A-Z a-z 0-9 . _ -)"
        );
        assert!(matches!(
            parse_devices(path, "SEP1\nSEP2\nSEP3\n", 2),
            Err(WatchError::TooManyDevices { .. })
        ));
    }

    #[test]
    fn validate_checks_ranges_and_pairs() {
        let good = WatchConfig::default();
        assert_eq!(good.validate(), Ok(()));
        let share = WatchConfig {
            rate_share: 0.0,
            ..WatchConfig::default()
        };
        assert_eq!(share.validate().unwrap_err().0, "rate_share");
        let half = WatchConfig {
            app_id: Some("poller".into()),
            ..WatchConfig::default()
        };
        assert_eq!(half.validate().unwrap_err().0, "app_certificate_file");
    }

    #[test]
    fn the_certificate_is_never_in_debug() {
        let dir = std::env::temp_dir().join(format!("bc-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "s3cr3t-pw\n").unwrap();
        let config = WatchConfig {
            app_id: Some("poller".into()),
            app_certificate_file: Some(path.clone()),
            ..WatchConfig::default()
        };
        let credentials = config.credentials().unwrap().unwrap();
        assert_eq!(credentials.app_certificate().expose(), "s3cr3t-pw");
        assert!(!format!("{credentials:?}").contains("s3cr3t"));
        assert!(!format!("{config:?}").contains("s3cr3t"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
