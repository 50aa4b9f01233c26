//! Bytes → `actors::em::codec::decode`, as the EM client reads a CUCM answer
//! (UTF-8, lossily). Checks what the cluster actor relies on.
#![no_main]

use actors::em::codec::{decode, DeviceState, EmResponse, UserState, MAX_DEVICES_PER_USER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = String::from_utf8_lossy(data);
    let Ok(response) = decode(&body) else {
        return;
    };
    match response {
        EmResponse::Success => {}
        EmResponse::Failure { text, .. } => check_text(&text),
        EmResponse::DeviceUsers(devices) => {
            for device in devices {
                // Matching against the queried devices compares upper-cased names.
                assert_eq!(device.device, device.device.to_ascii_uppercase());
                assert_eq!(device.device, device.device.trim());
                match device.state {
                    DeviceState::LoggedIn(user) => {
                        assert!(!user.is_empty(), "an empty user is nobody, not a login")
                    }
                    DeviceState::Failure { text, .. } => check_text(&text),
                    DeviceState::Nobody | DeviceState::DoesNotExist => {}
                }
            }
        }
        EmResponse::UserDevices(users) => {
            for user in users {
                match user.state {
                    UserState::Devices(devices) => {
                        assert!(devices.len() <= MAX_DEVICES_PER_USER, "device list not bounded");
                        for device in devices {
                            assert_eq!(device, device.to_ascii_uppercase());
                        }
                    }
                    UserState::Failure { text, .. } => check_text(&text),
                    UserState::Nowhere | UserState::DoesNotExist => {}
                }
            }
        }
    }
});

/// CUCM texts are cleaned and cut to 200 characters (plus the `…` mark).
fn check_text(text: &str) {
    assert!(
        text.chars().count() <= 201,
        "text not cut: {} chars",
        text.len()
    );
    assert_eq!(text, text.trim());
}
