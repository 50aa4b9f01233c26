//! The cluster's data: devices, end users with device profiles, application users
//! (immutable after start) and the EM sessions (who is logged in where), plus the
//! CUCM rules that turn that state into EM result codes.

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::config::{AppUser, Fixture, MultipleLogin, SimConfig, DEFAULT_PIN};
use crate::emapp::Pin;
use crate::emcc::PeerUrl;
use crate::protocol::{
    decode_user_id, AppCredentials, DeviceProfileAnswer, DeviceUserAnswer, UserDevicesAnswer,
};

/// EM result codes that arise from cluster state (Cisco's EM API code table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmError {
    #[error("invalid app user (bad appID or appCertificate)")]
    InvalidAppUser,
    #[error("caller lacks proxy rights to act for another user")]
    NoProxyRights,
    #[error("device does not exist")]
    DeviceNotFound,
    #[error("user has no such device profile")]
    ProfileNotFound,
    #[error("another user is logged in on the device")]
    AnotherUserLoggedIn,
    #[error("nobody is logged in on the device")]
    NoUserLoggedIn,
    #[error("extension mobility is not enabled on the device (login)")]
    DeviceLogonDisabled,
    #[error("extension mobility is not enabled on the device (logout)")]
    DeviceLogonDisabledAtLogout,
    #[error("user not found")]
    UserNotFound,
    #[error("user is logged in elsewhere and multiple logins are not allowed")]
    LoggedInElsewhere,
}

impl EmError {
    pub fn code(self) -> u32 {
        match self {
            EmError::InvalidAppUser => 3,
            EmError::DeviceLogonDisabledAtLogout => 5,
            EmError::NoProxyRights => 10,
            EmError::DeviceNotFound => 11,
            EmError::ProfileNotFound => 12,
            EmError::AnotherUserLoggedIn => 18,
            EmError::NoUserLoggedIn => 19,
            EmError::DeviceLogonDisabled => 22,
            EmError::UserNotFound => 23,
            EmError::LoggedInElsewhere => 25,
        }
    }
}

/// Who is calling, after `<appInfo>` was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Application user in "Standard EM Authentication Proxy Rights".
    ProxyApp,
    /// Application user without proxy rights: may query, not log anyone in or out.
    AppWithoutProxy,
    /// An end user authenticating with their own ID and password: acts only for themselves.
    EndUser(String),
}

/// A phone known to the cluster.
#[derive(Debug)]
pub struct DeviceInfo {
    /// Upper-case device name as stored.
    pub name: String,
    pub em_enabled: bool,
    /// Calls currently in progress naming this device (for the per-device concurrency stat).
    pub in_flight: AtomicU32,
}

#[derive(Debug)]
struct UserInfo {
    id: String,
    profiles: Vec<String>,
    default_profile: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Clone)]
struct Session {
    user: String,
    #[allow(dead_code)] // kept for realism and debugging output
    profile: String,
    /// For an EMCC visitor: the peer (home simulator) that checked the PIN.
    home: Option<PeerUrl>,
}

/// A session that ended (logout, logoutAll), so the caller can tell a visitor's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedSession {
    pub user: String,
    pub device: String,
    /// The visitor's home simulator; `None` for a local user.
    pub home: Option<PeerUrl>,
}

/// Outcome of checking a PIN on the user's home simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCheck {
    /// Not a user of this simulator.
    UnknownUser,
    Rejected,
    /// Right PIN; the canonical user ID.
    Accepted(String),
}

/// Mutable EM state; one lock so that login rules (18/25) are checked atomically.
#[derive(Debug, Default)]
struct Sessions {
    by_device: HashMap<String, Session>,
    /// user → devices in login order
    by_user: HashMap<String, Vec<String>>,
    /// device → last user who logged in there ("Remember the Last User Logged In")
    last_login: HashMap<String, String>,
    /// Home side of EMCC: user of this simulator → devices of other simulators they
    /// are visiting (so a login here, or another visit, sees them "elsewhere").
    visits: HashMap<String, Vec<String>>,
}

