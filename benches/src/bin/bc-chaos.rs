//! `bc-chaos`: the real gateway under a bounded concurrent load while CUCM misbehaves,
//! one fault at a time; every answer is checked for arrival, deadline and code.
//!
//! Set-up: two simulated CUCM nodes of one cluster (`sim::Simulator`, in this process,
//! port 0) and the real `business-connector` binary as a child process (port 0, its
//! bound address read from its "serving" log line), so that the last phase can send it
//! a real SIGTERM. C clients each own a disjoint set of devices (device n, user n) and
//! cycle login → getloggedinuser → logout → getloggedinuser over them on keep-alive
//! connections, with a short think time, until the phase ends or its request budget is
//! spent.
//!
//! A phase runs `--phase-secs`; its fault is on for the middle half. Each request is
//! classified by when it ran: wholly *before* the fault (normal codes expected),
//! wholly *during* it (the fault's codes expected), or *around* it (in flight when the
//! fault began or ended, or after it: either is accepted, since a node that failed is
//! skipped for a hold-off that outlives the fault). The table counts requests, answers,
//! answers within `deadline_ms + --slack-ms`, expected and unexpected codes, and lost
//! answers (sent, never answered: connection closed or reset, or no answer within
//! `deadline_ms + 3 s`). Exit status 1 when any answer is lost.
//!
//! ```text
//! cargo build --release -p business-connector -p bc-benches --bin business-connector --bin bc-chaos
//! target/release/bc-chaos --phase-secs 8 --concurrency 32
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bc_benches::{device_name, http_request, northbound_body};
use clap::Parser;
use sim::{Behavior, Faults, Latency, SimConfig, SimHandle, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(
    name = "bc-chaos",
    about = "Fault injection under load: every answer arrives, in time, with the right code"
)]
struct Args {
    /// The gateway binary (default: `business-connector` beside this binary).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Seconds per phase; the fault is on for the middle half.
    #[arg(long, default_value_t = 8.0)]
    phase_secs: f64,
    /// Concurrent clients (each one request at a time, keep-alive).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Devices (and users) in use, split among the clients; at least `--concurrency`.
    #[arg(long, default_value_t = 256)]
    devices: usize,
    /// Pause between a client's requests.
    #[arg(long, default_value_t = 5)]
    think_ms: u64,
    /// Upper bound on the requests of one phase.
    #[arg(long, default_value_t = 40_000)]
    max_requests: usize,
    /// The gateway's `deadline_ms`.
    #[arg(long, default_value_t = 3000)]
    deadline_ms: u64,
    /// The cluster's `timeout_ms` (one CUCM call).
    #[arg(long, default_value_t = 2500)]
    timeout_ms: u64,
    /// Lateness tolerated beyond the deadline (client-side measurement, loaded machine).
    #[arg(long, default_value_t = 25)]
    slack_ms: u64,
    /// The simulators' normal latency of every EM call.
    #[arg(long, default_value_t = 2)]
    sim_latency_ms: u64,
    /// Run only these phases (comma-separated names); the shutdown phase always ends a run.
    #[arg(long, value_delimiter = ',')]
    phases: Vec<String>,
    /// Where the gateway's log goes (default: a file in the temp directory).
    #[arg(long)]
    gateway_log: Option<PathBuf>,
}

const APP_ID: &str = "bcapp";
const APP_CERTIFICATE: &str = "bcsecret";
const CLUSTER: &str = "CHAOS";

/// One phase: a fault on some nodes for the middle half, and what it must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Baseline,
    KillNode,
    AllDown,
    Hang,
    Garbage,
    Http500,
    Http503,
    Busy,
    Slow,
    Shutdown,
}

const ALL_PHASES: [Phase; 10] = [
    Phase::Baseline,
    Phase::KillNode,
    Phase::AllDown,
    Phase::Hang,
    Phase::Garbage,
    Phase::Http500,
    Phase::Http503,
    Phase::Busy,
    Phase::Slow,
    Phase::Shutdown,
];

