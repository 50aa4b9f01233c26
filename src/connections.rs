//! Northbound connections: how many one client address may hold open, and the
//! process's open-file limit they all need.
//!
//! - Per client: `[access] max_connections_per_client`. Counted when a connection is
//!   established (for TLS, after the handshake); one beyond the cap is closed at once,
//!   so idle connections from one address cannot take what other clients need. A
//!   trusted proxy is not capped (it carries many clients). The count lives in a slot
//!   stored with the connection, released when the connection ends.
//! - Open files: at start the soft `RLIMIT_NOFILE` is raised to the hard limit, and
//!   checked against `max_connections` × workers plus a reserve for CUCM connections,
//!   files and the history database; too low is a warning naming both numbers.
//!
//! The decisions (`Admission::admit`, `plan_open_files`) are pure and unit-tested;
//! `on_connect` and `raise_open_files` only apply them.

use std::any::Any;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use actors::metrics::MetricsError;
use actors::Metrics;
use prometheus::IntCounter;

use crate::access::{AccessConfig, Cidr};
/// Files the process needs besides northbound connections: CUCM connections, logs,
/// the history database, TLS files.
pub const RESERVED_FILES: u64 = 256;

/// Open connections per client address, capped.
#[derive(Debug)]
pub struct Admission {
    per_client: usize,
    trusted_proxies: Vec<Cidr>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it (with the connection) frees its place.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    client: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(client) = self.client else {
            return;
        };
        let mut open = self.admission.lock();
        if let Some(count) = open.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                // Memory follows the clients connected now, not every address seen.
                open.remove(&client);
            }
        }
    }
}

