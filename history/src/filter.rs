//! `GET /api/history` query parameters → a [`Filter`].
//!
//! Pure: no I/O, no clock. Every error names the parameter at fault, so the gateway can
//! answer HTTP 400 with the message as it is.

use crate::record::{Operation, UtcMillis};

/// Entries returned when the query gives no `limit`.
pub const DEFAULT_LIMIT: u32 = 100;
/// The most entries one query may ask for.
pub const MAX_LIMIT: u32 = 1000;
/// Longest accepted parameter value, in bytes. Stored fields are at most 256 bytes
/// (`record::MAX_FIELD_BYTES`), so a longer value could never match anyway.
pub const MAX_VALUE_BYTES: usize = 256;
/// How much of an unknown parameter's name an error message echoes.
const MAX_ECHOED_NAME_CHARS: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("unknown parameter {0:?} (device, user, cluster, operation, code, since, until, limit, format)")]
    Unknown(String),
    #[error("parameter {0} given more than once")]
    Repeated(&'static str),
    #[error("parameter {0} is empty")]
    Empty(&'static str),
    #[error("parameter {0} is longer than {MAX_VALUE_BYTES} bytes")]
    TooLong(&'static str),
    #[error("parameter {parameter}: {reason}")]
    Invalid {
        parameter: &'static str,
        reason: String,
    },
}

impl FilterError {
    /// The parameter at fault, as the client spelled it (cut for unknown ones).
    pub fn parameter(&self) -> &str {
        match self {
            FilterError::Unknown(name) => name,
            FilterError::Repeated(name) | FilterError::Empty(name) | FilterError::TooLong(name) => {
                name
            }
            FilterError::Invalid { parameter, .. } => parameter,
        }
    }
}

/// How the answer is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Json,
    Csv,
}

/// Which records a query wants. Every condition present must hold; results are newest
/// first, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Upper-cased: the gateway records device names upper-cased.
    pub device: Option<String>,
    pub user: Option<String>,
    pub cluster: Option<String>,
    pub operation: Option<Operation>,
    pub code: Option<i64>,
    /// Inclusive: records at or after this time.
    pub since: Option<UtcMillis>,
    /// Exclusive: records strictly before this time.
    pub until: Option<UtcMillis>,
    pub limit: u32,
    pub format: Format,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            device: None,
            user: None,
            cluster: None,
            operation: None,
            code: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
            format: Format::Json,
        }
    }
}

/// Parse a URL query string (without the `?`), e.g. `device=SEP1&limit=10&format=csv`.
/// Values are percent-decoded (`+` is a space). An empty query is the default filter.
pub fn parse_filter(query: &str) -> Result<Filter, FilterError> {
    let mut filter = Filter::default();
    let mut seen: Vec<Parameter> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let parameter = Parameter::from_name(&name)?;
        let parameter_name = parameter.name();
        if seen.contains(&parameter) {
            return Err(FilterError::Repeated(parameter_name));
        }
        seen.push(parameter);
        if value.is_empty() {
            return Err(FilterError::Empty(parameter_name));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(FilterError::TooLong(parameter_name));
        }
        let value = value.into_owned();
        let invalid = |reason: String| FilterError::Invalid {
            parameter: parameter_name,
            reason,
        };
        match parameter {
            Parameter::Device => filter.device = Some(value.to_uppercase()),
            Parameter::User => filter.user = Some(value),
            Parameter::Cluster => filter.cluster = Some(value),
            Parameter::Operation => {
                filter.operation = Some(value.parse().map_err(|error| invalid(format!("{error}")))?)
            }
            Parameter::Code => {
                filter.code = Some(
                    value
                        .parse()
                        .map_err(|_| invalid("not an integer".to_string()))?,
                )
            }
            Parameter::Since => {
                filter.since = Some(
                    UtcMillis::parse_rfc3339(&value).map_err(|error| invalid(error.to_string()))?,
                )
            }
            Parameter::Until => {
                filter.until = Some(
                    UtcMillis::parse_rfc3339(&value).map_err(|error| invalid(error.to_string()))?,
                )
            }
            Parameter::Limit => {
                let limit: u32 = value
                    .parse()
                    .map_err(|_| invalid(format!("not a number from 1 to {MAX_LIMIT}")))?;
                if limit == 0 || limit > MAX_LIMIT {
                    return Err(invalid(format!("must be from 1 to {MAX_LIMIT}")));
                }
                filter.limit = limit;
            }
            Parameter::Format => {
                filter.format = match value.as_str() {
                    "json" => Format::Json,
                    "csv" => Format::Csv,
                    _ => return Err(invalid("must be json or csv".to_string())),
                }
            }
        }
    }
    if let (Some(since), Some(until)) = (filter.since, filter.until) {
        if until <= since {
            return Err(FilterError::Invalid {
                parameter: "until",
                reason: "must be later than since".to_string(),
            });
        }
    }
    Ok(filter)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parameter {
    Device,
    User,
    Cluster,
    Operation,
    Code,
    Since,
    Until,
    Limit,
    Format,
}

