//! Simulator of one Cisco CUCM cluster's Extension Mobility API (`EMServiceServlet`),
//! the other end of the wire for the gateway's tests, benchmarks and demo.
//!
//! [`Simulator::start`] is synchronous: it binds, runs the server on its own OS thread
//! with its own tokio runtime, and returns a [`SimHandle`] once the address is bound.
//! See `sim/README.md` for the wire behaviour, knobs and statistics.

pub mod config;
mod control;
mod em;
pub mod emapp;
pub mod emcc;
pub mod protocol;
mod server;
pub mod state;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use config::{
    AppUser, Behavior, ConfigError, Faults, Fixture, FixtureDevice, FixtureUser, Latency,
    MultipleLogin, SimConfig, DEFAULT_PIN,
};
pub use control::ControlError;
pub use emapp::{Pin, EMAPP_PATH};
pub use emcc::{EmccError, PeerUrl};
pub use server::ServerError;
pub use state::{seeded_device_name, seeded_user_id, Caller, ClusterState, EmError};
pub use stats::{CallKind, CallRecord, FaultKind, SimStats, CALL_LOG_CAPACITY};

use em::EmService;
use server::{ListenerStatus, Shared, LISTENER_APPLY_TIMEOUT};

/// Path of the EM service on the simulator (as on CUCM).
pub const EM_PATH: &str = server::EM_PATH;

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot build the simulator runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the simulator thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot generate the TLS certificate: {0}")]
    Certificate(String),
    #[error("the simulator thread ended during start-up")]
    StartupAborted,
    #[error(transparent)]
    EmccPeer(#[from] EmccError),
}

/// Entry point; see [`Simulator::start`].
pub struct Simulator;

/// Addresses reported by the server thread once bound.
struct Bound {
    addr: SocketAddr,
    control_addr: SocketAddr,
}

