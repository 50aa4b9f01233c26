//! `bc-load`: open-loop load at a fixed rate, with latency percentiles that include
//! the time a request had to wait for its turn (no coordinated omission).
//!
//! Like wrk2, each of C keep-alive connections owns every C-th slot of a global
//! schedule (`start + j / rate`). A request is sent at its slot; its latency runs
//! from the slot when the connection was behind schedule (the server made it late),
//! and from the actual send when it was on time (so the timer's own 1 ms granularity
//! is not charged to the server). Runs on one thread: pin it with taskset.
//!
//! ```text
//! bc-load --url http://127.0.0.1:8081 --mode northbound --rate 5000 --duration 10
//! ```
//! prints one JSON line: target and achieved rate, errors, p50/p90/p99/p99.9/max in µs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bc_benches::{
    device_name, em_query_body, http_request, northbound_body, quantile, split_url, Connection,
};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// EM `deviceUserQuery` POSTed to `/emservice/EMServiceServlet` (simulator, nginx).
    Em,
    /// `POST /api/getloggedinuser/{device}` with the credentials (the gateway).
    Northbound,
}

#[derive(Debug, Parser)]
#[command(
    name = "bc-load",
    about = "Open-loop fixed-rate HTTP load with latency percentiles"
)]
struct Args {
    /// Base URL of the server under test, e.g. http://127.0.0.1:8081
    #[arg(long)]
    url: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Requests per second, spread evenly over the connections.
    #[arg(long)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load whose samples are discarded.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Requests rotate over devices 1..=N (so the gateway's coalescing of identical
    /// concurrent queries does not flatter it).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    #[arg(long, default_value = "bcapp")]
    app_id: String,
    #[arg(long, default_value = "bcsecret")]
    app_certificate: String,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    /// Answers that arrived but were not the expected success.
    unexpected: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate <= 0.0 || args.connections == 0 || args.devices == 0 {
        bail!("--rate, --connections and --devices must be positive");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (host, base_path) = split_url(&args.url)?;
    let base_path = base_path.trim_end_matches('/').to_string();
    let requests: Vec<Vec<u8>> = (1..=args.devices)
        .map(|i| {
            let device = device_name(i);
            match args.mode {
                Mode::Em => http_request(
                    "POST",
                    &host,
                    &format!("{base_path}/emservice/EMServiceServlet"),
                    Some(&em_query_body(&device, &args.app_id, &args.app_certificate)),
                ),
                Mode::Northbound => http_request(
                    "POST",
                    &host,
                    &format!("{base_path}/api/getloggedinuser/{device}"),
                    Some(&northbound_body(&args.app_id, &args.app_certificate)),
                ),
            }
        })
        .collect();
    let requests = std::sync::Arc::new(requests);
    // Open every connection before the clock starts: connecting is not the server's
    // steady-state cost.
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        connections.push(Connection::open(&host).await.context("connecting")?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for (index, connection) in connections.into_iter().enumerate() {
        let requests = requests.clone();
        let (rate, count, mode) = (args.rate, args.connections, args.mode);
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            drive(
                connection,
                &host,
                &requests,
                mode,
                Schedule {
                    start,
                    measure_from,
                    end,
                    first_slot: index,
                    stride: count,
                    rate,
                },
            )
            .await
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await?;
        total.latencies_us.extend(tally.latencies_us);
        total.errors += tally.errors;
        total.unexpected += tally.unexpected;
    }
    let mut sorted = total.latencies_us;
    sorted.sort_unstable();
    let achieved = sorted.len() as f64 / args.duration;
    let report = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "url": args.url,
        "target_rate": args.rate,
        "achieved_rate": (achieved * 10.0).round() / 10.0,
        "requests": sorted.len(),
        "errors": total.errors,
        "unexpected": total.unexpected,
        "p50_us": quantile(&sorted, 0.50),
        "p90_us": quantile(&sorted, 0.90),
        "p99_us": quantile(&sorted, 0.99),
        "p999_us": quantile(&sorted, 0.999),
        "max_us": sorted.last().copied().unwrap_or(0),
    });
    println!("{report}");
    Ok(())
}

/// One connection's share of the global schedule.
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    first_slot: usize,
    stride: usize,
    rate: f64,
}

impl Schedule {
    fn slot_time(&self, slot: usize) -> Instant {
        self.start + Duration::from_secs_f64(slot as f64 / self.rate)
    }
}

async fn drive(
    mut connection: Connection,
    host: &str,
    requests: &[Vec<u8>],
    mode: Mode,
    schedule: Schedule,
) -> Tally {
    let mut tally = Tally::default();
    let mut slot = schedule.first_slot;
    loop {
        let due = schedule.slot_time(slot);
        if due >= schedule.end {
            break;
        }
        let request = &requests[slot % requests.len()];
        slot += schedule.stride;
        let now = Instant::now();
        let measured_from = if now < due {
            tokio::time::sleep_until(due.into()).await;
            Instant::now()
        } else {
            due
        };
        let result = connection.exchange(request).await;
        let done = Instant::now();
        match result {
            Ok(answer) => {
                let expected = answer.status == 200
                    && match mode {
                        Mode::Em => answer.body.windows(8).any(|w| w == b"<device "),
                        Mode::Northbound => answer.result_code() == Some(0),
                    };
                if !expected {
                    tally.unexpected += 1;
                }
                if due >= schedule.measure_from {
                    tally
                        .latencies_us
                        .push(done.duration_since(measured_from).as_micros() as u64);
                }
            }
            Err(_) => {
                tally.errors += 1;
                // A broken connection is replaced; the slot it lost counts as an error.
                match Connection::open(host).await {
                    Ok(fresh) => connection = fresh,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }
    tally
}
