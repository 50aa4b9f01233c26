//! The CUCM EM API documents (Cisco's EM API developer guide): requests the gateway
//! sends, and a tolerant reader of what CUCM answers.
//!
//! Reading rules that real clusters need: unknown elements and order are ignored;
//! user IDs in query results are percent-encoded; `<lastlogin>` is the *previous*
//! user, never the current one; query failures may come as `<error code>` or as the
//! DTD's `<errorMessage>`; the error code attribute may carry stray spaces.

use std::fmt::Write as _;

use percent_encoding::percent_decode_str;

use crate::operation::{Credentials, DeviceName, UserId};
use crate::xml::{self, escape, shorten, Element};

/// A request document for EMServiceServlet.
#[derive(Debug, Clone, Copy)]
pub enum EmRequest<'a> {
    Login {
        device: &'a DeviceName,
        user: &'a UserId,
    },
    Logout {
        device: &'a DeviceName,
    },
    /// `deviceUserQuery`: who is logged in on these devices (one or more).
    DeviceUserQuery {
        devices: &'a [DeviceName],
    },
    /// `userDevicesQuery`: which devices this user is logged in on.
    UserDevicesQuery {
        user: &'a UserId,
    },
}

impl EmRequest<'_> {
    /// The label used in metrics for CUCM calls.
    pub fn kind(&self) -> &'static str {
        match self {
            EmRequest::Login { .. } => "login",
            EmRequest::Logout { .. } => "logout",
            EmRequest::DeviceUserQuery { .. } => "deviceUserQuery",
            EmRequest::UserDevicesQuery { .. } => "userDevicesQuery",
        }
    }

    /// Whether CUCM may have changed state when the outcome of a call is unknown
    /// (a timeout): such calls are never sent twice.
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            EmRequest::DeviceUserQuery { .. } | EmRequest::UserDevicesQuery { .. }
        )
    }

    /// The XML document, every value escaped.
    pub fn encode(&self, credentials: &Credentials) -> String {
        let mut out = String::with_capacity(256);
        let root = match self {
            EmRequest::DeviceUserQuery { .. } | EmRequest::UserDevicesQuery { .. } => "query",
            _ => "request",
        };
        // Infallible: writing to a String.
        let _ = write!(
            out,
            "<{root}><appInfo><appID>{}</appID><appCertificate>{}</appCertificate></appInfo>",
            escape(credentials.app_id()),
            escape(credentials.app_certificate().expose())
        );
        match self {
            EmRequest::Login { device, user } => {
                let _ = write!(
                    out,
                    "<login><deviceName>{}</deviceName><userID>{}</userID></login>",
                    escape(device.as_str()),
                    escape(user.as_str())
                );
            }
            EmRequest::Logout { device } => {
                let _ = write!(
                    out,
                    "<logout><deviceName>{}</deviceName></logout>",
                    escape(device.as_str())
                );
            }
            EmRequest::DeviceUserQuery { devices } => {
                out.push_str("<deviceUserQuery>");
                for device in *devices {
                    let _ = write!(out, "<deviceName>{}</deviceName>", escape(device.as_str()));
                }
                out.push_str("</deviceUserQuery>");
            }
            EmRequest::UserDevicesQuery { user } => {
                let _ = write!(
                    out,
                    "<userDevicesQuery><userID>{}</userID></userDevicesQuery>",
                    escape(user.as_str())
                );
            }
        }
        let _ = write!(out, "</{root}>");
        out
    }
}

/// What CUCM answered, as far as the gateway cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmResponse {
    Success,
    /// `<failure>`: `code` is `None` when CUCM gave none or an unreadable one.
    Failure {
        code: Option<u32>,
        text: String,
    },
    /// `deviceUserResults`, one entry per `<device>`.
    DeviceUsers(Vec<DeviceUser>),
    /// `userDevicesResults`, one entry per `<user>`.
    UserDevices(Vec<UserDevices>),
}

