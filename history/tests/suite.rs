//! The history's behaviour, run against every backend: SQLite always, PostgreSQL when
//! `BC_TEST_POSTGRES_URL` is set (see `ci-postgres.sh`). Without it the PostgreSQL tests
//! print a SKIPPED line that cargo shows, and under `CI=true` they fail: in CI a missing
//! service is a failure, never a silent pass. Each PostgreSQL test gets a database of
//! its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use history::{
    parse_filter, Filter, History, HistoryConfig, HistoryMetrics, Operation, Record, Source,
    UtcMillis,
};

const FLUSH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A test that cannot run here: under `CI=true` that is a failure; elsewhere one line on
/// the real stderr (not the captured one, so cargo shows it for a passing test).
fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test}: {reason}, and CI=true: a missing service fails the run");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

/// A fresh, empty history database for one test; removed when dropped.
struct Fixture {
    config: HistoryConfig,
    _directory: tempfile::TempDir,
    postgres: Option<PostgresTestDatabase>,
}

impl Fixture {
    /// None (and a note on stderr) when the backend is not available here.
    fn new(backend: Backend, test: &str) -> Option<Fixture> {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut config = HistoryConfig {
            path: directory.path().join("history.sqlite"),
            instance: Some("gw-test".to_string()),
            // Test records are stamped "now"; tests that purge set their own retention.
            retention_days: 0,
            ..HistoryConfig::default()
        };
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let Ok(admin_url) = std::env::var("BC_TEST_POSTGRES_URL") else {
                    skip_or_fail(
                        test,
                        "PostgreSQL: BC_TEST_POSTGRES_URL is not set (see history/ci-postgres.sh)",
                    );
                    return None;
                };
                let database = PostgresTestDatabase::create(&admin_url);
                config.url = Some(database.url.clone());
                Some(database)
            }
        };
        Some(Fixture {
            config,
            _directory: directory,
            postgres,
        })
    }

    fn open(&self) -> (History, HistoryMetrics) {
        self.open_with(&self.config)
    }

    fn open_with(&self, config: &HistoryConfig) -> (History, HistoryMetrics) {
        let metrics = HistoryMetrics::unregistered().expect("metrics");
        let history = History::open(config, metrics.clone()).expect("open history");
        (history, metrics)
    }

    fn sqlite_path(&self) -> PathBuf {
        self.config.path.clone()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(database) = self.postgres.take() {
            database.drop_database();
        }
    }
}

struct PostgresTestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PostgresTestDatabase {
    fn create(admin_url: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bc_history_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = ::postgres::Client::connect(admin_url, ::postgres::NoTls)
            .expect("connect to BC_TEST_POSTGRES_URL");
        // Identifiers cannot be bound parameters; `name` is ours, digits and underscores.
        // Two calls: a multi-statement batch is one implicit transaction, which
        // DROP/CREATE DATABASE refuse.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .expect("drop a leftover test database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        Self {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        }
    }

