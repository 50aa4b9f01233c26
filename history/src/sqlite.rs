//! The embedded backend: one SQLite file (`[history] path`).
//!
//! WAL journal mode, so queries on their own read-only connection run while the writer
//! writes; `synchronous=NORMAL`, which in WAL mode keeps the database consistent after a
//! crash and loses at most the last transactions on power loss — fine for a history.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params_from_iter, Connection, OpenFlags, ToSql, TransactionBehavior};

use crate::filter::Filter;
use crate::record::{Record, UtcMillis};
use crate::store::{
    select_statement, stored_duration, Placeholders, RawRow, SqlValue, Store, StoreError, COLUMNS,
    SCHEMA_VERSION,
};

/// How long a statement waits for a lock held by another connection (a checkpoint, the
/// other gateway process during a rolling restart) before failing, instead of failing
/// at once. Writes take the lock at the start of their transaction (`IMMEDIATE`), so the
/// wait applies to them too: a read transaction that later upgrades to a write would get
/// `SQLITE_BUSY` at once, busy_timeout or not.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two tries of an open that found the file locked.
const OPEN_RETRY: Duration = Duration::from_millis(20);

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock now.
fn is_locked(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}
/// The writer's page cache, in KiB (SQLite's negative `cache_size`). Every batch adds
/// entries all over the device and user indexes; with SQLite's default 2 MiB those pages
/// are read back from the file again and again, and the writer took ~30 % more CPU per
/// record at the cache-hit peak (`benches/load.sh history`). Only the writer has it.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS history (
    id          INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    operation   TEXT    NOT NULL,
    cluster     TEXT,
    device      TEXT,
    user_id     TEXT,
    code        INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    duration_ms INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    node        TEXT,
    client      TEXT,
    app         TEXT,
    instance    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS history_time         ON history (time_ms);
CREATE INDEX IF NOT EXISTS history_device_time  ON history (device, time_ms);
CREATE INDEX IF NOT EXISTS history_user_time    ON history (user_id, time_ms);
CREATE INDEX IF NOT EXISTS history_cluster_time ON history (cluster, time_ms);
";

/// One connection to the history file.
pub struct SqliteStore {
    connection: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.connection.path())
            .finish()
    }
}

impl SqliteStore {
    /// Open (creating if needed) the file for writing, in WAL mode, with the schema.
    ///
    /// Two processes opening one new file at the same instant (a rolling restart) race
    /// for the switch to WAL and the schema; SQLite answers the loser "locked" at once,
    /// without its busy handler (waiting could deadlock), so the open is tried again
    /// until `BUSY_TIMEOUT`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let give_up = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_once(path) {
                Err(StoreError::Sqlite(error))
                    if is_locked(&error) && std::time::Instant::now() < give_up =>
                {
                    std::thread::sleep(OPEN_RETRY);
                }
                opened => return opened,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        // journal_mode answers with the mode now in force; WAL persists in the file.
        let _mode: String =
            connection.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        let mut store = Self { connection };
        store.migrate()?;
        Ok(store)
    }

    /// A read-only connection to a file `open` has already created: the query side.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Self { connection })
    }

    /// Whether an existing file is a history this version can use, without writing to
    /// it (`--check-config`): an SQLite database whose schema is not newer than ours.
    pub fn check_existing(path: &Path) -> Result<(), StoreError> {
        let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        let found: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    /// The journal mode in force (`wal` after `open`).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        Ok(self
            .connection
            .pragma_query_value(None, "journal_mode", |row| row.get(0))?)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < 1 {
            transaction.execute_batch(SCHEMA_V1)?;
        }
        // Version 2 writes fractional `duration_ms`: the column's INTEGER affinity keeps
        // a non-integral REAL as it is, so there is nothing to change in the file; the
        // version tells an older gateway (which reads integers) that it cannot read it.
        // Later versions add their steps here, each guarded by `found < N`.
        transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        transaction.commit()?;
        Ok(())
    }
}

impl ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            SqlValue::Text(text) => text.to_sql(),
            SqlValue::Integer(number) => number.to_sql(),
        }
    }
}

impl Store for SqliteStore {
    fn write_batch(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = transaction.prepare_cached(&format!(
                "INSERT INTO history ({COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))?;
            for record in records {
                insert.execute(rusqlite::params![
                    record.time.0,
                    record.operation.as_str(),
                    record.cluster,
                    record.device,
                    record.user,
                    record.code,
                    record.text,
                    stored_duration(record),
                    record.source.as_str(),
                    record.node,
                    record.client,
                    record.app,
                    record.instance,
                ])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn query(&mut self, filter: &Filter) -> Result<Vec<Record>, StoreError> {
        let (sql, values) = select_statement(filter, Placeholders::QuestionNumbered);
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(params_from_iter(values.iter()), |row| {
            Ok(RawRow {
                time_ms: row.get(0)?,
                operation: row.get(1)?,
                cluster: row.get(2)?,
                device: row.get(3)?,
                user: row.get(4)?,
                code: row.get(5)?,
                text: row.get(6)?,
                duration_ms: row.get(7)?,
                source: row.get(8)?,
                node: row.get(9)?,
                client: row.get(10)?,
                app: row.get(11)?,
                instance: row.get(12)?,
            })
        })?;
        let mut records = Vec::new();
        for row in rows {
            records.push(Record::try_from(row?)?);
        }
        Ok(records)
    }

    fn purge_older_than(&mut self, cutoff: UtcMillis, max_rows: u32) -> Result<u64, StoreError> {
        let deleted = self.connection.execute(
            "DELETE FROM history WHERE id IN \
             (SELECT id FROM history WHERE time_ms < ?1 ORDER BY time_ms LIMIT ?2)",
            rusqlite::params![cutoff.0, max_rows],
        )?;
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }
}
