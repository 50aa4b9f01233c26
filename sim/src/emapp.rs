//! EM *application* wire format (`/emapp/EMAppServlet`, the phone's own path to Extension
//! Mobility): the phone-facing GET query (`device`, `userid`, `seq` = PIN, `EMCC`,
//! `doLogout`, `loginType`) and the Cisco IP phone XML pages it answers.
//!
//! Pure: no I/O, no state. The PIN is wrapped in [`Pin`], whose `Debug` never shows it,
//! so a parsed request can be logged or printed without leaking the secret.

use std::fmt::Write as _;

use crate::protocol::push_escaped;

/// Path of the EM application on the simulator (as on CUCM).
pub const EMAPP_PATH: &str = "/emapp/EMAppServlet";

/// Longest accepted `device` value (CUCM device names are at most 15–50 characters).
pub const MAX_DEVICE_LEN: usize = 64;
/// Longest accepted `userid` value.
pub const MAX_USER_LEN: usize = 128;
/// Longest accepted `seq` (PIN) value.
pub const MAX_PIN_LEN: usize = 64;
/// Longest accepted value of the small flags (`EMCC`, `doLogout`, `loginType`).
const MAX_FLAG_LEN: usize = 16;

/// EMApp codes (Cisco's EMApp error table, 201-216) and EMService codes the simulator shows through EMApp.
pub mod code {
    /// EMService "Error on Parsing": used for over-long parameters (UNCONFIRMED).
    pub const PARSE: u32 = 1;
    /// EMService "EMCC Authentication Error": the home cluster rejected the PIN.
    pub const EMCC_AUTH: u32 = 2;
    /// Device does not exist (EMService 11 passed through; UNCONFIRMED).
    pub const DEVICE_NOT_FOUND: u32 = 11;
    /// EM disabled on the device (EMService 22 passed through).
    pub const DEVICE_LOGON_DISABLED: u32 = 22;
    /// User not found locally nor at any EMCC peer.
    pub const USER_NOT_FOUND: u32 = 23;
    /// User logged in elsewhere, Multiple Login Behavior = not allowed.
    pub const LOGGED_IN_ELSEWHERE: u32 = 25;
    /// Maximum Concurrent Requests exceeded (EMApp ends in EMService).
    pub const BUSY: u32 = 26;
    /// Caller not in the Trusted List of IPs (Validate IP Address = True).
    pub const UNTRUSTED_IP: u32 = 28;
    /// Blank userid or PIN.
    pub const BLANK_CREDENTIALS: u32 = 202;
    /// IMS rejected the PIN of a local user.
    pub const PIN_REJECTED: u32 = 204;
    /// User profile absent (local user without a device profile).
    pub const PROFILE_ABSENT: u32 = 205;
    /// `device` missing from the request (third-party callers only).
    pub const DEVICE_EMPTY: u32 = 207;
    /// No EMCC peer (home EMService) reachable.
    pub const EMSERVICE_CONNECTION: u32 = 208;
    /// `loginType` not UID/DN/SP.
    pub const LOGIN_TYPE_INVALID: u32 = 215;
}

/// Why an EMApp query string was rejected before any state was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmAppError {
    #[error("the device parameter is missing or empty")]
    DeviceEmpty,
    #[error("parameter {0} is longer than allowed")]
    TooLong(&'static str),
    #[error("loginType is not UID, DN or SP")]
    LoginTypeInvalid,
}

impl EmAppError {
    /// The code the phone page shows for this error.
    pub fn code(&self) -> u32 {
        match self {
            EmAppError::DeviceEmpty => code::DEVICE_EMPTY,
            EmAppError::TooLong(_) => code::PARSE,
            EmAppError::LoginTypeInvalid => code::LOGIN_TYPE_INVALID,
        }
    }
}

/// A PIN. Deliberately has no `Display`, and its `Debug` is redacted, so it cannot end
/// up in logs, statistics or panic messages by accident.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Pin(String);

impl Pin {
    pub fn new(pin: impl Into<String>) -> Pin {
        Pin(pin.into())
    }

    /// The secret itself, for comparison and for the EMCC call to the home simulator.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// Constant-time-ish comparison (length leaks; fine for a simulator, and it keeps
    /// the habit of not short-circuiting on secrets).
    pub fn matches(&self, other: &Pin) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// `loginType`: what `userid` means. The simulator treats DN and SP like UID
/// (extensions and self-service IDs are not modelled; UNCONFIRMED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoginType {
    #[default]
    Uid,
    Dn,
    Sp,
}

