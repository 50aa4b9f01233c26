//! EM API wire format (`POST /emservice/EMServiceServlet`, form field `xml`): lenient decoding of the `xml` form field,
//! tolerant parsing of `<request>`/`<query>` documents and rendering of `<response>`s.

use std::borrow::Cow;
use std::fmt::Write as _;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use quick_xml::events::Event;
use quick_xml::Reader;

/// Why a request document could not be turned into an [`EmRequest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Code 1 "Error on Parsing".
    #[error("cannot parse EM request: {0}")]
    Parse(String),
    /// Code 8 "Query type undetermined".
    #[error("unsupported query type {0:?}")]
    UnknownQuery(String),
}

impl ProtocolError {
    pub fn code(&self) -> u32 {
        match self {
            ProtocolError::Parse(_) => 1,
            ProtocolError::UnknownQuery(_) => 8,
        }
    }
}

/// `<appInfo>`: the calling application's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCredentials {
    pub app_id: String,
    pub certificate: String,
}

/// `<exclusiveDuration>` of a login: minutes, or indefinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExclusiveDuration {
    Minutes(u64),
    Indefinite,
}

/// One parsed EM API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmRequest {
    Login {
        app: AppCredentials,
        device: String,
        user: String,
        profile: Option<String>,
        duration: Option<ExclusiveDuration>,
    },
    Logout {
        app: AppCredentials,
        device: String,
    },
    LogoutAll {
        app: AppCredentials,
    },
    DeviceUserQuery {
        app: AppCredentials,
        devices: Vec<String>,
    },
    UserDevicesQuery {
        app: AppCredentials,
        users: Vec<String>,
    },
    DeviceProfileQuery {
        app: AppCredentials,
        users: Vec<String>,
    },
}

impl EmRequest {
    pub fn app(&self) -> &AppCredentials {
        match self {
            EmRequest::Login { app, .. }
            | EmRequest::Logout { app, .. }
            | EmRequest::LogoutAll { app }
            | EmRequest::DeviceUserQuery { app, .. }
            | EmRequest::UserDevicesQuery { app, .. }
            | EmRequest::DeviceProfileQuery { app, .. } => app,
        }
    }
}

/// Extracts the `xml` parameter from a form-encoded body or query string, leniently:
/// `xml=%3Cquery%3E…` (proper encoding), `xml=<query>…` (raw, not encoded) and a bare
/// `<query>…` body all work. Returns `None` when there is no `xml` parameter.
pub fn extract_xml_param(input: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(input);
    let trimmed = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if trimmed.starts_with('<') {
        return Some(trimmed.to_string());
    }
    if let Some(value) = trimmed.strip_prefix("xml=") {
        // Raw XML after `xml=`: take it literally, `&` and `+` inside belong to the XML.
        if value.trim_start().starts_with('<') {
            return Some(value.to_string());
        }
    }
    form_urlencoded::parse(trimmed.as_bytes())
        .find(|(key, _)| key == "xml")
        .map(|(_, value)| value.into_owned())
}

/// Minimal element tree of a request document; requests are tiny, so this stays cheap.
#[derive(Debug, Default)]
struct Element {
    name: String,
    text: String,
    children: Vec<Element>,
}

impl Element {
    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    fn children_text<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.children
            .iter()
            .filter(move |c| c.name == name)
            .map(|c| c.text.trim())
    }
}

fn parse_error(what: impl Into<String>) -> ProtocolError {
    ProtocolError::Parse(what.into())
}

