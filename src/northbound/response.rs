//! Northbound answers (the Business Connector 1.4 documents): the XML documents, and the one place where every
//! outcome and error becomes a result code, a text and an HTTP status.

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use actors::operation::MAX_USER_ID_LEN;
use actors::xml::{escape, shorten};
use actors::{OpError, Outcome, RouteError};

use super::request::{Call, RequestError};

pub const XML_DECLARATION: &str = "<?xml version='1.0' encoding='UTF-8'?>";
pub const CONTENT_TYPE: &str = "text/xml; charset=utf-8";

/// Echoed values are cut to this many characters (after which `…`).
const MAX_ECHO_CHARS: usize = 64;

/// The gateway's own codes.
pub mod code {
    pub const SUCCESS: u32 = 0;
    pub const DEVICE_ID_EMPTY: u32 = 404;
    pub const CLUSTER_NOT_FOUND: u32 = 1001;
    pub const INVALID_REQUEST: u32 = 1002;
    pub const CUCM_UNAVAILABLE: u32 = 1003;
    pub const OVERLOADED: u32 = 1004;
    pub const INVALID_CUCM_RESPONSE: u32 = 1005;
    pub const CREDENTIALS_MISSING: u32 = 1006;
    pub const PIN_REJECTED: u32 = 1007;
    pub const CUCM_UNKNOWN_FAILURE: u32 = 1008;
    pub const FORBIDDEN: u32 = 1009;
    pub const TOO_MANY_REQUESTS: u32 = 1010;
    pub const IN_SEVERAL_CLUSTERS: u32 = 1011;
}

/// Everything that can answer a call other than success.
#[derive(Debug, Clone)]
pub enum Failure {
    Request(RequestError),
    Route(RouteError),
    Operation(OpError),
    BodyTooLarge {
        limit: usize,
    },
    /// The body did not arrive within this many milliseconds: the client's fault
    /// (HTTP 408, code 1002), never a CUCM one.
    TooSlow {
        limit_ms: u64,
    },
    /// The client's address is not allowed (HTTP 403).
    Forbidden,
    /// The client is over its request rate (HTTP 429 + Retry-After).
    TooManyRequests {
        retry_after: Duration,
    },
}

/// One `<result>`: what the caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultDoc {
    pub status: StatusCode,
    pub code: u32,
    pub text: String,
    pub device_name: String,
    /// `Some` for login, getloggedinuser and getuserdevices.
    pub user_id: Option<String>,
    /// `Some` for getuserdevices (which has no `<deviceName>` of its own).
    pub devices: Option<Vec<String>>,
    pub retry_after: Option<Duration>,
}

impl ResultDoc {
    pub fn success(call: Call, device: &str, user: Option<&str>, outcome: &Outcome) -> Self {
        let (user_id, text) = match outcome {
            Outcome::LoggedIn => {
                let user = user.unwrap_or_default();
                (
                    Some(user.to_string()),
                    format!("Login successful for {user} on device {device}"),
                )
            }
            Outcome::LoggedOut => (None, format!("Logout successful for device {device}")),
            Outcome::CurrentUser(Some(current)) => (
                Some(current.as_str().to_string()),
                "Get logged in user request successful".to_string(),
            ),
            Outcome::CurrentUser(None) => (
                Some(String::new()),
                format!("No user is logged in on device {device}"),
            ),
            Outcome::LoggedInReplacing(previous) => {
                let user = user.unwrap_or_default();
                (
                    Some(user.to_string()),
                    format!(
                        "Login successful for {user} on device {device} after logging out {}",
                        shorten(previous.as_str(), MAX_ECHO_CHARS)
                    ),
                )
            }
            Outcome::UserDevices {
                devices,
                unanswered,
            } => {
                let user = user.unwrap_or_default();
                let mut text = match devices.len() {
                    0 => format!("User {user} is not logged in on any device"),
                    n => format!("User {user} is logged in on {n} device(s)"),
                };
                if !unanswered.is_empty() {
                    let _ = write!(
                        text,
                        "; clusters that could not be asked: {}",
                        unanswered.join(", ")
                    );
                }
                (Some(user.to_string()), text)
            }
        };
        let devices = match outcome {
            Outcome::UserDevices { devices, .. } => {
                Some(devices.iter().map(|d| d.to_string()).collect())
            }
            _ => None,
        };
        Self {
            status: StatusCode::OK,
            code: code::SUCCESS,
            text,
            device_name: device.to_string(),
            user_id: if call.echoes_user() {
                user_id.or(Some(String::new()))
            } else {
                None
            },
            devices: call.about_user().then(|| devices.unwrap_or_default()),
            retry_after: None,
        }
    }

