//! `GET /openapi.json`: an OpenAPI 3.1 description of every API call — its paths
//! (path form and message form), both request forms (the XML message in form field
//! `xml`, in the query string or as the raw body, and the JSON object), the XML and
//! JSON answers, every field and every code. Built once, from the same call table
//! as the handler (`Call`), so a new call cannot be forgotten here silently.
//!
//! CI checks the running gateway against it with schemathesis (`ci/schemathesis.sh`).

use std::sync::OnceLock;

use actix_web::HttpResponse;
use serde_json::{json, Map, Value};

use crate::northbound::code_meaning;
use crate::northbound::request::Call;

/// Every call with a request message, and the path segments its path form takes
/// (required ones first; the rest optional, in order).
const CALLS: [(Call, &str, &[&str], usize); 4] = [
    (
        Call::Login,
        "Log a user in on a device (`force` logs another user out first).",
        &["deviceName", "userID", "clusterCode", "pin"],
        2,
    ),
    (
        Call::Logout,
        "Log whoever is logged in out of a device.",
        &["deviceName", "clusterCode"],
        1,
    ),
    (
        Call::GetLoggedInUser,
        "Who is logged in on a device (empty userID: nobody).",
        &["deviceName", "clusterCode"],
        1,
    ),
    (
        Call::GetUserDevices,
        "On which devices a user is logged in; without a cluster code and with several \
         clusters, every cluster is asked and the answers merged.",
        &["userID", "clusterCode"],
        1,
    ),
];

fn field_description(name: &str) -> &'static str {
    match name {
        "deviceName" => "Device name: 1-50 of A-Z a-z 0-9 . _ - (upper-cased by the gateway).",
        "userID" => "User ID: 1-128 characters without control characters.",
        "clusterCode" => "Cluster code (case-insensitive); absent: the default cluster, or all.",
        "pin" => "The user's EM PIN, 1-32 digits (login only): a login through the EM application.",
        "appID" => "CUCM application user.",
        "appCertificate" => "Its password; passed through to CUCM, never stored or logged.",
        "force" => {
            "Login only, without a PIN: when another user is logged in (18), log them \
                    out and the requested user in, in the device's turn."
        }
        _ => "",
    }
}

fn schemas() -> Value {
    let codes = code_meaning::describe_all();
    let string = |name: &str| json!({ "type": "string", "description": field_description(name) });
    json!({
        "Request": {
            "type": "object",
            "description": "The request message as JSON (the same fields as the XML \
                            <request>); unknown members are ignored.",
            "properties": {
                "appID": string("appID"),
                "appCertificate": string("appCertificate"),
                "deviceName": string("deviceName"),
                "userID": string("userID"),
                "clusterCode": string("clusterCode"),
                "pin": string("pin"),
                "force": {
                    "type": ["boolean", "string"],
                    "description": field_description("force")
                }
            }
        },
        "XmlMessage": {
            "type": "string",
            "description": "The XML message: <request> with optional children appID, \
                            appCertificate, deviceName, userID, clusterCode, pin, force \
                            (element names case sensitive, unknown ones ignored).",
            "example": "<request><appID>bcapp</appID><appCertificate>bcsecret</appCertificate>\
                        <deviceName>SEP000000000001</deviceName><userID>user1</userID></request>"
        },
        "Form": {
            "type": "object",
            "properties": { "xml": { "$ref": "#/components/schemas/XmlMessage" } }
        },
        "Result": {
            "type": "object",
            "description": format!("The JSON form of <response><result>. {codes}"),
            "required": ["code", "text"],
            "properties": {
                "deviceName": {
                    "type": "string",
                    "description": "The device (every call but getuserdevices), as sent when refused."
                },
                "userID": {
                    "type": "string",
                    "description": "login, getloggedinuser (empty: nobody), getuserdevices."
                },
                "devices": {
                    "type": "array",
                    "items": { "type": "string" },
                    "description": "getuserdevices: the devices the user is logged in on."
                },
                "code": { "type": "integer", "minimum": 0, "description": codes },
                "text": { "type": "string" }
            }
        },
        "Version": {
            "type": "object",
            "required": ["appversion", "appname"],
            "properties": {
                "appversion": { "type": "string" },
                "appname": { "type": "string" }
            }
        }
    })
}

/// The answers every call can give, XML or JSON by `Accept` (or a JSON body).
fn answers(schema: &str) -> Value {
    let result = json!({
        "text/xml": {
            "schema": { "type": "string" },
            "example": "<?xml version='1.0' encoding='UTF-8'?>\n<response>\n<result>\n\
                        <deviceName>SEP000000000001</deviceName>\n<userID>user1</userID>\n\
                        <code>0</code>\n<text>Login successful for user1 on device \
                        SEP000000000001</text>\n</result>\n</response>\n"
        },
        "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } }
    });
    let retry_after = json!({
        "Retry-After": { "schema": { "type": "string" }, "description": "Seconds." }
    });
    let plain = json!({ "text/plain": { "schema": { "type": "string" } } });
    json!({
        "200": { "description": "Answered: see `code`.", "content": result },
        "403": { "description": "1009 forbidden.", "content": result },
        "404": { "description": "Not an API path (more path segments than the call takes).", "content": plain },
        "405": { "description": "Only GET and POST.", "content": plain },
        "408": { "description": "1002: the body did not arrive within client_timeout_ms.", "content": result },
        "413": { "description": "1002: the body is larger than max_body_bytes.", "content": result },
        "429": { "description": "1010 too many requests.", "content": result, "headers": retry_after },
        "503": { "description": "1004 overloaded.", "content": result, "headers": retry_after }
    })
}

