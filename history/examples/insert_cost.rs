//! What one history row costs the writer: CPU per record for the real schema (through
//! `SqliteStore::write_batch`, four indexes) and for the same table with no index but the
//! row id, in transactions of 20,000 like the writer's at a peak.
//!
//! ```sh
//! cargo run --release -p history --example insert_cost
//! ```
//!
//! Records look like the cache-hit benchmark's: 1,000 devices, 1,000 users (not the
//! devices' order), 600,000 records, ~50 per millisecond.

use std::time::Instant;

use history::sqlite::SqliteStore;
use history::{Operation, Record, Source, Store, UtcMillis};

const RECORDS: usize = 600_000;
const BATCH: usize = 20_000;

fn records(start: usize) -> Vec<Record> {
    let base = UtcMillis::now().0;
    (start..start + BATCH)
        .map(|index| {
            let device = (index * 7919) % 1000;
            let user = (index * 104_729 / 3) % 1000;
            let mut record = Record::new(Operation::GetLoggedInUser, 0, Source::Cache);
            record.time = UtcMillis(base + (index / 50) as i64);
            record.cluster = Some("SIM".into());
            record.device = Some(format!("SEP{device:012X}"));
            record.user = Some(format!("user{user}"));
            record.text = format!("user{user}");
            record.client = Some("127.0.0.1".into());
            record.app = Some("bcapp".into());
            record.instance = "bench".into();
            record
        })
        .collect()
}

/// CPU seconds used by the calling thread so far.
fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

fn measure(name: &str, mut store: SqliteStore) -> Result<(), Box<dyn std::error::Error>> {
    let mut cpu = 0.0;
    for start in (0..RECORDS).step_by(BATCH) {
        let batch = records(start);
        let before = thread_cpu_seconds();
        store.write_batch(&batch)?;
        cpu += thread_cpu_seconds() - before;
    }
    println!(
        "{name}: {:.2} µs of CPU per record ({RECORDS} records, transactions of {BATCH})",
        cpu * 1e6 / RECORDS as f64
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directory = tempfile::tempdir()?;
    let started = Instant::now();
    let indexed = directory.path().join("indexed.sqlite");
    measure("history schema (4 indexes)", SqliteStore::open(&indexed)?)?;
    let bare = directory.path().join("bare.sqlite");
    let store = SqliteStore::open(&bare)?;
    rusqlite::Connection::open(&bare)?.execute_batch(
        "DROP INDEX history_time; DROP INDEX history_device_time; \
         DROP INDEX history_user_time; DROP INDEX history_cluster_time;",
    )?;
    measure("same table, no index", store)?;
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
