//! Demo mode: without `--config`, the gateway runs against an embedded simulated
//! cluster `DEMO`, so `cargo run --release` shows the whole product on a fresh machine.

use std::net::SocketAddr;

use actors::ClusterConfig;
use sim::{SimConfig, SimHandle, Simulator};

use crate::config::Config;

/// Devices and users the demo cluster is seeded with (see sim/README.md for names).
const DEMO_DEVICES: usize = 100;
const DEMO_USERS: usize = 100;

/// The simulated CUCM and the config that points the gateway at it. Keep the
/// `SimHandle` alive as long as the gateway runs.
pub fn start(listen: SocketAddr) -> Result<(SimHandle, Config), sim::SimError> {
    let simulator = Simulator::start(SimConfig {
        devices: DEMO_DEVICES,
        users: DEMO_USERS,
        ..SimConfig::default()
    })?;
    let cluster = ClusterConfig::new("DEMO", vec![simulator.url()]);
    let mut config = Config::single_cluster(cluster);
    config.listen = listen;
    // The demo records too, in the temp dir: a demo run should not leave a database in
    // whatever directory it was started from.
    config.history = history::HistoryConfig::sqlite(
        std::env::temp_dir().join("business-connector-demo-history.sqlite"),
    );
    Ok((simulator, config))
}

/// Copy-paste lines that exercise every call against the demo.
pub fn curl_examples(gateway: &str) -> String {
    let creds = "<appID>bcapp</appID><appCertificate>bcsecret</appCertificate>";
    format!(
        "Demo mode: cluster DEMO is a simulated CUCM (devices SEP000000000001..SEP{last_device:012X}, \
         users user1..user{DEMO_USERS}, application user bcapp / bcsecret).\n\
         Dashboard (request history, per-cluster health): http://{gateway}/dashboard\n\
         Try:\n  \
         curl -s http://{gateway}/api/getversioninfo\n  \
         curl -s --data-urlencode 'xml=<request>{creds}</request>' http://{gateway}/api/login/SEP000000000001/user1\n  \
         curl -s --data-urlencode 'xml=<request>{creds}</request>' http://{gateway}/api/getloggedinuser/SEP000000000001\n  \
         curl -s -H 'Content-Type: text/xml' --data '<request>{creds}<deviceName>SEP000000000001</deviceName></request>' http://{gateway}/api/logout\n  \
         curl -s http://{gateway}/metrics | grep ^bc_requests_total",
        last_device = DEMO_DEVICES,
    )
}
