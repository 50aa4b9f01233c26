//! `RequestRecord`: what one API request was and how it was answered, built once by
//! the handler. The request metrics and the log line are written from it (and the
//! history, later), so they can never disagree. It has no field for the
//! application password or a PIN: what is not here cannot leak from here.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::Metrics;
use history::History;

use super::request::Call;
use super::response::{code_label, ResultDoc};

/// Where an answer came from: the history's own type, so the log line, the metrics and
/// the record name it alike.
pub use history::Source;

/// One request, as recorded.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub call: Call,
    started: Instant,
    /// The cluster that handled it; `None` when it never reached one.
    pub cluster: Option<Arc<str>>,
    pub device: Option<String>,
    /// The user logged in (login) or found (getloggedinuser).
    pub user: Option<String>,
    /// The application user's ID (never its certificate).
    pub app: Option<String>,
    pub code: u32,
    pub text: String,
    pub duration: Duration,
    pub source: Source,
    /// The CUCM node that answered.
    pub node: Option<Arc<str>>,
    /// A login with a PIN (the PIN itself is never kept).
    pub with_pin: bool,
    /// The client's address (the peer, or the X-Forwarded-For client behind a trusted
    /// proxy).
    pub client: Option<String>,
}

impl RequestRecord {
    pub fn new(call: Call, started: Instant) -> Self {
        Self {
            call,
            started,
            cluster: None,
            device: None,
            user: None,
            app: None,
            code: 0,
            text: String::new(),
            duration: Duration::ZERO,
            source: Source::Gateway,
            node: None,
            with_pin: false,
            client: None,
        }
    }

    /// The answer is known: take its code and text and stop the clock.
    pub fn answered(&mut self, doc: &ResultDoc) {
        self.code = doc.code;
        self.text = doc.text.clone();
        self.duration = self.started.elapsed();
    }

    /// Counts it in the request metrics, writes its log line, and queues it for the
    /// history (never waiting: a full history queue drops and counts). A cache hit is
    /// not built into a record unless the history wants it (`record_cache_hits`): it is
    /// counted per cluster in the metrics instead.
    pub fn publish(&self, metrics: &Metrics, history: Option<&History>) {
        if let Some(history) = history {
            let wanted = self
                .history_operation()
                .is_some_and(|operation| history.wants(operation, self.source));
            if let Some(record) = self.to_history().filter(|_| wanted) {
                history.record(record);
            }
        }
        // Unrouted requests share one label: a caller's cluster code never becomes one.
        let cluster = self.cluster.as_deref().unwrap_or("none");
        let operation = self.call.label();
        metrics
            .requests
            .with_label_values(&[operation, cluster, code_label(self.code)])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[operation, cluster])
            .observe(self.duration.as_secs_f64());
        if self.with_pin {
            metrics
                .pin_logins
                .with_label_values(&[cluster, code_label(self.code)])
                .inc();
        }
        // Field values are quoted and escaped by both log formats; the message is not,
        // so it goes through `log_safe` (a newline in it would forge a log line).
        tracing::info!(
            target: "request",
            operation,
            cluster,
            device = self.device.as_deref().unwrap_or(""),
            user = self.user.as_deref().unwrap_or(""),
            app = self.app.as_deref().unwrap_or(""),
            code = self.code,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            node = self.node.as_deref().unwrap_or(""),
            source = self.source.as_str(),
            client = self.client.as_deref().unwrap_or(""),
            cached = self.source == Source::Cache,
            "{}",
            log_safe(&self.text)
        );
    }
}

impl RequestRecord {
    /// The history's name of this call; `None` for getversioninfo, never recorded.
    fn history_operation(&self) -> Option<history::Operation> {
        match self.call {
            Call::Version => None,
            Call::Login => Some(history::Operation::Login),
            Call::Logout => Some(history::Operation::Logout),
            Call::GetLoggedInUser => Some(history::Operation::GetLoggedInUser),
            Call::GetUserDevices => Some(history::Operation::GetUserDevices),
        }
    }

    /// The history's record of this request; `None` for getversioninfo, which is
    /// not recorded. Only fields the history has: no credential can reach it from here.
    pub fn to_history(&self) -> Option<history::Record> {
        let operation = self.history_operation()?;
        let mut record = history::Record::new(operation, i64::from(self.code), self.source);
        // Stamped when the request arrived, so the history's order is arrival order.
        let now = history::UtcMillis::now();
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(0);
        record.time = history::UtcMillis(now.0.saturating_sub(elapsed));
        record.cluster = self.cluster.as_deref().map(str::to_string);
        record.device.clone_from(&self.device);
        record.user.clone_from(&self.user);
        record.text.clone_from(&self.text);
        record.duration_us = u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX);
        record.node = self.node.as_deref().map(str::to_string);
        record.client.clone_from(&self.client);
        record.app.clone_from(&self.app);
        Some(record)
    }
}

/// `value` with every control character written as an escape, so that no value a
/// caller chose can start a line of its own in a text log.
pub fn log_safe(value: &str) -> Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_logs() {
        assert_eq!(log_safe("plain text é"), "plain text é");
        assert_eq!(
            log_safe("a\r\n2026-12-01T00:00:00Z  INFO forged"),
            "a\\r\\n2026-12-01T00:00:00Z  INFO forged"
        );
        assert_eq!(log_safe("tab\there\u{1b}[31m"), "tab\\there\\u{1b}[31m");
    }
}
