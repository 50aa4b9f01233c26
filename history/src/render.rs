//! `GET /api/history` answers: JSON `{"entries":[…]}` or CSV.
//!
//! Field names and order are the contract's: `time`, `operation`, `cluster`, `device`,
//! `user`, `code`, `text`, `duration_ms`, `source`, `node`, `client`, `app`, plus
//! `instance`. An absent optional field is JSON `null` and an empty CSV cell.
//! `duration_ms` is a number of milliseconds to the microsecond (`0.412`, `12`, `12.5`).
//!
//! **CSV formula injection.** A spreadsheet opening the CSV would evaluate a cell that
//! starts with `=`, `+`, `-` or `@` (or a tab or carriage return, which some spreadsheets
//! skip before looking for those) as a formula — and `text`, `user` and `app` come from
//! clients or CUCM. Such text cells get a leading `'`, which spreadsheets take as "this is
//! text" (OWASP's advice). Number cells (`code`, `duration_ms`) are never prefixed: a
//! negative code stays a number.

use std::fmt::Write as _;

use crate::record::Record;

/// The CSV header row, also the JSON keys in order.
pub const FIELD_NAMES: [&str; 13] = [
    "time",
    "operation",
    "cluster",
    "device",
    "user",
    "code",
    "text",
    "duration_ms",
    "source",
    "node",
    "client",
    "app",
    "instance",
];

/// A record's cells, in `FIELD_NAMES` order.
enum Cell<'a> {
    Text(Option<&'a str>),
    Number(i128),
    /// Microseconds, written as milliseconds.
    Millis(u64),
}

/// `micros` as milliseconds with up to three decimals, no trailing zeros.
fn write_millis(out: &mut String, micros: u64) {
    let (whole, fraction) = (micros / 1000, micros % 1000);
    let _ = write!(out, "{whole}");
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

/// `time` is the record's time already rendered (the caller owns that string).
fn cells<'a>(record: &'a Record, time: &'a str) -> [Cell<'a>; 13] {
    [
        Cell::Text(Some(time)),
        Cell::Text(Some(record.operation.as_str())),
        Cell::Text(record.cluster.as_deref()),
        Cell::Text(record.device.as_deref()),
        Cell::Text(record.user.as_deref()),
        Cell::Number(i128::from(record.code)),
        Cell::Text(Some(&record.text)),
        Cell::Millis(record.duration_us),
        Cell::Text(Some(record.source.as_str())),
        Cell::Text(record.node.as_deref()),
        Cell::Text(record.client.as_deref()),
        Cell::Text(record.app.as_deref()),
        Cell::Text(Some(&record.instance)),
    ]
}

