//! The shared backend: one PostgreSQL database for every gateway instance,
//! `[history] url = "postgres://user@host:port/db"`. The schema is created by the first
//! writer that connects, under an advisory lock, so instances starting together against
//! an empty database all come up.
//!
//! This uses the synchronous `postgres` crate, which runs its own small Tokio runtime
//! inside each call: call it from a plain thread (the writer) or from `spawn_blocking` /
//! `web::block` (queries), never directly on an async executor thread (it panics there).
//! That is why [`PostgresStore::new`] does not connect: the writer thread does, through
//! [`Store::connect`]. Connections are plain TCP (`NoTls`): put the database on a
//! trusted network or a local socket.

use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls};

use crate::filter::Filter;
use crate::record::{Record, UtcMillis};
use crate::store::{
    select_statement, stored_duration, Placeholders, RawRow, SqlValue, Store, StoreError, COLUMNS,
    SCHEMA_VERSION,
};

/// Used when the URL does not set `connect_timeout`: nothing waits forever.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Used when the URL does not set `tcp_user_timeout`: data sent to a server that has
/// vanished without a reset (a network cut) fails the connection after this, instead of
/// holding the writer for the kernel's ~15 minutes of retransmissions.
const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP keepalive on idle connections when the URL does not set it: a cut is found
/// within idle + interval × retries (about a minute), not two hours.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_KEEPALIVES_RETRIES: u32 = 3;
/// `statement_timeout` when the URL sets no `options`: a statement stuck on a lock is
/// cancelled (SQLSTATE 57014, retried like an unavailable database) rather than holding
/// the writer, and with it every record, for ever.
const DEFAULT_STATEMENT_TIMEOUT_OPTION: &str = "-c statement_timeout=60000";

/// Serializes schema creation when several instances start at once (any constant
/// unlikely to collide with another application's advisory locks on the same database).
const SCHEMA_LOCK_KEY: i64 = 0x4243_4849_5354; // "BCHIST"

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS history (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms     BIGINT NOT NULL,
    operation   TEXT   NOT NULL,
    cluster     TEXT,
    device      TEXT,
    user_id     TEXT,
    code        BIGINT NOT NULL,
    text        TEXT   NOT NULL,
    duration_ms BIGINT NOT NULL,
    source      TEXT   NOT NULL,
    node        TEXT,
    client      TEXT,
    app         TEXT,
    instance    TEXT   NOT NULL
);
-- id in every index: queries order by (time_ms DESC, id DESC), and an index that has
-- both serves them with no sort.
CREATE INDEX IF NOT EXISTS history_time         ON history (time_ms, id);
CREATE INDEX IF NOT EXISTS history_device_time  ON history (device, time_ms, id);
CREATE INDEX IF NOT EXISTS history_user_time    ON history (user_id, time_ms, id);
CREATE INDEX IF NOT EXISTS history_cluster_time ON history (cluster, time_ms, id);
";

const SCHEMA_V2: &str = "ALTER TABLE history ALTER COLUMN duration_ms TYPE DOUBLE PRECISION";

/// How a connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Creates the schema on connect.
    ReadWrite,
    /// `default_transaction_read_only`: the query side can never write.
    ReadOnly,
}

/// One connection to the history database, re-established on the next call after it
/// broke (a database restart costs the batches written meanwhile, not the gateway).
pub struct PostgresStore {
    config: Config,
    access: Access,
    client: Option<Client>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Config's own Debug redacts the password.
        f.debug_struct("PostgresStore")
            .field("config", &self.config)
            .field("access", &self.access)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl PostgresStore {
    /// A store for writing, not connected yet: the first [`Store::connect`] or write
    /// connects and creates or checks the schema. Fails only on a malformed URL.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::with_access(url, Access::ReadWrite)
    }

    /// A store for queries only, not connected yet (the first query connects).
    pub fn new_read_only(url: &str) -> Result<Self, StoreError> {
        Self::with_access(url, Access::ReadOnly)
    }

    /// Connect for writing now and create or check the schema (tools and tests).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let mut store = Self::new(url)?;
        store.client()?;
        Ok(store)
    }

    /// Connect for queries only, now.
    pub fn connect_read_only(url: &str) -> Result<Self, StoreError> {
        let mut store = Self::new_read_only(url)?;
        store.client()?;
        Ok(store)
    }

    fn with_access(url: &str, access: Access) -> Result<Self, StoreError> {
        let mut config: Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
        }
        if config.get_keepalives_interval().is_none() && config.get_keepalives_retries().is_none() {
            config
                .keepalives_idle(DEFAULT_KEEPALIVES_IDLE)
                .keepalives_interval(DEFAULT_KEEPALIVES_INTERVAL)
                .keepalives_retries(DEFAULT_KEEPALIVES_RETRIES);
        }
        if config.get_options().is_none() {
            config.options(DEFAULT_STATEMENT_TIMEOUT_OPTION);
        }
        config.application_name("business-connector-history");
        Ok(Self {
            config,
            access,
            client: None,
        })
    }

    /// After an error that says the connection is gone, forget it: the next call
    /// connects afresh instead of failing on the dead one.
    fn forget_connection_after(&mut self, error: &StoreError) {
        if error.is_unavailable() {
            self.client = None;
        }
    }

    /// The live connection, connecting (and, for the writer, migrating) when there is
    /// none or the last one broke.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match self.client.take() {
            Some(client) => client,
            None => {
                let mut client = self.config.connect(NoTls)?;
                match self.access {
                    Access::ReadWrite => migrate(&mut client)?,
                    Access::ReadOnly => {
                        client.batch_execute("SET default_transaction_read_only = on")?
                    }
                }
                client
            }
        };
        Ok(self.client.insert(client))
    }
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut transaction = client.transaction()?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])?;
    transaction
        .batch_execute("CREATE TABLE IF NOT EXISTS history_schema (version BIGINT NOT NULL)")?;
    let found: i64 = transaction
        .query_opt("SELECT max(version) FROM history_schema", &[])?
        .and_then(|row| row.get::<_, Option<i64>>(0))
        .unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found < 1 {
        transaction.batch_execute(SCHEMA_V1)?;
    }
    if found < 2 {
        // Fractions of a millisecond (existing whole milliseconds convert exactly).
        transaction.batch_execute(SCHEMA_V2)?;
    }
    // Later versions add their steps here, each guarded by `found < N`.
    if found < SCHEMA_VERSION {
        transaction.execute("DELETE FROM history_schema", &[])?;
        transaction.execute(
            "INSERT INTO history_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )?;
    }
    transaction.commit()?;
    Ok(())
}