    fn drop_database(self) {
        if let Ok(mut admin) = ::postgres::Client::connect(&self.admin_url, ::postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}{query}")
}

fn record(device: &str, user: &str, time: UtcMillis) -> Record {
    let mut record = Record::new(Operation::Login, 0, Source::Cucm);
    record.time = time;
    record.cluster = Some("EU".into());
    record.device = Some(device.into());
    record.user = Some(user.into());
    record.text = format!("Login successful for {user} on device {device}");
    record.duration_us = 12_345;
    record.node = Some("https://cucm-eu-1:8443/emservice/EMServiceServlet".into());
    record.client = Some("10.1.2.3".into());
    record.app = Some("bcapp".into());
    record
}

fn an_hour_ago() -> UtcMillis {
    UtcMillis(UtcMillis::now().0 - 3_600_000)
}

fn query(history: &History, query_string: &str) -> Vec<Record> {
    let filter = parse_filter(query_string).expect("valid filter");
    history.query(&filter).expect("query")
}

fn devices(records: &[Record]) -> Vec<&str> {
    records
        .iter()
        .map(|record| record.device.as_deref().unwrap_or(""))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The suite: each function runs once per backend (see `backends!` below).

fn records_round_trip(fixture: &Fixture) {
    let (history, metrics) = fixture.open();
    let full = Record {
        time: UtcMillis(UtcMillis::now().0 - 1_000),
        operation: Operation::GetUserDevices,
        cluster: Some("EU".into()),
        device: Some("SEP1CE6C79BAF1F".into()),
        user: Some("multi.user@example.com".into()),
        code: 1003,
        text: "CUCM unavailable: «every node» failed, \"quoted\", 'single', \\ ; DROP TABLE history; --".into(),
        duration_us: 5_001_250,
        source: Source::Gateway,
        node: Some("https://cucm-eu-2:8443".into()),
        client: Some("2001:db8::7".into()),
        app: Some("bcapp".into()),
        instance: "ignored: History sets its own".into(),
    };
    let mut minimal = Record::new(Operation::GetLoggedInUser, -1, Source::Cucm);
    minimal.time = UtcMillis::now();
    history.record(full.clone());
    history.record(minimal.clone());
    history.flush(FLUSH).expect("flush");
    assert_eq!(metrics.written.get(), 2);

    let found = query(&history, "");
    let expected_full = Record {
        instance: "gw-test".into(),
        ..full
    };
    let expected_minimal = Record {
        instance: "gw-test".into(),
        ..minimal
    };
    assert_eq!(found, vec![expected_minimal, expected_full]);
    history.shutdown(FLUSH).expect("shutdown");
}

/// The table as schema version 1 made it (whole-millisecond durations), with one row;
/// `{id}` is the backend's key column.
const VERSION_1_TABLE: &str = "CREATE TABLE history (
    {id}, time_ms BIGINT NOT NULL, operation TEXT NOT NULL, cluster TEXT,
    device TEXT, user_id TEXT, code BIGINT NOT NULL, text TEXT NOT NULL,
    duration_ms BIGINT NOT NULL, source TEXT NOT NULL, node TEXT, client TEXT, app TEXT,
    instance TEXT NOT NULL);
    INSERT INTO history (time_ms, operation, device, code, text, duration_ms, source,
        instance) VALUES (1000, 'login', 'OLD', 0, 'ok', 7, 'cucm', 'gw-old');";

fn a_version_1_database_keeps_working(fixture: &Fixture) {
    match &fixture.config.url {
        None => {
            let connection = rusqlite::Connection::open(fixture.sqlite_path()).expect("file");
            connection
                .execute_batch(&format!(
                    "{} PRAGMA user_version = 1;",
                    VERSION_1_TABLE.replace("{id}", "id INTEGER PRIMARY KEY")
                ))
                .expect("a version 1 file");
        }
        Some(url) => {
            let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).expect("db");
            client
                .batch_execute(&format!(
                    "{} CREATE TABLE history_schema (version BIGINT NOT NULL);
                     INSERT INTO history_schema VALUES (1);",
                    VERSION_1_TABLE.replace("{id}", "id BIGINT GENERATED ALWAYS AS IDENTITY")
                ))
                .expect("a version 1 database");
        }
    }
    let (history, metrics) = fixture.open();
    let mut new = record("NEW", "u", UtcMillis::now());
    new.duration_us = 412;
    history.record(new);
    history.flush(FLUSH).expect("flush");
    assert_eq!(metrics.dropped_total(), 0);
    let found = query(&history, "");
    assert_eq!(devices(&found), ["NEW", "OLD"]);
    assert_eq!(
        found[0].duration_us, 412,
        "a fraction of a millisecond is kept"
    );
    assert_eq!(
        found[1].duration_us, 7_000,
        "old whole milliseconds read back"
    );
    history.shutdown(FLUSH).expect("shutdown");
}

