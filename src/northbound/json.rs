//! JSON in and out: a request with `Content-Type: application/json`
//! carries the fields of the XML message as one object; a request with
//! `Accept: application/json`, or with a JSON body, is answered with the same
//! `<result>` as one JSON object (same codes, same HTTP statuses).
//!
//! Decisions are plain functions (`parse_fields`, `result_value`, `wants_json`);
//! only `response` touches actix.

use std::time::Duration;

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use actors::xml::shorten;
use serde_json::{json, Map, Value};

use super::request::{Fields, RequestError};
use super::response::{retry_after_seconds, ResultDoc};

pub const CONTENT_TYPE: &str = "application/json";

/// Whether a `Content-Type` value declares JSON (`application/json`, `…+json`).
pub fn is_json_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == CONTENT_TYPE || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The body is JSON.
pub fn has_json_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type)
}

/// The answer should be JSON: the caller accepts it (and names it before any XML
/// type), or sent JSON.
pub fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    let position = |what: &str| accept.find(what);
    match (position("application/json"), position("xml")) {
        (Some(json), Some(xml)) => json < xml,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => has_json_body(headers),
    }
}

/// Reads the request object. Every field is a string (`force` may also be a boolean);
/// unknown keys are ignored, like unknown XML elements; `null` is absent.
pub fn parse_fields(body: &str) -> Result<Fields, RequestError> {
    let malformed = |detail: &str| RequestError::MalformedJson(detail.to_string());
    let value: Value = serde_json::from_str(body)
        .map_err(|e| RequestError::MalformedJson(shorten(&e.to_string(), 120)))?;
    let Value::Object(object) = value else {
        return Err(malformed("the body is not a JSON object"));
    };
    let text = |key: &str| -> Result<Option<String>, RequestError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(_) => Err(RequestError::MalformedJson(format!(
                "{key} must be a string"
            ))),
        }
    };
    let force = match object.get("force") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b.to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(malformed("force must be true or false")),
    };
    Ok(Fields {
        app_id: text("appID")?,
        app_certificate: text("appCertificate")?,
        device_name: text("deviceName")?,
        user_id: text("userID")?,
        cluster_code: text("clusterCode")?,
        pin: text("pin")?,
        force,
    })
}

/// The JSON form of a `<result>`: the same members as the XML, in the same order.
pub fn result_value(doc: &ResultDoc) -> Value {
    let mut object = Map::new();
    if let Some(device) = doc.echoed_device() {
        object.insert("deviceName".into(), device.into());
    }
    if let Some(user) = doc.echoed_user() {
        object.insert("userID".into(), user.into());
    }
    if let Some(devices) = doc.echoed_devices() {
        object.insert("devices".into(), json!(devices));
    }
    object.insert("code".into(), doc.code.into());
    object.insert("text".into(), doc.text.clone().into());
    Value::Object(object)
}

/// The version document as JSON.
pub fn version_value() -> Value {
    json!({ "appversion": "1.4", "appname": "Business Connector" })
}

pub fn response(status: StatusCode, value: &Value, retry_after: Option<Duration>) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CONTENT_TYPE, CONTENT_TYPE));
    if let Some(after) = retry_after {
        response.insert_header((header::RETRY_AFTER, retry_after_seconds(after)));
    }
    response.body(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::northbound::request::Call;
    use actix_web::http::header::HeaderValue;
    use actors::{Outcome, UserId};

    #[test]
    fn reads_every_field_and_ignores_unknown_ones() {
        let fields = parse_fields(
            r#"{"appID":"a","appCertificate":"b","deviceName":"SEP1","userID":"u@x",
                "clusterCode":"EU","pin":"1234","force":true,"future":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(fields.app_id.as_deref(), Some("a"));
        assert_eq!(fields.app_certificate.as_deref(), Some("b"));
        assert_eq!(fields.device_name.as_deref(), Some("SEP1"));
        assert_eq!(fields.user_id.as_deref(), Some("u@x"));
        assert_eq!(fields.cluster_code.as_deref(), Some("EU"));
        assert_eq!(fields.pin.as_deref(), Some("1234"));
        assert_eq!(fields.force.as_deref(), Some("true"));
        let fields = parse_fields(r#"{"force":"false","pin":null}"#).unwrap();
        assert_eq!(fields.force.as_deref(), Some("false"));
        assert_eq!(fields.pin, None);
    }

    #[test]
    fn malformed_json_is_refused() {
        for bad in [
            "{",
            "[]",
            "\"x\"",
            r#"{"deviceName":5}"#,
            r#"{"force":1}"#,
            "{\"a\":1}x",
        ] {
            assert!(
                matches!(parse_fields(bad), Err(RequestError::MalformedJson(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn answers_carry_the_result_members() {
        let doc = ResultDoc::success(
            Call::GetLoggedInUser,
            "SEP1",
            None,
            &Outcome::CurrentUser(Some(UserId::parse("a\"b").unwrap())),
        );
        assert_eq!(
            result_value(&doc),
            json!({"deviceName": "SEP1", "userID": "a\"b", "code": 0,
                   "text": "Get logged in user request successful"})
        );
        let doc = ResultDoc::success(
            Call::GetUserDevices,
            "",
            Some("u"),
            &Outcome::UserDevices {
                devices: vec![actors::DeviceName::parse("SEP2").unwrap()],
                unanswered: vec![],
            },
        );
        let value = result_value(&doc);
        assert_eq!(value["devices"], json!(["SEP2"]));
        assert!(value.get("deviceName").is_none());
    }

    #[test]
    fn negotiation() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(
                    header::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            map
        };
        assert!(wants_json(&headers(&[("accept", "application/json")])));
        assert!(wants_json(&headers(&[(
            "content-type",
            "application/json; charset=utf-8"
        )])));
        assert!(!wants_json(&headers(&[(
            "accept",
            "text/xml, application/json"
        )])));
        assert!(wants_json(&headers(&[(
            "accept",
            "application/json, text/xml"
        )])));
        assert!(!wants_json(&headers(&[("accept", "*/*")])));
        assert!(!wants_json(&headers(&[
            ("accept", "text/xml"),
            ("content-type", "application/json")
        ])));
        assert!(is_json_type("application/problem+json"));
        assert!(!is_json_type("text/json-ish"));
    }
}
