//! Oracles shared by the northbound targets. Beyond "does not panic", every answer the
//! gateway would render for the input is checked against the contract: responses are
//! well-formed XML 1.0 and carry the code the failure maps to; a request that
//! validates holds only values the API allows.
#![allow(dead_code)] // each target uses a part

use std::sync::LazyLock;

use actors::xml;
use actors::Operation;
use business_connector::northbound::request::{validate, Call, Fields, RequestError};
use business_connector::northbound::response::{Failure, ResultDoc};

/// Every call that reads a message (version reads none, but `validate` accepts it).
pub const CALLS: [Call; 4] = [
    Call::Login,
    Call::Logout,
    Call::GetLoggedInUser,
    Call::Version,
];

/// Set `BC_FUZZ_ALLOW_ILLEGAL_XML_CHARS=1` to stop reporting the known finding
/// (control characters echoed into answers, see RELIABILITY.md) so that a long run can
/// look for anything else. Read once: the oracle runs millions of times.
static ALLOW_ILLEGAL_XML_CHARS: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("BC_FUZZ_ALLOW_ILLEGAL_XML_CHARS").is_some());

/// `validate` for one call, then what the handler would answer.
pub fn check_validate(call: Call, fields: &Fields) {
    match validate(call, fields) {
        Ok(valid) => {
            if let Some(device) = valid.operation.device() {
                let device = device.as_str();
                assert!(
                    (1..=50).contains(&device.len())
                        && device.bytes().all(|b| b.is_ascii_uppercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'_' | b'-')),
                    "a validated device name breaks the API's rules: {device:?}"
                );
            }
            if let Operation::Login { user, .. } = &valid.operation {
                let user = user.as_str();
                let chars = user.chars().count();
                assert!(
                    (1..=128).contains(&chars) && !user.chars().any(char::is_control),
                    "a validated user ID breaks the API's rules: {user:?}"
                );
            }
            assert!(
                !valid.credentials.app_id().trim().is_empty()
                    && !valid
                        .credentials
                        .app_certificate()
                        .expose()
                        .trim()
                        .is_empty(),
                "validated without credentials"
            );
            if let Some(code) = &valid.cluster_code {
                assert!(!code.trim().is_empty(), "blank cluster code kept");
            }
        }
        Err(error) => check_failure(call, fields, error),
    }
}

/// The answer the handler renders for a request rejected before any cluster:
/// it echoes the caller's (unvalidated) device name and user ID.
pub fn check_failure(call: Call, fields: &Fields, error: RequestError) {
    let expected = match error {
        RequestError::DeviceMissing => 404,
        RequestError::CredentialsMissing => 1006,
        _ => 1002,
    };
    let device = fields.device_name.as_deref().unwrap_or_default();
    let doc = ResultDoc::failure(
        call,
        device,
        fields.user_id.as_deref(),
        &Failure::Request(error),
    );
    assert_eq!(doc.code, expected);
    check_document(&doc.render(), expected);
}

/// The contract: answers are well-formed XML, and the code is readable.
pub fn check_document(doc: &str, code: u32) {
    if !*ALLOW_ILLEGAL_XML_CHARS {
        if let Some(bad) = doc.chars().find(|&c| !is_xml_char(c)) {
            panic!(
                "answer is not well-formed XML 1.0: it contains U+{:04X}:\n{doc:?}",
                bad as u32
            );
        }
    }
    let root = match xml::parse(doc) {
        Ok(root) => root,
        Err(error) => panic!("answer does not parse ({error}):\n{doc:?}"),
    };
    assert_eq!(root.name, "response");
    let result = root.child("result").expect("<result>");
    let read = result.child("code").map(|c| c.text.as_str());
    assert_eq!(read, Some(code.to_string().as_str()), "code in {doc:?}");
}

/// XML 1.0 `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c,
        '\u{9}' | '\u{A}' | '\u{D}'
        | '\u{20}'..='\u{D7FF}'
        | '\u{E000}'..='\u{FFFD}'
        | '\u{10000}'..='\u{10FFFF}')
}

/// The handler's message path: parse, then (for a message that parses) the calls.
pub fn check_message(message: Option<&str>) {
    use business_connector::northbound::request::parse_message;
    let fields = match message.map(parse_message) {
        Some(Ok(fields)) => fields,
        Some(Err(error)) => {
            // Malformed XML: the handler answers with empty fields.
            for call in CALLS {
                check_failure(call, &Fields::default(), error.clone());
            }
            return;
        }
        None => Fields::default(),
    };
    for call in CALLS {
        check_validate(call, &fields);
    }
}