fn cache_hit(device: &str) -> Record {
    let mut record = Record::new(Operation::GetLoggedInUser, 0, Source::Cache);
    record.cluster = Some("FLOOD".into());
    record.device = Some(device.into());
    record
}

fn cache_hits_are_recorded_only_when_asked(fixture: &Fixture) {
    let (history, metrics) = fixture.open();
    assert!(!history.wants(Operation::GetLoggedInUser, Source::Cache));
    assert!(history.wants(Operation::GetLoggedInUser, Source::Cucm));
    assert!(history.wants(Operation::GetLoggedInUser, Source::Gateway));
    history.record(cache_hit("HIT"));
    history.record(record("MISS", "u", UtcMillis::now()));
    history.flush(FLUSH).expect("flush");
    assert_eq!(devices(&query(&history, "")), ["MISS"]);
    assert_eq!(metrics.dropped_total(), 0, "not recording is not dropping");
    history.shutdown(FLUSH).expect("shutdown");

    let config = HistoryConfig {
        record_cache_hits: true,
        ..fixture.config.clone()
    };
    let (history, _) = fixture.open_with(&config);
    assert!(history.wants(Operation::GetLoggedInUser, Source::Cache));
    history.record(cache_hit("HIT"));
    history.flush(FLUSH).expect("flush");
    let found = query(&history, "device=HIT");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].source, Source::Cache);
    history.shutdown(FLUSH).expect("shutdown");
}

