//! Path segments → `apply_path` → `validate` → the rendered answer.
//!
//! The first byte picks the call (bits 0-1) and whether the XML message already set
//! every field (bit 2), so overriding is exercised as well as path-only calls; the
//! rest is the part of the URL path after `/api/{call}/`, split as `handlers::api`
//! splits it (a trailing empty segment is a trailing slash).
#![no_main]

use business_connector::northbound::request::{apply_path, parse_message, Call, Fields};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const FULL: &str = "<request><appID>bcapp</appID><appCertificate>bcsecret</appCertificate>\
    <deviceName>SEP000000000001</deviceName><userID>user1</userID>\
    <clusterCode>EU</clusterCode><pin>1234</pin></request>";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let call = [
        Call::Login,
        Call::Logout,
        Call::GetLoggedInUser,
        Call::Version,
    ][usize::from(selector & 3)];
    let mut fields = if selector & 4 != 0 {
        parse_message(FULL).expect("the fixed message parses")
    } else {
        Fields::default()
    };
    let path = String::from_utf8_lossy(rest);
    let mut segments: Vec<&str> = path.split('/').collect();
    if segments.last() == Some(&"") {
        segments.pop();
    }
    match apply_path(call, &segments, &mut fields) {
        Ok(true) => common::check_validate(call, &fields),
        Ok(false) => {} // more segments than fields: 404, nothing rendered
        Err(error) => common::check_failure(call, &fields, error),
    }
});
