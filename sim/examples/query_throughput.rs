//! Rough throughput check of the simulator's query path (deviceUserQuery, zero latency).
//! `cargo run --release -p sim --example query_throughput -- [connections] [seconds]`
//! The client is deliberately minimal (pipelined keep-alive, one task per connection)
//! so that the simulator, on one runtime thread, is what gets measured.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let sim = sim::Simulator::start(sim::SimConfig {
        devices: 1000,
        users: 1000,
        ..sim::SimConfig::default()
    })?;
    for i in 1..=500 {
        sim.login_directly(&sim::seeded_device_name(i), &sim::seeded_user_id(i));
    }
    let addr = sim.addr();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let total: u64 = runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    let device = sim::seeded_device_name(c % 1000 + 1);
                    let xml = format!(
                        "<query><appInfo><appID>bcapp</appID><appCertificate>bcsecret</appCertificate>\
                         </appInfo><deviceUserQuery><deviceName>{device}</deviceName></deviceUserQuery></query>"
                    );
                    let body: String = form_urlencoded::Serializer::new(String::new())
                        .append_pair("xml", &xml)
                        .finish();
                    let request = format!(
                        "POST /emservice/EMServiceServlet HTTP/1.1\r\nHost: sim\r\n\
                         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        stream.write_all(request.as_bytes()).await?;
                        // Responses are small and of constant size per device: read until
                        // the end of one XML document.
                        let mut seen = Vec::new();
                        loop {
                            let n = stream.read(&mut buf).await?;
                            anyhow::ensure!(n > 0, "closed");
                            seen.extend_from_slice(&buf[..n]);
                            if seen.ends_with(b"</response>") {
                                break;
                            }
                        }
                        done += 1;
                    }
                    anyhow::Ok(done)
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.map_err(anyhow::Error::from).and_then(|r| r).unwrap_or(0);
        }
        total
    });
    let stats = sim.stats();
    println!(
        "{total} deviceUserQuery in {seconds} s over {connections} connections: {:.0}/s (sim counted {})",
        total as f64 / seconds as f64,
        stats.calls_device_user_query
    );
    Ok(())
}