/// One `<user>` of a `userDevicesResults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDevices {
    /// The `id` attribute, percent-decoded.
    pub user: String,
    pub state: UserState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserState {
    /// Logged in on these devices (the names as CUCM sent them, upper-cased; at most
    /// [`MAX_DEVICES_PER_USER`]).
    Devices(Vec<String>),
    /// `<none/>`, or no device named: logged in nowhere.
    Nowhere,
    DoesNotExist,
    Failure {
        code: Option<u32>,
        text: String,
    },
}

/// A user is on a handful of phones; more than this is not a sane answer and is cut.
pub const MAX_DEVICES_PER_USER: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUser {
    /// The `name` attribute as CUCM sent it (upper-cased for matching).
    pub device: String,
    pub state: DeviceState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    LoggedIn(String),
    Nobody,
    DoesNotExist,
    /// A per-device failure inside the results.
    Failure {
        code: Option<u32>,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("not XML: {0}")]
    NotXml(#[from] xml::XmlError),
    #[error("root element is <{0}>, not <response>")]
    UnexpectedRoot(String),
    #[error("<response> holds none of success, failure, deviceUserResults, userDevicesResults")]
    UnknownResponse,
}

/// Reads an EMServiceServlet answer.
pub fn decode(body: &str) -> Result<EmResponse, CodecError> {
    let root = xml::parse(body)?;
    if root.name != "response" {
        return Err(CodecError::UnexpectedRoot(shorten(&root.name, 40)));
    }
    if root.child("success").is_some() {
        return Ok(EmResponse::Success);
    }
    if let Some(failure) = root.child("failure") {
        let (code, text) = read_failure(failure);
        return Ok(EmResponse::Failure { code, text });
    }
    if let Some(results) = root.child("deviceUserResults") {
        let devices = results
            .children_named("device")
            .map(|device| DeviceUser {
                device: device
                    .attribute("name")
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_uppercase(),
                state: read_device_state(device),
            })
            .collect();
        return Ok(EmResponse::DeviceUsers(devices));
    }
    if let Some(results) = root.child("userDevicesResults") {
        let users = results
            .children_named("user")
            .map(|user| UserDevices {
                user: percent_decode(user.attribute("id").unwrap_or_default()),
                state: read_user_state(user),
            })
            .collect();
        return Ok(EmResponse::UserDevices(users));
    }
    Err(CodecError::UnknownResponse)
}

fn read_device_state(device: &Element) -> DeviceState {
    // <userID> is the current user; <lastlogin> is only history. A present but empty
    // <userID> means nobody, whatever flags follow.
    if let Some(user) = device.child("userID") {
        let user = percent_decode(&user.text);
        if !user.is_empty() {
            return DeviceState::LoggedIn(user);
        }
    }
    if device.child("doesNotExist").is_some() {
        return DeviceState::DoesNotExist;
    }
    if let Some(failure) = device.child("failure") {
        let (code, text) = read_failure(failure);
        return DeviceState::Failure { code, text };
    }
    DeviceState::Nobody
}

fn read_user_state(user: &Element) -> UserState {
    let devices: Vec<String> = user
        .children_named("deviceName")
        .map(|d| d.text.trim().to_ascii_uppercase())
        .filter(|d| !d.is_empty())
        .take(MAX_DEVICES_PER_USER)
        .collect();
    if !devices.is_empty() {
        return UserState::Devices(devices);
    }
    if user.child("doesNotExist").is_some() {
        return UserState::DoesNotExist;
    }
    if let Some(failure) = user.child("failure") {
        let (code, text) = read_failure(failure);
        return UserState::Failure { code, text };
    }
    UserState::Nowhere
}

/// `<failure><error code="N">text</error></failure>` or `<failure><errorMessage>`.
fn read_failure(failure: &Element) -> (Option<u32>, String) {
    if let Some(error) = failure.child("error") {
        let code = error
            .attribute("code")
            .and_then(|c| c.trim().trim_matches('"').trim().parse::<u32>().ok());
        return (code, clean_text(&error.text));
    }
    if let Some(message) = failure.child("errorMessage") {
        return (None, clean_text(&message.text));
    }
    (None, clean_text(&failure.text))
}

/// CUCM's texts sometimes carry stray quotes and line breaks (Cisco's own login
/// example ends its text with a quote and a newline).
fn clean_text(text: &str) -> String {
    let cleaned = text.trim().trim_matches('"').trim();
    shorten(
        &cleaned.split_whitespace().collect::<Vec<_>>().join(" "),
        200,
    )
}

fn percent_decode(value: &str) -> String {
    // CUCM percent-encodes user IDs; a `+` stays a `+` (not form encoding).
    percent_decode_str(value.trim())
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new("app<&>", "pa\"ss'")
    }

    #[test]
    fn login_request_escapes_every_value() {
        let device = DeviceName::parse("sep003094c25b15").unwrap();
        let user = UserId::parse("john</userID><userID>eve").unwrap();
        let doc = EmRequest::Login {
            device: &device,
            user: &user,
        }
        .encode(&creds());
        assert_eq!(
            doc,
            "<request><appInfo><appID>app&lt;&amp;&gt;</appID>\
             <appCertificate>pa&quot;ss&apos;</appCertificate></appInfo>\
             <login><deviceName>SEP003094C25B15</deviceName>\
             <userID>john&lt;/userID&gt;&lt;userID&gt;eve</userID></login></request>"
        );
        // The document is well-formed and carries the literal user ID back.
        let parsed = xml::parse(&doc).unwrap();
        assert_eq!(
            parsed.descendant("userID").unwrap().text,
            "john</userID><userID>eve"
        );
    }

    #[test]
    fn logout_and_query_documents() {
        let device = DeviceName::parse("SEP003094C25B15").unwrap();
        let creds = Credentials::new("appid", "apppasswd");
        assert_eq!(
            EmRequest::Logout { device: &device }.encode(&creds),
            "<request><appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate>\
             </appInfo><logout><deviceName>SEP003094C25B15</deviceName></logout></request>"
        );
        let devices = [device.clone(), DeviceName::parse("SEP2").unwrap()];
        assert_eq!(
            EmRequest::DeviceUserQuery { devices: &devices }.encode(&creds),
            "<query><appInfo><appID>appid</appID><appCertificate>apppasswd</appCertificate>\
             </appInfo><deviceUserQuery><deviceName>SEP003094C25B15</deviceName>\
             <deviceName>SEP2</deviceName></deviceUserQuery></query>"
        );
    }

    #[test]
    fn decodes_success_and_failures_from_em_api_examples() {
        assert_eq!(
            decode("<response><success/></response>"),
            Ok(EmResponse::Success)
        );
        assert_eq!(
            decode(
                "<response>\n  <failure>\n    <error code=\"3\">Could not authenticate 'appid'</error>\n  </failure>\n</response>"
            ),
            Ok(EmResponse::Failure {
                code: Some(3),
                text: "Could not authenticate 'appid'".into()
            })
        );
        // Cisco's own example, stray spaces and quote included.
        assert_eq!(
            decode(
                "<response> <failure> <error code= \"3\" > DB Query Error: Application Authentication Error: Could not authenticate\" </error> </failure> </response>"
            ),
            Ok(EmResponse::Failure {
                code: Some(3),
                text: "DB Query Error: Application Authentication Error: Could not authenticate"
                    .into()
            })
        );
        assert_eq!(
            decode("<response><failure><errorMessage>Query type undetermined</errorMessage></failure></response>"),
            Ok(EmResponse::Failure { code: None, text: "Query type undetermined".into() })
        );
        assert_eq!(
            decode(
                "<response><failure><error code=\"0\">Unknown Error</error></failure></response>"
            ),
            Ok(EmResponse::Failure {
                code: Some(0),
                text: "Unknown Error".into()
            })
        );
        assert_eq!(
            decode("<response><failure><error>no code</error></failure></response>"),
            Ok(EmResponse::Failure {
                code: None,
                text: "no code".into()
            })
        );
    }

    #[test]
    fn decodes_device_user_results_from_em_api_examples() {
        let one = |body: &str| match decode(body).unwrap() {
            EmResponse::DeviceUsers(mut devices) => devices.remove(0),
            other => panic!("unexpected {other:?}"),
        };
        // "first time": user one logged in, no last login.
        let d = one("<response><deviceUserResults><device name=\"SEP003094C25B15\">\n  <userID>one</userID><none/>\n</device></deviceUserResults></response>");
        assert_eq!(d.device, "SEP003094C25B15");
        assert_eq!(d.state, DeviceState::LoggedIn("one".into()));
        // previously logged in
        let d = one("<response><deviceUserResults><device name=\"SEP003094C25B15\">\n  <userID>john</userID><lastlogin>john</lastlogin>\n</device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::LoggedIn("john".into()));
        // current releases: percent-encoded, emccDevice ignored
        let d = one("<response><deviceUserResults><device name=\"SEP402CF4915265\">\n  <userID>em%40cisco.com</userID><lastlogin>em</lastlogin><emccDevice>no</emccDevice>\n</device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::LoggedIn("em@cisco.com".into()));
        // nobody, with a last login that must not be taken for the current user
        let d = one("<response><deviceUserResults><device name=\"x\"><lastlogin>bob</lastlogin><none/></device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::Nobody);
        assert_eq!(d.device, "X");
        let d = one("<response><deviceUserResults><device name=\"x\"><doesNotExist/></device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::DoesNotExist);
        let d = one("<response><deviceUserResults><device name=\"x\"><userID></userID><none/></device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::Nobody);
        // unknown elements anywhere, other order
        let d = one("<response><extra/><deviceUserResults><device name=\"x\"><emccDevice>no</emccDevice><future>1</future><userID>a+b%20c</userID></device></deviceUserResults></response>");
        assert_eq!(d.state, DeviceState::LoggedIn("a+b c".into()));
    }

    #[test]
    fn user_devices_query_and_results() {
        let user = UserId::parse("em@cisco.com").unwrap();
        assert_eq!(
            EmRequest::UserDevicesQuery { user: &user }.encode(&Credentials::new("a", "b")),
            "<query><appInfo><appID>a</appID><appCertificate>b</appCertificate></appInfo>\
             <userDevicesQuery><userID>em@cisco.com</userID></userDevicesQuery></query>"
        );
        let users = |body: &str| match decode(body).unwrap() {
            EmResponse::UserDevices(users) => users,
            other => panic!("unexpected {other:?}"),
        };
        // [S2] and [S1] examples.
        let u = users("<response>\n  <userDevicesResults>\n    <user id=\"john\">\n      <deviceName>SEP003094C25B15</deviceName>\n      <deviceName>sep003094c25b49</deviceName>\n    </user>\n  </userDevicesResults>\n</response>");
        assert_eq!(u[0].user, "john");
        assert_eq!(
            u[0].state,
            UserState::Devices(vec!["SEP003094C25B15".into(), "SEP003094C25B49".into()])
        );
        let u = users("<response><userDevicesResults><user id=\"em%40cisco.com\"><deviceName>SEP402CF4915265</deviceName></user></userDevicesResults></response>");
        assert_eq!(u[0].user, "em@cisco.com");
        let u = users("<response><userDevicesResults><user id=\"x\"><none/></user><user id=\"y\"><doesNotExist/></user><user id=\"z\"/></userDevicesResults></response>");
        assert_eq!(u[0].state, UserState::Nowhere);
        assert_eq!(u[1].state, UserState::DoesNotExist);
        assert_eq!(u[2].state, UserState::Nowhere);
    }

    #[test]
    fn tolerates_declarations_doctypes_and_comments() {
        assert_eq!(
            decode("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>\n<!-- EM -->\n<response><success/></response>"),
            Ok(EmResponse::Success)
        );
        assert_eq!(
            decode("<!DOCTYPE response SYSTEM \"em.dtd\"><response>\r\n<success></success>\r\n</response>\r\n"),
            Ok(EmResponse::Success)
        );
    }

    #[test]
    fn rejects_what_is_not_an_em_response() {
        assert!(matches!(
            decode("<html><body>Service Unavailable</body></html>"),
            Err(CodecError::UnexpectedRoot(_))
        ));
        assert!(matches!(decode("garbage"), Err(CodecError::NotXml(_))));
        assert!(matches!(decode(""), Err(CodecError::NotXml(_))));
        assert_eq!(
            decode("<response><something/></response>"),
            Err(CodecError::UnknownResponse)
        );
    }
}