/// One parsed EMApp request. Unknown parameters are ignored; the first occurrence of a
/// repeated parameter wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmAppQuery {
    pub device: String,
    /// `None` = parameter absent; `Some("")` = present but blank.
    pub user: Option<String>,
    pub pin: Option<Pin>,
    pub emcc: bool,
    pub do_logout: bool,
    pub login_type: LoginType,
}

/// What the request asks for, derived from which parameters are present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmAppAction {
    /// Only `device`: show the login form, or the logout prompt if someone is logged in.
    Show,
    /// `doLogout=true`.
    Logout,
    /// `userid` and/or `seq` given (possibly blank).
    Login { user: String, pin: Pin },
}

impl EmAppQuery {
    pub fn action(&self) -> EmAppAction {
        if self.do_logout {
            return EmAppAction::Logout;
        }
        match (&self.user, &self.pin) {
            (None, None) => EmAppAction::Show,
            (user, pin) => EmAppAction::Login {
                user: user.clone().unwrap_or_default(),
                pin: pin.clone().unwrap_or_else(|| Pin::new("")),
            },
        }
    }
}

fn is_true(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("true")
}

fn bounded(name: &'static str, value: String, max: usize) -> Result<String, EmAppError> {
    if value.chars().count() > max {
        return Err(EmAppError::TooLong(name));
    }
    Ok(value)
}

/// Parses the (raw, percent-encoded) query string of an EMApp request.
pub fn parse_query(query: &str) -> Result<EmAppQuery, EmAppError> {
    let mut device = None;
    let mut user = None;
    let mut pin = None;
    let mut emcc = None;
    let mut do_logout = None;
    let mut login_type = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        // Parameter names as EMApp spells them; case-insensitive to be forgiving.
        let slot = match key.to_ascii_lowercase().as_str() {
            "device" => &mut device,
            "userid" => &mut user,
            "seq" => &mut pin,
            "emcc" => &mut emcc,
            "dologout" => &mut do_logout,
            "logintype" => &mut login_type,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    // Validate in the order EMApp would notice: device first (207), then the rest.
    let device = bounded("device", device.unwrap_or_default(), MAX_DEVICE_LEN)?;
    let device = device.trim().to_string();
    if device.is_empty() {
        return Err(EmAppError::DeviceEmpty);
    }
    let user = user
        .map(|u| bounded("userid", u, MAX_USER_LEN))
        .transpose()?;
    let pin = pin
        .map(|p| bounded("seq", p, MAX_PIN_LEN).map(Pin))
        .transpose()?;
    let flag = |name: &'static str, value: Option<String>| {
        value
            .map(|v| bounded(name, v, MAX_FLAG_LEN))
            .transpose()
            .map(|v| v.as_deref().is_some_and(is_true))
    };
    let emcc = flag("EMCC", emcc)?;
    let do_logout = flag("doLogout", do_logout)?;
    let login_type = match login_type {
        None => LoginType::Uid,
        Some(value) => match bounded("loginType", value, MAX_FLAG_LEN)?
            .trim()
            .to_ascii_uppercase()
            .as_str()
        {
            "" | "UID" => LoginType::Uid,
            "DN" => LoginType::Dn,
            "SP" => LoginType::Sp,
            _ => return Err(EmAppError::LoginTypeInvalid),
        },
    };
    Ok(EmAppQuery {
        device,
        user,
        pin,
        emcc,
        do_logout,
        login_type,
    })
}

/// A page EMApp answers with. Only [`Page::Error`] carries a `(NNN)` code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// CiscoIPPhoneInput with a user ID and a PIN item (nobody logged in).
    LoginForm {
        device: String,
        emcc: bool,
    },
    /// CiscoIPPhoneText offering sign-out (somebody is logged in on the device).
    LogoutPrompt {
        device: String,
        emcc: bool,
    },
    LoginOk,
    LogoutOk,
    /// Failure: text ending with `(code)`.
    Error {
        code: u32,
        logout: bool,
    },
}

const TITLE: &str = "Extension Mobility";

