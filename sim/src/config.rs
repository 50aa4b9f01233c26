//! Configuration of the simulated cluster: listen address, seeding, fixture file,
//! application users, CUCM service parameters and the behaviour knobs (latency, faults).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::emapp::Pin;

/// PIN of every user that was given none (seeded users, fixture users without `pin`).
pub const DEFAULT_PIN: &str = "12345";

/// Errors while loading configuration or a fixture file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read fixture file {path}: {source}")]
    ReadFixture {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TOML fixture: {0}")]
    FixtureToml(#[from] toml::de::Error),
    #[error("invalid JSON fixture: {0}")]
    FixtureJson(#[from] serde_json::Error),
    #[error("invalid latency {0:?}: expected MS or MIN..MAX (milliseconds)")]
    Latency(String),
    #[error(
        "invalid multiple-login behaviour {0:?}: expected not-allowed, allowed or auto-logout"
    )]
    MultipleLogin(String),
}

/// Everything needed to start one simulated CUCM cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Address of the EM service listener; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Number of seeded devices `SEP000000000001`.. (all EM-enabled).
    pub devices: usize,
    /// Number of seeded end users `user1`.. (each with profile `userN-UDP`).
    pub users: usize,
    /// Explicit devices, users and app users, applied after seeding (overrides same names).
    pub fixture: Option<Fixture>,
    /// Application users allowed to call the API. Default: `bcapp`/`bcsecret` with proxy rights.
    pub app_users: Vec<AppUser>,
    /// CUCM service parameter "Maximum Concurrent Requests" (login/logout ops), default 5.
    pub max_concurrent: usize,
    /// CUCM service parameter "Multiple Login Behavior", default not allowed.
    pub multiple_login: MultipleLogin,
    /// Initial latency and faults; changeable at run time.
    pub behavior: Behavior,
    /// Serve HTTPS with a generated self-signed certificate.
    pub tls: bool,
    /// Tokio worker threads of the simulator's own runtime (1 = current-thread runtime).
    pub threads: usize,
    /// PINs by user ID (EMApp login); users not listed have [`DEFAULT_PIN`].
    pub pins: HashMap<String, Pin>,
    /// EMCC peers (other simulators' EM URLs or `HOST:PORT`) asked about users not
    /// defined here. More can be added at run time with `add_emcc_peer`.
    pub emcc_peers: Vec<String>,
    /// EMApp "Validate IP Address": `Some(list)` = only these caller IPs may use
    /// EMApp (others get `(28)`); `None` (default) = no check.
    pub emapp_trusted_ips: Option<Vec<IpAddr>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            devices: 0,
            users: 0,
            fixture: None,
            app_users: vec![AppUser::default_gateway_app()],
            max_concurrent: 5,
            multiple_login: MultipleLogin::NotAllowed,
            behavior: Behavior::default(),
            tls: false,
            threads: 1,
            pins: HashMap::new(),
            emcc_peers: Vec::new(),
            emapp_trusted_ips: None,
        }
    }
}

/// An application user (CUCM "Application User"); credentials travel in `<appInfo>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppUser {
    pub app_id: String,
    pub app_certificate: String,
    /// Member of "Standard EM Authentication Proxy Rights" (may act for any user).
    #[serde(default = "default_true")]
    pub proxy_rights: bool,
}

impl AppUser {
    /// The app user the gateway is configured with by default: `bcapp` / `bcsecret`.
    pub fn default_gateway_app() -> Self {
        AppUser {
            app_id: "bcapp".to_string(),
            app_certificate: "bcsecret".to_string(),
            proxy_rights: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// CUCM "Multiple Login Behavior" service parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultipleLogin {
    /// Second login of a user elsewhere fails with code 25 (CUCM default).
    #[default]
    NotAllowed,
    /// A user may be logged in on several devices.
    Allowed,
    /// Logging in elsewhere first logs the user out of the other device(s).
    AutoLogout,
}

impl std::str::FromStr for MultipleLogin {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "not-allowed" | "notallowed" => Ok(MultipleLogin::NotAllowed),
            "allowed" => Ok(MultipleLogin::Allowed),
            "auto-logout" | "autologout" => Ok(MultipleLogin::AutoLogout),
            _ => Err(ConfigError::MultipleLogin(s.to_string())),
        }
    }
}

/// Run-time knobs: latency and injected faults. Body of `POST /_sim/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behavior {
    /// Latency of login/logout/logoutAll (and of queries unless `query_latency` is set).
    pub latency: Latency,
    /// Separate latency for queries and unparsable requests.
    pub query_latency: Option<Latency>,
    pub faults: Faults,
}

impl Behavior {
    pub(crate) fn latency_for_query(&self) -> Latency {
        self.query_latency.unwrap_or(self.latency)
    }
}