/// What a CUCM with working state answers this load: success, or the state codes a
/// login/logout can meet when an earlier step of the cycle failed (18 another user
/// logged in, 19 nobody logged in).
const NORMAL: &[u32] = &[0, 18, 19];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::KillNode => "kill-node",
            Phase::AllDown => "all-down",
            Phase::Hang => "hang",
            Phase::Garbage => "garbage",
            Phase::Http500 => "http-500",
            Phase::Http503 => "http-503",
            Phase::Busy => "busy",
            Phase::Slow => "slow",
            Phase::Shutdown => "shutdown",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Phase::Baseline => "none",
            Phase::KillNode => {
                "node A refuses connections (listener closed, open connections cut), then re-binds"
            }
            Phase::AllDown => "both nodes refuse connections, then re-bind",
            Phase::Hang => "both nodes accept EM calls and never answer",
            Phase::Garbage => "both nodes answer HTTP 200 with HTML",
            Phase::Http500 => "both nodes answer HTTP 500",
            Phase::Http503 => "node A answers HTTP 503 (node B healthy)",
            Phase::Busy => "both nodes answer every 2nd login/logout with code 26",
            Phase::Slow => "both nodes take 2 s per EM call",
            Phase::Shutdown => "SIGTERM to the gateway at half time",
        }
    }

    /// Codes expected from a request wholly inside the fault.
    fn during(self) -> &'static [u32] {
        match self {
            Phase::Baseline | Phase::KillNode | Phase::Http503 => NORMAL,
            // Every node failed or timed out; or shed because the wait outlasts the deadline.
            Phase::AllDown | Phase::Hang => &[1003, 1004],
            Phase::Garbage => &[1005],
            Phase::Http500 => &[1003],
            // 26 is retried with back-off, never passed on.
            Phase::Busy => &[0, 18, 19, 1004],
            // Calls take 2 s: some finish, some are shed, some run out of deadline.
            Phase::Slow => &[0, 18, 19, 1003, 1004],
            // Requests accepted before the server stopped accepting finish normally.
            Phase::Shutdown => NORMAL,
        }
    }

    /// Extra codes tolerated around the fault (in flight when it began or ended).
    fn around(self) -> &'static [u32] {
        match self {
            // A call cut by the kill may have reached CUCM: 1003, never re-sent.
            Phase::KillNode => &[1003],
            _ => &[],
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 || args.devices < args.concurrency || args.phase_secs <= 0.0 {
        bail!("need --concurrency ≥ 1, --devices ≥ --concurrency and --phase-secs > 0");
    }
    let mut phases: Vec<Phase> = if args.phases.is_empty() {
        ALL_PHASES.to_vec()
    } else {
        let mut chosen = Vec::new();
        for name in &args.phases {
            match ALL_PHASES.iter().find(|p| p.name() == name) {
                Some(phase) => chosen.push(*phase),
                None => bail!("unknown phase {name:?}"),
            }
        }
        chosen
    };
    // The gateway does not come back after SIGTERM: shutdown can only be last.
    if let Some(at) = phases.iter().position(|p| *p == Phase::Shutdown) {
        phases.remove(at);
        phases.push(Phase::Shutdown);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let lost = runtime.block_on(run(args, phases))?;
    if lost > 0 {
        eprintln!("bc-chaos: {lost} answer(s) lost");
        std::process::exit(1);
    }
    Ok(())
}

/// Both simulated nodes and the gateway process; the child is killed if still alive
/// when this is dropped (an error path), so no gateway outlives the tool.
struct Lab {
    nodes: [SimHandle; 2],
    gateway: Mutex<Child>,
    gateway_pid: u32,
    addr: String,
    log: PathBuf,
    base_behavior: Behavior,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let gateway = self.gateway.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = gateway.try_wait() {
            let _ = gateway.kill();
            let _ = gateway.wait();
        }
    }
}