/// Display text of a failure as the phone shows it (the code in parentheses at
/// the end, as Cisco's phones show it).
/// The texts never contain request data, so the only `(NNN)` is the code at the end.
pub fn error_text(code: u32, logout: bool) -> String {
    match code {
        code::EMCC_AUTH | 201 | code::BLANK_CREDENTIALS => {
            format!("Please try to login again ({code})")
        }
        code::PIN_REJECTED | code::DEVICE_EMPTY | code::EMSERVICE_CONNECTION => {
            format!("Login is unavailable ({code})")
        }
        code::PROFILE_ABSENT => format!("Login/Logout is unavailable ({code})"),
        code::LOGIN_TYPE_INVALID => format!("LoginType invalid({code})"),
        216 => format!("DN has multiple users({code})"),
        _ if logout => format!("Logout is unavailable({code})"),
        _ => format!("Login is unavailable({code})"),
    }
}

fn servlet_url(device: &str, emcc: bool, extra: &str) -> String {
    let device: String = form_urlencoded::byte_serialize(device.as_bytes()).collect();
    let mut url = format!("{EMAPP_PATH}?device={device}");
    if emcc {
        url.push_str("&EMCC=true");
    }
    url.push_str(extra);
    url
}

fn push_text_page(out: &mut String, prompt: Option<&str>, text: &str) {
    out.push_str("<CiscoIPPhoneText><Title>");
    out.push_str(TITLE);
    out.push_str("</Title>");
    if let Some(prompt) = prompt {
        out.push_str("<Prompt>");
        push_escaped(out, prompt);
        out.push_str("</Prompt>");
    }
    out.push_str("<Text>");
    push_escaped(out, text);
    out.push_str("</Text>");
}

/// Renders a page as Cisco IP phone XML (the exact markup of real EMApp is UNCONFIRMED).
pub fn render(page: &Page) -> String {
    let mut out = String::with_capacity(512);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    match page {
        Page::LoginForm { device, emcc } => {
            out.push_str("<CiscoIPPhoneInput><Title>");
            out.push_str(TITLE);
            out.push_str("</Title><Prompt>Enter your user ID and PIN</Prompt><URL>");
            push_escaped(&mut out, &servlet_url(device, *emcc, ""));
            out.push_str("</URL>");
            for (name, param, flags) in [("User ID", "userid", "A"), ("PIN", "seq", "NP")] {
                let _ = write!(
                    out,
                    "<InputItem><DisplayName>{name}</DisplayName>\
                     <QueryStringParam>{param}</QueryStringParam>\
                     <DefaultValue></DefaultValue><InputFlags>{flags}</InputFlags></InputItem>"
                );
            }
            out.push_str("</CiscoIPPhoneInput>");
        }
        Page::LogoutPrompt { device, emcc } => {
            push_text_page(
                &mut out,
                Some("Sign out?"),
                "A user is signed in on this phone. Press Yes to sign out.",
            );
            out.push_str("<SoftKeyItem><Name>Yes</Name><URL>");
            push_escaped(&mut out, &servlet_url(device, *emcc, "&doLogout=true"));
            out.push_str(
                "</URL><Position>1</Position></SoftKeyItem>\
                 <SoftKeyItem><Name>No</Name><URL>SoftKey:Exit</URL><Position>2</Position></SoftKeyItem>\
                 </CiscoIPPhoneText>",
            );
        }
        Page::LoginOk => {
            push_text_page(&mut out, None, "Login successful");
            out.push_str("</CiscoIPPhoneText>");
        }
        Page::LogoutOk => {
            push_text_page(&mut out, None, "Logout successful");
            out.push_str("</CiscoIPPhoneText>");
        }
        Page::Error { code, logout } => {
            push_text_page(&mut out, None, &error_text(*code, *logout));
            out.push_str("</CiscoIPPhoneText>");
        }
    }
    out
}

