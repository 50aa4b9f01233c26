//! `bc-fair`: a well-behaved client's latency alone and beside a flooding client, side by
//! side in one run — the fair share of a cluster's ready line.
//!
//! Set-up: one simulated CUCM node (in this process, port 0, 5 ms per call) and the real
//! `business-connector` binary (a child process, port 0) with one cluster shaped to
//! `--cluster-rate` calls a second (burst 5, `max_concurrent` 5), no cache and no
//! batching (every request is one CUCM call), and 127.0.0.1 as a trusted proxy so each
//! client names itself in X-Forwarded-For:
//! - the well-behaved client (198.51.100.1) asks getloggedinuser at `--good-rate`/s,
//!   open loop (a request every 1/rate s whatever the answers do);
//! - the flooder (203.0.113.66) sends logins with a random wrong password at
//!   `--flood-rate`/s: each one must be checked by CUCM once (code 3).
//!
//! Phases alternate `alone`, `flood`, `alone`, `flood`, … (`--runs` of each, `--secs`
//! each); before each phase the gateway's queue is let empty (polled on /metrics). The
//! table gives the well-behaved client's p50/p99 per phase and the medians, and the
//! ratio flood ÷ alone. Compare two gateway binaries with `--gateway-bin`.
//!
//! ```text
//! cargo build --release -p business-connector -p bc-benches --bin business-connector --bin bc-fair
//! target/release/bc-fair --secs 10 --runs 3
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bc_benches::{device_name, northbound_body, quantile};
use clap::Parser;
use sim::{Behavior, Latency, SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOOD: &str = "198.51.100.1";
const FLOOD: &str = "203.0.113.66";

#[derive(Debug, Parser)]
#[command(
    name = "bc-fair",
    about = "A well-behaved client's latency alone and beside a flooding one"
)]
struct Args {
    /// The gateway binary (default: `business-connector` beside this binary).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Phases of each kind (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The well-behaved client's requests per second.
    #[arg(long, default_value_t = 5.0)]
    good_rate: f64,
    /// The flooder's requests per second.
    #[arg(long, default_value_t = 150.0)]
    flood_rate: f64,
    /// The cluster's CUCM calls per second (`max_requests_per_second`).
    #[arg(long, default_value_t = 20)]
    cluster_rate: u32,
}

struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(args: &Args, node: &str) -> anyhow::Result<Gateway> {
    let config = format!(
        "listen = \"127.0.0.1:0\"\nworkers = 1\ndrain_ms = 0\n\
         [history]\nenabled = false\n\
         [access]\ntrusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_client = 0\n\
         [[cluster]]\ncode = \"SIM\"\nnodes = [\"{node}\"]\nmax_concurrent = 5\n\
         max_requests_per_second = {rate}\nburst = 5\ncache_ttl_ms = 0\nmax_devices_per_query = 1\n",
        rate = args.cluster_rate
    );
    let path = std::env::temp_dir().join(format!("bc-fair-{}.toml", std::process::id()));
    std::fs::write(&path, config).context("writing the gateway config")?;
    let bin = match &args.gateway_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("business-connector"),
    };
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn,business_connector=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("gateway stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut sent = false;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if !sent {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("listen="))
                {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the gateway did not log its address within 20 s")?;
    let _ = std::fs::remove_file(&path);
    Ok(Gateway { child, addr })
}

/// One request on its own connection; the status and `<code>`.
async fn send(addr: &str, client: &str, path: &str, body: &str) -> Option<(u16, Option<u32>)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: {client}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let code = text
        .split("<code>")
        .nth(1)
        .and_then(|rest| rest.split("</code>").next())
        .and_then(|code| code.parse().ok());
    Some((status, code))
}