impl Admission {
    /// `per_client` 0 = unlimited.
    pub fn new(per_client: usize, trusted_proxies: Vec<Cidr>) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            trusted_proxies,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection from `peer`, or `None` when the address holds its
    /// cap already.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let peer = peer.to_canonical();
        let uncapped =
            self.per_client == 0 || self.trusted_proxies.iter().any(|p| p.contains(peer));
        if uncapped {
            return Some(Slot {
                admission: self.clone(),
                client: None,
            });
        }
        let mut open = self.lock();
        let count = open.entry(peer).or_insert(0);
        if *count >= self.per_client {
            return None;
        }
        *count += 1;
        Some(Slot {
            admission: self.clone(),
            client: Some(peer),
        })
    }

    /// Connections `client` holds now.
    pub fn open_from(&self, client: IpAddr) -> usize {
        self.lock()
            .get(&client.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

/// What the server's `on_connect` hook holds: the admission and its counter.
pub struct ConnectionGuard {
    admission: Arc<Admission>,
    refused: IntCounter,
}

impl ConnectionGuard {
    pub fn new(access: &AccessConfig, metrics: &Metrics) -> Result<Self, MetricsError> {
        let refused = IntCounter::new(
            "bc_connections_refused_total",
            "Northbound connections closed at once: their address held max_connections_per_client already",
        )?;
        metrics.register(Box::new(refused.clone()))?;
        Ok(Self {
            admission: Admission::new(
                access.max_connections_per_client,
                access.trusted_proxies.clone(),
            ),
            refused,
        })
    }

    /// actix's `on_connect`: admits the connection (its slot rides in the connection's
    /// extensions) or shuts its socket at once, so the server drops it without a
    /// request.
    pub fn on_connect(&self, io: &dyn Any, ext: &mut Extensions) {
        let Some(stream) = tcp_of(io) else {
            return;
        };
        let Ok(peer) = stream.peer_addr() else {
            return;
        };
        match self.admission.admit(peer.ip()) {
            Some(slot) => {
                ext.insert(slot);
            }
            None => {
                self.refused.inc();
                shut(stream);
            }
        }
    }
}

fn tcp_of(io: &dyn Any) -> Option<&TcpStream> {
    if let Some(stream) = io.downcast_ref::<TcpStream>() {
        return Some(stream);
    }
    io.downcast_ref::<actix_tls::accept::rustls_0_23::TlsStream<TcpStream>>()
        .map(|tls| tls.get_ref().0)
}

fn shut(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket this stream owns and keeps open; it only ends
    // both directions, the descriptor stays valid until the stream is dropped.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// What to do about the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesPlan {
    /// Raise the soft limit to this (the hard limit), when it is higher.
    pub raise_to: Option<u64>,
    /// The limit the process will run with.
    pub limit: u64,
    /// What `max_connections` × workers plus the reserve need.
    pub needed: u64,
}

impl OpenFilesPlan {
    pub fn enough(&self) -> bool {
        self.limit >= self.needed
    }
}

/// The plan for soft/hard limits `soft`, `hard` and `connections` northbound
/// connections at most.
pub fn plan_open_files(soft: u64, hard: u64, connections: u64) -> OpenFilesPlan {
    let limit = soft.max(hard);
    OpenFilesPlan {
        raise_to: (hard > soft).then_some(hard),
        limit,
        needed: connections.saturating_add(RESERVED_FILES),
    }
}

/// Raises the soft open-file limit to the hard one and checks it against
/// `connections`; logs what it did, and a warning when the limit is too low.
pub fn raise_open_files(connections: u64) -> OpenFilesPlan {
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) } != 0 {
        tracing::warn!("could not read the open-file limit (RLIMIT_NOFILE)");
        return plan_open_files(u64::MAX, u64::MAX, connections);
    }
    let mut plan = plan_open_files(limits.rlim_cur, limits.rlim_max, connections);
    if let Some(hard) = plan.raise_to {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: limits.rlim_max,
        };
        // SAFETY: setrlimit(2) with a struct we own; raising soft up to hard is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            plan.limit = limits.rlim_cur;
            tracing::warn!(
                soft = limits.rlim_cur,
                hard,
                "could not raise the open-file limit to its hard limit"
            );
        } else {
            tracing::info!(
                from = limits.rlim_cur,
                to = hard,
                "open-file limit raised to its hard limit"
            );
        }
    }
    if !plan.enough() {
        tracing::warn!(
            limit = plan.limit,
            needed = plan.needed,
            "the open-file limit cannot hold max_connections x workers (+{RESERVED_FILES} for CUCM, logs and history): \
             connections beyond it are refused by the system. Raise LimitNOFILE (systemd) or ulimit -n, or lower max_connections"
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_address_holds_at_most_its_cap_and_a_closed_connection_frees_its_place() {
        let admission = Admission::new(2, vec!["10.1.2.3/32".parse().unwrap()]);
        let first = admission.admit(ip("192.0.2.1")).expect("1st");
        let _second = admission.admit(ip("192.0.2.1")).expect("2nd");
        assert!(admission.admit(ip("192.0.2.1")).is_none(), "3rd refused");
        // IPv4-mapped IPv6 is the same client.
        assert!(admission.admit(ip("::ffff:192.0.2.1")).is_none());
        // Another address has its own.
        let _other = admission.admit(ip("192.0.2.2")).expect("other client");
        drop(first);
        assert_eq!(admission.open_from(ip("192.0.2.1")), 1);
        let _again = admission.admit(ip("192.0.2.1")).expect("a place again");
        // A trusted proxy carries many clients: not capped, not counted.
        let proxied: Vec<Slot> = (0..10)
            .map(|_| admission.admit(ip("10.1.2.3")).expect("proxy"))
            .collect();
        assert_eq!(admission.open_from(ip("10.1.2.3")), 0);
        drop(proxied);
        // Addresses without connections are forgotten.
        drop(_other);
        assert!(!admission.lock().contains_key(&ip("192.0.2.2")));
    }

    #[test]
    fn zero_means_unlimited() {
        let admission = Admission::new(0, Vec::new());
        let slots: Vec<Slot> = (0..1000)
            .map(|_| admission.admit(ip("192.0.2.1")).expect("admitted"))
            .collect();
        assert_eq!(slots.len(), 1000);
    }

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_and_is_checked_against_the_connections() {
        let plan = plan_open_files(1024, 524_288, 2 * 25_000);
        assert_eq!(plan.raise_to, Some(524_288));
        assert!(plan.enough());
        let short = plan_open_files(1024, 4096, 2 * 25_000);
        assert_eq!((short.limit, short.needed), (4096, 50_256));
        assert!(!short.enough());
        let already = plan_open_files(65_536, 65_536, 1000);
        assert_eq!(already.raise_to, None);
        assert!(already.enough());
    }
}
