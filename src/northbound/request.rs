//! The northbound request (the Business Connector 1.4 API): the XML message, path
//! segments that take the place of its elements, and validation in the order the API fixes for several
//! faults: malformed XML (1002), deviceName missing (404), an invalid value (1002),
//! credentials missing (1006). The unknown cluster (1001) comes after, at routing.

use actors::operation::InvalidValue;
use actors::{xml, Credentials, DeviceName, Operation, Pin, UserId};
use percent_encoding::percent_decode_str;

/// The four calls of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Version,
    Login,
    Logout,
    GetLoggedInUser,
    /// Where a user is logged in (beyond 1.4).
    GetUserDevices,
}

impl Call {
    /// From the path's call segment; case-insensitive (clients differ).
    pub fn from_segment(segment: &str) -> Option<Self> {
        match segment.to_ascii_lowercase().as_str() {
            "getversioninfo" => Some(Call::Version),
            "login" => Some(Call::Login),
            "logout" => Some(Call::Logout),
            "getloggedinuser" => Some(Call::GetLoggedInUser),
            "getuserdevices" => Some(Call::GetUserDevices),
            _ => None,
        }
    }

    /// Path segments after the call name, in the order they fill fields.
    fn path_fields(self) -> &'static [Field] {
        match self {
            Call::Version => &[],
            Call::Login => &[
                Field::DeviceName,
                Field::UserId,
                Field::ClusterCode,
                Field::Pin,
            ],
            Call::Logout | Call::GetLoggedInUser => &[Field::DeviceName, Field::ClusterCode],
            Call::GetUserDevices => &[Field::UserId, Field::ClusterCode],
        }
    }

    /// The bounded `operation` label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Call::Version => "getversioninfo",
            Call::Login => "login",
            Call::Logout => "logout",
            Call::GetLoggedInUser => "getloggedinuser",
            Call::GetUserDevices => "getuserdevices",
        }
    }

    /// Whether the answer carries a `<userID>`.
    pub fn echoes_user(self) -> bool {
        matches!(
            self,
            Call::Login | Call::GetLoggedInUser | Call::GetUserDevices
        )
    }

    /// Whether the call concerns a user rather than a device (no `<deviceName>`).
    pub fn about_user(self) -> bool {
        self == Call::GetUserDevices
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    DeviceName,
    UserId,
    ClusterCode,
    Pin,
}

/// The message's values, as given (not yet validated). Its Debug output leaves out
/// the application password and the PIN.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Fields {
    pub app_id: Option<String>,
    pub app_certificate: Option<String>,
    pub device_name: Option<String>,
    pub user_id: Option<String>,
    pub cluster_code: Option<String>,
    pub pin: Option<String>,
    /// `<force>` of a login (beyond 1.4): `true`/`1`/`yes` or `false`/`0`/`no`.
    pub force: Option<String>,
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("Fields")
            .field("app_id", &self.app_id)
            .field("app_certificate", &hidden(&self.app_certificate))
            .field("device_name", &self.device_name)
            .field("user_id", &self.user_id)
            .field("cluster_code", &self.cluster_code)
            .field("pin", &hidden(&self.pin))
            .finish()
    }
}

impl Fields {
    fn set(&mut self, field: Field, value: String) {
        let slot = match field {
            Field::DeviceName => &mut self.device_name,
            Field::UserId => &mut self.user_id,
            Field::ClusterCode => &mut self.cluster_code,
            Field::Pin => &mut self.pin,
        };
        *slot = Some(value);
    }
}

/// Why a request is refused before it reaches a cluster. Its text (its `Display`) is
/// the caller's, written where every answer's text is: `response::classify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    MalformedXml(String),
    MalformedJson(String),
    /// A path segment is not valid percent-encoded UTF-8.
    MalformedPath,
    /// The message (body, form value or query value) is not valid UTF-8.
    NotUtf8,
    DeviceMissing,
    UserMissing,
    InvalidValue(InvalidValue),
    CredentialsMissing,
    /// A PIN given to a call other than login.
    PinNotAllowed,
    /// `force` is not a boolean, or given where a login cannot force.
    InvalidForce,
}

impl std::error::Error for RequestError {}

impl From<InvalidValue> for RequestError {
    fn from(value: InvalidValue) -> Self {
        RequestError::InvalidValue(value)
    }
}

