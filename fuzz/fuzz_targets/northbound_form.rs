//! The form path of `handlers::read_message`: body (or query string) → the message
//! (`northbound::message::select`, the function the handler calls) → `parse_message` →
//! `validate` → the rendered answer. The first input byte picks the Content-Type (bits
//! 0-1) and whether the rest is the body or the query string (bit 2). Bytes that are not
//! UTF-8 (in the body, or percent-encoded in a form value) must be refused as such.
#![no_main]

use business_connector::northbound::message::select;
use business_connector::northbound::request::RequestError;
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
    let selected = if in_query {
        // A URI query is ASCII on the wire; the fuzzer's bytes are made text lossily.
        let query = String::from_utf8_lossy(rest);
        select(b"", content_type, Some(&query))
    } else {
        select(rest, content_type, None)
    };
    match selected {
        Ok(message) => {
            if let Some(message) = &message {
                assert!(
                    !message.contains('\u{fffd}')
                        || String::from_utf8_lossy(rest).contains('\u{fffd}')
                        || rest
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"%EF%BF%BD")),
                    "a replacement character the input did not carry"
                );
            }
            common::check_message(message.as_deref());
        }
        Err(RequestError::NotUtf8) => {
            assert!(
                std::str::from_utf8(rest).is_err() || rest.contains(&b'%'),
                "refused as not UTF-8 although it is, and nothing was decoded"
            );
        }
        Err(other) => panic!("select answers only NotUtf8, got {other:?}"),
    }
});
