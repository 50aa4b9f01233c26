//! Micro-benchmarks of the gateway's per-request hot path, in the order a request
//! meets them: northbound parse and validation, cache lookup, device queue and scheduler,
//! EM encode, EM decode, northbound render.
//!
//! `cargo bench -p bc-benches` (short measurement times: the whole run takes about a
//! minute; pass `-- --measurement-time 5` for tighter intervals).

use std::hint::black_box;
use std::time::{Duration, Instant};

use actors::cache::LoggedInCache;
use actors::device_queue::{DeviceQueue, PendingOp};
use actors::em::codec::{decode, EmRequest};
use actors::em::dispatch::CallEnd;
use actors::scheduler::Scheduler;
use actors::{Credentials, DeviceName, Operation, Outcome, QueueKey, UserId};
use business_connector::northbound::request::{apply_path, parse_message, validate, Call};
use business_connector::northbound::response::ResultDoc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prometheus::IntGauge;
use tokio::sync::oneshot;

/// What a hot-desking client sends: credentials in the form field, the rest in the path.
const NORTHBOUND_MESSAGE: &str =
    "<request><appID>bcapp</appID><appCertificate>bcsecret</appCertificate></request>";
/// The full vendor-style message (every field in the XML).
const NORTHBOUND_FULL: &str =
    "<request><appID>bcapp</appID><appCertificate>bcsecret</appCertificate>\
     <deviceName>SEP1CE6C79BAF1F</deviceName><userID>ALMUSER01</userID>\
     <clusterCode>EU</clusterCode><pin>1234</pin></request>";
/// What CUCM answers to a deviceUserQuery for a device with a user logged in.
const EM_QUERY_ANSWER: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
     <response><deviceUserResults><device name=\"SEP1CE6C79BAF1F\"><userID>ALMUSER01</userID>\
     <lastlogin>ALMUSER01</lastlogin><emccDevice>no</emccDevice></device></deviceUserResults></response>";
const EM_SUCCESS: &str =
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><response><success/></response>";
const EM_FAILURE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><response><failure>\
     <error code=\"26\">Busy, please try again</error></failure></response>";

fn device(index: usize) -> DeviceName {
    DeviceName::parse(&format!("SEP{index:012X}")).expect("valid device name")
}

fn northbound(c: &mut Criterion) {
    let mut group = c.benchmark_group("northbound");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_apply_validate/getloggedinuser", |b| {
        b.iter(|| {
            let mut fields = parse_message(black_box(NORTHBOUND_MESSAGE)).expect("parses");
            apply_path(
                Call::GetLoggedInUser,
                black_box(&["SEP1CE6C79BAF1F"]),
                &mut fields,
            )
            .expect("path applies");
            validate(Call::GetLoggedInUser, &fields).expect("valid")
        })
    });
    group.bench_function("parse_validate/login_full_message", |b| {
        b.iter(|| {
            let fields = parse_message(black_box(NORTHBOUND_FULL)).expect("parses");
            validate(Call::Login, &fields).expect("valid")
        })
    });
    let user = UserId::parse("ALMUSER01").expect("valid user");
    let logged_in = Outcome::CurrentUser(Some(user));
    group.bench_function("success_render/getloggedinuser", |b| {
        b.iter(|| {
            ResultDoc::success(
                Call::GetLoggedInUser,
                black_box("SEP1CE6C79BAF1F"),
                None,
                &logged_in,
            )
            .render()
        })
    });
    group.finish();
}

fn em_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("em_codec");
    group.throughput(Throughput::Elements(1));
    let credentials = Credentials::new("bcapp", "bcsecret");
    let devices = [device(0x1CE6C79BAF1F)];
    let user = UserId::parse("ALMUSER01").expect("valid user");
    group.bench_function("encode/deviceUserQuery", |b| {
        b.iter(|| EmRequest::DeviceUserQuery { devices: &devices }.encode(black_box(&credentials)))
    });
    group.bench_function("encode/login", |b| {
        b.iter(|| {
            EmRequest::Login {
                device: &devices[0],
                user: &user,
            }
            .encode(black_box(&credentials))
        })
    });
    group.bench_function("decode/deviceUserResults", |b| {
        b.iter(|| decode(black_box(EM_QUERY_ANSWER)).expect("decodes"))
    });
    group.bench_function("decode/success", |b| {
        b.iter(|| decode(black_box(EM_SUCCESS)).expect("decodes"))
    });
    group.bench_function("decode/failure", |b| {
        b.iter(|| decode(black_box(EM_FAILURE)).expect("decodes"))
    });
    group.finish();
}