/// `{"entries":[{"time":"…","operation":"login",…},…]}`, in the order given.
pub fn to_json(records: &[Record]) -> String {
    let mut out = String::with_capacity(64 + records.len() * 320);
    out.push_str("{\"entries\":[");
    for (index, record) in records.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push('{');
        let time = record.time.to_rfc3339();
        for (position, (name, cell)) in FIELD_NAMES.iter().zip(cells(record, &time)).enumerate() {
            if position > 0 {
                out.push(',');
            }
            push_json_string(&mut out, name);
            out.push(':');
            match cell {
                Cell::Text(Some(text)) => push_json_string(&mut out, text),
                Cell::Text(None) => out.push_str("null"),
                Cell::Number(number) => {
                    let _ = write!(out, "{number}");
                }
                Cell::Millis(micros) => write_millis(&mut out, micros),
            }
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

fn push_json_string(out: &mut String, text: &str) {
    // serde_json's escaping is correct for every control character and for U+2028/9
    // consumers alike; serializing a &str cannot fail.
    match serde_json::to_string(text) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// CSV (RFC 4180): a header row, then one row per record, CRLF line ends, cells quoted
/// when they hold `"`, `,`, CR or LF, and guarded against formula injection (module docs).
pub fn to_csv(records: &[Record]) -> String {
    let mut out = String::with_capacity(128 + records.len() * 256);
    out.push_str(&FIELD_NAMES.join(","));
    out.push_str("\r\n");
    for record in records {
        let time = record.time.to_rfc3339();
        for (position, cell) in cells(record, &time).into_iter().enumerate() {
            if position > 0 {
                out.push(',');
            }
            match cell {
                Cell::Text(Some(text)) => push_csv_text(&mut out, text),
                Cell::Text(None) => {}
                Cell::Number(number) => {
                    let _ = write!(out, "{number}");
                }
                Cell::Millis(micros) => write_millis(&mut out, micros),
            }
        }
        out.push_str("\r\n");
    }
    out
}

fn push_csv_text(out: &mut String, text: &str) {
    let guard = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = text.contains(['"', ',', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if guard {
        out.push('\'');
    }
    for character in text.chars() {
        if character == '"' {
            out.push('"');
        }
        out.push(character);
    }
    if quote {
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Operation, Source, UtcMillis};

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        for (micros, shown) in [
            (0, "0"),
            (412, "0.412"),
            (12_000, "12"),
            (12_500, "12.5"),
            (1_050, "1.05"),
        ] {
            let mut out = String::new();
            write_millis(&mut out, micros);
            assert_eq!(out, shown);
            let record = Record {
                duration_us: micros,
                ..sample()
            };
            let json: serde_json::Value = serde_json::from_str(&to_json(&[record])).expect("JSON");
            assert_eq!(
                json["entries"][0]["duration_ms"].as_f64(),
                Some(micros as f64 / 1000.0)
            );
        }
    }

    fn sample() -> Record {
        Record {
            time: UtcMillis(1_714_553_700_123),
            operation: Operation::Login,
            cluster: Some("EU".into()),
            device: Some("SEP1CE6C79BAF1F".into()),
            user: Some("ALMUSER01".into()),
            code: 0,
            text: "Login successful".into(),
            duration_us: 42_000,
            source: Source::Cucm,
            node: Some("https://cucm-eu-1:8443".into()),
            client: Some("10.0.0.7".into()),
            app: Some("bcapp".into()),
            instance: "gw1".into(),
        }
    }

    #[test]
    fn json_has_exactly_the_spec_fields() {
        let json = to_json(&[sample()]);
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let entry = &parsed["entries"][0];
        let keys: Vec<&str> = entry
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = FIELD_NAMES.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected); // serde_json's map sorts keys
        assert_eq!(entry["time"], "2024-05-01T08:55:00.123Z");
        assert_eq!(entry["operation"], "login");
        assert_eq!(entry["code"], 0);
        assert_eq!(entry["duration_ms"], 42);
        assert_eq!(entry["source"], "cucm");
        assert_eq!(entry["instance"], "gw1");
        // Field order in the text is the contract's.
        let positions: Vec<usize> = FIELD_NAMES
            .iter()
            .map(|name| json.find(&format!("\"{name}\":")).expect("field present"))
            .collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{json}");
    }

    #[test]
    fn json_absent_fields_are_null_and_text_is_escaped() {
        let mut record = Record::new(Operation::GetUserDevices, -3, Source::Gateway);
        record.text = "quote \" backslash \\ newline \n tab \t nul \u{0}".into();
        let json = to_json(&[record.clone()]);
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let entry = &parsed["entries"][0];
        for name in ["cluster", "device", "user", "node", "client", "app"] {
            assert!(entry[name].is_null(), "{name}");
        }
        assert_eq!(entry["text"], record.text.as_str());
        assert_eq!(entry["code"], -3);
        assert_eq!(to_json(&[]), r#"{"entries":[]}"#);
    }

    #[test]
    fn csv_has_header_and_rows() {
        let csv = to_csv(&[sample()]);
        assert_eq!(
            csv,
            "time,operation,cluster,device,user,code,text,duration_ms,source,node,client,app,instance\r\n\
             2024-05-01T08:55:00.123Z,login,EU,SEP1CE6C79BAF1F,ALMUSER01,0,Login successful,42,cucm,https://cucm-eu-1:8443,10.0.0.7,bcapp,gw1\r\n"
        );
    }

    #[test]
    fn csv_quotes_per_rfc4180_and_guards_formulas() {
        let cases = [
            ("plain", "plain"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("two\nlines", "\"two\nlines\""),
            ("cr\rlf", "\"cr\rlf\""),
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("=1+1", "'=1+1"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("a=1", "a=1"),
            ("", ""),
        ];
        for (text, cell) in cases {
            let mut out = String::new();
            push_csv_text(&mut out, text);
            assert_eq!(out, cell, "{text:?}");
        }
    }

    #[test]
    fn csv_numbers_are_not_guarded_and_absent_fields_are_empty() {
        let mut record = Record::new(Operation::Logout, -1, Source::Gateway);
        record.time = UtcMillis(0);
        record.user = Some("=cmd|' /C calc'!A0".into());
        let csv = to_csv(&[record]);
        let row = csv.lines().nth(1).expect("a row");
        assert_eq!(
            row,
            "1970-01-01T00:00:00.000Z,logout,,,'=cmd|' /C calc'!A0,-1,,0,gateway,,,,"
        );
    }
}
