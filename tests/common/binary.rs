//! The `business-connector` binary as operators run it: a child process started with a
//! config file, its log lines, SIGTERM and its exit; a PostgreSQL database per test; a
//! TCP relay that can cut a connection to a database on demand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_business-connector");

/// A running binary and the address it logged.
pub struct Running {
    pub child: Child,
    pub addr: String,
    /// What it logged before the "serving" line.
    pub early_lines: Vec<String>,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Self {
        Self::start_logging(args, "info")
    }

    pub fn start_logging(args: &[&str], filter: &str) -> Self {
        Self::spawn(args, filter).wait_serving()
    }

    /// Started, not yet serving (several binaries can be started before any is waited
    /// for).
    pub fn spawn(args: &[&str], filter: &str) -> Starting {
        let mut child = Command::new(BINARY)
            .args(args)
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Starting {
            child: Some(child),
            lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(result, 0, "SIGTERM delivered");
    }

    /// SIGTERM, then the exit status (within `timeout`) and every line it logged.
    pub fn stop(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        self.terminate();
        let give_up = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < give_up,
                "still running {timeout:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // The child has exited: the reader ends at its end of output.
        let mut lines = std::mem::take(&mut self.early_lines);
        lines.extend(self.lines.iter());
        (status, lines)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary that has not logged its "serving" line yet.
pub struct Starting {
    /// Taken by `wait_serving`; killed on drop while still here.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl Starting {
    pub fn wait_serving(mut self) -> Running {
        let mut seen = Vec::new();
        let addr = loop {
            let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) else {
                // Never leave a gateway running behind a failed test (Drop kills it).
                panic!("no 'serving' line; saw: {seen:#?}");
            };
            // Text format: `listen=ADDR`; JSON format: `"listen":"ADDR"`.
            let text = line
                .split("listen=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next());
            let json = line
                .split("\"listen\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            if let Some(addr) = text.or(json) {
                break addr.to_string();
            }
            seen.push(line);
        };
        let child = self.child.take().expect("not yet handed on");
        let (_, empty) = mpsc::channel();
        Running {
            child,
            addr,
            early_lines: seen,
            lines: std::mem::replace(&mut self.lines, empty),
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A config file in a temp dir, removed with it.
pub fn write_config(directory: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = directory.join(name);
    std::fs::write(&path, text).expect("config written");
    path
}

/// A test that cannot run here: under `CI=true` that is a failure; elsewhere one line on
/// the real stderr (not the captured one, so cargo shows it for a passing test).
pub fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test}: {reason}, and CI=true: a missing service fails the run");
    }
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

/// A fresh PostgreSQL database on `BC_TEST_POSTGRES_URL`'s server, dropped with this.
pub struct PostgresDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PostgresDatabase {
    /// None (skipped, or failed under CI) without `BC_TEST_POSTGRES_URL`.
    pub fn create(test: &str) -> Option<Self> {
        let Ok(admin_url) = std::env::var("BC_TEST_POSTGRES_URL") else {
            skip_or_fail(
                test,
                "PostgreSQL: BC_TEST_POSTGRES_URL is not set (see history/ci-postgres.sh)",
            );
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bc_gateway_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The blocking client on a thread of its own (tests run inside actix runtimes).
        let admin = admin_url.clone();
        let database = name.clone();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&admin, postgres::NoTls)
                .expect("connect to BC_TEST_POSTGRES_URL");
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
                .expect("drop a leftover database");
            client
                .batch_execute(&format!("CREATE DATABASE {database}"))
                .expect("create the test database");
        })
        .join()
        .expect("database created");
        Some(Self {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        })
    }

    /// The URL with another host:port (through a relay).
    pub fn url_via(&self, address: SocketAddr) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (userinfo, after) = rest.split_once('@').expect("user@host");
        let path = after.split_once('/').map_or("", |(_, path)| path);
        format!("{scheme}://{userinfo}@{address}/{path}")
    }

    /// `SELECT count(*) FROM history WHERE <condition>`, on a thread of its own.
    pub fn count(&self, condition: &str) -> i64 {
        let url = self.url.clone();
        let sql = format!("SELECT count(*) FROM history WHERE {condition}");
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
            client.query_one(&sql, &[]).expect("count").get::<_, i64>(0)
        })
        .join()
        .expect("counted")
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(mut client) = postgres::Client::connect(&admin, postgres::NoTls) {
                let _ =
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}{query}")
}

/// A TCP relay to `target` that can be cut: `cut()` closes every relayed connection and
/// refuses new ones (accepted and closed at once) until `restore()`. Stands in for a
/// database that goes away and comes back, without touching the shared server.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let cut = cut.clone();
            let live = live.clone();
            std::thread::spawn(move || {
                for incoming in listener.incoming() {
                    let Ok(client) = incoming else { continue };
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let mut streams = live.lock().expect("relay lock");
                    for stream in [&client, &server] {
                        if let Ok(clone) = stream.try_clone() {
                            streams.push(clone);
                        }
                    }
                    drop(streams);
                    pipe(&client, &server);
                    pipe(&server, &client);
                }
            });
        }
        Self { addr, cut, live }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.live.lock().expect("relay lock").drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// The PostgreSQL server's address in a `postgres://` URL.
pub fn postgres_address(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("a URL").1;
    let host_port = rest
        .split_once('@')
        .map_or(rest, |(_, after)| after)
        .split(['/', '?'])
        .next()
        .expect("host:port");
    host_port
        .parse()
        .expect("host:port is an IP address and port")
}
