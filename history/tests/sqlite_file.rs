//! What only the SQLite file can show: its settings, its schema version, its bytes.

use std::time::Duration;

use history::sqlite::SqliteStore;
use history::store::SCHEMA_VERSION;
use history::{
    Filter, History, HistoryConfig, HistoryError, HistoryMetrics, Operation, Record, Source, Store,
    StoreError, UtcMillis,
};

const FLUSH: Duration = Duration::from_secs(10);

fn config(directory: &tempfile::TempDir) -> HistoryConfig {
    HistoryConfig {
        path: directory.path().join("history.sqlite"),
        instance: Some("gw-test".into()),
        ..HistoryConfig::default()
    }
}

#[test]
fn file_is_wal_with_a_versioned_schema_and_indexes() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("h.sqlite");
    let store = SqliteStore::open(&path).expect("open");
    assert_eq!(store.journal_mode().expect("journal mode"), "wal");
    drop(store);

    let connection = rusqlite::Connection::open(&path).expect("open raw");
    let version: i64 = connection
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("user_version");
    assert_eq!(version, SCHEMA_VERSION);
    let mut statement = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'history' ORDER BY name")
        .expect("prepare");
    let indexes: Vec<String> = statement
        .query_map([], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        indexes,
        [
            "history_cluster_time",
            "history_device_time",
            "history_time",
            "history_user_time"
        ]
    );
    // A query by device is served by its index, newest first, without a sort.
    let plan: Vec<String> = connection
        .prepare(
            "EXPLAIN QUERY PLAN SELECT * FROM history WHERE device = ?1 \
             ORDER BY time_ms DESC, id DESC LIMIT 100",
        )
        .expect("prepare")
        .query_map(["SEP1"], |row| row.get::<_, String>(3))
        .expect("plan")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert!(
        plan.iter().any(|step| step.contains("history_device_time")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

#[test]
fn reopening_an_existing_file_keeps_its_rows() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("h.sqlite");
    let mut record = Record::new(Operation::Logout, 0, Source::Cucm);
    record.device = Some("SEP1".into());
    SqliteStore::open(&path)
        .expect("open")
        .write_batch(&[record.clone()])
        .expect("write");
    let mut reopened = SqliteStore::open(&path).expect("reopen");
    assert_eq!(reopened.query(&Filter::default()).expect("query"), [record]);
}

#[test]
fn a_newer_schema_is_refused() {
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("h.sqlite");
    let connection = rusqlite::Connection::open(&path).expect("open raw");
    connection
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("set version");
    drop(connection);
    match SqliteStore::open(&path) {
        Err(StoreError::SchemaTooNew { found, .. }) => assert_eq!(found, SCHEMA_VERSION + 1),
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn an_unwritable_path_fails_open() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = HistoryConfig {
        path: directory.path().join("no-such-dir").join("h.sqlite"),
        ..HistoryConfig::default()
    };
    let metrics = HistoryMetrics::unregistered().expect("metrics");
    assert!(matches!(
        History::open(&config, metrics),
        Err(HistoryError::Store(StoreError::Sqlite(_)))
    ));
}

/// The records a request's secrets could reach, if anything could. `Record` has no field
/// for the appCertificate or the PIN (this literal names every field: adding one breaks
/// the build here, and whoever adds it reads this). So the marker, standing for the
/// password and PIN the gateway saw, can only reach the file through a field that should
/// not hold it; this checks none does, in the database, its WAL and its shared memory.
#[test]
fn no_secret_reaches_the_database_file() {
    const SECRET_MARKER: &str = "S3cr3t-AppCertificate-Marker-7f1e";
    const PIN_MARKER: &str = "PIN-Marker-918273";
    const VISIBLE_MARKER: &str = "Visible-Text-Marker-4c2d";
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(&directory);
    let metrics = HistoryMetrics::unregistered().expect("metrics");
    let history = History::open(&config, metrics).expect("open");
    // What the gateway knows about a login request: appID, appCertificate, PIN, …
    let (app_id, app_certificate, pin) = ("bcapp", SECRET_MARKER, PIN_MARKER);
    assert!(!app_certificate.is_empty() && !pin.is_empty());
    // … and what it can record of it.
    let record = Record {
        time: UtcMillis::now(),
        operation: Operation::Login,
        cluster: Some("EU".into()),
        device: Some("SEP1CE6C79BAF1F".into()),
        user: Some("ALMUSER01".into()),
        code: 1007,
        text: format!("PIN rejected by the home cluster {VISIBLE_MARKER}"),
        duration_us: 80_000,
        source: Source::Cucm,
        node: Some("https://cucm-eu-1:8443".into()),
        client: Some("10.0.0.7".into()),
        app: Some(app_id.into()),
        instance: String::new(),
    };
    for _ in 0..50 {
        history.record(record.clone());
    }
    history.flush(FLUSH).expect("flush");

    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut file = config.path.clone().into_os_string();
        file.push(suffix);
        if let Ok(content) = std::fs::read(&file) {
            bytes.extend_from_slice(&content);
        }
    }
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The scan works: recorded text is found …
    assert!(
        contains(VISIBLE_MARKER),
        "the scan found not even the visible marker"
    );
    // … and the secrets are not.
    assert!(!contains(SECRET_MARKER));
    assert!(!contains(PIN_MARKER));
    history.shutdown(FLUSH).expect("shutdown");
}

/// A store whose writes always fail: the database is down.
struct FailingStore;

impl Store for FailingStore {
    fn write_batch(&mut self, _records: &[Record]) -> Result<(), StoreError> {
        Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery))
    }
    fn query(&mut self, _filter: &Filter) -> Result<Vec<Record>, StoreError> {
        Ok(Vec::new())
    }
    fn purge_older_than(&mut self, _cutoff: UtcMillis, _max: u32) -> Result<u64, StoreError> {
        Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery))
    }
}