async fn metric(addr: &str, series: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// What one phase measured.
struct Phase {
    good_ms: Vec<u64>,
    good_failed: usize,
    flood_sent: usize,
    flood_by_code: std::collections::BTreeMap<String, usize>,
}

async fn phase(args: &Args, addr: &Arc<str>, flood: bool, devices: usize) -> Phase {
    let end = Instant::now() + Duration::from_secs_f64(args.secs);
    let good = {
        let addr = addr.clone();
        let period = Duration::from_secs_f64(1.0 / args.good_rate);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            let mut requests = Vec::new();
            let mut n = 0;
            while Instant::now() < end {
                ticks.tick().await;
                n += 1;
                let addr = addr.clone();
                let path = format!("/api/getloggedinuser/{}", device_name(n % devices + 1));
                requests.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let answer =
                        send(&addr, GOOD, &path, &northbound_body("bcapp", "bcsecret")).await;
                    (answer, started.elapsed())
                }));
            }
            let mut done = Vec::new();
            for request in requests {
                if let Ok(result) = request.await {
                    done.push(result);
                }
            }
            done
        })
    };
    let flooder = flood.then(|| {
        let addr = addr.clone();
        let period = Duration::from_secs_f64(1.0 / args.flood_rate);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            let mut requests = Vec::new();
            let mut n: u64 = 0;
            while Instant::now() < end {
                ticks.tick().await;
                n += 1;
                let addr = addr.clone();
                // A password nobody has: CUCM must check each one.
                let password = format!("wrong-{}-{n}", std::process::id());
                let path = format!(
                    "/api/login/{}/user{}",
                    device_name(n as usize % devices + 1),
                    n as usize % devices + 1
                );
                requests.push(tokio::spawn(async move {
                    send(&addr, FLOOD, &path, &northbound_body("bcapp", &password)).await
                }));
            }
            let mut by_code = std::collections::BTreeMap::new();
            let sent = requests.len();
            for request in requests {
                let key = match request.await.ok().flatten() {
                    Some((status, Some(code))) => format!("{status}/{code}"),
                    Some((status, None)) => format!("{status}/-"),
                    None => "no answer".into(),
                };
                *by_code.entry(key).or_insert(0) += 1;
            }
            (sent, by_code)
        })
    });
    let answers = good.await.unwrap_or_default();
    let (flood_sent, flood_by_code) = match flooder {
        Some(flooder) => flooder.await.unwrap_or_default(),
        None => (0, Default::default()),
    };
    let mut good_ms: Vec<u64> = Vec::new();
    let mut good_failed = 0;
    for (answer, took) in answers {
        match answer {
            Some((200, Some(0))) => good_ms.push(took.as_millis() as u64),
            _ => good_failed += 1,
        }
    }
    good_ms.sort_unstable();
    Phase {
        good_ms,
        good_failed,
        flood_sent,
        flood_by_code,
    }
}

/// Waits until nothing is queued at the cluster (bounded: 60 s).
async fn settle(addr: &str) {
    let give_up = Instant::now() + Duration::from_secs(60);
    while Instant::now() < give_up {
        let depth = metric(addr, "bc_queue_depth{cluster=\"SIM\"}").await;
        let in_flight = metric(addr, "bc_cucm_in_flight{cluster=\"SIM\"}").await;
        if depth == Some(0.0) && in_flight.unwrap_or(0.0) == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let devices = 500;
    let node = Simulator::start(SimConfig {
        devices,
        users: devices,
        behavior: Behavior {
            latency: Latency::Fixed(Duration::from_millis(5)),
            ..Behavior::default()
        },
        ..SimConfig::default()
    })
    .context("starting the simulated CUCM")?;
    let gateway = start_gateway(&args, &node.url())?;
    let addr: Arc<str> = Arc::from(gateway.addr.as_str());
    println!(
        "bc-fair: cluster {} calls/s (burst 5, 5 at once), CUCM 5 ms; well-behaved {}/s getloggedinuser; flood {}/s logins with wrong passwords; {} s per phase",
        args.cluster_rate, args.good_rate, args.flood_rate, args.secs
    );
    println!(
        "{:<6} {:>4} {:>9} {:>9} {:>9} {:>7} {:>8}  flood answers (status/code)",
        "phase", "run", "good n", "p50 ms", "p99 ms", "failed", "flood n"
    );
    let (mut alone_p50, mut alone_p99, mut flood_p50, mut flood_p99) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        for flood in [false, true] {
            settle(&addr).await;
            let measured = phase(&args, &addr, flood, devices).await;
            let p50 = quantile(&measured.good_ms, 0.50);
            let p99 = quantile(&measured.good_ms, 0.99);
            let (p50s, p99s) = match flood {
                false => (&mut alone_p50, &mut alone_p99),
                true => (&mut flood_p50, &mut flood_p99),
            };
            p50s.push(p50);
            p99s.push(p99);
            println!(
                "{:<6} {:>4} {:>9} {:>9} {:>9} {:>7} {:>8}  {:?}",
                if flood { "flood" } else { "alone" },
                run,
                measured.good_ms.len(),
                p50,
                p99,
                measured.good_failed,
                measured.flood_sent,
                measured.flood_by_code
            );
        }
    }
    let (a50, a99, f50, f99) = (
        median(&mut alone_p50),
        median(&mut alone_p99),
        median(&mut flood_p50),
        median(&mut flood_p99),
    );
    println!(
        "median of {} runs: alone p50 {a50} ms p99 {a99} ms; with the flood p50 {f50} ms p99 {f99} ms; p99 ratio flood/alone {:.2}",
        args.runs,
        f99 as f64 / a99.max(1) as f64
    );
    drop(gateway);
    Ok(())
}