async fn run(args: Args, phases: Vec<Phase>) -> anyhow::Result<usize> {
    let lab = start_lab(&args)?;
    println!(
        "bc-chaos: gateway {} (log {}), nodes {} and {}, {} clients over {} devices, \
         {} s per phase, deadline_ms {}, timeout_ms {}",
        lab.addr,
        lab.log.display(),
        lab.nodes[0].url(),
        lab.nodes[1].url(),
        args.concurrency,
        args.devices,
        args.phase_secs,
        args.deadline_ms,
        args.timeout_ms
    );
    let lab = Arc::new(lab);
    let mut clients: Vec<Client> = (0..args.concurrency)
        .map(|id| Client::new(id, &args, &lab.addr))
        .collect();
    let mut reports = Vec::new();
    let mut shutdown_exit = None;
    for phase in phases {
        settle(&lab, &args).await;
        let (report, back, exit) = run_phase(phase, &args, lab.clone(), clients).await?;
        clients = back;
        eprintln!(
            "bc-chaos: {} done: {} requests, {} lost",
            phase.name(),
            report.requests,
            report.lost.len()
        );
        reports.push(report);
        if exit.is_some() {
            shutdown_exit = exit;
        }
    }
    print!("{}", render(&reports, &args, shutdown_exit));
    Ok(reports.iter().map(|r| r.lost.len()).sum())
}

fn start_lab(args: &Args) -> anyhow::Result<Lab> {
    let base_behavior = Behavior {
        latency: Latency::Fixed(Duration::from_millis(args.sim_latency_ms)),
        ..Behavior::default()
    };
    let node = || {
        Simulator::start(SimConfig {
            devices: args.devices,
            users: args.devices,
            behavior: base_behavior.clone(),
            ..SimConfig::default()
        })
        .context("starting a simulated node")
    };
    let nodes = [node()?, node()?];
    let config = format!(
        "listen = \"127.0.0.1:0\"\n\
         deadline_ms = {deadline}\n\
         shutdown_grace_ms = 5000\n\
         workers = 1\n\
         \n\
         [[cluster]]\n\
         code = \"{CLUSTER}\"\n\
         nodes = [\"{a}\", \"{b}\"]\n\
         max_concurrent = 5\n\
         # the load is about faults, not the rate limit\n\
         max_requests_per_second = 0\n\
         timeout_ms = {timeout}\n\
         # every answer reflects a CUCM call, so a 0 under a fault is never a cached one\n\
         cache_ttl_ms = 0\n",
        deadline = args.deadline_ms,
        timeout = args.timeout_ms,
        a = nodes[0].url(),
        b = nodes[1].url(),
    );
    let pid = std::process::id();
    let config_path = std::env::temp_dir().join(format!("bc-chaos-{pid}.toml"));
    std::fs::write(&config_path, config).context("writing the gateway config")?;
    let log = args
        .gateway_log
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("bc-chaos-{pid}-gateway.log")));
    let bin = match &args.gateway_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("business-connector"),
    };
    let mut gateway = Command::new(&bin)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = gateway.stdout.take().context("gateway stdout")?;
    // The bound address is in the "serving" line; a reader thread finds it, then copies
    // the rest of the log to the file (a full pipe would only cost the gateway its log
    // lines, but they are the evidence when an answer is lost).
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.clone();
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&log_path).ok();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !sent && line.contains("serving") {
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("listen="))
                {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
            if let Some(file) = file.as_mut() {
                let _ = std::io::Write::write_all(file, line.as_bytes());
            }
            line.clear();
        }
    });
    let mut lab = Lab {
        nodes,
        gateway_pid: gateway.id(),
        gateway: Mutex::new(gateway),
        addr: String::new(),
        log,
        base_behavior,
    };
    lab.addr = rx
        .recv_timeout(Duration::from_secs(20))
        .context("the gateway did not log its address within 20 s")?;
    Ok(lab)
}