impl Store for PostgresStore {
    fn connect(&mut self) -> Result<(), StoreError> {
        let result = self.client().map(|_| ());
        if let Err(error) = &result {
            self.forget_connection_after(error);
        }
        result
    }

    fn write_batch(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let result = self.insert(records);
        if let Err(error) = &result {
            self.forget_connection_after(error);
        }
        result
    }

    fn query(&mut self, filter: &Filter) -> Result<Vec<Record>, StoreError> {
        match self.select(filter) {
            // A connection that broke since the last query (a database restart): one
            // more try on a fresh one before the caller sees an error.
            Err(error) if error.is_unavailable() => {
                self.client = None;
                self.select(filter)
            }
            other => other,
        }
    }

    fn purge_older_than(&mut self, cutoff: UtcMillis, max_rows: u32) -> Result<u64, StoreError> {
        let result = self.client().and_then(|client| {
            Ok(client.execute(
                "DELETE FROM history WHERE id IN \
                 (SELECT id FROM history WHERE time_ms < $1 ORDER BY time_ms LIMIT $2)",
                &[&cutoff.0, &i64::from(max_rows)],
            )?)
        });
        if let Err(error) = &result {
            self.forget_connection_after(error);
        }
        result
    }
}

impl PostgresStore {
    fn insert(&mut self, records: &[Record]) -> Result<(), StoreError> {
        // Column arrays + UNNEST: a whole batch in one statement and one round trip.
        let times: Vec<i64> = records.iter().map(|record| record.time.0).collect();
        let operations: Vec<&str> = records.iter().map(|r| r.operation.as_str()).collect();
        let clusters: Vec<Option<&str>> = records.iter().map(|r| r.cluster.as_deref()).collect();
        let devices: Vec<Option<&str>> = records.iter().map(|r| r.device.as_deref()).collect();
        let users: Vec<Option<&str>> = records.iter().map(|r| r.user.as_deref()).collect();
        let codes: Vec<i64> = records.iter().map(|record| record.code).collect();
        let texts: Vec<&str> = records.iter().map(|record| record.text.as_str()).collect();
        let durations: Vec<f64> = records.iter().map(stored_duration).collect();
        let sources: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
        let nodes: Vec<Option<&str>> = records.iter().map(|r| r.node.as_deref()).collect();
        let clients: Vec<Option<&str>> = records.iter().map(|r| r.client.as_deref()).collect();
        let apps: Vec<Option<&str>> = records.iter().map(|r| r.app.as_deref()).collect();
        let instances: Vec<&str> = records.iter().map(|r| r.instance.as_str()).collect();
        let client = self.client()?;
        let mut transaction = client.transaction()?;
        transaction.execute(
            &format!(
                "INSERT INTO history ({COLUMNS}) SELECT * FROM UNNEST(\
                 $1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], \
                 $7::TEXT[], $8::DOUBLE PRECISION[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[], \
                 $13::TEXT[])"
            ),
            &[
                &times,
                &operations,
                &clusters,
                &devices,
                &users,
                &codes,
                &texts,
                &durations,
                &sources,
                &nodes,
                &clients,
                &apps,
                &instances,
            ],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn select(&mut self, filter: &Filter) -> Result<Vec<Record>, StoreError> {
        let (sql, values) = select_statement(filter, Placeholders::DollarNumbered);
        let parameters: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|value| match value {
                SqlValue::Text(text) => text as &(dyn ToSql + Sync),
                SqlValue::Integer(number) => number as &(dyn ToSql + Sync),
            })
            .collect();
        let rows = self.client()?.query(&sql, &parameters)?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let raw = RawRow {
                time_ms: row.try_get(0)?,
                operation: row.try_get(1)?,
                cluster: row.try_get(2)?,
                device: row.try_get(3)?,
                user: row.try_get(4)?,
                code: row.try_get(5)?,
                text: row.try_get(6)?,
                duration_ms: row.try_get(7)?,
                source: row.try_get(8)?,
                node: row.try_get(9)?,
                client: row.try_get(10)?,
                app: row.try_get(11)?,
                instance: row.try_get(12)?,
            };
            records.push(Record::try_from(raw)?);
        }
        Ok(records)
    }
}
