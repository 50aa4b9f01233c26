//! Query-by-device benchmark: 1,000,000 records, then 100 queries by device (limit 100),
//! median and p99 in milliseconds.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-history cargo run --release -p history --example query_bench
//! # on PostgreSQL instead of a temp SQLite file:
//! BENCH_POSTGRES_URL=postgres://… cargo run --release -p history --example query_bench
//! ```
//!
//! Records are spread over 10,000 devices (100 each) and 2,000 users over the last 30
//! days, written through the `Store` trait in transactions of 10,000.

use std::time::{Duration, Instant};

use history::postgres::PostgresStore;
use history::sqlite::SqliteStore;
use history::{Filter, Operation, Record, Source, Store, UtcMillis};

const RECORDS: usize = 1_000_000;
const DEVICES: usize = 10_000;
const USERS: usize = 2_000;
const BATCH: usize = 10_000;
const QUERIES: usize = 100;

/// A small deterministic generator (xorshift), so runs are comparable without a `rand`
/// dependency.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directory = tempfile::tempdir()?;
    let (mut store, backend): (Box<dyn Store>, String) = match std::env::var("BENCH_POSTGRES_URL") {
        Ok(url) => (Box::new(PostgresStore::connect(&url)?), "PostgreSQL".into()),
        Err(_) => {
            let path = directory.path().join("bench.sqlite");
            (
                Box::new(SqliteStore::open(&path)?),
                format!("SQLite ({})", path.display()),
            )
        }
    };
    println!("backend: {backend}");

    let mut random = Xorshift(0x9E37_79B9_7F4A_7C15);
    let now = UtcMillis::now().0;
    let span_ms = 30 * 86_400_000_i64;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for index in 0..RECORDS {
        let device = index % DEVICES;
        let user = random.below(USERS);
        let mut record = Record::new(
            Operation::ALL[random.below(Operation::ALL.len())],
            [0, 0, 0, 18, 1003][random.below(5)],
            Source::ALL[random.below(Source::ALL.len())],
        );
        record.time = UtcMillis(now - span_ms + (index as i64) * span_ms / RECORDS as i64);
        record.cluster = Some(["EU", "US", "APAC"][random.below(3)].into());
        record.device = Some(format!("SEP{device:012X}"));
        record.user = Some(format!("user{user}"));
        record.text = format!("Login successful for user{user} on device SEP{device:012X}");
        record.duration_us = random.below(500_000) as u64;
        record.node = Some("https://cucm-eu-1:8443/emservice/EMServiceServlet".into());
        record.client = Some("10.20.30.40".into());
        record.app = Some("bcapp".into());
        record.instance = "bench".into();
        batch.push(record);
        if batch.len() == BATCH {
            store.write_batch(&batch)?;
            batch.clear();
        }
    }
    store.write_batch(&batch)?;
    let insert_elapsed = started.elapsed();
    println!(
        "inserted {RECORDS} records in {:.1} s ({:.0} records/s)",
        insert_elapsed.as_secs_f64(),
        RECORDS as f64 / insert_elapsed.as_secs_f64()
    );

    let mut timings: Vec<Duration> = Vec::with_capacity(QUERIES);
    let mut returned = 0;
    for _ in 0..QUERIES {
        let filter = Filter {
            device: Some(format!("SEP{:012X}", random.below(DEVICES))),
            limit: 100,
            ..Filter::default()
        };
        let started = Instant::now();
        let records = store.query(&filter)?;
        timings.push(started.elapsed());
        returned += records.len();
    }
    timings.sort_unstable();
    let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let median = millis(timings[QUERIES / 2]);
    // Nearest-rank p99 of 100 samples: the 99th smallest.
    let p99 = millis(timings[(QUERIES * 99).div_ceil(100) - 1]);
    println!(
        "{QUERIES} queries by device (limit 100, {} rows each on average): median {median:.3} ms, p99 {p99:.3} ms, max {:.3} ms",
        returned / QUERIES,
        millis(timings[QUERIES - 1])
    );
    Ok(())
}
