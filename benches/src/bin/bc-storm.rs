//! `bc-storm`: the "8:55 on Monday" scenarios against a running gateway and simulator.
//!
//! * `login`: N logins on N devices at once (one connection each); completion time
//!   against the physical minimum, codes callers saw, the simulator's peak concurrency.
//! * `query`: R getloggedinuser over N devices from C connections; CUCM calls made.
//! * `fill`: getloggedinuser once per device (to fill the cache for the memory scenario).
//! * `hold`: C client connections held open against the gateway while its resident
//!   memory is sampled from /proc/PID/status.
//!
//! Each prints one JSON line. Pin it with taskset so it does not share the server's core.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bc_benches::{device_name, http_request, northbound_body, split_url, Answer, Connection};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(
    name = "bc-storm",
    about = "Storm and memory scenarios for Business Connector"
)]
struct Args {
    /// The gateway, host:port.
    #[arg(long, global = true, default_value = "127.0.0.1:18091")]
    gateway: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N logins on N devices at once (device i, user i); with --logout, N logouts.
    Login {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Log the devices out instead (puts the simulator back for the next run).
        #[arg(long)]
        logout: bool,
        /// The simulator's stats URL as cucm-sim prints it (`control: …/stats`).
        #[arg(long)]
        sim_stats: String,
        /// The simulator's latency and gate, for the physical minimum.
        #[arg(long, default_value_t = 100.0)]
        sim_latency_ms: f64,
        #[arg(long, default_value_t = 5)]
        sim_max_concurrent: usize,
    },
    /// R getloggedinuser over N devices from C keep-alive connections.
    Query {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        #[arg(long, default_value_t = 100_000)]
        requests: usize,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long)]
        sim_stats: String,
    },
    /// getloggedinuser once for each of devices 1..=N.
    Fill {
        #[arg(long, default_value_t = 100_000)]
        devices: usize,
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    /// Holds C connections open (a /healthz request on each every `every` seconds,
    /// inside the server's keep-alive timeout) and samples the server's VmRSS.
    Hold {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2.0)]
        every: f64,
        /// The gateway's process id.
        #[arg(long)]
        pid: u32,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        match args.command {
            Command::Login {
                devices,
                logout,
                sim_stats,
                sim_latency_ms,
                sim_max_concurrent,
            } => {
                login_storm(
                    &args.gateway,
                    devices,
                    logout,
                    &sim_stats,
                    sim_latency_ms,
                    sim_max_concurrent,
                )
                .await
            }
            Command::Query {
                devices,
                requests,
                connections,
                sim_stats,
            } => query_storm(&args.gateway, devices, requests, connections, &sim_stats).await,
            Command::Fill {
                devices,
                connections,
            } => fill(&args.gateway, devices, connections).await,
            Command::Hold {
                connections,
                seconds,
                every,
                pid,
            } => hold(&args.gateway, connections, seconds, every, pid).await,
        }
    })?;
    println!("{report}");
    Ok(())
}

/// Counts answers by northbound code (`-1`: no code, `-2`: transport error).
#[derive(Default)]
struct Codes(BTreeMap<i64, u64>);

impl Codes {
    fn add(&mut self, answer: &std::io::Result<Answer>) {
        let code = match answer {
            Ok(answer) => answer.result_code().map_or(-1, i64::from),
            Err(_) => -2,
        };
        *self.0.entry(code).or_default() += 1;
    }

    fn merge(&mut self, other: Codes) {
        for (code, count) in other.0 {
            *self.0.entry(code).or_default() += count;
        }
    }

    fn count(&self, code: i64) -> u64 {
        self.0.get(&code).copied().unwrap_or(0)
    }

    fn not_success(&self) -> u64 {
        self.0
            .iter()
            .filter(|(c, _)| **c != 0)
            .map(|(_, n)| n)
            .sum()
    }

    fn to_json(&self) -> Value {
        json!(self
            .0
            .iter()
            .map(|(code, count)| (code.to_string(), json!(count)))
            .collect::<serde_json::Map<_, _>>())
    }
}