impl Sessions {
    fn remove_device(&mut self, device: &str) -> Option<Session> {
        let session = self.by_device.remove(device)?;
        if let Some(devices) = self.by_user.get_mut(&session.user) {
            devices.retain(|d| d != device);
            if devices.is_empty() {
                self.by_user.remove(&session.user);
            }
        }
        Some(session)
    }

    fn insert(&mut self, device: &str, user: &str, profile: &str, home: Option<PeerUrl>) {
        self.by_device.insert(
            device.to_string(),
            Session {
                user: user.to_string(),
                profile: profile.to_string(),
                home,
            },
        );
        let devices = self.by_user.entry(user.to_string()).or_default();
        if !devices.iter().any(|d| d == device) {
            devices.push(device.to_string());
        }
        self.last_login.insert(device.to_string(), user.to_string());
    }
}

/// Home-side answer to an EMCC check (see [`ClusterState::home_check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeCheck {
    Unknown,
    PinRejected,
    LoggedInElsewhere,
    Ok,
}

/// The simulated cluster: directory (fixed after start) plus EM sessions.
#[derive(Debug)]
pub struct ClusterState {
    devices: HashMap<String, Arc<DeviceInfo>>,
    users: HashMap<String, UserInfo>,
    app_users: HashMap<String, AppUser>,
    multiple_login: MultipleLogin,
    sessions: RwLock<Sessions>,
    /// PINs by user ID; changeable at run time (`set_pin`). Users without an entry
    /// have [`DEFAULT_PIN`].
    pins: RwLock<HashMap<String, Pin>>,
}

/// Device name of the 1-based seeded index: `SEP` + 12 upper-case hex digits.
pub fn seeded_device_name(index: usize) -> String {
    format!("SEP{index:012X}")
}

/// User ID of the 1-based seeded index.
pub fn seeded_user_id(index: usize) -> String {
    format!("user{index}")
}

impl ClusterState {
    /// Builds the directory from seeding counts, then the fixture (which wins on equal names).
    pub fn from_config(config: &SimConfig) -> ClusterState {
        let mut state = ClusterState {
            devices: HashMap::with_capacity(config.devices),
            users: HashMap::with_capacity(config.users),
            app_users: HashMap::new(),
            multiple_login: config.multiple_login,
            sessions: RwLock::new(Sessions::default()),
            pins: RwLock::new(config.pins.clone()),
        };
        for i in 1..=config.devices {
            state.add_device(&seeded_device_name(i), true);
        }
        for i in 1..=config.users {
            let id = seeded_user_id(i);
            let profile = format!("{id}-UDP");
            state.add_user(&id, vec![profile.clone()], Some(profile), None);
        }
        for app in &config.app_users {
            state.app_users.insert(app.app_id.clone(), app.clone());
        }
        if let Some(fixture) = &config.fixture {
            state.apply_fixture(fixture);
        }
        state
    }

    fn add_device(&mut self, name: &str, em_enabled: bool) {
        let key = name.to_ascii_uppercase();
        self.devices.insert(
            key.clone(),
            Arc::new(DeviceInfo {
                name: key,
                em_enabled,
                in_flight: AtomicU32::new(0),
            }),
        );
    }

    fn add_user(
        &mut self,
        id: &str,
        profiles: Vec<String>,
        default_profile: Option<String>,
        password: Option<String>,
    ) {
        let default_profile = default_profile
            .filter(|p| profiles.contains(p))
            .or_else(|| profiles.first().cloned());
        self.users.insert(
            id.to_string(),
            UserInfo {
                id: id.to_string(),
                profiles,
                default_profile,
                password,
            },
        );
    }