#[test]
fn failed_writes_are_counted_as_dropped_and_the_writer_survives() {
    let metrics = HistoryMetrics::unregistered().expect("metrics");
    let history = History::with_stores(
        Box::new(FailingStore),
        Box::new(FailingStore),
        &HistoryConfig::default(),
        metrics.clone(),
    )
    .expect("start");
    for _ in 0..3 {
        history.record(Record::new(Operation::Login, 0, Source::Cucm));
    }
    history.flush(FLUSH).expect("flush");
    assert_eq!(metrics.dropped_total(), 3);
    // Still alive after the failure and the failed purge.
    history.record(Record::new(Operation::Login, 0, Source::Cucm));
    history.flush(FLUSH).expect("flush");
    assert_eq!(metrics.dropped_total(), 4);
    assert_eq!(metrics.written.get(), 0);
    history.shutdown(FLUSH).expect("shutdown");
}

/// Two writers on one file at once (two gateway processes during a rolling restart):
/// every batch of both is written, none fails on the other's lock. Store level, so the
/// writes really overlap: two threads, each committing small batches as fast as it can.
#[test]
fn two_writers_share_one_file() {
    const BATCHES: usize = 300;
    let directory = tempfile::tempdir().expect("temp dir");
    let path = directory.path().join("shared.sqlite");
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        for writer in 0..2 {
            let (path, barrier) = (&path, &barrier);
            scope.spawn(move || {
                barrier.wait();
                // Both open (and migrate) at the same moment too.
                let mut store = SqliteStore::open(path).expect("open");
                let reader = SqliteStore::open_read_only(path).expect("open read-only");
                drop(reader);
                for batch in 0..BATCHES {
                    let records: Vec<Record> = (0..10)
                        .map(|n| {
                            let mut record = Record::new(Operation::Login, 0, Source::Cucm);
                            record.device = Some(format!("SEP{writer}{batch:05}{n}"));
                            record
                        })
                        .collect();
                    if let Err(error) = store.write_batch(&records) {
                        panic!("writer {writer}, batch {batch}: {error}");
                    }
                }
            });
        }
    });
    let connection = rusqlite::Connection::open(&path).expect("open raw");
    let rows: i64 = connection
        .query_row("SELECT count(*) FROM history", [], |row| row.get(0))
        .expect("count");
    assert_eq!(rows, 2 * BATCHES as i64 * 10);
}

/// A rolling restart: processes opening one new file at the same instant all get it
/// (the loser of the race for WAL and the schema is told "locked" at once, and tries
/// again). Eight openers, twenty fresh files.
#[test]
fn openers_racing_for_a_new_file_all_open_it() {
    let directory = tempfile::tempdir().expect("temp dir");
    for round in 0..20 {
        let path = directory.path().join(format!("race-{round}.sqlite"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    SqliteStore::open(&path).map(|_| ())
                })
            })
            .collect();
        for opener in openers {
            let opened = opener.join().expect("opener thread");
            assert!(opened.is_ok(), "round {round}: {opened:?}");
        }
    }
}
