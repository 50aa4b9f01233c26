//! CUCM's EM codes the gateway acts on, and the message for a code CUCM sent without
//! text. One home for every number and text of the EM API's failures.

/// Code 0 in a `<failure>` is no code at all: CUCM's own "Unknown Error".
pub const UNKNOWN: u32 = 0;
pub const INVALID_APP_USER: u32 = 3;
/// "Policy Validation error": the request does not conform to the application user's
/// policy.
pub const POLICY_VALIDATION: u32 = 4;
pub const DEVICE_DOES_NOT_EXIST: u32 = 11;
pub const ANOTHER_USER_LOGGED_IN: u32 = 18;
pub const NO_USER_LOGGED_IN: u32 = 19;
pub const USER_NOT_FOUND: u32 = 23;
/// "Maximum Concurrent Requests" reached: retry later.
pub const BUSY: u32 = 26;
/// The codes an EM application page gives for a PIN that was not accepted: EMCC
/// authentication error (the home cluster refused it), "please try to login again",
/// and the local PIN check's refusal.
pub const PIN_REJECTED: [u32; 3] = [2, 201, 204];

/// CUCM's message for an EM service code, for answers that carry a code without
/// text. The texts are those of Cisco's EM API developer guide.
pub fn cucm_message(code: u32) -> &'static str {
    match code {
        1 => "Error on Parsing",
        2 => "Cannot authorize App user",
        3 => "Invalid App User",
        4 => "Policy Validation error",
        5 => "Device logon disabled",
        6 => "Database Error",
        7 => "Logout Request Error",
        8 => "Query type undetermined",
        9 => "Dir. User Info Error",
        10 => "User lacks app proxy rights",
        11 => "Device does not exist",
        12 => "Dev. Profile not found",
        18 => "Another user logged in",
        19 => "No user logged in",
        20 => "Hoteling flag error",
        21 => "Hoteling Status error",
        22 => "Device logon disabled",
        23 => "User not found",
        25 => "User logged in elsewhere",
        26 => "Busy, please try again",
        27 => "Change Password",
        28 => "Untrusted IP Error",
        29 => "RIS down-contact admin",
        30 => "Proxy not allowed",
        31..=47 => "Extension Mobility Cross Cluster error",
        _ => "CUCM error",
    }
}

/// The EM application's message for a code shown on the phone (its own 201-216, or
/// an EM service code it passes on).
pub fn emapp_message(code: u32) -> &'static str {
    match code {
        201 => "EM application: please try to login again (EMCC not activated, or wrong PIN)",
        202 => "EM application: blank user ID or PIN",
        204 => "EM application: the PIN was rejected",
        207 => "EM application: device name missing",
        208 => "EM application: the cluster could not reach the user's home cluster",
        211 => "EM application: PSTN access not activated for EMCC",
        212 => "EM application: invalid cluster ID",
        213 => "EM application: the device does not support EMCC",
        215 => "EM application: invalid login type",
        216 => "EM application: the DN has multiple users",
        203 | 205 | 206 | 209 | 210 | 214 => "EM application error",
        other => cucm_message(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_has_its_message() {
        assert_eq!(cucm_message(BUSY), "Busy, please try again");
        assert_eq!(cucm_message(40), "Extension Mobility Cross Cluster error");
        assert_eq!(cucm_message(999), "CUCM error");
    }
}