/// Back to normal between phases: faults off, then until a query succeeds (a node
/// that failed is skipped for a hold-off, and that must not leak into the next phase's
/// "before"). Bounded: a gateway that does not recover shows in the next table row.
async fn settle(lab: &Arc<Lab>, args: &Args) {
    let behavior = lab.base_behavior.clone();
    let nodes = lab.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for node in &nodes.nodes {
            node.set_behavior(behavior.clone());
        }
    })
    .await;
    let mut probe = Connection::new(&lab.addr);
    let request = http_request(
        "POST",
        &lab.addr,
        &format!("/api/getloggedinuser/{}", device_name(args.devices)),
        Some(&northbound_body(APP_ID, APP_CERTIFICATE)),
    );
    let give_up = Instant::now() + Duration::from_secs(35);
    while Instant::now() < give_up {
        let timeout = Duration::from_millis(args.deadline_ms + 3000);
        if let Ok(answer) = probe.exchange(&request, timeout).await {
            if answer.code == Some(0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Login,
    Query,
    Logout,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Login => "login",
            Op::Query => "getloggedinuser",
            Op::Logout => "logout",
        }
    }
}

/// A client's devices and where each is in its login → query → logout → query cycle;
/// kept across phases.
struct Client {
    devices: Vec<usize>,
    steps: Vec<u8>,
    cursor: usize,
    connection: Connection,
    body: String,
}

impl Client {
    fn new(id: usize, args: &Args, addr: &str) -> Self {
        let devices: Vec<usize> = (1..=args.devices)
            .filter(|n| n % args.concurrency == id)
            .collect();
        Self {
            steps: vec![0; devices.len()],
            devices,
            cursor: id, // spread the clients' first steps
            connection: Connection::new(addr),
            body: northbound_body(APP_ID, APP_CERTIFICATE),
        }
    }

    fn next(&mut self, host: &str) -> (Op, usize, Vec<u8>) {
        let slot = self.cursor % self.devices.len();
        self.cursor += 1;
        let n = self.devices[slot];
        let step = self.steps[slot];
        self.steps[slot] = (step + 1) % 4;
        let device = device_name(n);
        let (op, path) = match step {
            0 => (Op::Login, format!("/api/login/{device}/user{n}")),
            2 => (Op::Logout, format!("/api/logout/{device}")),
            _ => (Op::Query, format!("/api/getloggedinuser/{device}")),
        };
        (op, n, http_request("POST", host, &path, Some(&self.body)))
    }
}

/// One request's fate.
#[derive(Debug, Clone)]
struct Sample {
    op: Op,
    device: usize,
    /// Since the phase began.
    started: Duration,
    ended: Duration,
    outcome: Result<Reply, Lost>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lost {
    /// The gateway did not accept the connection.
    Refused,
    /// Closed or reset before any byte of the answer.
    ClosedBeforeAnswer,
    /// Closed or reset in the middle of the answer.
    ClosedMidAnswer,
    /// No answer within `deadline_ms + 3 s`.
    NoAnswer,
    /// An answer that is not HTTP/1.1 as expected.
    Malformed,
}

#[derive(Debug, Clone, Copy)]
struct Reply {
    status: u16,
    code: Option<u32>,
}

/// When the fault was switched on and off, relative to the phase start.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    on_begin: Duration,
    on_done: Duration,
    off_begin: Duration,
    off_done: Duration,
}