/// Simulated processing time. JSON: `"none"`, `{"fixed_ms": 100}` or
/// `{"min_ms": 50, "max_ms": 150}` (milliseconds, fractions allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LatencySpec", into = "LatencySpec")]
pub enum Latency {
    #[default]
    None,
    Fixed(Duration),
    Uniform {
        min: Duration,
        max: Duration,
    },
}

impl Latency {
    /// Picks the delay for one call.
    pub fn sample(&self) -> Duration {
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                if max <= min {
                    min
                } else {
                    use rand::Rng;
                    rand::rng().random_range(min..=max)
                }
            }
        }
    }

    /// Parses the CLI forms `100` (fixed) or `50..150` (uniform), in milliseconds.
    pub fn parse_ms(text: &str) -> Result<Latency, ConfigError> {
        let bad = || ConfigError::Latency(text.to_string());
        let ms = |s: &str| -> Result<Duration, ConfigError> {
            let v: f64 = s.trim().parse().map_err(|_| bad())?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad());
            }
            Ok(Duration::from_secs_f64(v / 1000.0))
        };
        match text.split_once("..") {
            Some((min, max)) => {
                let (min, max) = (ms(min)?, ms(max.trim_start_matches('='))?);
                if max < min {
                    return Err(bad());
                }
                Ok(Latency::Uniform { min, max })
            }
            None => {
                let d = ms(text)?;
                Ok(if d.is_zero() {
                    Latency::None
                } else {
                    Latency::Fixed(d)
                })
            }
        }
    }
}

/// Wire form of [`Latency`] (milliseconds keep the JSON readable).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum LatencySpec {
    Fixed { fixed_ms: f64 },
    Uniform { min_ms: f64, max_ms: f64 },
    Word(String),
    Null(()),
}

fn ms_to_duration(ms: f64) -> Duration {
    if ms.is_finite() && ms > 0.0 {
        Duration::from_secs_f64(ms / 1000.0)
    } else {
        Duration::ZERO
    }
}

impl From<LatencySpec> for Latency {
    fn from(spec: LatencySpec) -> Self {
        match spec {
            LatencySpec::Fixed { fixed_ms } => Latency::Fixed(ms_to_duration(fixed_ms)),
            LatencySpec::Uniform { min_ms, max_ms } => Latency::Uniform {
                min: ms_to_duration(min_ms),
                max: ms_to_duration(max_ms),
            },
            // "none" or null: anything else is not a latency we understand; no delay.
            LatencySpec::Word(_) | LatencySpec::Null(()) => Latency::None,
        }
    }
}

impl From<Latency> for LatencySpec {
    fn from(latency: Latency) -> Self {
        match latency {
            Latency::None => LatencySpec::Word("none".to_string()),
            Latency::Fixed(d) => LatencySpec::Fixed {
                fixed_ms: d.as_secs_f64() * 1000.0,
            },
            Latency::Uniform { min, max } => LatencySpec::Uniform {
                min_ms: min.as_secs_f64() * 1000.0,
                max_ms: max.as_secs_f64() * 1000.0,
            },
        }
    }
}

/// Injected faults; all off by default. The control endpoint is never affected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Accept EM requests and never answer while on (connections of hung calls are
    /// closed when it is turned off again).
    pub hang: bool,
    /// Answer every EM call with this HTTP status (e.g. 500, 503) and a non-EM body.
    pub http_status: Option<u16>,
    /// Answer every EM call with HTTP 200 and an HTML body that is not an EM response.
    pub garbage: bool,
    /// Close the listener (ECONNREFUSED) and all EM connections; off re-binds the same address.
    pub refuse: bool,
    /// Every Nth login/logout/logoutAll answers code 26.
    pub busy_every: Option<u32>,
    /// Every EM call answers `<failure><error code="N">` (0 = Unknown Error is allowed).
    pub fail_code: Option<u32>,
}

/// Devices, end users and app users to create in addition to (or instead of) seeding.
/// Parsed from TOML or JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fixture {
    pub devices: Vec<FixtureDevice>,
    pub users: Vec<FixtureUser>,
    pub app_users: Vec<AppUser>,
}