    fn apply_fixture(&mut self, fixture: &Fixture) {
        for device in &fixture.devices {
            self.add_device(&device.name, device.em_enabled);
        }
        for user in &fixture.users {
            self.add_user(
                &user.id,
                user.profiles.clone(),
                user.default_profile.clone(),
                user.password.clone(),
            );
        }
        for app in &fixture.app_users {
            self.app_users.insert(app.app_id.clone(), app.clone());
        }
        // Initial state: remembered last logins and current sessions.
        let mut sessions = self.write_sessions();
        for device in &fixture.devices {
            let key = device.name.to_ascii_uppercase();
            if let Some(last) = &device.last_login {
                sessions.last_login.insert(key.clone(), last.clone());
            }
        }
        drop(sessions);
        for device in &fixture.devices {
            if let Some(user) = &device.logged_in {
                if let Err(e) = self.login(&Caller::ProxyApp, &device.name, user, None) {
                    tracing::warn!(device = %device.name, %user, error = %e, "fixture login skipped");
                }
            }
        }
    }

    fn read_sessions(&self) -> RwLockReadGuard<'_, Sessions> {
        // A panic while holding the lock cannot leave Sessions half-updated in a way
        // that matters for a simulator; keep serving.
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_sessions(&self) -> RwLockWriteGuard<'_, Sessions> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn device(&self, name: &str) -> Option<&Arc<DeviceInfo>> {
        match self.devices.get(name) {
            Some(d) => Some(d),
            None => self.devices.get(&name.to_ascii_uppercase()),
        }
    }

    /// Finds an end user; a percent-encoded ID (`em%40cisco.com`) is accepted too.
    fn user(&self, id: &str) -> Option<&UserInfo> {
        self.users
            .get(id)
            .or_else(|| decode_user_id(id).and_then(|decoded| self.users.get(&decoded)))
    }

    /// Checks `<appInfo>`: application users first, then end users with a password.
    pub fn authenticate(&self, app: &AppCredentials) -> Result<Caller, EmError> {
        if let Some(app_user) = self.app_users.get(&app.app_id) {
            if app_user.app_certificate == app.certificate {
                return Ok(if app_user.proxy_rights {
                    Caller::ProxyApp
                } else {
                    Caller::AppWithoutProxy
                });
            }
            return Err(EmError::InvalidAppUser);
        }
        match self.users.get(&app.app_id) {
            Some(user) if user.password.as_deref() == Some(app.certificate.as_str()) => {
                Ok(Caller::EndUser(user.id.clone()))
            }
            _ => Err(EmError::InvalidAppUser),
        }
    }

    /// EM login. Check order: proxy rights (10) → device (11) → EM enabled (22) → user (23)
    /// → profile (12) → device busy (18) → user elsewhere (25, per Multiple Login Behavior).
    /// The same user logging in again on the same device succeeds (idempotent).
    pub fn login(
        &self,
        caller: &Caller,
        device: &str,
        user: &str,
        profile: Option<&str>,
    ) -> Result<(), EmError> {
        match caller {
            Caller::ProxyApp => {}
            Caller::AppWithoutProxy => return Err(EmError::NoProxyRights),
            Caller::EndUser(me) => {
                let requested = decode_user_id(user);
                if me != user && requested.as_deref() != Some(me.as_str()) {
                    return Err(EmError::NoProxyRights);
                }
            }
        }
        let device = self.device(device).ok_or(EmError::DeviceNotFound)?;
        if !device.em_enabled {
            return Err(EmError::DeviceLogonDisabled);
        }
        let user = self.user(user).ok_or(EmError::UserNotFound)?;
        let profile = match profile {
            Some(name) => user
                .profiles
                .iter()
                .find(|p| p.as_str() == name)
                .ok_or(EmError::ProfileNotFound)?,
            None => user
                .default_profile
                .as_ref()
                .ok_or(EmError::ProfileNotFound)?,
        };
        let mut sessions = self.write_sessions();
        if let Some(current) = sessions.by_device.get(&device.name) {
            if current.user != user.id {
                return Err(EmError::AnotherUserLoggedIn);
            }
        }
        let elsewhere: Vec<String> = sessions
            .by_user
            .get(&user.id)
            .map(|devices| {
                devices
                    .iter()
                    .filter(|d| **d != device.name)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if !elsewhere.is_empty() {
            match self.multiple_login {
                MultipleLogin::NotAllowed => return Err(EmError::LoggedInElsewhere),
                MultipleLogin::Allowed => {}
                MultipleLogin::AutoLogout => {
                    for other in &elsewhere {
                        sessions.remove_device(other);
                    }
                }
            }
        }
        if !sessions.visits.get(&user.id).is_none_or(Vec::is_empty) {
            // Visiting another simulator counts as "elsewhere": CUCM applies Multiple
            // Login Behavior between EMCC logins too.
            match self.multiple_login {
                MultipleLogin::NotAllowed => return Err(EmError::LoggedInElsewhere),
                MultipleLogin::Allowed => {}
                // The visiting simulator is not told (UNCONFIRMED what CUCM does).
                MultipleLogin::AutoLogout => {
                    sessions.visits.remove(&user.id);
                }
            }
        }
        sessions.insert(&device.name, &user.id, profile, None);
        Ok(())
    }

    /// EM logout; returns the user who was logged out.
    /// Check order: proxy rights (10) → device (11) → EM enabled (5) → logged in (19)
    /// → an end user may only log out themselves (10).
    pub fn logout(&self, caller: &Caller, device: &str) -> Result<String, EmError> {
        self.logout_session(caller, device).map(|ended| ended.user)
    }

    /// Like [`ClusterState::logout`], returning the whole ended session.
    pub fn logout_session(&self, caller: &Caller, device: &str) -> Result<EndedSession, EmError> {
        if *caller == Caller::AppWithoutProxy {
            return Err(EmError::NoProxyRights);
        }
        let device = self.device(device).ok_or(EmError::DeviceNotFound)?;
        if !device.em_enabled {
            return Err(EmError::DeviceLogonDisabledAtLogout);
        }
        let mut sessions = self.write_sessions();
        let current = sessions
            .by_device
            .get(&device.name)
            .ok_or(EmError::NoUserLoggedIn)?;
        if let Caller::EndUser(me) = caller {
            if current.user != *me {
                return Err(EmError::NoProxyRights);
            }
        }
        let session = sessions
            .remove_device(&device.name)
            .ok_or(EmError::NoUserLoggedIn)?;
        Ok(EndedSession {
            user: session.user,
            device: device.name.clone(),
            home: session.home,
        })
    }

    /// EM logoutAll: everyone, on every device. Only proxy applications may do it.
    pub fn logout_all(&self, caller: &Caller) -> Result<usize, EmError> {
        self.logout_all_sessions(caller).map(|ended| ended.len())
    }

    /// Like [`ClusterState::logout_all`], returning the ended sessions.
    pub fn logout_all_sessions(&self, caller: &Caller) -> Result<Vec<EndedSession>, EmError> {
        if *caller != Caller::ProxyApp {
            return Err(EmError::NoProxyRights);
        }
        let mut sessions = self.write_sessions();
        let ended = sessions
            .by_device
            .drain()
            .map(|(device, session)| EndedSession {
                user: session.user,
                device,
                home: session.home,
            })
            .collect();
        sessions.by_user.clear();
        Ok(ended)
    }

    /// Whether `user` is a user of this simulator (their home); percent-encoding accepted.
    pub fn is_local_user(&self, user: &str) -> bool {
        self.user(user).is_some()
    }

    /// Whether a local user has at least one device profile (EMApp 205 otherwise).
    pub fn has_profile(&self, user: &str) -> bool {
        self.user(user).is_some_and(|u| u.default_profile.is_some())
    }

    /// Sets (or replaces) the PIN of a user. Returns false if the user is not local.
    pub fn set_pin(&self, user: &str, pin: Pin) -> bool {
        let Some(id) = self.user(user).map(|u| u.id.clone()) else {
            return false;
        };
        self.pins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, pin);
        true
    }

    /// Checks a PIN of a local user (the IMS check of EMApp, or the home side of EMCC).
    pub fn check_pin(&self, user: &str, pin: &Pin) -> PinCheck {
        let Some(user) = self.user(user) else {
            return PinCheck::UnknownUser;
        };
        let pins = self.pins.read().unwrap_or_else(|e| e.into_inner());
        let ok = match pins.get(&user.id) {
            Some(expected) => expected.matches(pin),
            None => Pin::new(DEFAULT_PIN).matches(pin),
        };
        if ok {
            PinCheck::Accepted(user.id.clone())
        } else {
            PinCheck::Rejected
        }
    }

    /// Device checks of an EMApp request before any user is considered:
    /// 11 unknown, 22 EM disabled. Returns the stored device name.
    pub fn emapp_device(&self, device: &str) -> Result<String, EmError> {
        let device = self.device(device).ok_or(EmError::DeviceNotFound)?;
        if !device.em_enabled {
            return Err(EmError::DeviceLogonDisabled);
        }
        Ok(device.name.clone())
    }

    /// Logs an EMCC visitor (a user of another simulator, PIN already checked there) in
    /// on a local device. No device profile is needed here (the home provides it). Rules:
    /// 11, 22, 18 (another user), 25 (visitor on another local device, per Multiple Login
    /// Behavior). With `dry_run` only checks. Re-login on the same device succeeds.
    pub fn login_visitor(
        &self,
        device: &str,
        user: &str,
        home: &PeerUrl,
        dry_run: bool,
    ) -> Result<(), EmError> {
        let name = self.emapp_device(device)?;
        let mut sessions = self.write_sessions();
        if let Some(current) = sessions.by_device.get(&name) {
            if current.user != user {
                return Err(EmError::AnotherUserLoggedIn);
            }
        }
        let elsewhere: Vec<String> = sessions
            .by_user
            .get(user)
            .map(|devices| devices.iter().filter(|d| **d != name).cloned().collect())
            .unwrap_or_default();
        if !elsewhere.is_empty() {
            match self.multiple_login {
                MultipleLogin::NotAllowed => return Err(EmError::LoggedInElsewhere),
                MultipleLogin::Allowed => {}
                MultipleLogin::AutoLogout if dry_run => {}
                MultipleLogin::AutoLogout => {
                    for other in &elsewhere {
                        sessions.remove_device(other);
                    }
                }
            }
        }
        if !dry_run {
            sessions.insert(&name, user, "", Some(home.clone()));
        }
        Ok(())
    }

    /// Home side of EMCC: checks the PIN and, with `record`, records that the user now
    /// visits `device` of another simulator. A visit counts as "elsewhere" for the
    /// user's local sessions and other visits (Multiple Login Behavior).
    pub fn home_check(&self, user: &str, pin: &Pin, device: &str, record: bool) -> HomeCheck {
        let id = match self.check_pin(user, pin) {
            PinCheck::UnknownUser => return HomeCheck::Unknown,
            PinCheck::Rejected => return HomeCheck::PinRejected,
            PinCheck::Accepted(id) => id,
        };
        let device = device.to_ascii_uppercase();
        let mut sessions = self.write_sessions();
        let local = sessions.by_user.get(&id).cloned().unwrap_or_default();
        let other_visits: Vec<String> = sessions
            .visits
            .get(&id)
            .map(|v| v.iter().filter(|d| **d != device).cloned().collect())
            .unwrap_or_default();
        if !local.is_empty() || !other_visits.is_empty() {
            match self.multiple_login {
                MultipleLogin::NotAllowed => return HomeCheck::LoggedInElsewhere,
                MultipleLogin::Allowed => {}
                MultipleLogin::AutoLogout if !record => {}
                MultipleLogin::AutoLogout => {
                    for d in &local {
                        sessions.remove_device(d);
                    }
                    sessions.visits.remove(&id);
                }
            }
        }
        if record {
            let visits = sessions.visits.entry(id).or_default();
            if !visits.contains(&device) {
                visits.push(device);
            }
        }
        HomeCheck::Ok
    }

    /// Home side of EMCC: the user left `device` of another simulator.
    pub fn home_visit_ended(&self, user: &str, device: &str) {
        let device = device.to_ascii_uppercase();
        let mut sessions = self.write_sessions();
        if let Some(visits) = sessions.visits.get_mut(user) {
            visits.retain(|d| *d != device);
            if visits.is_empty() {
                sessions.visits.remove(user);
            }
        }
    }

    /// Devices of other simulators a local user is visiting (home side, test inspection).
    pub fn visits_of_user(&self, user: &str) -> Vec<String> {
        self.read_sessions()
            .visits
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    pub fn device_user_query(&self, names: &[String]) -> Vec<DeviceUserAnswer> {
        let sessions = self.read_sessions();
        names
            .iter()
            .map(|requested| match self.device(requested) {
                None => DeviceUserAnswer::DoesNotExist {
                    requested: requested.clone(),
                },
                Some(device) => DeviceUserAnswer::Known {
                    name: device.name.clone(),
                    user: sessions.by_device.get(&device.name).map(|s| s.user.clone()),
                    last_login: sessions.last_login.get(&device.name).cloned(),
                    emcc: sessions
                        .by_device
                        .get(&device.name)
                        .is_some_and(|s| s.home.is_some()),
                },
            })
            .collect()
    }

    pub fn user_devices_query(&self, users: &[String]) -> Vec<UserDevicesAnswer> {
        let sessions = self.read_sessions();
        users
            .iter()
            .map(|requested| match self.user(requested) {
                None => UserDevicesAnswer::DoesNotExist {
                    user: decode_user_id(requested).unwrap_or_else(|| requested.clone()),
                },
                Some(user) => UserDevicesAnswer::Devices {
                    user: user.id.clone(),
                    devices: sessions.by_user.get(&user.id).cloned().unwrap_or_default(),
                },
            })
            .collect()
    }

    pub fn device_profile_query(&self, users: &[String]) -> Vec<DeviceProfileAnswer> {
        users
            .iter()
            .map(|requested| match self.user(requested) {
                None => DeviceProfileAnswer::Failure {
                    user: decode_user_id(requested).unwrap_or_else(|| requested.clone()),
                    code: EmError::UserNotFound.code(),
                },
                Some(user) if user.profiles.is_empty() => DeviceProfileAnswer::Failure {
                    user: user.id.clone(),
                    code: EmError::ProfileNotFound.code(),
                },
                Some(user) => DeviceProfileAnswer::Profiles {
                    user: user.id.clone(),
                    profiles: user
                        .profiles
                        .iter()
                        .map(|p| (p.clone(), user.default_profile.as_ref() == Some(p)))
                        .collect(),
                },
            })
            .collect()
    }

    /// The user currently logged in on a device (test inspection).
    pub fn logged_in_user(&self, device: &str) -> Option<String> {
        let device = self.device(device)?;
        self.read_sessions()
            .by_device
            .get(&device.name)
            .map(|s| s.user.clone())
    }

    /// Devices a user is logged in on, in login order (test inspection).
    pub fn devices_of_user(&self, user: &str) -> Vec<String> {
        self.read_sessions()
            .by_user
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// The user remembered as last login on a device.
    pub fn last_login(&self, device: &str) -> Option<String> {
        let device = self.device(device)?;
        self.read_sessions().last_login.get(&device.name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FixtureDevice, FixtureUser};

    fn state(multiple_login: MultipleLogin) -> ClusterState {
        ClusterState::from_config(&SimConfig {
            devices: 3,
            users: 3,
            multiple_login,
            fixture: Some(Fixture {
                devices: vec![FixtureDevice {
                    name: "sepnoem".into(),
                    em_enabled: false,
                    last_login: None,
                    logged_in: None,
                }],
                users: vec![
                    FixtureUser {
                        id: "noprofile".into(),
                        profiles: vec![],
                        default_profile: None,
                        password: None,
                    },
                    FixtureUser {
                        id: "self".into(),
                        profiles: vec!["self-A".into()],
                        default_profile: None,
                        password: Some("pw".into()),
                    },
                ],
                app_users: vec![],
            }),
            ..SimConfig::default()
        })
    }

    const D1: &str = "SEP000000000001";
    const D2: &str = "SEP000000000002";

    #[test]
    fn seeding_names() {
        assert_eq!(seeded_device_name(1), "SEP000000000001");
        assert_eq!(seeded_device_name(255), "SEP0000000000FF");
        assert_eq!(seeded_user_id(7), "user7");
    }

    #[test]
    fn login_rules_in_order() {
        let s = state(MultipleLogin::NotAllowed);
        let app = Caller::ProxyApp;
        assert_eq!(
            s.login(&app, "SEPNOPE", "user1", None),
            Err(EmError::DeviceNotFound)
        );
        assert_eq!(
            s.login(&app, "SEPNOEM", "nobody", None),
            Err(EmError::DeviceLogonDisabled)
        );
        assert_eq!(
            s.login(&app, D1, "nobody", None),
            Err(EmError::UserNotFound)
        );
        assert_eq!(
            s.login(&app, D1, "noprofile", None),
            Err(EmError::ProfileNotFound)
        );
        assert_eq!(
            s.login(&app, D1, "user1", Some("user2-UDP")),
            Err(EmError::ProfileNotFound)
        );
        assert_eq!(s.login(&app, &D1.to_lowercase(), "user1", None), Ok(()));
        assert_eq!(s.login(&app, D1, "user1", None), Ok(()), "idempotent");
        assert_eq!(
            s.login(&app, D1, "user2", None),
            Err(EmError::AnotherUserLoggedIn)
        );
        assert_eq!(
            s.login(&app, D2, "user1", None),
            Err(EmError::LoggedInElsewhere)
        );
        assert_eq!(s.logged_in_user(D1).as_deref(), Some("user1"));
        assert_eq!(s.logout(&app, D2), Err(EmError::NoUserLoggedIn));
        assert_eq!(s.logout(&app, D1).as_deref(), Ok("user1"));
        assert_eq!(s.last_login(D1).as_deref(), Some("user1"));
    }

    #[test]
    fn multiple_login_modes() {
        let s = state(MultipleLogin::Allowed);
        s.login(&Caller::ProxyApp, D1, "user1", None).unwrap();
        s.login(&Caller::ProxyApp, D2, "user1", None).unwrap();
        assert_eq!(
            s.devices_of_user("user1"),
            vec![D1.to_string(), D2.to_string()]
        );

        let s = state(MultipleLogin::AutoLogout);
        s.login(&Caller::ProxyApp, D1, "user1", None).unwrap();
        s.login(&Caller::ProxyApp, D2, "user1", None).unwrap();
        assert_eq!(s.logged_in_user(D1), None);
        assert_eq!(s.devices_of_user("user1"), vec![D2.to_string()]);
    }

    #[test]
    fn callers_and_rights() {
        let s = state(MultipleLogin::NotAllowed);
        let creds = |id: &str, cert: &str| AppCredentials {
            app_id: id.into(),
            certificate: cert.into(),
        };
        assert_eq!(
            s.authenticate(&creds("bcapp", "bcsecret")),
            Ok(Caller::ProxyApp)
        );
        assert_eq!(
            s.authenticate(&creds("bcapp", "x")),
            Err(EmError::InvalidAppUser)
        );
        assert_eq!(
            s.authenticate(&creds("user1", "")),
            Err(EmError::InvalidAppUser)
        );
        let me = s.authenticate(&creds("self", "pw")).unwrap();
        assert_eq!(me, Caller::EndUser("self".into()));
        assert_eq!(s.login(&me, D1, "user1", None), Err(EmError::NoProxyRights));
        assert_eq!(s.login(&me, D1, "self", None), Ok(()));
        s.login(&Caller::ProxyApp, D2, "user2", None).unwrap();
        assert_eq!(s.logout(&me, D2), Err(EmError::NoProxyRights));
        assert_eq!(s.logout_all(&me), Err(EmError::NoProxyRights));
        assert_eq!(s.logout(&me, D1).as_deref(), Ok("self"));
        assert_eq!(s.logout_all(&Caller::ProxyApp), Ok(1));
    }

    #[test]
    fn pins_visits_and_visitors() {
        let s = state(MultipleLogin::NotAllowed);
        let home = PeerUrl::parse("127.0.0.1:1").unwrap();
        assert_eq!(
            s.check_pin("user1", &Pin::new(DEFAULT_PIN)),
            PinCheck::Accepted("user1".into())
        );
        assert_eq!(s.check_pin("user1", &Pin::new("0")), PinCheck::Rejected);
        assert_eq!(s.check_pin("ghost", &Pin::new("0")), PinCheck::UnknownUser);
        assert!(s.set_pin("user1", Pin::new("77")));
        assert_eq!(
            s.check_pin("user1", &Pin::new(DEFAULT_PIN)),
            PinCheck::Rejected
        );

        // Home side: a recorded visit makes a local login "elsewhere" (25), and back.
        assert_eq!(
            s.home_check("user2", &Pin::new("x"), "SEPV1", true),
            HomeCheck::PinRejected
        );
        assert_eq!(
            s.home_check("user2", &Pin::new(DEFAULT_PIN), "sepv1", true),
            HomeCheck::Ok
        );
        assert_eq!(s.visits_of_user("user2"), vec!["SEPV1".to_string()]);
        assert_eq!(
            s.home_check("user2", &Pin::new(DEFAULT_PIN), "SEPV1", true),
            HomeCheck::Ok
        );
        assert_eq!(
            s.home_check("user2", &Pin::new(DEFAULT_PIN), "SEPV2", true),
            HomeCheck::LoggedInElsewhere
        );
        assert_eq!(
            s.login(&Caller::ProxyApp, D1, "user2", None),
            Err(EmError::LoggedInElsewhere)
        );
        s.home_visit_ended("user2", "SEPV1");
        assert!(s.visits_of_user("user2").is_empty());
        assert_eq!(s.login(&Caller::ProxyApp, D1, "user2", None), Ok(()));

        // Visiting side: no profile needed, 18 and 25 apply, emcc flag in the query.
        assert_eq!(s.login_visitor(D2, "guest", &home, true), Ok(()));
        assert_eq!(s.logged_in_user(D2), None, "dry run");
        assert_eq!(
            s.login_visitor(D1, "guest", &home, false),
            Err(EmError::AnotherUserLoggedIn)
        );
        assert_eq!(s.login_visitor(D2, "guest", &home, false), Ok(()));
        assert_eq!(
            s.login_visitor("SEP000000000003", "guest", &home, false),
            Err(EmError::LoggedInElsewhere)
        );
        let answers = s.device_user_query(&[D1.into(), D2.into()]);
        assert!(matches!(
            &answers[0],
            DeviceUserAnswer::Known { emcc: false, .. }
        ));
        assert!(matches!(
            &answers[1],
            DeviceUserAnswer::Known { emcc: true, .. }
        ));
        let ended = s.logout_session(&Caller::ProxyApp, D2).unwrap();
        assert_eq!(ended.home, Some(home));
        assert_eq!(ended.user, "guest");
    }
}
