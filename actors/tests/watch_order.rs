//! A watch poll's answer never overrides a change made through the gateway while the
//! poll was out. A fake CUCM reads who is on the phone when a poll arrives and answers
//! only 500 ms later; a login through the gateway goes through meanwhile. The poll's
//! (older) answer must not put "nobody" back in the cache or publish a change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actors::events::{Cause, EventHub};
use actors::watch::{WatchSettings, Watching};
use actors::{
    ClientId, ClusterActor, ClusterConfig, Credentials, DeviceName, Metrics, Operation, Outcome,
    UserId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEVICE: &str = "SEP000000000001";

#[derive(Default)]
struct FakeCucm {
    user: Mutex<Option<String>>,
    queries: AtomicUsize,
}

impl FakeCucm {
    /// The answer to one EM request (`xml` decoded), and how long to wait before it.
    fn answer(&self, xml: &str) -> (String, Duration) {
        let decl = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
        if xml.contains("<login>") {
            let user = xml
                .split("<userID>")
                .nth(1)
                .and_then(|rest| rest.split("</userID>").next())
                .unwrap_or("")
                .to_string();
            *self.user.lock().unwrap() = Some(user);
            return (
                format!("{decl}<response><success/></response>"),
                Duration::ZERO,
            );
        }
        // Read now, answer later: the answer is as old as the moment it was asked.
        let who = match self.user.lock().unwrap().clone() {
            Some(user) => format!("<userID>{user}</userID>"),
            None => "<none/>".into(),
        };
        let first = self.queries.fetch_add(1, Ordering::SeqCst) == 0;
        let delay = if first {
            Duration::ZERO
        } else {
            Duration::from_millis(500)
        };
        (
            format!("{decl}<response><deviceUserResults><device name=\"{DEVICE}\">{who}<emccDevice>no</emccDevice></device></deviceUserResults></response>"),
            delay,
        )
    }
}

async fn serve(listener: TcpListener, cucm: Arc<FakeCucm>) {
    while let Ok((stream, _)) = listener.accept().await {
        let cucm = cucm.clone();
        tokio::spawn(connection(stream, cucm));
    }
}

/// HTTP/1.1 with keep-alive: one request after the other; each answer in one write.
async fn connection(mut stream: TcpStream, cucm: Arc<FakeCucm>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer.drain(..head_end + length).skip(head_end).collect();
        let xml = form_urlencoded::parse(&body)
            .find(|(key, _)| key == "xml")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        let (answer, delay) = cucm.answer(&xml);
        tokio::time::sleep(delay).await;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[actix_rt::test]
async fn a_poll_answer_older_than_a_login_does_not_override_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/emservice/EMServiceServlet",
        listener.local_addr().unwrap()
    );
    let cucm = Arc::new(FakeCucm::default());
    tokio::spawn(serve(listener, cucm.clone()));

    let metrics = Arc::new(Metrics::new().unwrap());
    let hub = Arc::new(EventHub::new(100, &metrics));
    let watching = Watching::new(
        WatchSettings {
            enabled: true,
            ttl: Duration::from_secs(3600),
            interval: Duration::from_millis(200),
            rate_share: 1.0,
            max_per_cluster: 100,
        },
        hub.clone(),
    );
    let credentials = Credentials::new("bcapp", "bcsecret");
    watching.set_credentials(Some(credentials.clone()));
    let mut config = ClusterConfig::new("EU", vec![url]);
    config.max_requests_per_second = 0;
    let cluster = ClusterActor::launch_watching(&config, metrics.clone(), None, &watching).unwrap();
    let device = DeviceName::parse(DEVICE).unwrap();
    let deadline = || Instant::now() + Duration::from_secs(5);

    // Asked once: nobody. From now on the device is watched.
    let first = cluster
        .submit(
            Operation::Query {
                device: device.clone(),
            },
            credentials.clone(),
            deadline(),
            ClientId::default(),
        )
        .await;
    assert_eq!(first.result, Ok(Outcome::CurrentUser(None)));

    // A poll is out (CUCM read "nobody"); alice logs in meanwhile.
    wait_until("a poll is out", || cucm.queries.load(Ordering::SeqCst) >= 2).await;
    let login = cluster
        .submit(
            Operation::Login {
                device: device.clone(),
                user: UserId::parse("alice").unwrap(),
            },
            credentials.clone(),
            deadline(),
            ClientId::default(),
        )
        .await;
    assert_eq!(login.result, Ok(Outcome::LoggedIn));

    // The poll's answer comes back ("nobody", older than the login).
    let polls = metrics.watch_polls.with_label_values(&["EU", "ok"]);
    wait_until("the poll answered", || polls.get() >= 1).await;

    let now = cluster
        .submit(
            Operation::Query {
                device: device.clone(),
            },
            credentials.clone(),
            deadline(),
            ClientId::default(),
        )
        .await;
    assert!(now.from_cache, "answered from the cache");
    assert_eq!(
        now.result,
        Ok(Outcome::CurrentUser(Some(UserId::parse("alice").unwrap())))
    );
    let causes: Vec<Cause> = hub.latest(10).iter().map(|e| e.cause).collect();
    assert_eq!(causes, vec![Cause::Request], "only the login is a change");
}