async fn login_storm(
    gateway: &str,
    devices: usize,
    logout: bool,
    sim_stats: &str,
    sim_latency_ms: f64,
    sim_max_concurrent: usize,
) -> anyhow::Result<Value> {
    sim_reset(sim_stats).await?;
    let body = northbound_body("bcapp", "bcsecret");
    // Every connection is open before the clock starts: the storm is N requests
    // arriving together, not N TCP handshakes.
    let mut connections = Vec::with_capacity(devices);
    for _ in 0..devices {
        connections.push(Connection::open(gateway).await.context("connecting")?);
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(devices);
    for (index, mut connection) in connections.into_iter().enumerate() {
        let device = device_name(index + 1);
        let path = if logout {
            format!("/api/logout/{device}")
        } else {
            format!("/api/login/{device}/user{}", index + 1)
        };
        let request = http_request("POST", gateway, &path, Some(&body));
        tasks.push(tokio::spawn(async move {
            let answer = connection.exchange(&request).await;
            (answer, started.elapsed())
        }));
    }
    let mut codes = Codes::default();
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (answer, took) = task.await?;
        codes.add(&answer);
        slowest = slowest.max(took);
    }
    let stats = sim_stats_of(sim_stats).await?;
    let physical_min = devices as f64 * sim_latency_ms / 1000.0 / sim_max_concurrent as f64;
    let elapsed = slowest.as_secs_f64();
    Ok(json!({
        "scenario": if logout { "logout_storm" } else { "login_storm" },
        "devices": devices,
        "elapsed_s": round3(elapsed),
        "physical_min_s": physical_min,
        "ratio_to_min": round3(elapsed / physical_min),
        "codes": codes.to_json(),
        "code26_to_callers": codes.count(26),
        "not_success": codes.not_success(),
        "sim_calls": stats[if logout { "calls_logout" } else { "calls_login" }],
        "sim_busy_answers": stats["busy_answers"],
        "sim_max_concurrent_ops": stats["max_concurrent_ops"],
    }))
}

