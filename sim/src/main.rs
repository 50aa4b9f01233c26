//! `cucm-sim`: run the CUCM Extension Mobility simulator from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sim::{AppUser, Behavior, Faults, Fixture, Latency, MultipleLogin, SimConfig, Simulator};

/// Simulates one Cisco CUCM cluster's Extension Mobility API (EMServiceServlet).
#[derive(Debug, Parser)]
#[command(name = "cucm-sim", version)]
struct Cli {
    /// Address of the EM service (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seed N devices SEP000000000001.. (EM enabled).
    #[arg(long, default_value_t = 0)]
    devices: usize,
    /// Seed N end users user1.. with profile userN-UDP.
    #[arg(long, default_value_t = 0)]
    users: usize,
    /// TOML or JSON (.json) fixture with devices, users and app users.
    #[arg(long)]
    fixture: Option<PathBuf>,
    /// Extra application user ID:CERTIFICATE (with proxy rights); repeatable.
    /// bcapp:bcsecret is always present unless --no-default-app.
    #[arg(long = "app-user", value_name = "ID:CERT")]
    app_users: Vec<String>,
    /// Do not create the default application user bcapp/bcsecret.
    #[arg(long)]
    no_default_app: bool,
    /// Serve HTTPS with a generated self-signed certificate.
    #[arg(long)]
    tls: bool,
    /// Write the self-signed certificate (PEM) to this file (with --tls).
    #[arg(long, value_name = "FILE")]
    ca_out: Option<PathBuf>,
    /// CUCM "Maximum Concurrent Requests" (login/logout ops at once; above → code 26).
    #[arg(long, default_value_t = 5)]
    max_concurrent: usize,
    /// Fixed latency of login/logout in milliseconds.
    #[arg(long, value_name = "MS", conflicts_with = "latency_uniform_ms")]
    latency_ms: Option<String>,
    /// Uniform latency MIN..MAX in milliseconds, e.g. 50..150.
    #[arg(long, value_name = "MIN..MAX")]
    latency_uniform_ms: Option<String>,
    /// Latency of queries: MS or MIN..MAX (default: same as login/logout).
    #[arg(long, value_name = "MS|MIN..MAX")]
    query_latency_ms: Option<String>,
    /// CUCM "Multiple Login Behavior".
    #[arg(
        long,
        default_value = "not-allowed",
        value_name = "not-allowed|allowed|auto-logout"
    )]
    multiple_login: String,
    /// Runtime worker threads (1 = single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Fault: every Nth login/logout answers code 26.
    #[arg(long, value_name = "N")]
    busy_every: Option<u32>,
    /// Fault: every EM call answers <error code="N"> (0 allowed).
    #[arg(long, value_name = "N")]
    fail_code: Option<u32>,
    /// Fault: every EM call answers this HTTP status (e.g. 503).
    #[arg(long, value_name = "STATUS")]
    http_status: Option<u16>,
    /// Fault: answer HTTP 200 with an HTML body.
    #[arg(long)]
    garbage: bool,
    /// Fault: accept EM calls and never answer.
    #[arg(long)]
    hang: bool,
    /// EMCC peer: another simulator's EM URL (or HOST:PORT) asked about users not
    /// defined here; repeatable.
    #[arg(long = "emcc-peer", value_name = "URL")]
    emcc_peers: Vec<String>,
    /// EMApp "Validate IP Address": only this caller IP may use EMApp (others get
    /// (28)); repeatable. Without it, no check.
    #[arg(long = "emapp-trusted-ip", value_name = "IP")]
    emapp_trusted_ips: Vec<std::net::IpAddr>,
}

fn parse_app_user(text: &str) -> anyhow::Result<AppUser> {
    let (id, cert) = text
        .split_once(':')
        .with_context(|| format!("--app-user {text:?}: expected ID:CERTIFICATE"))?;
    Ok(AppUser {
        app_id: id.to_string(),
        app_certificate: cert.to_string(),
        proxy_rights: true,
    })
}

fn config_from(cli: &Cli) -> anyhow::Result<SimConfig> {
    let latency = match (&cli.latency_ms, &cli.latency_uniform_ms) {
        (Some(ms), _) | (None, Some(ms)) => Latency::parse_ms(ms)?,
        (None, None) => Latency::None,
    };
    let query_latency = cli
        .query_latency_ms
        .as_deref()
        .map(Latency::parse_ms)
        .transpose()?;
    let (fixture, pins) = match cli.fixture.as_deref() {
        Some(path) => {
            let (fixture, pins) = Fixture::load_with_pins(path).context("loading the fixture")?;
            (Some(fixture), pins)
        }
        None => (None, Default::default()),
    };
    for peer in &cli.emcc_peers {
        sim::PeerUrl::parse(peer)?;
    }
    let mut app_users = if cli.no_default_app {
        Vec::new()
    } else {
        vec![AppUser::default_gateway_app()]
    };
    for text in &cli.app_users {
        app_users.push(parse_app_user(text)?);
    }
    Ok(SimConfig {
        listen: cli.listen,
        devices: cli.devices,
        users: cli.users,
        fixture,
        app_users,
        max_concurrent: cli.max_concurrent,
        multiple_login: cli.multiple_login.parse::<MultipleLogin>()?,
        behavior: Behavior {
            latency,
            query_latency,
            faults: Faults {
                hang: cli.hang,
                http_status: cli.http_status,
                garbage: cli.garbage,
                refuse: false,
                busy_every: cli.busy_every,
                fail_code: cli.fail_code,
            },
        },
        tls: cli.tls,
        threads: cli.threads.max(1),
        pins,
        emcc_peers: cli.emcc_peers.clone(),
        emapp_trusted_ips: (!cli.emapp_trusted_ips.is_empty())
            .then(|| cli.emapp_trusted_ips.clone()),
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let config = config_from(&cli)?;
    let handle = Simulator::start(config).context("starting the simulator")?;
    if let (Some(path), Some(pem)) = (&cli.ca_out, handle.ca_pem()) {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
        println!("CA certificate written to {}", path.display());
    }
    println!("{}", handle.url());
    println!("{}", handle.emapp_url());
    println!("control: {}/stats", handle.control_url());
    tracing::info!(url = %handle.url(), control = %handle.control_url(), "cucm-sim listening");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    runtime.block_on(tokio::signal::ctrl_c())?;
    tracing::info!("stopping");
    handle.stop();
    Ok(())
}