    /// `device` and `user` are what the caller sent (echoed, escaped, cut).
    pub fn failure(call: Call, device: &str, user: Option<&str>, failure: &Failure) -> Self {
        let (status, code, text, retry_after) = classify(failure);
        Self {
            status,
            code,
            text,
            device_name: device.to_string(),
            devices: call.about_user().then(Vec::new),
            user_id: call.echoes_user().then(|| {
                if call == Call::Login || call.about_user() {
                    user.unwrap_or_default().to_string()
                } else {
                    String::new()
                }
            }),
            retry_after,
        }
    }

    /// The `<deviceName>` as echoed (none for getuserdevices), cut like every echo.
    pub fn echoed_device(&self) -> Option<String> {
        self.devices
            .is_none()
            .then(|| shorten(&self.device_name, MAX_ECHO_CHARS))
    }

    /// The `<userID>` as echoed, cut to the longest user ID there can be.
    pub fn echoed_user(&self) -> Option<String> {
        self.user_id
            .as_deref()
            .map(|user| shorten(user, MAX_USER_ID_LEN))
    }

    /// The `<devices>` of getuserdevices, each cut like every echo.
    pub fn echoed_devices(&self) -> Option<Vec<String>> {
        self.devices.as_ref().map(|devices| {
            devices
                .iter()
                .map(|device| shorten(device, MAX_ECHO_CHARS))
                .collect()
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str(XML_DECLARATION);
        out.push_str("\n<response>\n<result>\n");
        if let Some(device) = self.echoed_device() {
            let _ = writeln!(out, "<deviceName>{}</deviceName>", escape(&device));
        }
        if let Some(user) = self.echoed_user() {
            let _ = writeln!(out, "<userID>{}</userID>", escape(&user));
        }
        if let Some(devices) = self.echoed_devices() {
            out.push_str("<devices>");
            for device in devices {
                let _ = write!(out, "<deviceName>{}</deviceName>", escape(&device));
            }
            out.push_str("</devices>\n");
        }
        let _ = writeln!(out, "<code>{}</code>", self.code);
        let _ = writeln!(out, "<text>{}</text>", escape(&self.text));
        out.push_str("</result>\n</response>\n");
        out
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&classify(&Failure::Request(self.clone())).2)
    }
}

/// The mapping from every failure to (HTTP status, code, text, Retry-After). The one
/// place where the gateway's own caller-facing texts are written. Where the actor core's
/// error already says it to the caller (an invalid value beside the limit it states, an
/// unknown cluster, CUCM unavailable or without a usable code) its text is taken, not
/// copied.
fn classify(failure: &Failure) -> (StatusCode, u32, String, Option<Duration>) {
    use code::*;
    let ok = StatusCode::OK;
    let invalid = |text: String| {
        (
            ok,
            INVALID_REQUEST,
            format!("Invalid request: {text}"),
            None,
        )
    };
    match failure {
        Failure::Request(error) => match error {
            RequestError::DeviceMissing => (ok, DEVICE_ID_EMPTY, "Device ID empty".into(), None),
            RequestError::CredentialsMissing => (
                ok,
                CREDENTIALS_MISSING,
                "Credentials missing: appID and appCertificate are required".into(),
                None,
            ),
            RequestError::MalformedXml(detail) => invalid(format!("malformed XML ({detail})")),
            RequestError::MalformedJson(detail) => invalid(format!("malformed JSON ({detail})")),
            RequestError::MalformedPath => {
                invalid("a path segment is not valid percent-encoded UTF-8".into())
            }
            RequestError::NotUtf8 => invalid("the message is not valid UTF-8".into()),
            RequestError::UserMissing => invalid("userID is missing".into()),
            RequestError::PinNotAllowed => invalid("a PIN is only taken by login".into()),
            RequestError::InvalidForce => invalid(
                "force must be true or false, and is only taken by a login without a PIN".into(),
            ),
            RequestError::InvalidValue(value) => invalid(value.to_string()),
        },
        Failure::BodyTooLarge { limit } => (
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            format!("Invalid request: the body is larger than {limit} bytes"),
            None,
        ),
        Failure::TooSlow { limit_ms } => (
            StatusCode::REQUEST_TIMEOUT,
            INVALID_REQUEST,
            format!("Invalid request: the request did not arrive within {limit_ms} ms"),
            None,
        ),
        Failure::Forbidden => (
            StatusCode::FORBIDDEN,
            FORBIDDEN,
            "Forbidden: this client is not allowed".into(),
            None,
        ),
        Failure::TooManyRequests { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            TOO_MANY_REQUESTS,
            "Too many requests from this client; retry later".into(),
            Some(*retry_after),
        ),
        Failure::Route(error @ RouteError::UnknownCluster(_)) => {
            (ok, CLUSTER_NOT_FOUND, error.to_string(), None)
        }
        Failure::Operation(error) => match error {
            OpError::Cucm { code, text } => (ok, *code, text.clone(), None),
            OpError::CucmUnknown { .. } => (ok, CUCM_UNKNOWN_FAILURE, error.to_string(), None),
            OpError::Unavailable { .. } => (ok, CUCM_UNAVAILABLE, error.to_string(), None),
            OpError::InvalidResponse { detail } => (
                ok,
                INVALID_CUCM_RESPONSE,
                format!(
                    "CUCM answered with something that is not a valid EM API response: {detail}"
                ),
                None,
            ),
            OpError::PinRejected => (
                ok,
                PIN_REJECTED,
                "PIN rejected by the user's home cluster".into(),
                None,
            ),
            OpError::InSeveralClusters { clusters } => (
                ok,
                IN_SEVERAL_CLUSTERS,
                format!(
                    "The device exists in more than one cluster ({}): give a cluster code",
                    clusters.join(", ")
                ),
                None,
            ),
            OpError::Overloaded {
                reason,
                retry_after,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                OVERLOADED,
                format!("Overloaded: {reason}; retry later"),
                Some(*retry_after),
            ),
        },
    }
}

/// The `code` label of the request metrics: the codes the gateway can answer (its own
/// and CUCM's documented EM codes), anything else `other`. CUCM can send any number;
/// a label must stay bounded.
pub fn code_label(code: u32) -> &'static str {
    const CUCM_CODES: [&str; 48] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
        "32", "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46",
        "47",
    ];
    const EMAPP_CODES: [&str; 16] = [
        "201", "202", "203", "204", "205", "206", "207", "208", "209", "210", "211", "212", "213",
        "214", "215", "216",
    ];
    match code {
        0..=47 => CUCM_CODES[code as usize],
        code::DEVICE_ID_EMPTY => "404",
        code::CLUSTER_NOT_FOUND => "1001",
        code::INVALID_REQUEST => "1002",
        code::CUCM_UNAVAILABLE => "1003",
        code::OVERLOADED => "1004",
        code::INVALID_CUCM_RESPONSE => "1005",
        code::CREDENTIALS_MISSING => "1006",
        code::PIN_REJECTED => "1007",
        code::CUCM_UNKNOWN_FAILURE => "1008",
        code::FORBIDDEN => "1009",
        code::TOO_MANY_REQUESTS => "1010",
        code::IN_SEVERAL_CLUSTERS => "1011",
        201..=216 => EMAPP_CODES[(code - 201) as usize],
        _ => "other",
    }
}