fn operation(summary: &str, call: &str, path_params: &[&str], with_body: bool) -> Value {
    let mut parameters: Vec<Value> = path_params
        .iter()
        .map(|name| {
            json!({
                "name": name, "in": "path", "required": true,
                "description": format!("{} Percent-decoded.", field_description(name)),
                "schema": { "type": "string", "minLength": 1 }
            })
        })
        .collect();
    parameters.push(json!({
        "name": "xml", "in": "query", "required": false,
        "description": "The XML message (also accepted in a form body).",
        "schema": { "$ref": "#/components/schemas/XmlMessage" }
    }));
    let mut op = json!({
        "summary": summary,
        "operationId": format!("{}{}", if with_body { "post_" } else { "get_" },
            operation_suffix(call, path_params)),
        "parameters": parameters,
        "responses": answers("Result")
    });
    if with_body {
        op["requestBody"] = json!({
            "required": false,
            "content": {
                "application/x-www-form-urlencoded": { "schema": { "$ref": "#/components/schemas/Form" } },
                "text/xml": { "schema": { "$ref": "#/components/schemas/XmlMessage" } },
                "application/xml": { "schema": { "$ref": "#/components/schemas/XmlMessage" } },
                "application/json": { "schema": { "$ref": "#/components/schemas/Request" } }
            }
        });
    }
    op
}

fn operation_suffix(call: &str, path_params: &[&str]) -> String {
    let mut id = call.to_string();
    for param in path_params {
        id.push('_');
        id.push_str(param);
    }
    id
}

/// The whole document.
pub fn document() -> Value {
    let codes = code_meaning::describe_all();
    let mut paths = Map::new();
    for (call, summary, fields, required) in CALLS {
        let label = call.label();
        // The message form, then the path forms: required segments, then each optional.
        let mut forms: Vec<&[&str]> = vec![&[]];
        for n in required..=fields.len() {
            forms.push(&fields[..n]);
        }
        for params in forms {
            let mut path = format!("/api/{label}");
            for param in params {
                path.push_str(&format!("/{{{param}}}"));
            }
            paths.insert(
                path,
                json!({
                    "get": operation(summary, label, params, false),
                    "post": operation(summary, label, params, true)
                }),
            );
        }
    }
    let version = json!({
        "summary": "The API version (no credentials).",
        "responses": {
            "200": {
                "description": "Version info.",
                "content": {
                    "text/xml": { "schema": { "type": "string" } },
                    "application/json": { "schema": { "$ref": "#/components/schemas/Version" } }
                }
            },
            "405": { "description": "Only GET and POST.", "content": { "text/plain": { "schema": { "type": "string" } } } }
        }
    });
    let mut get_version = version.clone();
    get_version["operationId"] = "get_getversioninfo".into();
    let mut post_version = version;
    post_version["operationId"] = "post_getversioninfo".into();
    paths.insert(
        "/api/getversioninfo".into(),
        json!({ "get": get_version, "post": post_version }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Business Connector",
            "version": "1.4",
            "description": format!(
                "The Business Connector 1.4 API to Cisco CUCM Extension Mobility, with \
                 getuserdevices, forced logins and JSON. Every call takes GET or \
                 POST; the message is XML (form field `xml`, query string, or raw body with \
                 Content-Type text/xml or application/xml) or a JSON object (Content-Type \
                 application/json); path segments take the place of the same-named fields. \
                 Answers are XML unless the request accepts application/json (before any \
                 XML type) or sent JSON. HTTP status is 200 for every answer with a result \
                 except 408 and 413 (1002), 503 (1004), 403 (1009), 429 (1010). {codes}"
            )
        },
        "paths": paths,
        "components": { "schemas": schemas() }
    })
}

/// `GET /openapi.json`.
pub async fn serve() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(|| document().to_string());
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_call_and_path_form() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/api/getversioninfo",
            "/api/login",
            "/api/login/{deviceName}/{userID}",
            "/api/login/{deviceName}/{userID}/{clusterCode}/{pin}",
            "/api/logout/{deviceName}/{clusterCode}",
            "/api/getloggedinuser/{deviceName}",
            "/api/getuserdevices",
            "/api/getuserdevices/{userID}/{clusterCode}",
        ] {
            assert!(paths.contains_key(path), "{path}");
            assert!(paths[path]["get"].is_object() && paths[path]["post"].is_object());
        }
        assert!(!paths.contains_key("/api/login/{deviceName}"));
        // Every HTTP status the API answers with a result is documented.
        let login = &paths["/api/login"]["post"]["responses"];
        for status in ["200", "403", "408", "413", "429", "503"] {
            assert!(login[status].is_object(), "{status}");
        }
        // Every documented field, every gateway code.
        let text = doc.to_string();
        for needle in [
            "\"force\"",
            "\"devices\"",
            "1001",
            "1011",
            "application/json",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
        // operationIds are unique.
        let mut ids: Vec<String> = paths
            .values()
            .flat_map(|p| p.as_object().unwrap().values())
            .map(|op| op["operationId"].as_str().unwrap().to_string())
            .collect();
        let count = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count);
    }
}