async fn run_phase(
    phase: Phase,
    args: &Args,
    lab: Arc<Lab>,
    clients: Vec<Client>,
) -> anyhow::Result<(PhaseReport, Vec<Client>, Option<String>)> {
    let length = Duration::from_secs_f64(args.phase_secs);
    for node in &lab.nodes {
        node.reset_stats();
    }
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let budget = Arc::new(AtomicUsize::new(args.max_requests));
    let client_timeout = Duration::from_millis(args.deadline_ms + 3000);
    let think = Duration::from_millis(args.think_ms);
    let mut tasks = Vec::new();
    for mut client in clients {
        let (stop, budget, host) = (stop.clone(), budget.clone(), lab.addr.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            // Bounded twice: by the phase's end and by its request budget.
            while !stop.load(Ordering::Relaxed)
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            {
                let (op, device, request) = client.next(&host);
                let started = start.elapsed();
                let outcome = client.connection.exchange(&request, client_timeout).await;
                samples.push(Sample {
                    op,
                    device,
                    started,
                    ended: start.elapsed(),
                    outcome,
                });
                tokio::time::sleep(think).await;
            }
            (client, samples)
        }));
    }

    let mut window = None;
    let mut exit = None;
    let mut sigterm_at = None;
    if phase == Phase::Shutdown {
        tokio::time::sleep_until((start + length / 2).into()).await;
        sigterm_at = Some(start.elapsed());
        let pid = lab.gateway_pid.to_string();
        // A real SIGTERM: the gateway's own signal handling is under test too.
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
    } else if phase != Phase::Baseline {
        tokio::time::sleep_until((start + length / 4).into()).await;
        let on_begin = start.elapsed();
        apply(&lab, phase, true).await;
        let on_done = start.elapsed();
        tokio::time::sleep_until((start + length * 3 / 4).into()).await;
        let off_begin = start.elapsed();
        apply(&lab, phase, false).await;
        window = Some(Window {
            on_begin,
            on_done,
            off_begin,
            off_done: start.elapsed(),
        });
    }
    tokio::time::sleep_until((start + length).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut back = Vec::new();
    let mut samples = Vec::new();
    for task in tasks {
        let (client, mut mine) = task.await?;
        back.push(client);
        samples.append(&mut mine);
    }
    if phase == Phase::Shutdown {
        exit = Some(wait_exit(&lab, Duration::from_secs(10)).await);
    }
    let mut report = PhaseReport::new(phase, args, window, sigterm_at, samples);
    // What CUCM saw: proof that the fault was really served, and where the load went.
    for (index, node) in lab.nodes.iter().enumerate() {
        let stats = node.stats();
        report.node_calls[index] = stats.calls_total;
        report.faults_served += stats.faults_served;
        report.busy_answers += stats.busy_answers;
    }
    Ok((report, back, exit))
}

/// Switches the phase's fault on or off; the simulator calls block until done.
async fn apply(lab: &Arc<Lab>, phase: Phase, on: bool) {
    let lab = lab.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let base = lab.base_behavior.clone();
        let faulted = |faults: Faults| Behavior {
            faults,
            ..base.clone()
        };
        let behavior = if !on {
            base.clone()
        } else {
            match phase {
                Phase::KillNode | Phase::AllDown => faulted(Faults {
                    refuse: true,
                    ..Faults::default()
                }),
                Phase::Hang => faulted(Faults {
                    hang: true,
                    ..Faults::default()
                }),
                Phase::Garbage => faulted(Faults {
                    garbage: true,
                    ..Faults::default()
                }),
                Phase::Http500 => faulted(Faults {
                    http_status: Some(500),
                    ..Faults::default()
                }),
                Phase::Http503 => faulted(Faults {
                    http_status: Some(503),
                    ..Faults::default()
                }),
                Phase::Busy => faulted(Faults {
                    busy_every: Some(2),
                    ..Faults::default()
                }),
                Phase::Slow => Behavior {
                    latency: Latency::Fixed(Duration::from_secs(2)),
                    ..Behavior::default()
                },
                Phase::Baseline | Phase::Shutdown => base.clone(),
            }
        };
        let only_node_a = matches!(phase, Phase::KillNode | Phase::Http503);
        for (index, node) in lab.nodes.iter().enumerate() {
            if index == 0 || !only_node_a {
                node.set_behavior(behavior.clone());
            }
        }
    })
    .await;
}