impl Fixture {
    pub fn from_toml_str(text: &str) -> Result<Fixture, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    pub fn from_json_str(text: &str) -> Result<Fixture, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Loads a fixture file: `.json` is JSON, anything else TOML. (`pin`s are ignored
    /// here; see [`Fixture::load_with_pins`].)
    pub fn load(path: &Path) -> Result<Fixture, ConfigError> {
        Fixture::load_with_pins(path).map(|(fixture, _)| fixture)
    }

    /// Loads a fixture file and the users' `pin`s (for [`SimConfig::pins`]). The PINs
    /// live outside [`FixtureUser`] so that existing struct literals keep compiling.
    pub fn load_with_pins(path: &Path) -> Result<(Fixture, HashMap<String, Pin>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFixture {
            path: path.display().to_string(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        if is_json {
            Ok((
                Fixture::from_json_str(&text)?,
                serde_json::from_str::<FixturePins>(&text)?.into_map(),
            ))
        } else {
            Ok((
                Fixture::from_toml_str(&text)?,
                toml::from_str::<FixturePins>(&text)?.into_map(),
            ))
        }
    }

    /// The `pin`s of a TOML fixture text (user ID → PIN).
    pub fn pins_from_toml_str(text: &str) -> Result<HashMap<String, Pin>, ConfigError> {
        Ok(toml::from_str::<FixturePins>(text)?.into_map())
    }

    /// The `pin`s of a JSON fixture text (user ID → PIN).
    pub fn pins_from_json_str(text: &str) -> Result<HashMap<String, Pin>, ConfigError> {
        Ok(serde_json::from_str::<FixturePins>(text)?.into_map())
    }
}

/// Only the `[[users]]` `id`/`pin` pairs of a fixture (other fields are ignored).
#[derive(Deserialize, Default)]
#[serde(default)]
struct FixturePins {
    users: Vec<FixtureUserPin>,
}

#[derive(Deserialize)]
struct FixtureUserPin {
    id: String,
    #[serde(default)]
    pin: Option<Pin>,
}

impl FixturePins {
    fn into_map(self) -> HashMap<String, Pin> {
        self.users
            .into_iter()
            .filter_map(|u| Some((u.id, u.pin?)))
            .collect()
    }
}

/// A phone. Names are matched case-insensitively and stored upper-case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureDevice {
    pub name: String,
    /// "Enable Extension Mobility" on the device.
    #[serde(default = "default_true")]
    pub em_enabled: bool,
    /// User remembered as last login (shown as `<lastlogin>`).
    #[serde(default)]
    pub last_login: Option<String>,
    /// User logged in at start (with their default profile).
    #[serde(default)]
    pub logged_in: Option<String>,
}

/// An end user with their device profiles (user device profiles, UDPs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureUser {
    pub id: String,
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Default profile; when absent the first profile is the default.
    #[serde(default)]
    pub default_profile: Option<String>,
    /// Password, so this end user can authenticate as `appID` (acting for themselves only).
    #[serde(default)]
    pub password: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_json_forms() {
        let b: Behavior = serde_json::from_str(r#"{"latency":{"fixed_ms":100}}"#).unwrap();
        assert_eq!(b.latency, Latency::Fixed(Duration::from_millis(100)));
        let b: Behavior = serde_json::from_str(
            r#"{"latency":{"min_ms":50,"max_ms":150},"query_latency":"none"}"#,
        )
        .unwrap();
        assert_eq!(
            b.latency,
            Latency::Uniform {
                min: Duration::from_millis(50),
                max: Duration::from_millis(150)
            }
        );
        assert_eq!(b.query_latency, Some(Latency::None));
        let text = serde_json::to_string(&b).unwrap();
        let back: Behavior = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn latency_cli_forms() {
        assert_eq!(
            Latency::parse_ms("100").unwrap(),
            Latency::Fixed(Duration::from_millis(100))
        );
        assert_eq!(Latency::parse_ms("0").unwrap(), Latency::None);
        assert!(matches!(
            Latency::parse_ms("50..150").unwrap(),
            Latency::Uniform { .. }
        ));
        assert!(Latency::parse_ms("150..50").is_err());
        assert!(Latency::parse_ms("x").is_err());
    }

    #[test]
    fn fixture_toml_and_json() {
        let toml_text = r#"
            [[devices]]
            name = "SEP00AABBCCDDEE"
            em_enabled = false
            [[users]]
            id = "em@cisco.com"
            profiles = ["EM-A", "EM-B"]
            default_profile = "EM-B"
            [[app_users]]
            app_id = "weak"
            app_certificate = "pw"
            proxy_rights = false
        "#;
        let f = Fixture::from_toml_str(toml_text).unwrap();
        assert!(!f.devices[0].em_enabled);
        assert_eq!(f.users[0].default_profile.as_deref(), Some("EM-B"));
        assert!(!f.app_users[0].proxy_rights);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(Fixture::from_json_str(&json).unwrap(), f);
    }

    #[test]
    fn fixture_pins() {
        let toml_text = r#"
            [[users]]
            id = "a"
            pin = "4711"
            [[users]]
            id = "b"
        "#;
        assert!(
            Fixture::from_toml_str(toml_text).is_ok(),
            "pin is not an error"
        );
        let pins = Fixture::pins_from_toml_str(toml_text).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins["a"].expose(), "4711");
        let pins = Fixture::pins_from_json_str(r#"{"users":[{"id":"x","pin":"1"}],"devices":[]}"#)
            .unwrap();
        assert_eq!(pins["x"].expose(), "1");
        assert!(!format!("{pins:?}").contains("\"1\""));
    }
}
