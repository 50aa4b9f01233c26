//! Which part of a request is the message: the raw body (XML or JSON), the form field
//! `xml` of a form body, or `xml` in the query string.
//!
//! Pure, so the fuzzer drives exactly what the handler runs. Everything that reaches a
//! value is decoded strictly: a body or a percent-decoded form value that is not valid
//! UTF-8 is a malformed request (1002), never read with replacement characters — a
//! password `S3cr3t\xff` must not reach CUCM as `S3cr3t\u{fffd}`.

use super::json;
use super::request::RequestError;

/// The message of a request whose body is `body` (already bounded in size),
/// `content_type` its Content-Type (any case), `query` its query string. `Ok(None)`
/// when there is none (path-only calls).
pub fn select(
    body: &[u8],
    content_type: &str,
    query: Option<&str>,
) -> Result<Option<String>, RequestError> {
    let body = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    let content_type = content_type.to_ascii_lowercase();
    let trimmed = body.trim_start_matches('\u{feff}').trim();
    if json::is_json_type(&content_type) {
        return Ok((!trimmed.is_empty()).then(|| trimmed.to_string()));
    }
    if !trimmed.is_empty() {
        let looks_like_xml = trimmed.starts_with('<');
        let is_form = content_type.starts_with("application/x-www-form-urlencoded");
        // Declared XML is the message even when it is not XML at all: then it is
        // malformed (1002), which comes before every other fault.
        let declared_xml = ["text/xml", "application/xml"]
            .iter()
            .any(|xml| content_type.starts_with(xml));
        if (looks_like_xml || declared_xml) && !is_form {
            return Ok(Some(trimmed.to_string()));
        }
        if let Some(xml) = form_field(trimmed, "xml")? {
            return Ok(Some(xml));
        }
        if looks_like_xml {
            // Declared as a form but sent raw: what some clients do.
            return Ok(Some(trimmed.to_string()));
        }
    }
    match query {
        Some(query) => form_field(query, "xml"),
        None => Ok(None),
    }
}

/// The first non-blank field `name` of a form (`a=1&b=2`, `+` for space, `%XX`).
/// A field whose decoded bytes are not UTF-8 is an error, whichever field it is: the
/// request as a whole is malformed.
fn form_field(encoded: &str, name: &str) -> Result<Option<String>, RequestError> {
    let mut found = None;
    for pair in encoded.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (form_decode(key)?, form_decode(value)?);
        if found.is_none() && key == name && !value.trim().is_empty() {
            found = Some(value);
        }
    }
    Ok(found)
}

fn form_decode(text: &str) -> Result<String, RequestError> {
    let spaced = text.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(&spaced).collect();
    String::from_utf8(bytes).map_err(|_| RequestError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "application/x-www-form-urlencoded";

    #[test]
    fn the_message_is_the_raw_body_the_xml_field_or_the_query() {
        let xml = "<request><appID>a</appID></request>";
        assert_eq!(
            select(xml.as_bytes(), "text/xml", None),
            Ok(Some(xml.into()))
        );
        assert_eq!(select(xml.as_bytes(), "", None), Ok(Some(xml.into())));
        let form = "other=1&xml=%3Crequest%3E+%3C%2Frequest%3E";
        assert_eq!(
            select(form.as_bytes(), FORM, None),
            Ok(Some("<request> </request>".into()))
        );
        // Raw XML declared as a form.
        assert_eq!(select(xml.as_bytes(), FORM, None), Ok(Some(xml.into())));
        assert_eq!(
            select(b"", "", Some("xml=%3Cr%2F%3E")),
            Ok(Some("<r/>".into()))
        );
        assert_eq!(select(b"", "", Some("xml=+")), Ok(None), "blank is none");
        assert_eq!(select(b"", "", None), Ok(None));
        assert_eq!(
            select(b"{\"a\":1}", "application/json", None),
            Ok(Some("{\"a\":1}".into()))
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused_never_replaced() {
        let cases: [(&[u8], &str, Option<&str>); 6] = [
            (
                b"<request><appCertificate>S3cr3t\xff</appCertificate></request>",
                "text/xml",
                None,
            ),
            (b"<request>\xc3</request>", "", None),
            (
                b"{\"appCertificate\":\"S3cr3t\xff\"}",
                "application/json",
                None,
            ),
            (b"xml=%3Crequest%3ES3cr3t%FF%3C%2Frequest%3E", FORM, None),
            (b"", "", Some("xml=%3Crequest%3ES3cr3t%FF%3C%2Frequest%3E")),
            (b"junk=%FF&xml=%3Cr%2F%3E", FORM, None),
        ];
        for (body, content_type, query) in cases {
            assert_eq!(
                select(body, content_type, query),
                Err(RequestError::NotUtf8),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