/// The gateway's exit after SIGTERM, polled (bounded); killed if it outlives the bound.
async fn wait_exit(lab: &Arc<Lab>, limit: Duration) -> String {
    let give_up = Instant::now() + limit;
    loop {
        let polled = lab
            .gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait();
        match polled {
            Ok(Some(status)) => return format!("exited by itself: {status}"),
            Ok(None) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(None) => {
                let mut gateway = lab.gateway.lock().unwrap_or_else(|e| e.into_inner());
                let _ = gateway.kill();
                let _ = gateway.wait();
                return format!("still running {} s after SIGTERM: killed", limit.as_secs());
            }
            Err(error) => return format!("unknown ({error})"),
        }
    }
}

#[derive(Debug)]
struct PhaseReport {
    phase: Phase,
    requests: usize,
    answered: usize,
    within_deadline: usize,
    expected: BTreeMap<u32, usize>,
    /// (where, code or HTTP status) → count
    unexpected: BTreeMap<(String, String), usize>,
    lost: Vec<Sample>,
    /// Shutdown phase: requests sent after SIGTERM that were not accepted.
    refused_after_sigterm: usize,
    late: Vec<Sample>,
    /// The first few answers with an unexpected code, for the details.
    odd: Vec<Sample>,
    /// Shutdown phase: requests in flight when SIGTERM was sent, and how many of them
    /// were answered.
    in_flight_at_sigterm: (usize, usize),
    max_ms: u64,
    /// First success of a request sent after the fault was switched off.
    recovered_after: Option<Duration>,
    window: Option<Window>,
    sigterm_at: Option<Duration>,
    node_calls: [u64; 2],
    faults_served: u64,
    busy_answers: u64,
}

impl PhaseReport {
    fn new(
        phase: Phase,
        args: &Args,
        window: Option<Window>,
        sigterm_at: Option<Duration>,
        samples: Vec<Sample>,
    ) -> Self {
        let limit = Duration::from_millis(args.deadline_ms + args.slack_ms);
        let mut report = PhaseReport {
            phase,
            requests: samples.len(),
            answered: 0,
            within_deadline: 0,
            expected: BTreeMap::new(),
            unexpected: BTreeMap::new(),
            lost: Vec::new(),
            refused_after_sigterm: 0,
            late: Vec::new(),
            odd: Vec::new(),
            in_flight_at_sigterm: (0, 0),
            max_ms: 0,
            recovered_after: None,
            window,
            sigterm_at,
            node_calls: [0; 2],
            faults_served: 0,
            busy_answers: 0,
        };
        for sample in samples {
            let took = sample.ended - sample.started;
            if let Some(at) = sigterm_at {
                if sample.started < at && sample.ended > at {
                    report.in_flight_at_sigterm.0 += 1;
                    report.in_flight_at_sigterm.1 += usize::from(sample.outcome.is_ok());
                }
            }
            report.max_ms = report.max_ms.max(took.as_millis() as u64);
            let reply = match sample.outcome {
                Ok(reply) => reply,
                Err(lost) => {
                    // After SIGTERM the gateway stops accepting: a request sent then and
                    // refused or closed before any answer byte was never accepted.
                    let after_sigterm = sigterm_at.is_some_and(|at| sample.started >= at);
                    let unaccepted = matches!(lost, Lost::Refused | Lost::ClosedBeforeAnswer);
                    if after_sigterm && unaccepted {
                        report.refused_after_sigterm += 1;
                    } else {
                        report.lost.push(sample);
                    }
                    continue;
                }
            };
            report.answered += 1;
            if took <= limit {
                report.within_deadline += 1;
            }
            let (place, allowed): (&str, Vec<u32>) = match window {
                None => ("", NORMAL.to_vec()),
                Some(w) if sample.ended <= w.on_begin => ("before", NORMAL.to_vec()),
                Some(w) if sample.started >= w.on_done && sample.ended <= w.off_begin => {
                    ("during", phase.during().to_vec())
                }
                Some(_) => ("around", [NORMAL, phase.during(), phase.around()].concat()),
            };
            if let Some(w) = window {
                if reply.code == Some(0)
                    && sample.started >= w.off_done
                    && report
                        .recovered_after
                        .is_none_or(|r| sample.ended - w.off_done < r)
                {
                    report.recovered_after = Some(sample.ended - w.off_done);
                }
            }
            // A getloggedinuser never meets the login/logout state codes.
            let fits = match (reply.status, reply.code) {
                (200, Some(code)) if code != 1004 => {
                    allowed.contains(&code) && !(sample.op == Op::Query && matches!(code, 18 | 19))
                }
                (503, Some(1004)) => allowed.contains(&1004),
                _ => false,
            };
            if fits {
                *report.expected.entry(reply.code.unwrap_or(0)).or_default() += 1;
            } else {
                let what = match reply.code {
                    Some(code) if reply.status == 200 || reply.status == 503 => code.to_string(),
                    Some(code) => format!("{code} (HTTP {})", reply.status),
                    None => format!("HTTP {} without code", reply.status),
                };
                let key = (format!("{} {place}", sample.op.label()), what);
                *report.unexpected.entry(key).or_default() += 1;
                if report.odd.len() < 5 {
                    report.odd.push(sample.clone());
                }
            }
            if took > limit {
                report.late.push(sample);
            }
        }
        report
    }
}

