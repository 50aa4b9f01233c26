//! Where records live: the [`Store`] trait, and the SQL both backends share.
//!
//! One table, `history`, with the fields; `time_ms` is milliseconds since the
//! epoch (an integer sorts and indexes cheaply), `user_id` because `user` is reserved in
//! PostgreSQL. Every value reaches SQL as a bound parameter, never as text in a statement.

use crate::filter::Filter;
use crate::record::{Operation, Record, RecordError, Source, UtcMillis};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("the database's history schema is version {found}, newer than this gateway's {supported}: upgrade the gateway")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("a stored record is unreadable: {0}")]
    Corrupt(#[from] RecordError),
    /// The database cannot be reached, from a backend that has no error type of its own
    /// for it (or a test double).
    #[error("unreachable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The database cannot be reached or cannot take writes right now (connection
    /// refused or broken, server shutting down or out of resources): the records are
    /// kept and written once it is back. Any other error is about the records or the
    /// statement, and retrying the same batch would fail the same way.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Postgres(error) => postgres_unavailable(error),
            StoreError::Unavailable(_) => true,
            StoreError::Sqlite(_) | StoreError::SchemaTooNew { .. } | StoreError::Corrupt(_) => {
                false
            }
        }
    }
}

/// No answer from the server at all (connect, I/O, closed connection, timeout), or an
/// SQLSTATE that says "not now": class 08 connection exception, 53 insufficient
/// resources, 57P admin/crash shutdown or starting up, 57014 cancelled (the
/// `statement_timeout` the writer sets: stuck on a lock), 58 system error, 25006
/// read-only (a failover to a standby).
fn postgres_unavailable(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    let Some(database_error) = error.as_db_error() else {
        // Conversion errors are the only ones without a server or transport behind
        // them; they come with a source that is not an I/O error.
        return !is_conversion_error(error);
    };
    let code = database_error.code().code();
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "57014"
        || code.starts_with("58")
        || code == "25006"
}

fn is_conversion_error(error: &postgres::Error) -> bool {
    let text = error.to_string();
    text.starts_with("error serializing") || text.starts_with("error deserializing")
}

/// A place records are written to and read from. A `Store` is one connection: the
/// writer thread owns one, queries use another.
pub trait Store: Send {
    /// Make sure a connection is open (PostgreSQL: connect and create the schema). The
    /// writer calls it at start and after the store was unavailable. SQLite opens its
    /// file in its constructor, so the default does nothing.
    fn connect(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Write every record, in one transaction: all or nothing.
    fn write_batch(&mut self, records: &[Record]) -> Result<(), StoreError>;
    /// The records `filter` selects, newest first (ties: last written first), at most
    /// `filter.limit`. Blocking: async callers use `spawn_blocking` / `web::block`.
    fn query(&mut self, filter: &Filter) -> Result<Vec<Record>, StoreError>;
    /// Delete at most `max_rows` records older than `cutoff`, oldest first; returns how
    /// many were deleted. Bounded so a first purge of a big table never holds the writer
    /// (and its queue) for long: call again while it returns `max_rows`.
    fn purge_older_than(&mut self, cutoff: UtcMillis, max_rows: u32) -> Result<u64, StoreError>;
}

/// The schema version this code writes (SQLite `user_version`, PostgreSQL
/// `history_schema.version`). 2: `duration_ms` holds fractions of a millisecond.
pub const SCHEMA_VERSION: i64 = 2;

/// Columns in insert/select order.
pub(crate) const COLUMNS: &str = "time_ms, operation, cluster, device, user_id, code, text, \
                                  duration_ms, source, node, client, app, instance";

/// A bound query parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SqlValue {
    Text(String),
    Integer(i64),
}

/// How a backend spells the n-th (1-based) placeholder: SQLite `?1`, PostgreSQL `$1`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Placeholders {
    QuestionNumbered,
    DollarNumbered,
}

impl Placeholders {
    fn nth(self, position: usize) -> String {
        match self {
            Placeholders::QuestionNumbered => format!("?{position}"),
            Placeholders::DollarNumbered => format!("${position}"),
        }
    }
}