async fn query_storm(
    gateway: &str,
    devices: usize,
    requests: usize,
    connections: usize,
    sim_stats: &str,
) -> anyhow::Result<Value> {
    if connections == 0 || devices == 0 {
        bail!("--connections and --devices must be positive");
    }
    sim_reset(sim_stats).await?;
    let body = northbound_body("bcapp", "bcsecret");
    let per_device: Arc<Vec<Vec<u8>>> = Arc::new(
        (1..=devices)
            .map(|i| {
                let path = format!("/api/getloggedinuser/{}", device_name(i));
                http_request("POST", gateway, &path, Some(&body))
            })
            .collect(),
    );
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(Connection::open(gateway).await.context("connecting")?);
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for (index, mut connection) in opened.into_iter().enumerate() {
        let per_device = per_device.clone();
        // Connection c asks devices c, c+1, …: at the start every device is asked at
        // once (cache misses), then mostly fresh entries or queries in flight.
        let share = requests / connections + usize::from(index < requests % connections);
        tasks.push(tokio::spawn(async move {
            let mut codes = Codes::default();
            for k in 0..share {
                let request = &per_device[(index + k) % per_device.len()];
                let answer = connection.exchange(request).await;
                codes.add(&answer);
                if answer.is_err() {
                    break;
                }
            }
            codes
        }));
    }
    let mut codes = Codes::default();
    for task in tasks {
        codes.merge(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = sim_stats_of(sim_stats).await?;
    Ok(json!({
        "scenario": "query_storm",
        "devices": devices,
        "requests": requests,
        "connections": connections,
        "elapsed_s": round3(elapsed),
        "codes": codes.to_json(),
        "not_success": codes.not_success(),
        "sim_calls_device_user_query": stats["calls_device_user_query"],
        "sim_max_concurrent_calls": stats["max_concurrent_calls"],
    }))
}

async fn fill(gateway: &str, devices: usize, connections: usize) -> anyhow::Result<Value> {
    let body = Arc::new(northbound_body("bcapp", "bcsecret"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..connections.max(1) {
        let gateway = gateway.to_string();
        let body = body.clone();
        let stride = connections.max(1);
        tasks.push(tokio::spawn(async move {
            let mut codes = Codes::default();
            let mut connection = Connection::open(&gateway).await?;
            let mut device = index + 1;
            while device <= devices {
                let path = format!("/api/getloggedinuser/{}", device_name(device));
                let request = http_request("POST", &gateway, &path, Some(&body));
                let answer = connection.exchange(&request).await;
                codes.add(&answer);
                if answer.is_err() {
                    connection = Connection::open(&gateway).await?;
                }
                device += stride;
            }
            anyhow::Ok(codes)
        }));
    }
    let mut codes = Codes::default();
    for task in tasks {
        codes.merge(task.await??);
    }
    Ok(json!({
        "scenario": "fill",
        "devices": devices,
        "elapsed_s": round3(started.elapsed().as_secs_f64()),
        "codes": codes.to_json(),
        "not_success": codes.not_success(),
    }))
}

async fn hold(
    gateway: &str,
    connections: usize,
    seconds: f64,
    every: f64,
    pid: u32,
) -> anyhow::Result<Value> {
    let rss_before = vm_kib(pid, "VmRSS")?;
    let request = Arc::new(http_request("GET", gateway, "/healthz", None));
    // Bounded connect concurrency: a 10,000-SYN burst would overflow the listen
    // backlog and measure the kernel's SYN retry timer instead.
    let connecting = Arc::new(Semaphore::new(256));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (gateway, request, connecting) =
            (gateway.to_string(), request.clone(), connecting.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = {
                let _permit = connecting.acquire().await.ok();
                let mut connection = Connection::open(&gateway).await?;
                connection.exchange(&request).await?;
                connection
            };
            let mut answered = 1u64;
            loop {
                let next = Instant::now() + Duration::from_secs_f64(every);
                if next >= until {
                    tokio::time::sleep_until(until.into()).await;
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
                connection.exchange(&request).await?;
                answered += 1;
            }
            // Held until every task is done sampling: dropped on return.
            anyhow::Ok((connection, answered))
        }));
    }
    let mut rss_peak = rss_before;
    let mut fds_peak = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_peak = rss_peak.max(vm_kib(pid, "VmRSS")?);
        fds_peak = fds_peak.max(open_fds(pid));
    }
    let mut held = Vec::with_capacity(connections);
    let mut failed = 0u64;
    let mut answers = 0u64;
    for task in tasks {
        match task.await? {
            Ok((connection, answered)) => {
                answers += answered;
                held.push(connection);
            }
            Err(_) => failed += 1,
        }
    }
    let rss_end = vm_kib(pid, "VmRSS")?;
    let hwm = vm_kib(pid, "VmHWM")?;
    drop(held);
    Ok(json!({
        "scenario": "hold",
        "connections": connections,
        "connections_failed": failed,
        "healthz_answers": answers,
        "server_fds_peak": fds_peak,
        "rss_before_kib": rss_before,
        "rss_peak_kib": rss_peak.max(rss_end),
        "rss_peak_mib": round3(rss_peak.max(rss_end) as f64 / 1024.0),
        "vm_hwm_kib": hwm,
    }))
}

fn vm_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .with_context(|| format!("{field} not in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// `GET …/_sim/stats?log=false` as JSON.
async fn sim_stats_of(stats_url: &str) -> anyhow::Result<Value> {
    let (host, path) = split_url(stats_url)?;
    let mut connection = Connection::open(&host).await?;
    let request = http_request("GET", &host, &format!("{path}?log=false"), None);
    let answer = connection.exchange(&request).await?;
    if answer.status != 200 {
        bail!("simulator stats: HTTP {}", answer.status);
    }
    Ok(serde_json::from_slice(&answer.body)?)
}

/// `POST …/_sim/reset`: counters from zero (EM state kept).
async fn sim_reset(stats_url: &str) -> anyhow::Result<()> {
    let (host, path) = split_url(stats_url)?;
    let reset = path
        .strip_suffix("/stats")
        .map(|base| format!("{base}/reset"))
        .context("the simulator stats URL should end in /stats")?;
    let mut connection = Connection::open(&host).await?;
    let answer = connection
        .exchange(&http_request("POST", &host, &reset, Some("")))
        .await?;
    if answer.status != 200 {
        bail!("simulator reset: HTTP {}", answer.status);
    }
    Ok(())
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