fn cache(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(1));
    let gauge = IntGauge::new("bench_cache_entries", "bench").expect("gauge");
    let cache = LoggedInCache::new(Duration::from_secs(3600), gauge);
    let credentials = Credentials::new("bcapp", "bcsecret").fingerprint();
    cache.mark_verified(credentials);
    // The memory scenario's size: a cache over 100,000 devices.
    let devices: Vec<DeviceName> = (1..=100_000).map(device).collect();
    let user = UserId::parse("user1").expect("valid user");
    for (index, name) in devices.iter().enumerate() {
        let someone = (index % 2 == 0).then(|| user.clone());
        cache.set(name, someone);
    }
    let mut next = 0usize;
    group.bench_function("get/hit_100k_entries", |b| {
        b.iter(|| {
            next = (next + 7919) % devices.len();
            cache.get(&devices[next], credentials)
        })
    });
    let absent = device(0xFFFF_FFFF);
    group.bench_function("get/miss", |b| {
        b.iter(|| cache.get(black_box(&absent), credentials))
    });
    group.bench_function("set/nobody", |b| {
        b.iter(|| {
            next = (next + 7919) % devices.len();
            cache.set(&devices[next], None)
        })
    });
    group.bench_function("mark_verified", |b| {
        b.iter(|| cache.mark_verified(black_box(credentials)))
    });
    group.finish();
}

fn queues(c: &mut Criterion) {
    let mut group = c.benchmark_group("queues");
    group.throughput(Throughput::Elements(1));
    let credentials = Credentials::new("bcapp", "bcsecret");
    let name = device(1);
    let deadline = Instant::now() + Duration::from_secs(3600);
    let pending = |operation: Operation| {
        let (sender, receiver) = oneshot::channel();
        // The receiver is dropped: answering it is not part of the queue's cost.
        drop(receiver);
        PendingOp::new(operation, credentials.clone(), deadline, sender)
    };
    group.bench_function("device_queue/push_start_finish", |b| {
        b.iter_batched(
            || {
                (
                    DeviceQueue::default(),
                    pending(Operation::Query {
                        device: name.clone(),
                    }),
                )
            },
            |(mut queue, op)| {
                queue.push(op);
                let started = queue.start().is_some();
                (started, queue.finish())
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("device_queue/query_joins_running", |b| {
        b.iter_batched(
            || {
                let mut queue = DeviceQueue::default();
                queue.push(pending(Operation::Query {
                    device: name.clone(),
                }));
                queue.start();
                let joining = pending(Operation::Query {
                    device: name.clone(),
                });
                (queue, joining)
            },
            |(mut queue, joining)| {
                let pushed = queue.push(joining);
                (pushed, queue)
            },
            BatchSize::SmallInput,
        )
    });
    let devices: Vec<DeviceName> = (1..=1000).map(device).collect();
    let mut scheduler = Scheduler::new(5, None, 100_000);
    let mut next = 0usize;
    group.bench_function("scheduler/offer_start_complete", |b| {
        b.iter(|| {
            next = (next + 1) % devices.len();
            let device = devices[next].clone();
            let now = Instant::now();
            scheduler.offer(
                pending(Operation::Logout {
                    device: device.clone(),
                }),
                now,
            );
            let step = scheduler.next_step(now);
            let key = QueueKey::Device(device);
            let completion = scheduler.complete(&key, CallEnd::NoAnswer, now, 0.5);
            (step, completion)
        })
    });
    group.finish();
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = hot_path;
    config = short();
    targets = northbound, em_codec, cache, queues
}
criterion_main!(hot_path);