/// Reads the XML message. Element names are case sensitive; unknown ones are ignored;
/// each field is the first element of its name at any depth (clients that nest the
/// credentials in `<appInfo>`, as the EM API does, work too).
pub fn parse_message(message: &str) -> Result<Fields, RequestError> {
    // The parser's errors name an offset, never input: the message carries secrets.
    let root = xml::parse(message).map_err(|e| {
        RequestError::MalformedXml(match e {
            xml::XmlError::Malformed(at) => format!("at byte {at}"),
            other => other.to_string(),
        })
    })?;
    let find = |name: &str| {
        if root.name == name {
            return Some(root.text.clone());
        }
        root.descendant(name).map(|e| e.text.clone())
    };
    Ok(Fields {
        app_id: find("appID"),
        app_certificate: find("appCertificate"),
        device_name: find("deviceName"),
        user_id: find("userID"),
        cluster_code: find("clusterCode"),
        pin: find("pin"),
        force: find("force"),
    })
}

/// Path segments after the call take the place of the same-named elements.
/// Returns `Ok(false)` when there are more segments than the call has fields.
pub fn apply_path(
    call: Call,
    segments: &[&str],
    fields: &mut Fields,
) -> Result<bool, RequestError> {
    let names = call.path_fields();
    if segments.len() > names.len() {
        return Ok(false);
    }
    for (name, raw) in names.iter().zip(segments) {
        let value = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| RequestError::MalformedPath)?;
        if !value.is_empty() {
            fields.set(*name, value.into_owned());
        }
    }
    Ok(true)
}

/// A request ready for a cluster.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub operation: Operation,
    pub credentials: Credentials,
    pub cluster_code: Option<String>,
}

/// The calls about a device.
enum DeviceCall {
    Login,
    Logout,
    GetLoggedInUser,
}

/// Checks the fields in the API's order of faults.
pub fn validate(call: Call, fields: &Fields) -> Result<ValidRequest, RequestError> {
    let call = match call {
        Call::GetUserDevices => return validate_user_call(fields),
        // getversioninfo names no device (the handler answers it before validation).
        Call::Version => return Err(RequestError::DeviceMissing),
        Call::Login => DeviceCall::Login,
        Call::Logout => DeviceCall::Logout,
        Call::GetLoggedInUser => DeviceCall::GetLoggedInUser,
    };
    let device = present(&fields.device_name).ok_or(RequestError::DeviceMissing)?;
    let device = DeviceName::parse(device)?;
    let pin = present(&fields.pin);
    let force = parse_force(&fields.force)?;
    let operation = match call {
        DeviceCall::Login => {
            let user = present(&fields.user_id).ok_or(RequestError::UserMissing)?;
            let user = UserId::parse(user)?;
            match (pin, force) {
                // Logging someone out needs the EM API; a PIN login goes through the
                // phone's EM application, which has no such step.
                (Some(_), true) => return Err(RequestError::InvalidForce),
                (Some(pin), false) => Operation::PinLogin {
                    device,
                    user,
                    pin: Pin::parse(pin)?,
                },
                (None, true) => Operation::ForceLogin { device, user },
                (None, false) => Operation::Login { device, user },
            }
        }
        _ if pin.is_some() => return Err(RequestError::PinNotAllowed),
        _ if force => return Err(RequestError::InvalidForce),
        DeviceCall::Logout => Operation::Logout { device },
        DeviceCall::GetLoggedInUser => Operation::Query { device },
    };
    with_credentials(operation, fields)
}

/// getuserdevices: userID instead of deviceName, same order of faults otherwise.
fn validate_user_call(fields: &Fields) -> Result<ValidRequest, RequestError> {
    let user = present(&fields.user_id).ok_or(RequestError::UserMissing)?;
    let user = UserId::parse(user)?;
    if present(&fields.pin).is_some() {
        return Err(RequestError::PinNotAllowed);
    }
    if parse_force(&fields.force)? {
        return Err(RequestError::InvalidForce);
    }
    with_credentials(Operation::user_devices(user), fields)
}

fn with_credentials(operation: Operation, fields: &Fields) -> Result<ValidRequest, RequestError> {
    let (Some(app_id), Some(app_certificate)) =
        (present(&fields.app_id), present(&fields.app_certificate))
    else {
        return Err(RequestError::CredentialsMissing);
    };
    Ok(ValidRequest {
        operation,
        credentials: Credentials::new(app_id, app_certificate),
        cluster_code: present(&fields.cluster_code).map(str::to_string),
    })
}

/// `<force>`: absent or blank is false; anything but the usual spellings is refused
/// rather than guessed (a typo must not log somebody out).
fn parse_force(value: &Option<String>) -> Result<bool, RequestError> {
    match present(value)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(_) => Err(RequestError::InvalidForce),
    }
}