impl Parameter {
    const ALL: [Parameter; 9] = [
        Parameter::Device,
        Parameter::User,
        Parameter::Cluster,
        Parameter::Operation,
        Parameter::Code,
        Parameter::Since,
        Parameter::Until,
        Parameter::Limit,
        Parameter::Format,
    ];

    fn name(self) -> &'static str {
        match self {
            Parameter::Device => "device",
            Parameter::User => "user",
            Parameter::Cluster => "cluster",
            Parameter::Operation => "operation",
            Parameter::Code => "code",
            Parameter::Since => "since",
            Parameter::Until => "until",
            Parameter::Limit => "limit",
            Parameter::Format => "format",
        }
    }

    /// Names are case-sensitive, like the rest of the URL query.
    fn from_name(name: &str) -> Result<Self, FilterError> {
        Parameter::ALL
            .into_iter()
            .find(|parameter| parameter.name() == name)
            .ok_or_else(|| FilterError::Unknown(name.chars().take(MAX_ECHOED_NAME_CHARS).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(query: &str) -> Filter {
        match parse_filter(query) {
            Ok(filter) => filter,
            Err(error) => panic!("{query:?}: {error}"),
        }
    }

    #[test]
    fn empty_query_is_the_default() {
        assert_eq!(ok(""), Filter::default());
        assert_eq!(ok("").limit, 100);
        assert_eq!(ok("").format, Format::Json);
    }

    #[test]
    fn accepts_every_parameter() {
        let cases: Vec<(&str, Filter)> = vec![
            ("device=sep1ce6c79baf1f", Filter { device: Some("SEP1CE6C79BAF1F".into()), ..Filter::default() }),
            ("user=multi.user%40example.com", Filter { user: Some("multi.user@example.com".into()), ..Filter::default() }),
            ("user=a+b", Filter { user: Some("a b".into()), ..Filter::default() }),
            ("cluster=EU", Filter { cluster: Some("EU".into()), ..Filter::default() }),
            ("operation=getloggedinuser", Filter { operation: Some(Operation::GetLoggedInUser), ..Filter::default() }),
            ("code=1003", Filter { code: Some(1003), ..Filter::default() }),
            ("code=-1", Filter { code: Some(-1), ..Filter::default() }),
            ("since=2024-05-01T08:55:00Z", Filter { since: Some(UtcMillis(1_714_553_700_000)), ..Filter::default() }),
            ("until=2024-05-01T10:55:00.5%2B02:00", Filter { until: Some(UtcMillis(1_714_553_700_500)), ..Filter::default() }),
            ("limit=1", Filter { limit: 1, ..Filter::default() }),
            ("limit=1000", Filter { limit: 1000, ..Filter::default() }),
            ("format=csv", Filter { format: Format::Csv, ..Filter::default() }),
            ("format=json", Filter::default()),
            (
                "device=SEP1&user=u1&cluster=EU&operation=login&code=0&since=2024-05-01T00:00:00Z&until=2024-05-02T00:00:00Z&limit=5&format=csv",
                Filter {
                    device: Some("SEP1".into()),
                    user: Some("u1".into()),
                    cluster: Some("EU".into()),
                    operation: Some(Operation::Login),
                    code: Some(0),
                    since: Some(UtcMillis(1_714_521_600_000)),
                    until: Some(UtcMillis(1_714_608_000_000)),
                    limit: 5,
                    format: Format::Csv,
                },
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(ok(query), expected, "{query}");
        }
    }

    #[test]
    fn rejects_bad_queries_naming_the_parameter() {
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        let too_long = format!("user={long}");
        let cases: Vec<(&str, &str)> = vec![
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("limit=-5", "limit"),
            ("limit=99999999999999999999", "limit"),
            ("code=abc", "code"),
            ("code=1.5", "code"),
            ("operation=LOGIN", "operation"),
            ("operation=version", "operation"),
            ("since=yesterday", "since"),
            ("until=2024-05-01", "until"),
            (
                "since=2024-05-02T00:00:00Z&until=2024-05-01T00:00:00Z",
                "until",
            ),
            (
                "since=2024-05-01T00:00:00Z&until=2024-05-01T00:00:00Z",
                "until",
            ),
            ("format=xml", "format"),
            ("device=", "device"),
            ("device", "device"),
            ("device=A&device=B", "device"),
            ("deviceName=SEP1", "deviceName"),
            ("appCertificate=secret", "appCertificate"),
            (&too_long, "user"),
        ];
        for (query, parameter) in cases {
            match parse_filter(query) {
                Ok(filter) => panic!("{query:?} accepted: {filter:?}"),
                Err(error) => {
                    assert_eq!(error.parameter(), parameter, "{query}: {error}");
                    assert!(error.to_string().contains(parameter), "{query}: {error}");
                }
            }
        }
    }

    #[test]
    fn unknown_parameter_names_are_cut_in_messages() {
        let name = "n".repeat(10_000);
        let error = parse_filter(&format!("{name}=1")).err();
        let message = error.map(|error| error.to_string()).unwrap_or_default();
        assert!(message.len() < 300, "{}", message.len());
    }
}