/// Parses the document into an element tree (namespace prefixes dropped).
fn parse_tree(xml: &str) -> Result<Element, ProtocolError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Element> = Vec::with_capacity(4);
    let mut root: Option<Element> = None;
    let open = |name: &[u8]| -> Result<Element, ProtocolError> {
        Ok(Element {
            name: std::str::from_utf8(name)
                .map_err(|_| parse_error("element name is not UTF-8"))?
                .to_string(),
            ..Element::default()
        })
    };
    loop {
        let event = reader
            .read_event()
            .map_err(|e| parse_error(format!("XML error: {e}")))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(parse_error("content after the root element"));
                }
                stack.push(open(start.local_name().as_ref())?);
            }
            Event::Empty(start) => {
                let element = open(start.local_name().as_ref())?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None if root.is_none() => root = Some(element),
                    None => return Err(parse_error("content after the root element")),
                }
            }
            Event::End(_) => {
                // quick-xml checks that end tags match start tags.
                let element = stack
                    .pop()
                    .ok_or_else(|| parse_error("unbalanced end tag"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => root = Some(element),
                }
            }
            Event::Text(text) => {
                let text = text
                    .decode()
                    .map_err(|e| parse_error(format!("text encoding: {e}")))?;
                match stack.last_mut() {
                    Some(current) => current.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(parse_error("text outside the root element")),
                }
            }
            Event::CData(cdata) => {
                let text = cdata
                    .decode()
                    .map_err(|e| parse_error(format!("CDATA encoding: {e}")))?;
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&text);
                }
            }
            Event::GeneralRef(reference) => {
                let resolved: Cow<'_, str> = if reference.is_char_ref() {
                    match reference.resolve_char_ref() {
                        Ok(Some(c)) => Cow::Owned(c.to_string()),
                        _ => return Err(parse_error("invalid character reference")),
                    }
                } else {
                    let name = reference
                        .decode()
                        .map_err(|e| parse_error(format!("entity encoding: {e}")))?;
                    match quick_xml::escape::resolve_predefined_entity(&name) {
                        Some(value) => Cow::Borrowed(value),
                        None => return Err(parse_error(format!("unknown entity &{name};"))),
                    }
                };
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(parse_error("document ends inside an element"));
    }
    root.ok_or_else(|| parse_error("empty document"))
}

fn parse_app_info(root: &Element) -> Result<AppCredentials, ProtocolError> {
    let info = root
        .child("appInfo")
        .ok_or_else(|| parse_error("missing <appInfo>"))?;
    let app_id = info
        .child_text("appID")
        .ok_or_else(|| parse_error("missing <appID>"))?;
    // appEncryptedCertificate has no documented encoding; compare it like a plain one.
    let certificate = info
        .child_text("appCertificate")
        .or_else(|| info.child_text("appEncryptedCertificate"))
        .ok_or_else(|| parse_error("missing <appCertificate>"))?;
    Ok(AppCredentials {
        app_id: app_id.to_string(),
        certificate: certificate.to_string(),
    })
}

fn required_text(parent: &Element, name: &str) -> Result<String, ProtocolError> {
    match parent.child_text(name) {
        Some(text) if !text.is_empty() => Ok(text.to_string()),
        _ => Err(parse_error(format!(
            "<{}> needs a non-empty <{name}>",
            parent.name
        ))),
    }
}

fn non_empty_list(parent: &Element, name: &str) -> Result<Vec<String>, ProtocolError> {
    let list: Vec<String> = parent
        .children_text(name)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        return Err(parse_error(format!(
            "<{}> needs at least one <{name}>",
            parent.name
        )));
    }
    Ok(list)
}

fn parse_login(app: AppCredentials, login: &Element) -> Result<EmRequest, ProtocolError> {
    let device = required_text(login, "deviceName")?;
    let user = required_text(login, "userID")?;
    let profile = login
        .child_text("deviceProfile")
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let duration = login.child("exclusiveDuration").and_then(|d| {
        if d.child("indefinite").is_some() {
            Some(ExclusiveDuration::Indefinite)
        } else {
            d.child_text("time")
                .and_then(|t| t.parse().ok())
                .map(ExclusiveDuration::Minutes)
        }
    });
    Ok(EmRequest::Login {
        app,
        device,
        user,
        profile,
        duration,
    })
}

