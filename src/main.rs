//! `business-connector`: serve the gateway from a TOML config, or the demo without one.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use business_connector::config::{Config, LogFormat};
use business_connector::{demo, preflight, server};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Business Connector: log users in and out of Cisco IP phones (Extension Mobility) across CUCM clusters"
)]
struct Args {
    /// The TOML config file; without it, a demo with an embedded simulated cluster runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override the config's `listen` address (the demo defaults to 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Check the config and exit.
    #[arg(long, requires = "config")]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Read a password and print its Argon2 hash for `[dashboard] users = [{ name = "…",
    /// password_hash = "…" }]`. On a terminal it asks twice without echoing; otherwise it
    /// reads one line from stdin.
    HashPassword,
}

#[actix_web::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::HashPassword) => hash_password(),
        None => serve(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line, never a backtrace: a CLI error reads the same
            // whatever RUST_BACKTRACE says.
            eprintln!("business-connector: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line; a cause already spelled out by the message
/// before it is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let (demo_sim, config) = match &args.config {
        Some(path) => {
            let mut config = Config::load(path)?;
            if args.check_config {
                // The files the config names, as the start would read them; no binding.
                preflight::check(&config)?;
                println!("config OK: {} cluster(s)", config.clusters.len());
                return Ok(());
            }
            if let Some(listen) = args.listen {
                config.listen = listen;
            }
            (None, config)
        }
        None => {
            let listen = args
                .listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
            let (sim, mut config) =
                demo::start(listen).context("starting the demo's simulated cluster")?;
            // No balancer watches the demo: Ctrl-C stops it without the drain.
            config.drain_ms = 0;
            (Some(sim), config)
        }
    };
    let _log_writer = init_logging(config.log_format);

    // Everything that can fail happens before the "serving" line: binding here, the
    // files, the history and the clusters in server::start.
    let listener = TcpListener::bind(config.listen)
        .with_context(|| format!("listen {}: cannot bind", config.listen))?;
    let bound = listener.local_addr()?;
    let clusters = config.clusters.len();
    // From here on a SIGHUP must not stop the gateway, and SIGTERM/SIGINT must drain it.
    #[cfg(unix)]
    survive_hangup();
    let shutdown = shutdown_signal();
    let started = server::start(listener, config).await?;
    tracing::info!(listen = %bound, clusters, "business-connector {} serving", env!("CARGO_PKG_VERSION"));
    if demo_sim.is_some() {
        tracing::info!("{}", demo::curl_examples(&bound.to_string()));
    }
    started.until(shutdown).await?;
    drop(demo_sim);
    tracing::info!("stopped");
    Ok(())
}

/// `business-connector hash-password`: a password → a PHC string on stdout. On a
/// terminal it prompts (on stderr) twice without echo; from a pipe it reads the first
/// line. Nothing but the hash goes to stdout, so `$(…)` captures it.
fn hash_password() -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let password = if std::io::stdin().is_terminal() {
        let first = read_hidden("Password: ")?;
        let again = read_hidden("Again: ")?;
        anyhow::ensure!(first == again, "the two passwords differ");
        first
    } else {
        read_line().context("reading the password from stdin")?
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    let hash = business_connector::dashboard::password::hash_password(&password)?;
    println!("{hash}");
    Ok(())
}

/// One line of stdin without its line end.
fn read_line() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    Ok(password.strip_suffix('\r').unwrap_or(password).to_string())
}

/// One line from the terminal with its echo off, after `prompt` on stderr (the echo is
/// restored on every way out, errors included).
#[cfg(unix)]
fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    /// Puts the terminal's settings back when dropped.
    struct EchoOff(libc::termios);
    impl Drop for EchoOff {
        fn drop(&mut self) {
            // SAFETY: fd 0 is the terminal tcgetattr read these settings from.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
        }
    }
    // SAFETY: a zeroed termios is a valid out-parameter; fd 0 is a terminal (checked).
    let mut settings: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(0, &mut settings) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the terminal settings");
    }
    let restore = EchoOff(settings);
    settings.c_lflag &= !libc::ECHO;
    // SAFETY: settings came from tcgetattr on the same fd.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &settings) } != 0 {
        return Err(std::io::Error::last_os_error()).context("turning the echo off");
    }
    // The prompt only once the echo is off: whatever is typed after it stays hidden.
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let line = read_line().context("reading the password");
    drop(restore);
    // The Enter the user typed was not echoed either.
    eprintln!();
    line
}

#[cfg(not(unix))]
fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    anyhow::bail!("{prompt}no hidden terminal input on this platform: pipe the password in")
}

/// Logs go through a background thread that writes them in batches: the request path
/// never waits on a `write(2)` per line. The returned guard flushes on exit. Lines are
/// dropped (and counted by tracing-appender) only if 128k are already waiting.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) =
        tracing_appender::non_blocking(std::io::BufWriter::new(std::io::stdout()));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

/// systemd's `ExecReload` sends SIGHUP, whose default action would end the process
/// (and as a "clean" signal, without a restart). Here it is only logged; with `[tls]`,
/// `tls::reload_on_sighup` re-reads the certificate and key on the same signal, and
/// `watch::reload_on_sighup` the `[watch]` devices and certificate files.
#[cfg(unix)]
fn survive_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            actix_web::rt::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP: TLS certificates are re-read when [tls] is set, and the [watch] files; the rest of the configuration is read at start only"
                    );
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP; it will stop the gateway"),
    }
}

/// SIGTERM or SIGINT. The handlers are registered when this is called (not when the
/// future is first polled), so a signal that arrives right after the "serving" line
/// still starts the drain instead of ending the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Ok(mut only), Err(error)) | (Err(error), Ok(mut only)) => {
                    tracing::error!(%error, "cannot listen for one of SIGINT/SIGTERM");
                    only.recv().await;
                }
                (Err(error), Err(_)) => {
                    tracing::error!(%error, "cannot listen for SIGINT or SIGTERM; stop the gateway with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