fn render(reports: &[PhaseReport], args: &Args, shutdown_exit: Option<String>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| phase | fault (middle half of the phase) | requests | answered | within deadline | expected codes | unexpected codes | lost | max ms | recovered after | CUCM calls A / B | faults served (26s) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"
    );
    for r in reports {
        let expected = r
            .expected
            .iter()
            .map(|(code, n)| format!("{code}×{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let unexpected = if r.unexpected.is_empty() {
            "—".to_string()
        } else {
            r.unexpected
                .iter()
                .map(|((place, what), n)| format!("{what}×{n} ({place})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lost = r.lost.len().to_string();
        if r.refused_after_sigterm > 0 {
            let _ = write!(
                lost,
                " (+{} refused after SIGTERM)",
                r.refused_after_sigterm
            );
        }
        let recovered = match (r.window, r.recovered_after) {
            (None, _) => "—".to_string(),
            (Some(_), Some(after)) => format!("{} ms", after.as_millis()),
            (Some(_), None) => "not within the phase".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} ({}) |",
            r.phase.name(),
            r.phase.description(),
            r.requests,
            r.answered,
            r.within_deadline,
            expected,
            unexpected,
            lost,
            r.max_ms,
            recovered,
            r.node_calls[0],
            r.node_calls[1],
            r.faults_served,
            r.busy_answers
        );
    }
    let _ = writeln!(
        out,
        "\nwithin deadline = answered within deadline_ms {} + {} ms slack, measured by the client.",
        args.deadline_ms, args.slack_ms
    );
    if let Some(status) = shutdown_exit {
        let _ = writeln!(out, "gateway after SIGTERM: {status}.");
    }
    for r in reports {
        let windows = match (r.window, r.sigterm_at) {
            (Some(w), _) => format!(
                "fault on {:.3}–{:.3} s, off {:.3}–{:.3} s",
                w.on_begin.as_secs_f64(),
                w.on_done.as_secs_f64(),
                w.off_begin.as_secs_f64(),
                w.off_done.as_secs_f64()
            ),
            (None, Some(at)) => format!("SIGTERM at {:.3} s", at.as_secs_f64()),
            (None, None) => "no fault".to_string(),
        };
        if r.lost.is_empty() && r.late.is_empty() && r.odd.is_empty() && r.sigterm_at.is_none() {
            continue;
        }
        let _ = writeln!(out, "\n{} ({windows}):", r.phase.name());
        if r.sigterm_at.is_some() {
            let (in_flight, answered) = r.in_flight_at_sigterm;
            let _ = writeln!(
                out,
                "- in flight when SIGTERM was sent: {in_flight}, answered: {answered}"
            );
        }
        for sample in &r.odd {
            let _ = writeln!(out, "- unexpected: {}", describe(sample));
        }
        let mut lost_by: BTreeMap<(Lost, Op), usize> = BTreeMap::new();
        for sample in &r.lost {
            if let Err(cause) = sample.outcome {
                *lost_by.entry((cause, sample.op)).or_default() += 1;
            }
        }
        for ((cause, op), n) in lost_by {
            let _ = writeln!(out, "- lost: {n} × {} ({cause:?})", op.label());
        }
        for sample in r.lost.iter().take(5) {
            let _ = writeln!(out, "  - {}", describe(sample));
        }
        let _ = writeln!(out, "- late: {}", r.late.len());
        let mut late = r.late.iter().collect::<Vec<_>>();
        late.sort_by_key(|s| std::cmp::Reverse(s.ended - s.started));
        for sample in late.iter().take(5) {
            let _ = writeln!(out, "  - {}", describe(sample));
        }
    }
    out
}

fn describe(sample: &Sample) -> String {
    let what = match sample.outcome {
        Ok(reply) => format!(
            "HTTP {} code {}",
            reply.status,
            reply.code.map_or("none".into(), |c| c.to_string())
        ),
        Err(lost) => format!("{lost:?}"),
    };
    format!(
        "{} {} sent at {:.3} s, {what} after {} ms",
        sample.op.label(),
        device_name(sample.device),
        sample.started.as_secs_f64(),
        (sample.ended - sample.started).as_millis()
    )
}

/// A keep-alive HTTP/1.1 connection that reports *how* an exchange failed, which the
/// benchmark client (`bc_benches::Connection`) does not need to.
struct Connection {
    addr: String,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Connection {
    fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            stream: None,
            buffer: Vec::with_capacity(2048),
        }
    }

    /// One request and its whole answer, or why not. Any failure drops the connection.
    async fn exchange(&mut self, request: &[u8], timeout: Duration) -> Result<Reply, Lost> {
        let result = tokio::time::timeout(timeout, self.exchange_inner(request)).await;
        let result = result.unwrap_or(Err(Lost::NoAnswer));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange_inner(&mut self, request: &[u8]) -> Result<Reply, Lost> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|_| Lost::Refused)?;
            let _ = stream.set_nodelay(true);
            self.stream = Some(stream);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(Lost::Refused);
        };
        stream
            .write_all(request)
            .await
            .map_err(|_| Lost::ClosedBeforeAnswer)?;
        self.buffer.clear();
        let closed = |buffer: &Vec<u8>| {
            if buffer.is_empty() {
                Lost::ClosedBeforeAnswer
            } else {
                Lost::ClosedMidAnswer
            }
        };
        let head_end = loop {
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if self.buffer.len() > 64 * 1024 {
                return Err(Lost::Malformed);
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(closed(&self.buffer)),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = std::str::from_utf8(&self.buffer[..head_end]).map_err(|_| Lost::Malformed)?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or(Lost::Malformed)?;
        let mut length = None;
        let mut close = false;
        for line in head.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let length = length.ok_or(Lost::Malformed)?;
        while self.buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(Lost::ClosedMidAnswer),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body = &self.buffer[head_end..head_end + length];
        if close {
            self.stream = None;
        }
        Ok(Reply {
            status,
            code: result_code(body),
        })
    }
}

/// The northbound `<code>`.
fn result_code(body: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<code>")? + "<code>".len();
    let end = start + text[start..].find("</code>")?;
    text[start..end].trim().parse().ok()
}