/// The SELECT for `filter`, with its parameters. Each condition is an equality or range
/// on an indexed column, so `(device, time_ms)` and friends serve it newest first.
pub(crate) fn select_statement(filter: &Filter, style: Placeholders) -> (String, Vec<SqlValue>) {
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let mut condition = |column_test: &str, value: SqlValue| {
        values.push(value);
        conditions.push(format!("{column_test} {}", style.nth(values.len())));
    };
    if let Some(device) = &filter.device {
        condition("device =", SqlValue::Text(device.clone()));
    }
    if let Some(user) = &filter.user {
        condition("user_id =", SqlValue::Text(user.clone()));
    }
    if let Some(cluster) = &filter.cluster {
        condition("cluster =", SqlValue::Text(cluster.clone()));
    }
    if let Some(operation) = filter.operation {
        condition(
            "operation =",
            SqlValue::Text(operation.as_str().to_string()),
        );
    }
    if let Some(code) = filter.code {
        condition("code =", SqlValue::Integer(code));
    }
    if let Some(since) = filter.since {
        condition("time_ms >=", SqlValue::Integer(since.0));
    }
    if let Some(until) = filter.until {
        condition("time_ms <", SqlValue::Integer(until.0));
    }
    let mut sql = format!("SELECT {COLUMNS} FROM history");
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    values.push(SqlValue::Integer(i64::from(filter.limit)));
    sql.push_str(&format!(
        " ORDER BY time_ms DESC, id DESC LIMIT {}",
        style.nth(values.len())
    ));
    (sql, values)
}

/// A row as read back, before its enums are checked.
pub(crate) struct RawRow {
    pub time_ms: i64,
    pub operation: String,
    pub cluster: Option<String>,
    pub device: Option<String>,
    pub user: Option<String>,
    pub code: i64,
    pub text: String,
    pub duration_ms: f64,
    pub source: String,
    pub node: Option<String>,
    pub client: Option<String>,
    pub app: Option<String>,
    pub instance: String,
}

impl TryFrom<RawRow> for Record {
    type Error = RecordError;
    fn try_from(row: RawRow) -> Result<Self, Self::Error> {
        Ok(Record {
            time: UtcMillis(row.time_ms),
            operation: row.operation.parse::<Operation>()?,
            cluster: row.cluster,
            device: row.device,
            user: row.user,
            code: row.code,
            text: row.text,
            duration_us: duration_us_from_stored(row.duration_ms),
            source: row.source.parse::<Source>()?,
            node: row.node,
            client: row.client,
            app: row.app,
            instance: row.instance,
        })
    }
}

/// `duration_ms` as the databases store it since schema version 2: milliseconds as a
/// double, to the microsecond (version 1 stored whole milliseconds, which read back the
/// same way).
pub(crate) fn stored_duration(record: &Record) -> f64 {
    record.duration_us as f64 / 1000.0
}

/// The stored milliseconds back to microseconds (negative or NaN: 0).
fn duration_us_from_stored(milliseconds: f64) -> u64 {
    let micros = (milliseconds * 1000.0).round();
    if micros.is_nan() || micros <= 0.0 {
        0
    } else {
        // Saturates at u64::MAX, which no request reaches.
        micros as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::parse_filter;

    #[test]
    fn select_without_conditions_orders_and_limits() {
        let (sql, values) = select_statement(&Filter::default(), Placeholders::QuestionNumbered);
        assert_eq!(
            sql,
            format!("SELECT {COLUMNS} FROM history ORDER BY time_ms DESC, id DESC LIMIT ?1")
        );
        assert_eq!(values, vec![SqlValue::Integer(100)]);
    }

    #[test]
    fn select_binds_every_condition_as_a_parameter() {
        let filter = parse_filter(
            "device=sep1&user=u'1&cluster=EU&operation=login&code=7&since=1970-01-01T00:00:01Z&until=1970-01-01T00:00:02Z&limit=3",
        )
        .expect("valid filter");
        let (sql, values) = select_statement(&filter, Placeholders::DollarNumbered);
        assert!(sql.contains(
            "WHERE device = $1 AND user_id = $2 AND cluster = $3 AND operation = $4 AND code = $5 \
             AND time_ms >= $6 AND time_ms < $7 ORDER BY time_ms DESC, id DESC LIMIT $8"
        ), "{sql}");
        // The quote in the user ID is a value, never SQL text.
        assert!(!sql.contains("u'1"));
        assert_eq!(
            values,
            vec![
                SqlValue::Text("SEP1".into()),
                SqlValue::Text("u'1".into()),
                SqlValue::Text("EU".into()),
                SqlValue::Text("login".into()),
                SqlValue::Integer(7),
                SqlValue::Integer(1000),
                SqlValue::Integer(2000),
                SqlValue::Integer(3),
            ]
        );
    }
}