/// Parses a decoded EM request document. Tolerates whitespace, element order and unknown
/// elements; an unparsable document is code 1, an unknown query type code 8.
pub fn parse_em_request(xml: &str) -> Result<EmRequest, ProtocolError> {
    let root = parse_tree(xml)?;
    let is_query = match root.name.as_str() {
        "request" => false,
        "query" => true,
        other => return Err(parse_error(format!("unknown root element <{other}>"))),
    };
    let app = parse_app_info(&root)?;
    // logoutAll is accepted under <query> too: a real client sends it that way.
    if let Some(login) = root.child("login").filter(|_| !is_query) {
        return parse_login(app, login);
    }
    if let Some(logout) = root.child("logout").filter(|_| !is_query) {
        let device = required_text(logout, "deviceName")?;
        return Ok(EmRequest::Logout { app, device });
    }
    if root.child("logoutAll").is_some() {
        return Ok(EmRequest::LogoutAll { app });
    }
    if !is_query {
        return Err(parse_error("<request> without login, logout or logoutAll"));
    }
    if let Some(q) = root.child("deviceUserQuery") {
        let devices = non_empty_list(q, "deviceName")?;
        return Ok(EmRequest::DeviceUserQuery { app, devices });
    }
    if let Some(q) = root.child("userDevicesQuery") {
        let users = non_empty_list(q, "userID")?;
        return Ok(EmRequest::UserDevicesQuery { app, users });
    }
    if let Some(q) = root
        .child("deviceProfileQuery")
        .or_else(|| root.child("userDeviceProfileQuery"))
    {
        let users = non_empty_list(q, "userID")?;
        return Ok(EmRequest::DeviceProfileQuery { app, users });
    }
    let kind = root
        .children
        .iter()
        .map(|c| c.name.as_str())
        .find(|name| *name != "appInfo")
        .unwrap_or("")
        .to_string();
    Err(ProtocolError::UnknownQuery(kind))
}

/// Message text per code: the "message" column of Cisco's EM API code table (the EMCC
/// guide's texts for 31–47).
pub fn error_message(code: u32) -> &'static str {
    match code {
        0 => "Unknown Error",
        1 => "Error on Parsing",
        2 => "Cannot authorize App user",
        3 => "Invalid App User",
        4 => "Policy Validation error",
        5 => "Device logon disabled",
        6 => "Database Error",
        7 => "Logout Request Error",
        8 => "Query type undetermined",
        9 => "Dir. User Info Error",
        10 => "User lacks app proxy rights",
        11 => "Device does not exist",
        12 => "Dev. Profile not found",
        18 => "Another user logged in",
        19 => "No user logged in",
        20 => "Hoteling flag error",
        21 => "Hoteling Status error",
        22 => "Device logon disabled",
        23 => "User not found",
        25 => "User logged in elsewhere",
        26 => "Busy, please try again",
        27 => "Change Password",
        28 => "Untrusted IP Error",
        29 => "RIS down-contact admin",
        30 => "Proxy not allowed",
        31 => "EMCC Not Activated for the user",
        32 => "Device does not support EMCC",
        33 => "No free EMCC dummy device",
        35 => "Visiting Cluster Information is not present in Home Cluster",
        36 => "No Remote Cluster",
        37 => "Duplicate Device Name",
        38 => "EMCC Not Allowed",
        39 => "Configuration Issue",
        40 => "No Response from Remote Host",
        41 => "PIN change is required",
        42 => "Invalid ClusterID",
        43 => "Device Security mode error",
        45 => "Remote Cluster version not supported",
        46 => "Remote Cluster security mode not supported",
        47 => "DN has multiple users",
        _ => "Unknown Error",
    }
}

/// Characters left as-is when percent-encoding user IDs (Java `URLEncoder` set;
/// space becomes `%20`, which every decoder understands).
const USER_ID_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'*');

/// Percent-encodes a user ID as CUCM does in query results (`em@cisco.com` → `em%40cisco.com`).
pub fn encode_user_id(user: &str) -> Cow<'_, str> {
    utf8_percent_encode(user, USER_ID_KEEP).into()
}

/// Decodes `%XX` in a user ID sent by a client; `None` when nothing changes or not UTF-8.
pub fn decode_user_id(user: &str) -> Option<String> {
    if !user.contains('%') {
        return None;
    }
    percent_decode_str(user)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
        .filter(|s| s != user)
}

/// Escapes text or attribute values.
pub fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

pub fn render_success() -> String {
    format!("{XML_DECL}<response><success/></response>")
}