impl Simulator {
    /// Builds the cluster state, binds the EM address (and a separate control address on
    /// the same IP), and serves them on a dedicated thread with its own tokio runtime
    /// (`config.threads` workers; 1 = current-thread runtime). Returns once bound.
    pub fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let state = Arc::new(ClusterState::from_config(&config));
        let peers = config
            .emcc_peers
            .iter()
            .map(|p| PeerUrl::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let em = EmService::new(state, config.max_concurrent, config.behavior.clone());
        *em.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
        *em.trusted_ips.write().unwrap_or_else(|e| e.into_inner()) =
            config.emapp_trusted_ips.clone();
        let shared = Arc::new(Shared {
            em,
            listener: ListenerStatus::default(),
        });

        let (tls, ca_pem) = if config.tls {
            let (acceptor, pem) = self_signed_acceptor(config.listen)?;
            (Some(acceptor), Some(pem))
        } else {
            (None, None)
        };

        let runtime = if config.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.threads)
                .thread_name("cucm-sim-worker")
                .enable_all()
                .build()
        }
        .map_err(SimError::Runtime)?;

        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Bound, ServerError>>();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_shared = shared.clone();
        let listen = config.listen;
        let thread = std::thread::Builder::new()
            .name("cucm-sim".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let bound = server::bind_listener(listen).and_then(|em| {
                        let addr = em.local_addr().map_err(|source| ServerError::Bind {
                            addr: listen,
                            source,
                        })?;
                        let control_listen = SocketAddr::new(addr.ip(), 0);
                        let control = server::bind_listener(control_listen)?;
                        let control_addr =
                            control.local_addr().map_err(|source| ServerError::Bind {
                                addr: control_listen,
                                source,
                            })?;
                        Ok((em, addr, control, control_addr))
                    });
                    let (em, addr, control, control_addr) = match bound {
                        Ok(bound) => bound,
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    // Honour `refuse` given at start: the accept loop closes at once.
                    tokio::spawn(server::run_em_listener(
                        thread_shared.clone(),
                        Some(em),
                        addr,
                        tls,
                    ));
                    tokio::spawn(server::run_control_listener(thread_shared, control));
                    let _ = ready_tx.send(Ok(Bound { addr, control_addr }));
                    // Runs until stop()/drop; the sender side vanishing also ends it.
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime cancels every task, including hung calls.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(SimError::Thread)?;

        let bound = match ready_rx.recv() {
            Ok(Ok(bound)) => bound,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(SimError::StartupAborted);
            }
        };
        if config.behavior.faults.refuse {
            shared.listener.wait_blocking(true, LISTENER_APPLY_TIMEOUT);
        }
        tracing::debug!(addr = %bound.addr, control = %bound.control_addr, "CUCM simulator started");
        Ok(SimHandle {
            shared,
            addr: bound.addr,
            control_addr: bound.control_addr,
            tls: config.tls,
            ca_pem,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }
}

/// Generates a self-signed certificate for `localhost`, `127.0.0.1` (and the listen IP
/// when it is a specific other address).
fn self_signed_acceptor(
    listen: SocketAddr,
) -> Result<(tokio_rustls::TlsAcceptor, String), SimError> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    if ip.is_loopback() && ip.is_ipv6() {
        names.push("::1".to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| SimError::Certificate(e.to_string()))?;
    let pem = certified.cert.pem();
    let acceptor = server::tls_acceptor(
        certified.cert.der().to_vec(),
        certified.signing_key.serialize_der(),
    )?;
    Ok((acceptor, pem))
}

/// A running simulator. Stops on [`SimHandle::stop`] or drop.
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    control_addr: SocketAddr,
    tls: bool,
    ca_pem: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The EM service address (stays the same across `refuse` on/off).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:PORT/emservice/EMServiceServlet`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{EM_PATH}", self.addr)
    }

    /// The separate control address: plain HTTP, `/_sim/*` only, reachable even under `refuse`.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// `http://127.0.0.1:PORT/_sim` on the control address.
    pub fn control_url(&self) -> String {
        format!("http://{}/_sim", self.control_addr)
    }

    /// PEM of the self-signed certificate (use as the CA) when TLS is on.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// Snapshot of counters and call log.
    pub fn stats(&self) -> SimStats {
        self.shared.em.stats.snapshot(true)
    }

    /// Zeroes counters and maxima and clears the call log (EM state is kept).
    pub fn reset_stats(&self) {
        self.shared.em.stats.reset();
    }

    /// Replaces latency and faults. Returns once a `refuse` change is in effect
    /// (listener closed / re-bound), so the next connect sees it.
    pub fn set_behavior(&self, behavior: Behavior) {
        let refuse = self.shared.replace_behavior(behavior);
        if !self
            .shared
            .listener
            .wait_blocking(refuse, LISTENER_APPLY_TIMEOUT)
        {
            tracing::warn!(
                refuse,
                "listener did not reach the requested refuse state in time"
            );
        }
    }

    /// Convenience: replaces only the faults, keeping the latency.
    pub fn set_faults(&self, faults: Faults) {
        let mut behavior = self.behavior();
        behavior.faults = faults;
        self.set_behavior(behavior);
    }

    pub fn behavior(&self) -> Behavior {
        self.shared.em.behavior.borrow().clone()
    }

    /// The user logged in on `device` (case-insensitive), if any.
    pub fn logged_in_user(&self, device: &str) -> Option<String> {
        self.shared.em.state.logged_in_user(device)
    }

    /// Devices `user` is logged in on, in login order.
    pub fn devices_of_user(&self, user: &str) -> Vec<String> {
        self.shared.em.state.devices_of_user(user)
    }

    /// Test setup shortcut: logs `user` in on `device` with their default profile,
    /// bypassing credentials, gate, latency, faults and stats, but applying the state
    /// rules (11, 22, 23, 12, 18, 25/auto-logout). True on success.
    pub fn login_directly(&self, device: &str, user: &str) -> bool {
        self.shared
            .em
            .state
            .login(&Caller::ProxyApp, device, user, None)
            .is_ok()
    }

    /// Test setup shortcut: logs out whoever is on `device`. True if someone was.
    pub fn logout_directly(&self, device: &str) -> bool {
        self.shared
            .em
            .state
            .logout(&Caller::ProxyApp, device)
            .is_ok()
    }

    /// `http(s)://127.0.0.1:PORT/emapp/EMAppServlet` (same listener as [`SimHandle::url`]).
    pub fn emapp_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{EMAPP_PATH}", self.addr)
    }

    /// Sets the PIN of a user defined on this simulator (their home). False if the user
    /// is not defined here. Users without a PIN set have [`DEFAULT_PIN`].
    pub fn set_pin(&self, user: &str, pin: &str) -> bool {
        self.shared.em.state.set_pin(user, Pin::new(pin))
    }

    /// Adds an EMCC peer: another simulator's `url()` (or `http(s)://HOST:PORT`, or
    /// `HOST:PORT`). Users not defined here are looked up at the peers, in the order
    /// added. Call it on both simulators for a symmetric EMCC set.
    pub fn add_emcc_peer(&self, peer: &str) -> Result<(), EmccError> {
        let peer = PeerUrl::parse(peer)?;
        let mut peers = self
            .shared
            .em
            .peers
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !peers.contains(&peer) {
            peers.push(peer);
        }
        Ok(())
    }

    /// The EMCC peers, as `http(s)://HOST:PORT`.
    pub fn emcc_peers(&self) -> Vec<String> {
        self.shared
            .em
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// EMApp "Validate IP Address": `Some(ips)` = only these callers (else `(28)`);
    /// `None` = no check (default).
    pub fn set_emapp_trusted_ips(&self, ips: Option<Vec<std::net::IpAddr>>) {
        *self
            .shared
            .em
            .trusted_ips
            .write()
            .unwrap_or_else(|e| e.into_inner()) = ips;
    }

    /// Home side of EMCC: devices of other simulators that `user` (defined here) is
    /// visiting, as recorded by the EMCC checks.
    pub fn emcc_visits_of_user(&self, user: &str) -> Vec<String> {
        self.shared.em.state.visits_of_user(user)
    }

    /// Whether the user on `device` is an EMCC visitor (`<emccDevice>yes`).
    pub fn is_emcc_visitor(&self, device: &str) -> bool {
        self.shared
            .em
            .state
            .device_user_query(&[device.to_string()])
            .iter()
            .any(|a| matches!(a, protocol::DeviceUserAnswer::Known { emcc: true, .. }))
    }

    /// Stops the server and its thread (in-flight and hung calls are dropped).
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("url", &self.url())
            .field("control_addr", &self.control_addr)
            .finish()
    }
}
