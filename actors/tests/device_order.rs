//! Per-device order, proven where arrival order is defined: messages sent to one
//! cluster actor in sequence. The simulator records what CUCM saw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::{
    ClusterActor, ClusterConfig, Credentials, DeviceName, Metrics, Operation, Outcome, UserId,
};
use futures_util::future::join_all;
use sim::{Behavior, Latency, SimConfig, Simulator};

fn device(n: usize) -> DeviceName {
    DeviceName::parse(&format!("SEP{n:012X}")).unwrap()
}

fn user(n: usize) -> UserId {
    UserId::parse(&format!("user{n}")).unwrap()
}

#[actix_rt::test]
async fn operations_on_one_device_keep_arrival_order_while_devices_overlap() {
    let sim = Simulator::start(SimConfig {
        devices: 4,
        users: 12,
        behavior: Behavior {
            latency: Latency::Fixed(Duration::from_millis(20)),
            ..Behavior::default()
        },
        ..SimConfig::default()
    })
    .unwrap();
    let mut config = ClusterConfig::new("EU", vec![sim.url()]);
    config.max_requests_per_second = 0;
    config.cache_ttl_ms = 0;
    let cluster = ClusterActor::launch(&config, Arc::new(Metrics::new().unwrap()), None).unwrap();
    let credentials = Credentials::new("bcapp", "bcsecret");
    let deadline = Instant::now() + Duration::from_secs(30);

    // Per device: login A, logout, login B, logout, login C. Any reordering makes
    // CUCM refuse one of them (18: someone is logged in; 19: nobody is).
    let mut plan = Vec::new();
    for d in 1..=4 {
        for step in 0..5 {
            let operation = if step % 2 == 0 {
                Operation::Login {
                    device: device(d),
                    user: user(d + 4 * (step / 2)),
                }
            } else {
                Operation::Logout { device: device(d) }
            };
            plan.push(operation);
        }
    }
    // join_all polls in order, so the actor's mailbox receives them in plan order.
    let replies = join_all(plan.iter().map(|op| {
        cluster.submit(
            op.clone(),
            credentials.clone(),
            deadline,
            Default::default(),
        )
    }))
    .await;
    for (op, reply) in plan.iter().zip(&replies) {
        let expected = match op {
            Operation::Login { .. } => Outcome::LoggedIn,
            _ => Outcome::LoggedOut,
        };
        assert_eq!(reply.result, Ok(expected), "{op:?}");
    }

    let stats = sim.stats();
    for d in 1..=4 {
        let seen: Vec<(String, Option<String>)> = stats
            .log
            .iter()
            .filter(|r| r.devices.first().map(String::as_str) == Some(device(d).as_str()))
            .map(|r| {
                let kind = format!("{:?}", r.kind);
                // The simulator notes who a logout ended; the plan only knows logins' users.
                let user = (kind == "Login").then(|| r.user.clone()).flatten();
                (kind, user)
            })
            .collect();
        let planned: Vec<(String, Option<String>)> = plan
            .iter()
            .filter(|op| op.device() == Some(&device(d)))
            .map(|op| match op {
                Operation::Login { user, .. } => ("Login".to_string(), Some(user.to_string())),
                _ => ("Logout".to_string(), None),
            })
            .collect();
        assert_eq!(seen, planned, "device {d} in CUCM's order");
    }
    assert_eq!(stats.max_concurrent_per_device, 1);
    assert!(stats.max_concurrent_calls > 1, "devices ran in parallel");
    assert_eq!(
        sim.logged_in_user(device(1).as_str()).as_deref(),
        Some("user9")
    );
}
