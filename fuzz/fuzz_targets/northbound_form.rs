//! The form path of `handlers::read_message`: body (or query string) → the `xml`
//! field → `parse_message` → `validate` → the rendered answer.
//!
//! `read_message` and `form_field` are private to `src/northbound/handlers.rs`, so the
//! selection logic is reimplemented here line for line (from commit 3c729e8); keep it
//! in step with the handler. The first input byte picks the Content-Type (bits 0-1)
//! and whether the rest is the body or the query string (bit 2).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const CONTENT_TYPES: [&str; 4] = [
    "application/x-www-form-urlencoded",
    "text/xml",
    "",
    "application/x-www-form-urlencoded; charset=utf-8",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector & 3)];
    let in_query = selector & 4 != 0;
    let text = String::from_utf8_lossy(rest);
    let message = if in_query {
        // A URI query is never lossy UTF-8 in practice, but the form decoder must
        // not care.
        message_of("", content_type, Some(&text))
    } else {
        message_of(&text, content_type, None)
    };
    common::check_message(message.as_deref());
});

/// `read_message` after the body is read (the size limit is checked before).
fn message_of(body: &str, content_type: &str, query: Option<&str>) -> Option<String> {
    let content_type = content_type.to_ascii_lowercase();
    let trimmed = body.trim_start_matches('\u{feff}').trim();
    if !trimmed.is_empty() {
        let looks_like_xml = trimmed.starts_with('<');
        let is_form = content_type.starts_with("application/x-www-form-urlencoded");
        if looks_like_xml && !is_form {
            return Some(trimmed.to_string());
        }
        if let Some(xml) = form_field(trimmed, "xml") {
            return Some(xml);
        }
        if looks_like_xml {
            return Some(trimmed.to_string());
        }
    }
    query.and_then(|query| form_field(query, "xml"))
}

fn form_field(encoded: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(encoded.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.trim().is_empty())
}