/// Threads recording cache hits as fast as they can (more threads than cores: the CPU is
/// saturated and the best-effort lane overflows), while a storm of logins and logouts is
/// recorded: every login and logout is written, only cache hits are dropped. With one
/// shared queue the flood takes every free slot and most of the storm is lost.
fn a_saturating_cache_hit_flood_never_drops_a_change_record(fixture: &Fixture) {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    const STORM: usize = 1_000;
    let config = HistoryConfig {
        record_cache_hits: true,
        queue_capacity: 1_000,
        ..fixture.config.clone()
    };
    let (history, metrics) = fixture.open_with(&config);
    let history = Arc::new(history);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    let flood: Vec<_> = (0..flooders)
        .map(|thread| {
            let (history, stop) = (history.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut sent = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    history.record(cache_hit(&format!("F{thread}")));
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    // Until the flood has overflowed its lane: the storm then meets a saturated writer.
    let give_up = Instant::now() + FLUSH;
    while metrics.dropped_from(history::Lane::BestEffort) == 0 && Instant::now() < give_up {
        std::thread::yield_now();
    }
    for index in 0..STORM {
        let mut login = record(&format!("S{index}"), "u", UtcMillis::now());
        login.cluster = Some("STORM".into());
        history.record(login);
        let mut logout = Record::new(Operation::Logout, 0, Source::Cucm);
        logout.cluster = Some("STORM".into());
        logout.device = Some(format!("S{index}"));
        history.record(logout);
        if index % 50 == 49 {
            // 2,000 changes a second: a storm far above what CUCM lets through (tens a
            // second per cluster), yet twice the lane's room in a second, so the writer
            // must keep writing them while the flood saturates the CPU.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flooded: u64 = flood
        .into_iter()
        .map(|thread| thread.join().expect("flood thread"))
        .sum();
    history.flush(FLUSH).expect("flush");

    assert!(
        metrics.dropped_from(history::Lane::BestEffort) > 0,
        "the flood ({flooded} cache hits) saturated its lane"
    );
    assert_eq!(metrics.dropped_from(history::Lane::Kept), 0);
    assert_eq!(
        query(&history, "cluster=STORM&operation=login&limit=1000").len(),
        STORM
    );
    assert_eq!(
        query(&history, "cluster=STORM&operation=logout&limit=1000").len(),
        STORM
    );
    history.shutdown(FLUSH).expect("shutdown");
}

fn strings_are_bounded_on_the_way_in(fixture: &Fixture) {
    let (history, _) = fixture.open();
    let mut long = record("SEP1", "u", an_hour_ago());
    long.user = Some("ü".repeat(1000));
    long.text = "x".repeat(10_000);
    history.record(long);
    history.flush(FLUSH).expect("flush");
    let found = query(&history, "");
    assert_eq!(found[0].user.as_deref().map(str::len), Some(256));
    assert_eq!(found[0].text.len(), 512);
}

fn every_filter_selects_its_records(fixture: &Fixture) {
    let (history, _) = fixture.open();
    let base = an_hour_ago().0;
    // (device, user, cluster, operation, code, minutes after base)
    let rows = [
        ("SEPA", "alice", "EU", Operation::Login, 0, 0),
        ("SEPA", "bob", "EU", Operation::Logout, 0, 1),
        ("SEPB", "alice", "US", Operation::GetLoggedInUser, 0, 2),
        ("SEPB", "carol", "US", Operation::Login, 18, 3),
        ("SEPC", "alice", "EU", Operation::GetUserDevices, 1003, 4),
    ];
    for (device, user, cluster, operation, code, minutes) in rows {
        let mut entry = record(device, user, UtcMillis(base + minutes * 60_000));
        entry.cluster = Some(cluster.into());
        entry.operation = operation;
        entry.code = code;
        history.record(entry);
    }
    history.flush(FLUSH).expect("flush");

    let at = |minutes: i64| UtcMillis(base + minutes * 60_000).to_rfc3339();
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            "".into(),
            vec![
                ("SEPC", "alice"),
                ("SEPB", "carol"),
                ("SEPB", "alice"),
                ("SEPA", "bob"),
                ("SEPA", "alice"),
            ],
        ),
        (
            "device=SEPA".into(),
            vec![("SEPA", "bob"), ("SEPA", "alice")],
        ),
        (
            "device=sepb".into(),
            vec![("SEPB", "carol"), ("SEPB", "alice")],
        ),
        ("device=SEPZ".into(), vec![]),
        (
            "user=alice".into(),
            vec![("SEPC", "alice"), ("SEPB", "alice"), ("SEPA", "alice")],
        ),
        (
            "cluster=US".into(),
            vec![("SEPB", "carol"), ("SEPB", "alice")],
        ),
        (
            "operation=login".into(),
            vec![("SEPB", "carol"), ("SEPA", "alice")],
        ),
        ("operation=getuserdevices".into(), vec![("SEPC", "alice")]),
        ("code=18".into(), vec![("SEPB", "carol")]),
        (
            "code=0".into(),
            vec![("SEPB", "alice"), ("SEPA", "bob"), ("SEPA", "alice")],
        ),
        (
            format!("since={}", at(3)),
            vec![("SEPC", "alice"), ("SEPB", "carol")],
        ),
        (format!("until={}", at(1)), vec![("SEPA", "alice")]),
        (
            format!("since={}&until={}", at(1), at(3)),
            vec![("SEPB", "alice"), ("SEPA", "bob")],
        ),
        (
            "user=alice&cluster=EU".into(),
            vec![("SEPC", "alice"), ("SEPA", "alice")],
        ),
        (
            "device=SEPA&user=alice&cluster=EU&operation=login&code=0".into(),
            vec![("SEPA", "alice")],
        ),
        ("device=SEPA&operation=logout&code=18".into(), vec![]),
    ];
    for (query_string, expected) in cases {
        // `since`/`until` carry '+' only as "Z" here, so no percent-encoding is needed.
        let found = query(&history, &query_string);
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|r| {
                (
                    r.device.as_deref().unwrap_or(""),
                    r.user.as_deref().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(pairs, expected, "{query_string}");
    }
}

fn newest_first_and_limit(fixture: &Fixture) {
    let (history, _) = fixture.open();
    let base = an_hour_ago().0;
    // Recorded out of time order; two share a millisecond (then the later write wins).
    for (device, offset) in [
        ("T3", 3),
        ("T1", 1),
        ("T5", 5),
        ("T2", 2),
        ("T4", 4),
        ("T4B", 4),
    ] {
        history.record(record(device, "u", UtcMillis(base + offset)));
    }
    history.flush(FLUSH).expect("flush");
    assert_eq!(
        devices(&query(&history, "")),
        ["T5", "T4B", "T4", "T3", "T2", "T1"]
    );
    assert_eq!(devices(&query(&history, "limit=2")), ["T5", "T4B"]);
    assert_eq!(devices(&query(&history, "limit=1&user=u")), ["T5"]);
}

fn default_limit_is_100_and_max_is_1000(fixture: &Fixture) {
    let (history, _) = fixture.open();
    let base = an_hour_ago().0;
    for index in 0..1_100 {
        history.record(record(
            &format!("SEP{index:04}"),
            "u",
            UtcMillis(base + index),
        ));
    }
    history.flush(FLUSH).expect("flush");
    assert_eq!(query(&history, "").len(), 100);
    let thousand = query(&history, "limit=1000");
    assert_eq!(thousand.len(), 1000);
    assert_eq!(thousand[0].device.as_deref(), Some("SEP1099"));
}

fn retention_purges_old_records(fixture: &Fixture) {
    let day = 86_400_000;
    let now = UtcMillis::now().0;
    {
        let (history, _) = fixture.open();
        history.record(record("OLD200", "u", UtcMillis(now - 200 * day)));
        history.record(record("OLD91", "u", UtcMillis(now - 91 * day)));
        history.record(record("NEW89", "u", UtcMillis(now - 89 * day)));
        history.record(record("NOW", "u", UtcMillis(now)));
        history.flush(FLUSH).expect("flush");
        assert_eq!(query(&history, "").len(), 4, "retention 0 keeps everything");
        history.shutdown(FLUSH).expect("shutdown");
    }
    // The writer purges once at start, before it takes the first message.
    let config = HistoryConfig {
        retention_days: 90,
        ..fixture.config.clone()
    };
    let (history, _) = fixture.open_with(&config);
    history.flush(FLUSH).expect("flush");
    assert_eq!(devices(&query(&history, "")), ["NOW", "NEW89"]);
}

fn store_purge_is_chunked(fixture: &Fixture) {
    let (history, _) = fixture.open();
    let base = an_hour_ago().0;
    for offset in 0..5 {
        history.record(record(&format!("P{offset}"), "u", UtcMillis(base + offset)));
    }
    history.shutdown(FLUSH).expect("shutdown");
    let mut store: Box<dyn history::Store> = match &fixture.config.url {
        Some(url) => Box::new(history::postgres::PostgresStore::connect(url).expect("connect")),
        None => Box::new(history::sqlite::SqliteStore::open(&fixture.sqlite_path()).expect("open")),
    };
    let cutoff = UtcMillis(base + 4);
    assert_eq!(store.purge_older_than(cutoff, 3).expect("purge"), 3);
    assert_eq!(store.purge_older_than(cutoff, 3).expect("purge"), 1);
    assert_eq!(store.purge_older_than(cutoff, 3).expect("purge"), 0);
    let left = store.query(&Filter::default()).expect("query");
    assert_eq!(devices(&left), ["P4"]);
}

fn full_queue_drops_and_counts_without_blocking(fixture: &Fixture) {
    let config = HistoryConfig {
        queue_capacity: 10,
        ..fixture.config.clone()
    };
    let (history, metrics) = fixture.open_with(&config);
    history.record(record("BEFORE", "u", an_hour_ago()));
    history.flush(FLUSH).expect("flush");

    let pause = history.pause_writer().expect("pause");
    let started = Instant::now();
    for index in 0..1_000 {
        history.record(record(&format!("Q{index}"), "u", UtcMillis::now()));
    }
    let elapsed = started.elapsed();
    // 1,000 calls with a stalled writer: each returns at once (a blocking `record` would
    // never return here, the writer being parked).
    assert!(elapsed < Duration::from_secs(1), "record took {elapsed:?}");
    assert_eq!(metrics.dropped_total(), 990);

    // Queries have their own connection: they still answer while the writer is stalled.
    assert_eq!(devices(&query(&history, "")), ["BEFORE"]);

    drop(pause);
    history.flush(FLUSH).expect("flush");
    assert_eq!(metrics.written.get(), 11);
    assert_eq!(query(&history, "limit=1000").len(), 11);
}

fn shutdown_writes_everything_queued(fixture: &Fixture) {
    let (history, metrics) = fixture.open();
    let base = an_hour_ago().0;
    for index in 0..1_000 {
        history.record(record(&format!("S{index}"), "u", UtcMillis(base + index)));
    }
    history.shutdown(FLUSH).expect("shutdown");
    assert_eq!(metrics.written.get(), 1_000);
    assert_eq!(metrics.dropped_total(), 0);
    // After shutdown, recording is counted as dropped, never an error or a block.
    history.record(record("LATE", "u", UtcMillis::now()));
    assert_eq!(metrics.dropped_total(), 1);
    history
        .shutdown(FLUSH)
        .expect("a second shutdown is a no-op");

    let (reopened, _) = fixture.open();
    assert_eq!(query(&reopened, "limit=1000").len(), 1_000);
}

fn reopening_keeps_the_history(fixture: &Fixture) {
    {
        let (history, _) = fixture.open();
        history.record(record("KEEP", "u", an_hour_ago()));
        history.shutdown(FLUSH).expect("shutdown");
    }
    {
        // Dropped without shutdown: the writer still drains what was queued.
        let (history, _) = fixture.open();
        history.record(record("KEEP2", "u", UtcMillis::now()));
        history.flush(FLUSH).expect("flush");
    }
    let (history, _) = fixture.open();
    assert_eq!(devices(&query(&history, "")), ["KEEP2", "KEEP"]);
}

fn instances_share_one_database(fixture: &Fixture) {
    let first_config = HistoryConfig {
        instance: Some("gw1".into()),
        ..fixture.config.clone()
    };
    let second_config = HistoryConfig {
        instance: Some("gw2".into()),
        ..fixture.config.clone()
    };
    let (first, _) = fixture.open_with(&first_config);
    let (second, _) = fixture.open_with(&second_config);
    first.record(record("SEP1", "u", UtcMillis(an_hour_ago().0)));
    second.record(record("SEP2", "u", UtcMillis(an_hour_ago().0 + 1)));
    first.flush(FLUSH).expect("flush");
    second.flush(FLUSH).expect("flush");
    for history in [&first, &second] {
        let found = query(history, "");
        let seen: Vec<(&str, &str)> = found
            .iter()
            .map(|r| (r.device.as_deref().unwrap_or(""), r.instance.as_str()))
            .collect();
        assert_eq!(seen, [("SEP2", "gw2"), ("SEP1", "gw1")]);
    }
}

macro_rules! backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $test() {
                    if let Some(fixture) = super::Fixture::new(super::Backend::Sqlite, stringify!($test)) {
                        super::$test(&fixture);
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $test() {
                    if let Some(fixture) = super::Fixture::new(super::Backend::Postgres, stringify!($test)) {
                        super::$test(&fixture);
                    }
                }
            )*
        }
    };
}

backends!(
    records_round_trip,
    a_version_1_database_keeps_working,
    cache_hits_are_recorded_only_when_asked,
    a_saturating_cache_hit_flood_never_drops_a_change_record,
    strings_are_bounded_on_the_way_in,
    every_filter_selects_its_records,
    newest_first_and_limit,
    default_limit_is_100_and_max_is_1000,
    retention_purges_old_records,
    store_purge_is_chunked,
    full_queue_drops_and_counts_without_blocking,
    shutdown_writes_everything_queued,
    reopening_keeps_the_history,
    instances_share_one_database,
);

#[test]
fn url_database_replacement() {
    assert_eq!(
        with_database(
            "postgres://bc:pw@127.0.0.1:5433/postgres?sslmode=disable",
            "t1"
        ),
        "postgres://bc:pw@127.0.0.1:5433/t1?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://bc@h:1", "t2"),
        "postgres://bc@h:1/t2"
    );
}

#[test]
fn postgres_store_debug_hides_the_password() {
    let Some(fixture) = Fixture::new(Backend::Postgres, "postgres_store_debug_hides_the_password")
    else {
        return;
    };
    let url = fixture
        .config
        .url
        .clone()
        .expect("a postgres fixture has a url");
    let store = history::postgres::PostgresStore::connect(&url).expect("connect");
    let debug = format!("{store:?} {:?}", fixture.config);
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_string());
    if let Some(password) = password.filter(|password| !password.is_empty()) {
        assert!(!debug.contains(&password), "{debug}");
    }
}

/// Instances started at the same instant against an empty database all come up: the
/// schema is created once, under an advisory lock, and the others find it.
#[test]
fn postgres_instances_starting_together_on_an_empty_database_all_come_up() {
    const INSTANCES: usize = 6;
    for round in 0..3 {
        let Some(fixture) = Fixture::new(
            Backend::Postgres,
            "postgres_instances_starting_together_on_an_empty_database_all_come_up",
        ) else {
            return;
        };
        let barrier = std::sync::Barrier::new(INSTANCES);
        let histories: Vec<(History, HistoryMetrics)> = std::thread::scope(|scope| {
            let started: Vec<_> = (0..INSTANCES)
                .map(|n| {
                    let barrier = &barrier;
                    let config = HistoryConfig {
                        instance: Some(format!("gw{n}")),
                        ..fixture.config.clone()
                    };
                    let fixture = &fixture;
                    scope.spawn(move || {
                        barrier.wait();
                        fixture.open_with(&config)
                    })
                })
                .collect();
            started
                .into_iter()
                .map(|handle| handle.join().expect("open did not panic"))
                .collect()
        });
        for (n, (history, metrics)) in histories.iter().enumerate() {
            assert!(history.store_up(), "round {round}: instance {n} is not up");
            history.record(record(&format!("SEP{n}"), "u", an_hour_ago()));
            history.flush(FLUSH).expect("flush");
            assert_eq!(metrics.written.get(), 1, "round {round}: instance {n}");
        }
        let found = query(&histories[0].0, "");
        assert_eq!(found.len(), INSTANCES, "round {round}");
        for (history, _) in &histories {
            history.shutdown(FLUSH).expect("shutdown");
        }
    }
}

/// A PostgreSQL that cannot be reached does not fail `open`: the history reports the
/// store down, queries fail at once, records wait (not dropped) until shutdown.
#[test]
fn an_unreachable_postgres_does_not_fail_open_and_records_wait() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let directory = tempfile::tempdir().expect("temp dir");
    let config = HistoryConfig {
        path: directory.path().join("unused.sqlite"),
        url: Some(format!(
            "postgres://bc@127.0.0.1:{port}/bc?connect_timeout=1"
        )),
        retention_days: 0,
        ..HistoryConfig::default()
    };
    let metrics = HistoryMetrics::unregistered().expect("metrics");
    let started = Instant::now();
    let history = History::open(&config, metrics.clone()).expect("open does not fail");
    assert!(started.elapsed() < Duration::from_secs(5), "open waited");
    assert!(!history.store_up());
    assert_eq!(metrics.store_up.get(), 0);
    for n in 0..3 {
        history.record(record(&format!("SEP{n}"), "u", an_hour_ago()));
    }
    history
        .flush(FLUSH)
        .expect("flush returns while the store is down");
    assert_eq!(
        metrics.dropped_total(),
        0,
        "records wait, they are not dropped"
    );
    assert!(matches!(
        history.query(&Filter::default()),
        Err(history::HistoryError::StoreDown)
    ));
    history.shutdown(FLUSH).expect("shutdown");
    assert_eq!(
        metrics.dropped_total(),
        3,
        "what never reached the store is counted"
    );
    assert_eq!(metrics.written.get(), 0);
}