/// The code of a page as a gateway reads it: the last `(NNN)` in the text, if any.
/// Used by the tests; kept here next to the renderer it mirrors.
pub fn page_code(page: &str) -> Option<u32> {
    let mut rest = page;
    let mut found = None;
    while let Some(open) = rest.find('(') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find(')') {
            let inner = &after[..close];
            if !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit()) {
                found = inner.parse().ok().or(found);
            }
        }
        rest = after;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_decodes_parameters() {
        let q = parse_query(
            "device=SEP0001&userid=em%40cisco.com&seq=12345&EMCC=TRUE&loginType=uid&x=1",
        )
        .unwrap();
        assert_eq!(q.device, "SEP0001");
        assert_eq!(q.user.as_deref(), Some("em@cisco.com"));
        assert_eq!(q.pin.as_ref().map(Pin::expose), Some("12345"));
        assert!(q.emcc);
        assert!(!q.do_logout);
        assert_eq!(q.login_type, LoginType::Uid);
        assert_eq!(
            q.action(),
            EmAppAction::Login {
                user: "em@cisco.com".into(),
                pin: Pin::new("12345")
            }
        );
        // First occurrence wins; unknown parameters are ignored.
        let q = parse_query("device=A&device=B&headsetbasedem=true").unwrap();
        assert_eq!(q.device, "A");
        assert_eq!(q.action(), EmAppAction::Show);
    }

    #[test]
    fn actions() {
        let q = parse_query("device=A&doLogout=true&userid=u").unwrap();
        assert_eq!(q.action(), EmAppAction::Logout);
        let q = parse_query("device=A&userid=u").unwrap();
        assert!(matches!(q.action(), EmAppAction::Login { pin, .. } if pin.is_blank()));
        let q = parse_query("device=A&seq=1").unwrap();
        assert!(matches!(q.action(), EmAppAction::Login { user, .. } if user.is_empty()));
        let q = parse_query("device=A&doLogout=false").unwrap();
        assert_eq!(q.action(), EmAppAction::Show);
    }

    #[test]
    fn rejects() {
        assert_eq!(parse_query(""), Err(EmAppError::DeviceEmpty));
        assert_eq!(
            parse_query("device=+&userid=u"),
            Err(EmAppError::DeviceEmpty)
        );
        assert_eq!(
            parse_query("device=A&loginType=XX"),
            Err(EmAppError::LoginTypeInvalid)
        );
        let long = "9".repeat(MAX_PIN_LEN + 1);
        assert_eq!(
            parse_query(&format!("device=A&seq={long}")),
            Err(EmAppError::TooLong("seq"))
        );
        assert_eq!(EmAppError::DeviceEmpty.code(), 207);
        assert_eq!(EmAppError::LoginTypeInvalid.code(), 215);
    }

    #[test]
    fn pin_is_never_debug_printed() {
        let q = parse_query("device=A&userid=u&seq=987654").unwrap();
        let debug = format!("{q:?} {:?}", q.action());
        assert!(!debug.contains("987654"), "{debug}");
        assert!(Pin::new("1234").matches(&Pin::new("1234")));
        assert!(!Pin::new("1234").matches(&Pin::new("1235")));
        assert!(!Pin::new("1234").matches(&Pin::new("12345")));
    }

    #[test]
    fn pages_and_codes() {
        let error = render(&Page::Error {
            code: 201,
            logout: false,
        });
        assert!(error.contains("<Text>Please try to login again (201)</Text>"));
        assert_eq!(page_code(&error), Some(201));
        assert_eq!(
            page_code(&render(&Page::Error {
                code: 23,
                logout: false
            })),
            Some(23)
        );
        assert!(render(&Page::Error {
            code: 23,
            logout: false
        })
        .contains("Login is unavailable(23)"));
        for page in [
            Page::LoginOk,
            Page::LogoutOk,
            Page::LoginForm {
                device: "SEP1".into(),
                emcc: true,
            },
            Page::LogoutPrompt {
                device: "SEP1".into(),
                emcc: false,
            },
        ] {
            assert_eq!(page_code(&render(&page)), None, "{page:?}");
        }
        let form = render(&Page::LoginForm {
            device: "SEP1".into(),
            emcc: true,
        });
        assert!(form.contains("<CiscoIPPhoneInput>"));
        assert!(form.contains("<QueryStringParam>userid</QueryStringParam>"));
        assert!(form.contains("<QueryStringParam>seq</QueryStringParam>"));
        assert!(form.contains("device=SEP1&amp;EMCC=true"));
        let prompt = render(&Page::LogoutPrompt {
            device: "SEP1".into(),
            emcc: false,
        });
        assert!(prompt.contains("doLogout=true"));
        assert!(prompt.contains("<Name>Yes</Name>"));
        assert_eq!(page_code("a (12) b (x) c (7)"), Some(7));
        assert_eq!(page_code("no code"), None);
    }
}