pub fn render_failure(code: u32) -> String {
    let mut out = String::with_capacity(128);
    out.push_str(XML_DECL);
    push_failure(&mut out, code);
    out
}

fn push_failure_element(out: &mut String, code: u32) {
    let _ = write!(out, "<failure><error code=\"{code}\">");
    push_escaped(out, error_message(code));
    out.push_str("</error></failure>");
}

fn push_failure(out: &mut String, code: u32) {
    out.push_str("<response>");
    push_failure_element(out, code);
    out.push_str("</response>");
}

/// What a `deviceUserQuery` reports for one requested device name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceUserAnswer {
    DoesNotExist {
        requested: String,
    },
    Known {
        name: String,
        user: Option<String>,
        last_login: Option<String>,
        /// The logged-in user is an EMCC visitor (`<emccDevice>yes</emccDevice>`).
        emcc: bool,
    },
}

pub fn render_device_user_results(answers: &[DeviceUserAnswer]) -> String {
    let mut out = String::with_capacity(96 + 160 * answers.len());
    out.push_str(XML_DECL);
    out.push_str("<response><deviceUserResults>");
    for answer in answers {
        match answer {
            DeviceUserAnswer::DoesNotExist { requested } => {
                out.push_str("<device name=\"");
                push_escaped(&mut out, requested);
                out.push_str("\"><doesNotExist/></device>");
            }
            DeviceUserAnswer::Known {
                name,
                user,
                last_login,
                emcc,
            } => {
                out.push_str("<device name=\"");
                push_escaped(&mut out, name);
                out.push_str("\">");
                match user {
                    Some(user) => {
                        out.push_str("<userID>");
                        push_escaped(&mut out, &encode_user_id(user));
                        out.push_str("</userID>");
                    }
                    None => out.push_str("<none/>"),
                }
                if let Some(last) = last_login {
                    out.push_str("<lastlogin>");
                    push_escaped(&mut out, &encode_user_id(last));
                    out.push_str("</lastlogin>");
                }
                out.push_str(if *emcc {
                    "<emccDevice>yes</emccDevice></device>"
                } else {
                    "<emccDevice>no</emccDevice></device>"
                });
            }
        }
    }
    out.push_str("</deviceUserResults></response>");
    out
}

/// What a `userDevicesQuery` reports for one requested user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserDevicesAnswer {
    DoesNotExist { user: String },
    Devices { user: String, devices: Vec<String> },
}

pub fn render_user_devices_results(answers: &[UserDevicesAnswer]) -> String {
    let mut out = String::with_capacity(96 + 128 * answers.len());
    out.push_str(XML_DECL);
    out.push_str("<response><userDevicesResults>");
    for answer in answers {
        let (user, devices) = match answer {
            UserDevicesAnswer::DoesNotExist { user } => (user, None),
            UserDevicesAnswer::Devices { user, devices } => (user, Some(devices)),
        };
        out.push_str("<user id=\"");
        push_escaped(&mut out, &encode_user_id(user));
        out.push_str("\">");
        match devices {
            None => out.push_str("<doesNotExist/>"),
            Some(devices) if devices.is_empty() => out.push_str("<none/>"),
            Some(devices) => {
                for device in devices {
                    out.push_str("<deviceName>");
                    push_escaped(&mut out, device);
                    out.push_str("</deviceName>");
                }
            }
        }
        out.push_str("</user>");
    }
    out.push_str("</userDevicesResults></response>");
    out
}

/// What a device profile query reports for one requested user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceProfileAnswer {
    /// Per-user nested failure (23 unknown user, 12 no profile).
    Failure { user: String, code: u32 },
    Profiles {
        user: String,
        /// (profile name, is default)
        profiles: Vec<(String, bool)>,
    },
}

