//! The coordination store against a real PostgreSQL (`BC_TEST_POSTGRES_URL`, see
//! history/ci-postgres.sh): two clients stand for two instances on one database.
//! Slots leased and given back, a NOTIFY waking the other instance, a dead holder's
//! lease running out, the shared rate, and no store at all.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::coordination::{Answer, ClusterShape, StoreClient};
use actors::shaper::Rate;

const PATIENCE: Duration = Duration::from_secs(5);

/// A fresh database on the test server, or None (a failure under CI=true).
fn database(test: &str) -> Option<String> {
    let Ok(admin) = std::env::var("BC_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "{test}: BC_TEST_POSTGRES_URL is not set, and CI=true"
        );
        eprintln!("SKIPPED {test}: BC_TEST_POSTGRES_URL is not set");
        return None;
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "bc_coordination_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let statement = format!("DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}");
    let admin_url = admin.clone();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin_url, postgres::NoTls).expect("connect");
        for sql in statement.split("; ") {
            client.batch_execute(sql).expect("create the database");
        }
    })
    .join()
    .expect("database created");
    let base = admin.rsplit_once('/').expect("a URL with a database").0;
    Some(format!("{base}/{name}"))
}

fn shape(slots: usize, rate: Option<(u32, u32)>, lease: Duration) -> ClusterShape {
    ClusterShape {
        code: Arc::from("EU"),
        max_concurrent: slots,
        rate: rate.map(|(per_second, burst)| Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }),
        lease,
    }
}

fn client(url: &str, shape: &ClusterShape) -> StoreClient {
    let gauge = prometheus::IntGauge::new("up", "up").unwrap();
    StoreClient::start(url, vec![shape.clone()], gauge).expect("store thread")
}

async fn connected(store: &StoreClient) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !store.is_up() {
        assert!(Instant::now() < give_up, "never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn two_instances_share_the_slots_and_a_release_wakes_the_other() {
    let Some(url) = database("two_instances_share_the_slots") else {
        return;
    };
    let shape = shape(2, None, Duration::from_secs(30));
    let (a, b) = (client(&url, &shape), client(&url, &shape));
    connected(&a).await;
    connected(&b).await;
    let code = shape.code.clone();
    let Answer::Leased(first) = a.acquire(&code, 1, PATIENCE).await else {
        panic!("a free slot");
    };
    assert!(matches!(
        b.acquire(&code, 1, PATIENCE).await,
        Answer::Leased(_)
    ));
    assert_eq!(b.acquire(&code, 2, PATIENCE).await, Answer::Full);
    assert_eq!(a.acquire(&code, 3, PATIENCE).await, Answer::Full);
    // b waits for a NOTIFY; a gives its slot back.
    let freed = b.slot_freed("EU").expect("a known cluster");
    let notified = freed.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let _waiting = b.waiting();
    a.release(&code, first);
    tokio::time::timeout(Duration::from_secs(5), notified)
        .await
        .expect("the release wakes the other instance");
    assert!(matches!(
        b.acquire(&code, 4, PATIENCE).await,
        Answer::Leased(_)
    ));
}

#[actix_rt::test]
async fn a_dead_holders_lease_runs_out() {
    let Some(url) = database("a_dead_holders_lease_runs_out") else {
        return;
    };
    let shape = shape(1, None, Duration::from_millis(300));
    let (dead, survivor) = (client(&url, &shape), client(&url, &shape));
    connected(&dead).await;
    connected(&survivor).await;
    let code = shape.code.clone();
    assert!(matches!(
        dead.acquire(&code, 1, PATIENCE).await,
        Answer::Leased(_)
    ));
    drop(dead); // never released
    let taken = Instant::now();
    assert_eq!(survivor.acquire(&code, 1, PATIENCE).await, Answer::Full);
    loop {
        match survivor.acquire(&code, 2, PATIENCE).await {
            Answer::Leased(_) => break,
            Answer::Full => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("{other:?}"),
        }
        assert!(
            taken.elapsed() < Duration::from_secs(5),
            "the lease never ran out"
        );
    }
    assert!(
        taken.elapsed() >= Duration::from_millis(250),
        "{:?}",
        taken.elapsed()
    );
}

#[actix_rt::test]
async fn the_rate_is_shared_and_a_refused_token_takes_no_slot() {
    let Some(url) = database("the_rate_is_shared") else {
        return;
    };
    // 2 calls a second, burst 1, one slot for each call.
    let shape = shape(10, Some((2, 1)), Duration::from_secs(30));
    let (a, b) = (client(&url, &shape), client(&url, &shape));
    connected(&a).await;
    connected(&b).await;
    let code = shape.code.clone();
    assert!(matches!(
        a.acquire(&code, 1, PATIENCE).await,
        Answer::Leased(_)
    ));
    let Answer::RateLimited(wait) = b.acquire(&code, 1, PATIENCE).await else {
        panic!("the other instance spent the token");
    };
    assert!(
        wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    assert!(matches!(
        b.acquire(&code, 2, PATIENCE).await,
        Answer::Leased(_)
    ));
    // Refused tokens took no slot: of 10 slots, 2 are leased.
    let url2 = url.clone();
    let leased: i64 = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url2, postgres::NoTls).unwrap();
        c.query_one(
            "SELECT count(*) FROM bc_coordination_slots WHERE holder IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0)
    })
    .join()
    .unwrap();
    assert_eq!(leased, 2);
}

#[actix_rt::test]
async fn no_store_answers_unreachable_at_once() {
    // Nothing listens on port 1.
    let shape = shape(5, None, Duration::from_secs(3));
    let store = client("postgres://bc@127.0.0.1:1/bc", &shape);
    let asked = Instant::now();
    assert_eq!(
        store
            .acquire(&shape.code, 1, Duration::from_millis(250))
            .await,
        Answer::Unreachable
    );
    assert!(asked.elapsed() < Duration::from_millis(500));
    assert!(!store.is_up());
}
