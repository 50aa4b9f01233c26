//! Bytes → `parse_message` (as the handler reads a body: UTF-8, lossily) → `validate`
//! for every call → the answer the handler would render.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let message = String::from_utf8_lossy(data);
    common::check_message(Some(&message));
});