pub fn render_device_profile_results(answers: &[DeviceProfileAnswer]) -> String {
    let mut out = String::with_capacity(96 + 192 * answers.len());
    out.push_str(XML_DECL);
    out.push_str("<response><deviceProfileResults>");
    for answer in answers {
        let user = match answer {
            DeviceProfileAnswer::Failure { user, .. }
            | DeviceProfileAnswer::Profiles { user, .. } => user,
        };
        out.push_str("<user id=\"");
        push_escaped(&mut out, &encode_user_id(user));
        out.push_str("\">");
        match answer {
            DeviceProfileAnswer::Failure { code, .. } => push_failure_element(&mut out, *code),
            DeviceProfileAnswer::Profiles { profiles, .. } => {
                for (name, is_default) in profiles {
                    out.push_str("<deviceProfile><deviceProfileName>");
                    push_escaped(&mut out, name);
                    out.push_str("</deviceProfileName><isDefaultDeviceProfile>");
                    out.push_str(if *is_default { "t" } else { "f" });
                    out.push_str("</isDefaultDeviceProfile></deviceProfile>");
                }
            }
        }
        out.push_str("</user>");
    }
    out.push_str("</deviceProfileResults></response>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppCredentials {
        AppCredentials {
            app_id: "appid".into(),
            certificate: "apppasswd".into(),
        }
    }

    #[test]
    fn lenient_form_decoding() {
        let encoded = b"xml=%3cquery%3e%3cappInfo%3e%3c%2fappInfo%3e%3c%2fquery%3e";
        assert_eq!(
            extract_xml_param(encoded).unwrap(),
            "<query><appInfo></appInfo></query>"
        );
        assert_eq!(
            extract_xml_param(b"xml=<request>a+b&amp;c</request>").unwrap(),
            "<request>a+b&amp;c</request>"
        );
        assert_eq!(extract_xml_param(b"  <query/>").unwrap(), "<query/>");
        assert_eq!(extract_xml_param(b"foo=1&xml=%3Cq%2F%3E").unwrap(), "<q/>");
        assert_eq!(extract_xml_param(b"foo=1"), None);
        assert_eq!(extract_xml_param(b""), None);
    }

    #[test]
    fn tolerant_parsing() {
        let xml = "<?xml version=\"1.0\"?>\n<request>\n <login> <userID> a&amp;b </userID>\
                   <unknown>x</unknown><deviceName>SEP1</deviceName></login>\
                   <appInfo><appCertificate>apppasswd</appCertificate><appID>appid</appID></appInfo>\
                   </request>";
        let parsed = parse_em_request(xml).unwrap();
        assert_eq!(
            parsed,
            EmRequest::Login {
                app: app(),
                device: "SEP1".into(),
                user: "a&b".into(),
                profile: None,
                duration: None
            }
        );
    }

    #[test]
    fn parse_errors_and_unknown_queries() {
        assert_eq!(
            parse_em_request("<request><appInfo>").unwrap_err().code(),
            1
        );
        assert_eq!(parse_em_request("not xml at all").unwrap_err().code(), 1);
        assert_eq!(parse_em_request("").unwrap_err().code(), 1);
        assert_eq!(parse_em_request("<foo/>").unwrap_err().code(), 1);
        let no_app = "<request><logout><deviceName>X</deviceName></logout></request>";
        assert_eq!(parse_em_request(no_app).unwrap_err().code(), 1);
        let unknown = "<query><appInfo><appID>a</appID><appCertificate>b</appCertificate>\
                       </appInfo><checkUser><userID>x</userID></checkUser></query>";
        assert_eq!(
            parse_em_request(unknown).unwrap_err(),
            ProtocolError::UnknownQuery("checkUser".into())
        );
    }

    #[test]
    fn user_id_encoding() {
        assert_eq!(encode_user_id("em@cisco.com"), "em%40cisco.com");
        assert_eq!(encode_user_id("a b"), "a%20b");
        assert_eq!(
            decode_user_id("em%40cisco.com").as_deref(),
            Some("em@cisco.com")
        );
        assert_eq!(decode_user_id("plain"), None);
    }

    #[test]
    fn rendering_escapes() {
        let xml = render_device_user_results(&[DeviceUserAnswer::DoesNotExist {
            requested: "<x\"&".into(),
        }]);
        assert!(xml.contains("name=\"&lt;x&quot;&amp;\""));
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
        assert_eq!(
            render_failure(11),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<response><failure><error code=\"11\">Device does not exist</error></failure></response>"
        );
    }
}