/// A value that is there and not blank. Device names and user IDs are used as given
/// (no trimming inside validation), but surrounding whitespace from pretty-printed
/// XML is already gone.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "<request><appID>app</appID><appCertificate>pw</appCertificate>\
        <deviceName>SEP1CE6C79BAF1F</deviceName><userID>ALMUSER01</userID>\
        <clusterCode>EU</clusterCode><pin>1234</pin></request>";

    #[test]
    fn reads_every_field_of_the_vendor_message() {
        let fields = parse_message(FULL).unwrap();
        assert_eq!(fields.app_id.as_deref(), Some("app"));
        assert_eq!(fields.app_certificate.as_deref(), Some("pw"));
        assert_eq!(fields.device_name.as_deref(), Some("SEP1CE6C79BAF1F"));
        assert_eq!(fields.user_id.as_deref(), Some("ALMUSER01"));
        assert_eq!(fields.cluster_code.as_deref(), Some("EU"));
        assert_eq!(fields.pin.as_deref(), Some("1234"));
    }

    #[test]
    fn tolerates_declaration_whitespace_nesting_and_unknown_elements() {
        let fields = parse_message(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<request>\n  <appInfo><appID> app </appID>\
             <appCertificate>pw</appCertificate></appInfo>\n  <future>x</future>\n  \
             <deviceName>sep1</deviceName>\n</request>",
        )
        .unwrap();
        assert_eq!(fields.app_id.as_deref(), Some("app"));
        assert_eq!(fields.device_name.as_deref(), Some("sep1"));
        // Case sensitive: <deviceid> or <DeviceName> are not deviceName.
        let fields = parse_message("<request><DeviceName>x</DeviceName></request>").unwrap();
        assert_eq!(fields.device_name, None);
    }

    #[test]
    fn path_segments_override_and_are_percent_decoded() {
        let mut fields = parse_message(FULL).unwrap();
        assert!(apply_path(
            Call::Login,
            &["SEP2", "multi.user%40example.com", "us"],
            &mut fields
        )
        .unwrap());
        assert_eq!(fields.device_name.as_deref(), Some("SEP2"));
        assert_eq!(fields.user_id.as_deref(), Some("multi.user@example.com"));
        assert_eq!(fields.cluster_code.as_deref(), Some("us"));
        assert_eq!(fields.pin.as_deref(), Some("1234"));
        assert!(!apply_path(Call::Logout, &["a", "b", "c"], &mut fields).unwrap());
        assert_eq!(
            apply_path(Call::Logout, &["%ff"], &mut fields),
            Err(RequestError::MalformedPath)
        );
    }

    #[test]
    fn faults_answer_in_the_specified_order() {
        let blank = Fields::default();
        // deviceName missing comes before the missing credentials and user.
        assert_eq!(
            validate(Call::Login, &blank).unwrap_err(),
            RequestError::DeviceMissing
        );
        let bad_device = Fields {
            device_name: Some("SEP 1".into()),
            ..Fields::default()
        };
        assert!(matches!(
            validate(Call::Login, &bad_device).unwrap_err(),
            RequestError::InvalidValue(InvalidValue::DeviceName)
        ));
        let no_user = Fields {
            device_name: Some("SEP1".into()),
            ..Fields::default()
        };
        assert_eq!(
            validate(Call::Login, &no_user).unwrap_err(),
            RequestError::UserMissing
        );
        assert_eq!(
            validate(Call::Logout, &no_user).unwrap_err(),
            RequestError::CredentialsMissing
        );
        let only_id = Fields {
            device_name: Some("SEP1".into()),
            app_id: Some("app".into()),
            ..Fields::default()
        };
        assert_eq!(
            validate(Call::GetLoggedInUser, &only_id).unwrap_err(),
            RequestError::CredentialsMissing
        );
    }

    #[test]
    fn a_pin_makes_a_pin_login_and_is_refused_elsewhere() {
        let request = validate(Call::Login, &parse_message(FULL).unwrap()).unwrap();
        assert!(matches!(request.operation, Operation::PinLogin { .. }));
        assert!(!format!("{request:?}").contains("1234"));
        let with_pin = |pin: &str| Fields {
            pin: Some(pin.into()),
            ..parse_message(FULL).unwrap()
        };
        for bad in ["12a", "1 2", &"1".repeat(33)] {
            assert_eq!(
                validate(Call::Login, &with_pin(bad)).unwrap_err(),
                RequestError::InvalidValue(InvalidValue::Pin)
            );
        }
        assert_eq!(
            validate(Call::Logout, &with_pin("1234")).unwrap_err(),
            RequestError::PinNotAllowed
        );
        assert_eq!(
            validate(Call::GetLoggedInUser, &with_pin("1234")).unwrap_err(),
            RequestError::PinNotAllowed
        );
        // An empty <pin/> is no PIN (1.4 clients send the element blank).
        assert!(matches!(
            validate(Call::Logout, &with_pin("")).unwrap().operation,
            Operation::Logout { .. }
        ));
    }

    #[test]
    fn a_valid_login_upper_cases_the_device() {
        let request = validate(Call::Login, &parse_message(FULL).unwrap()).unwrap();
        assert!(matches!(request.operation, Operation::PinLogin { .. }));
        assert_eq!(
            request.operation.device().unwrap().as_str(),
            "SEP1CE6C79BAF1F"
        );
        assert_eq!(request.cluster_code.as_deref(), Some("EU"));
        assert_eq!(request.credentials.app_id(), "app");
    }

    #[test]
    fn getuserdevices_takes_a_user_and_no_device() {
        let mut fields =
            parse_message("<request><appID>a</appID><appCertificate>b</appCertificate></request>")
                .unwrap();
        assert_eq!(
            validate(Call::GetUserDevices, &fields).unwrap_err(),
            RequestError::UserMissing
        );
        assert!(apply_path(Call::GetUserDevices, &["em%40cisco.com", "EU"], &mut fields).unwrap());
        let valid = validate(Call::GetUserDevices, &fields).unwrap();
        assert!(
            matches!(&valid.operation, Operation::UserDevicesQuery { user, .. } if user.as_str() == "em@cisco.com")
        );
        assert_eq!(valid.cluster_code.as_deref(), Some("EU"));
        assert!(!apply_path(Call::GetUserDevices, &["u", "EU", "x"], &mut fields).unwrap());
        fields.app_id = None;
        assert_eq!(
            validate(Call::GetUserDevices, &fields).unwrap_err(),
            RequestError::CredentialsMissing
        );
    }

    #[test]
    fn force_makes_a_forced_login_and_is_refused_elsewhere() {
        let base = "<request><appID>a</appID><appCertificate>b</appCertificate>\
                    <deviceName>SEP1</deviceName><userID>u</userID>";
        let login = |force: &str| {
            validate(
                Call::Login,
                &parse_message(&format!("{base}{force}</request>")).unwrap(),
            )
        };
        for yes in [
            "<force>true</force>",
            "<force> TRUE </force>",
            "<force>1</force>",
        ] {
            assert!(
                matches!(login(yes).unwrap().operation, Operation::ForceLogin { .. }),
                "{yes}"
            );
        }
        for no in ["", "<force>false</force>", "<force/>", "<force>0</force>"] {
            assert!(
                matches!(login(no).unwrap().operation, Operation::Login { .. }),
                "{no}"
            );
        }
        assert_eq!(
            login("<force>sure</force>").unwrap_err(),
            RequestError::InvalidForce
        );
        assert_eq!(
            login("<force>true</force><pin>1234</pin>").unwrap_err(),
            RequestError::InvalidForce
        );
        let logout = parse_message(&format!("{base}<force>true</force></request>")).unwrap();
        assert_eq!(
            validate(Call::Logout, &logout).unwrap_err(),
            RequestError::InvalidForce
        );
    }

    #[test]
    fn malformed_xml_is_a_request_error() {
        assert!(matches!(
            parse_message("<request><deviceName>x</request>"),
            Err(RequestError::MalformedXml(_))
        ));
        assert!(matches!(
            parse_message("hello"),
            Err(RequestError::MalformedXml(_))
        ));
    }

    #[test]
    fn debug_output_hides_the_password_and_the_pin() {
        let fields = parse_message(FULL).unwrap();
        let shown = format!("{fields:?} {:?}", validate(Call::Login, &fields).unwrap());
        assert!(shown.contains("ALMUSER01"), "{shown}");
        assert!(
            !shown.contains("pw\"") && !shown.contains("1234"),
            "{shown}"
        );
    }

    #[test]
    fn malformed_xml_never_quotes_a_secret() {
        for message in [
            "<request><appCertificate>Zq9&SECRETx7;</appCertificate></request>",
            "<request><appCertificate>Zq9<SECRETx7</appCertificate></request>",
            "<request><pin>1<SECRET>2</pin></request>",
        ] {
            let error = parse_message(message).unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("SECRET"), "{shown}");
            assert!(shown.contains("malformed XML"), "{shown}");
        }
    }
}