/// `Retry-After` in whole seconds: rounded up, and at least 1 (a client told 0 would
/// come back at once).
pub fn retry_after_seconds(after: Duration) -> String {
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    seconds.max(1).to_string()
}

/// An XML answer, with `Retry-After` when the caller should come back later.
pub fn xml_response(
    status: StatusCode,
    body: String,
    retry_after: Option<Duration>,
) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE)));
    if let Some(after) = retry_after {
        response.insert_header((header::RETRY_AFTER, retry_after_seconds(after)));
    }
    response.body(body)
}

/// The version document (no credentials needed).
pub fn version_document() -> String {
    format!(
        "{XML_DECLARATION}\n<result>\n<appversion>1.4</appversion>\n<appname>Business Connector</appname>\n</result>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use actors::UserId;

    #[test]
    fn an_unknown_cluster_code_is_echoed_cut() {
        let failure = Failure::Route(RouteError::UnknownCluster("C".repeat(100)));
        let doc = ResultDoc::failure(Call::Logout, "SEP1", None, &failure);
        assert_eq!(doc.code, code::CLUSTER_NOT_FOUND);
        assert_eq!(
            doc.text,
            format!("Cluster with code [{}…] not found", "C".repeat(32))
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        let cases = [
            (0, "1"),
            (1, "1"),
            (999, "1"),
            (1000, "1"),
            (1001, "2"),
            (2500, "3"),
        ];
        for (millis, header) in cases {
            assert_eq!(
                retry_after_seconds(Duration::from_millis(millis)),
                header,
                "{millis} ms"
            );
        }
    }

    #[test]
    fn xml_and_json_echo_the_same_cut_values() {
        let long = "x".repeat(300);
        let doc = ResultDoc::failure(
            Call::Login,
            &long,
            Some(&long),
            &Failure::Request(RequestError::CredentialsMissing),
        );
        let device = doc.echoed_device().unwrap();
        let user = doc.echoed_user().unwrap();
        assert_eq!(device.chars().count(), MAX_ECHO_CHARS + 1, "cut, then …");
        assert_eq!(user.chars().count(), MAX_USER_ID_LEN + 1);
        assert!(doc
            .render()
            .contains(&format!("<deviceName>{device}</deviceName>")));
        let value = crate::northbound::json::result_value(&doc);
        assert_eq!(value["deviceName"], device.as_str());
        assert_eq!(value["userID"], user.as_str());
        assert_eq!(
            RequestError::CredentialsMissing.to_string(),
            doc.text,
            "a request error's text is the caller's"
        );
    }

    #[test]
    fn login_success_document_is_exactly_the_vendor_format() {
        let doc = ResultDoc::success(
            Call::Login,
            "SEP1CE6C79BAF1F",
            Some("ALMUSER01"),
            &Outcome::LoggedIn,
        );
        assert_eq!(
            doc.render(),
            "<?xml version='1.0' encoding='UTF-8'?>\n<response>\n<result>\n\
             <deviceName>SEP1CE6C79BAF1F</deviceName>\n<userID>ALMUSER01</userID>\n<code>0</code>\n\
             <text>Login successful for ALMUSER01 on device SEP1CE6C79BAF1F</text>\n</result>\n</response>\n"
        );
    }

    #[test]
    fn logout_has_no_user_and_query_for_nobody_has_an_empty_one() {
        let logout = ResultDoc::success(Call::Logout, "SEP1", None, &Outcome::LoggedOut).render();
        assert!(!logout.contains("<userID>"));
        assert!(logout.contains("<text>Logout successful for device SEP1</text>"));
        let nobody = ResultDoc::success(
            Call::GetLoggedInUser,
            "SEP1",
            None,
            &Outcome::CurrentUser(None),
        )
        .render();
        assert!(nobody.contains("<userID></userID>"));
        assert!(nobody.contains("<code>0</code>"));
        let someone = ResultDoc::success(
            Call::GetLoggedInUser,
            "SEP1",
            None,
            &Outcome::CurrentUser(Some(UserId::parse("a&b").unwrap())),
        )
        .render();
        assert!(someone.contains("<userID>a&amp;b</userID>"));
    }

    #[test]
    fn codes_and_statuses_of_each_failure() {
        let case = |failure: Failure| {
            let doc = ResultDoc::failure(Call::Login, "SEP1", Some("u"), &failure);
            (doc.status.as_u16(), doc.code)
        };
        assert_eq!(
            case(Failure::Request(RequestError::DeviceMissing)),
            (200, 404)
        );
        assert_eq!(
            case(Failure::Request(RequestError::UserMissing)),
            (200, 1002)
        );
        assert_eq!(
            case(Failure::Request(RequestError::CredentialsMissing)),
            (200, 1006)
        );
        assert_eq!(
            case(Failure::Route(RouteError::UnknownCluster("X".into()))),
            (200, 1001)
        );
        assert_eq!(case(Failure::BodyTooLarge { limit: 10 }), (413, 1002));
        assert_eq!(case(Failure::TooSlow { limit_ms: 10 }), (408, 1002));
        assert_eq!(case(Failure::Forbidden), (403, 1009));
        assert_eq!(
            case(Failure::TooManyRequests {
                retry_after: Duration::from_secs(1)
            }),
            (429, 1010)
        );
        assert_eq!(
            case(Failure::Operation(OpError::Cucm {
                code: 25,
                text: "User logged in elsewhere".into()
            })),
            (200, 25)
        );
        assert_eq!(
            case(Failure::Operation(OpError::CucmUnknown {
                text: "Unknown Error".into()
            })),
            (200, 1008)
        );
        assert_eq!(
            case(Failure::Operation(OpError::Unavailable {
                reason: "x".into()
            })),
            (200, 1003)
        );
        assert_eq!(
            case(Failure::Operation(OpError::InvalidResponse {
                detail: "x".into()
            })),
            (200, 1005)
        );
        let shed = ResultDoc::failure(
            Call::Login,
            "SEP1",
            None,
            &Failure::Operation(OpError::Overloaded {
                reason: "full",
                retry_after: Duration::from_secs(3),
            }),
        );
        assert_eq!((shed.status.as_u16(), shed.code), (503, 1004));
        assert_eq!(shed.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn echoed_values_are_escaped_and_cut() {
        let requested = format!("<script>{}", "x".repeat(100));
        let doc = ResultDoc::failure(
            Call::Logout,
            &requested,
            None,
            &Failure::Route(RouteError::UnknownCluster(requested.clone())),
        );
        let rendered = doc.render();
        assert!(!rendered.contains("<script>"));
        assert!(rendered.contains("&lt;script&gt;"));
        assert!(doc.text.chars().count() < 70, "{}", doc.text);
        let device_line = rendered
            .lines()
            .find(|l| l.starts_with("<deviceName>"))
            .unwrap();
        assert!(device_line.chars().count() < 100, "{device_line}");
    }

    #[test]
    fn code_labels_are_bounded() {
        assert_eq!(code_label(0), "0");
        assert_eq!(code_label(26), "26");
        assert_eq!(code_label(47), "47");
        assert_eq!(code_label(1004), "1004");
        assert_eq!(code_label(48), "other");
        assert_eq!(code_label(4_000_000), "other");
        for code in 0..=2000 {
            let label = code_label(code);
            assert!(label == "other" || label == code.to_string(), "{code}");
        }
    }

    #[test]
    fn version_document_is_exact() {
        assert_eq!(
            version_document(),
            "<?xml version='1.0' encoding='UTF-8'?>\n<result>\n<appversion>1.4</appversion>\n<appname>Business Connector</appname>\n</result>\n"
        );
    }
}
