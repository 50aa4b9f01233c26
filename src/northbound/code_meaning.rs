//! What each answer code means, in a few words: the one table the OpenAPI document's
//! code description and the dashboard's "answers by code" (through `/api/status`) are
//! written from. The numbers themselves are `response::code` (the gateway's) and CUCM's.

/// Who gives a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Success,
    /// CUCM's Extension Mobility service, passed through.
    Cucm,
    /// The EM application (a login with a PIN), passed through.
    EmApp,
    /// The gateway itself.
    Gateway,
}

/// Codes `first..=last` mean `meaning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeMeaning {
    pub first: u32,
    pub last: u32,
    pub origin: Origin,
    pub meaning: &'static str,
}

const fn one(code: u32, origin: Origin, meaning: &'static str) -> CodeMeaning {
    CodeMeaning {
        first: code,
        last: code,
        origin,
        meaning,
    }
}

/// Every code the gateway documents, in ascending order.
pub const MEANINGS: &[CodeMeaning] = &[
    one(0, Origin::Success, "success"),
    one(1, Origin::Cucm, "parse error"),
    one(3, Origin::Cucm, "invalid application user"),
    one(4, Origin::Cucm, "policy"),
    one(6, Origin::Cucm, "database"),
    one(10, Origin::Cucm, "lacks proxy rights"),
    one(11, Origin::Cucm, "device does not exist"),
    one(12, Origin::Cucm, "device profile not found"),
    one(18, Origin::Cucm, "another user logged in"),
    one(19, Origin::Cucm, "no user logged in"),
    one(22, Origin::Cucm, "device logon disabled"),
    one(23, Origin::Cucm, "user not found"),
    one(25, Origin::Cucm, "user logged in elsewhere"),
    one(
        26,
        Origin::Cucm,
        "busy (never while the deadline allows a retry)",
    ),
    one(28, Origin::Cucm, "untrusted IP"),
    CodeMeaning {
        first: 31,
        last: 47,
        origin: Origin::Cucm,
        meaning: "EMCC",
    },
    CodeMeaning {
        first: 201,
        last: 216,
        origin: Origin::EmApp,
        meaning: "EM application error (PIN login)",
    },
    one(404, Origin::Gateway, "deviceName missing"),
    one(1001, Origin::Gateway, "cluster not found"),
    one(
        1002,
        Origin::Gateway,
        "invalid request (malformed XML or JSON, missing userID, invalid value; body too \
         large: HTTP 413; body not arrived within client_timeout_ms: HTTP 408)",
    ),
    one(1003, Origin::Gateway, "CUCM unavailable"),
    one(
        1004,
        Origin::Gateway,
        "overloaded (HTTP 503 with Retry-After)",
    ),
    one(1005, Origin::Gateway, "invalid CUCM response"),
    one(1006, Origin::Gateway, "credentials missing"),
    one(1007, Origin::Gateway, "PIN rejected"),
    one(1008, Origin::Gateway, "CUCM failure without a usable code"),
    one(1009, Origin::Gateway, "forbidden (HTTP 403)"),
    one(1010, Origin::Gateway, "too many requests (HTTP 429)"),
    one(1011, Origin::Gateway, "device in several clusters"),
];

/// What `code` means, if it is documented.
pub fn meaning(code: u32) -> Option<&'static str> {
    MEANINGS
        .iter()
        .find(|entry| (entry.first..=entry.last).contains(&code))
        .map(|entry| entry.meaning)
}

/// The paragraph the OpenAPI document gives `code`.
pub fn describe_all() -> String {
    let numbers = |entry: &CodeMeaning| match entry.first == entry.last {
        true => entry.first.to_string(),
        false => format!("{}-{}", entry.first, entry.last),
    };
    let listed = |origin: Origin, separator: &str| {
        MEANINGS
            .iter()
            .filter(|entry| entry.origin == origin)
            .map(|entry| format!("{} {}", numbers(entry), entry.meaning))
            .collect::<Vec<_>>()
            .join(separator)
    };
    let em_app = MEANINGS
        .iter()
        .filter(|entry| entry.origin == Origin::EmApp)
        .map(numbers)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "`code` is the contract, `text` is for people. {}. CUCM's EM codes pass through ({}), \
         and the EM application's {em_app} from a PIN login. The gateway's own: {}.",
        listed(Origin::Success, ", "),
        listed(Origin::Cucm, ", "),
        listed(Origin::Gateway, "; "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::northbound::response::{code, code_label};

    #[test]
    fn every_gateway_code_has_a_meaning() {
        for gateway_code in [
            code::SUCCESS,
            code::DEVICE_ID_EMPTY,
            code::CLUSTER_NOT_FOUND,
            code::INVALID_REQUEST,
            code::CUCM_UNAVAILABLE,
            code::OVERLOADED,
            code::INVALID_CUCM_RESPONSE,
            code::CREDENTIALS_MISSING,
            code::PIN_REJECTED,
            code::CUCM_UNKNOWN_FAILURE,
            code::FORBIDDEN,
            code::TOO_MANY_REQUESTS,
            code::IN_SEVERAL_CLUSTERS,
        ] {
            assert!(meaning(gateway_code).is_some(), "{gateway_code}");
        }
        assert_eq!(meaning(18), Some("another user logged in"));
        assert_eq!(meaning(40), Some("EMCC"));
        assert_eq!(meaning(2), None);
    }

    #[test]
    fn the_table_is_ordered_and_every_code_is_a_metric_label() {
        for pair in MEANINGS.windows(2) {
            assert!(pair[0].last < pair[1].first, "{pair:?}");
        }
        for entry in MEANINGS {
            for number in entry.first..=entry.last {
                assert_eq!(code_label(number), number.to_string(), "{number}");
            }
        }
    }

    #[test]
    fn the_description_is_the_one_the_api_has_always_given() {
        const BEFORE_THE_TABLE: &str = "`code` is the contract, `text` is for people. 0 success. CUCM's EM codes pass through (1 parse error, 3 invalid application user, 4 policy, 6 database, 10 lacks proxy rights, 11 device does not exist, 12 device profile not found, 18 another user logged in, 19 no user logged in, 22 device logon disabled, 23 user not found, 25 user logged in elsewhere, 26 busy (never while the deadline allows a retry), 28 untrusted IP, 31-47 EMCC), and the EM application's 201-216 from a PIN login. The gateway's own: 404 deviceName missing; 1001 cluster not found; 1002 invalid request (malformed XML or JSON, missing userID, invalid value; body too large: HTTP 413; body not arrived within client_timeout_ms: HTTP 408); 1003 CUCM unavailable; 1004 overloaded (HTTP 503 with Retry-After); 1005 invalid CUCM response; 1006 credentials missing; 1007 PIN rejected; 1008 CUCM failure without a usable code; 1009 forbidden (HTTP 403); 1010 too many requests (HTTP 429); 1011 device in several clusters.";
        assert_eq!(describe_all(), BEFORE_THE_TABLE);
    }

    #[test]
    fn the_description_names_each_code_with_its_meaning() {
        let text = describe_all();
        for needle in [
            "0 success.",
            "(1 parse error, 3 invalid application user,",
            "18 another user logged in",
            "31-47 EMCC)",
            "the EM application's 201-216 from a PIN login.",
            "The gateway's own: 404 deviceName missing; 1001 cluster not found;",
            "1011 device in several clusters.",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
