//! `GET /api/events`: the changes of devices' logged-in users as Server-Sent Events
//! (`event: change`, `id:`, `data:` one JSON object), resumable with `Last-Event-ID`.
//! Who may read it: whoever may read `/api/history`.
//!
//! A subscriber reads from the hub's bounded broadcast: one that falls too far behind
//! is disconnected (it resumes with `Last-Event-ID`) and counted, so a slow client
//! never holds the gateway back. The stream ends when the gateway shuts down.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::header;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use actors::events::{Event, EventHub};
use futures_util::stream;
use history::{Operation, Record, Source, UtcMillis};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::dashboard::Admin;

/// A comment line this often keeps proxies from closing an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Most clients streaming at once (each holds a connection and a cursor).
const MAX_SUBSCRIBERS: i64 = 256;

/// What the handler needs (one per server).
pub struct Events {
    pub hub: Arc<EventHub>,
    /// Turns true when the gateway shuts down: every stream ends.
    pub closing: watch::Receiver<bool>,
}

/// Records observed changes in the history (requests are recorded as requests).
pub fn record_observed(hub: &EventHub, history: Option<Arc<history::History>>) {
    let Some(history) = history else {
        return;
    };
    hub.observe_with(move |event| {
        let Some(seen_by) = event.seen_by else {
            return;
        };
        let source = match seen_by {
            actors::events::SeenBy::Poll => Source::Poll,
            actors::events::SeenBy::Query => Source::Query,
        };
        let mut record = Record::new(Operation::Observed, 0, source);
        record.time = millis(event);
        record.cluster = Some(event.cluster.to_string());
        record.device = Some(event.device.as_str().to_string());
        record.user = event.after.as_ref().map(|u| u.as_str().to_string());
        record.text = match &event.before {
            Some(before) => format!("was {}", before.as_str()),
            None => "was nobody".into(),
        };
        history.record(record);
    });
}

fn millis(event: &Event) -> UtcMillis {
    UtcMillis(
        event
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    )
}

/// One event as its JSON document, fields in this order.
#[derive(serde::Serialize)]
pub struct EventDoc<'a> {
    id: u64,
    time: String,
    cluster: &'a str,
    device: &'a str,
    before: Option<&'a str>,
    after: Option<&'a str>,
    cause: &'static str,
    /// For an observed change: `poll` or `query`.
    source: Option<&'static str>,
}

pub fn event_json(event: &Event) -> EventDoc<'_> {
    EventDoc {
        id: event.id,
        time: millis(event).to_rfc3339(),
        cluster: &event.cluster,
        device: event.device.as_str(),
        before: event.before.as_ref().map(|u| u.as_str()),
        after: event.after.as_ref().map(|u| u.as_str()),
        cause: event.cause.as_str(),
        source: event.seen_by.map(|s| s.as_str()),
    }
}

/// One event as an SSE frame. JSON has no raw line ends, so `data:` is one line.
fn frame(event: &Event) -> Bytes {
    // Serializing plain strings and numbers cannot fail.
    let data = serde_json::to_string(&event_json(event)).unwrap_or_default();
    Bytes::from(format!("event: change\nid: {}\ndata: {data}\n\n", event.id))
}

const RESET: &str = "event: reset\ndata: {\"reason\":\"events after Last-Event-ID are no longer kept; the ones still kept follow\"}\n\n";

/// Keeps `bc_event_subscribers` right however a stream ends.
struct Subscribed(Arc<EventHub>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.subscribers.dec();
    }
}

struct StreamState {
    reset: bool,
    missed: VecDeque<Arc<Event>>,
    live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    heartbeat: tokio::time::Interval,
    closing: watch::Receiver<bool>,
    subscribed: Subscribed,
}

/// `GET /api/events`.
pub async fn get(
    request: HttpRequest,
    admin: web::Data<Admin>,
    events: web::Data<Events>,
) -> HttpResponse {
    if let Err(refused) = admin.authorize(&request).await {
        return refused;
    }
    let hub = events.hub.clone();
    if hub.subscribers.get() >= MAX_SUBSCRIBERS {
        return HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "5"))
            .content_type("text/plain; charset=utf-8")
            .body("too many event subscribers\n");
    }
    // An id that does not parse is as good as none: the client starts from now.
    let last_seen = request
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let subscription = hub.subscribe(last_seen);
    hub.subscribers.inc();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        reset: subscription.reset,
        missed: subscription.missed.into(),
        live: subscription.live,
        heartbeat,
        closing: events.closing.clone(),
        subscribed: Subscribed(hub),
    };
    let body = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let chunk = next_chunk(&mut state).await?;
        Some((Ok::<_, actix_web::Error>(chunk), Some(state)))
    });
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// How many changes `GET /api/events/latest` shows (the dashboard's table).
const LATEST: usize = 20;

/// `GET /api/events/latest`: the newest changes, newest first, as
/// `{"events":[…]}` (the dashboard's "latest changes").
pub async fn latest(
    request: HttpRequest,
    admin: web::Data<Admin>,
    events: web::Data<Events>,
) -> HttpResponse {
    if let Err(refused) = admin.authorize(&request).await {
        return refused;
    }
    let newest = events.hub.latest(LATEST);
    let newest: Vec<EventDoc<'_>> = newest.iter().rev().map(|e| event_json(e)).collect();
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(serde_json::json!({ "events": newest }))
}

/// The next piece of the stream; `None` ends it.
async fn next_chunk(state: &mut StreamState) -> Option<Bytes> {
    if std::mem::take(&mut state.reset) {
        return Some(Bytes::from_static(RESET.as_bytes()));
    }
    if let Some(event) = state.missed.pop_front() {
        return Some(frame(&event));
    }
    if *state.closing.borrow() {
        return None;
    }
    tokio::select! {
        received = state.live.recv() => match received {
            Ok(event) => Some(frame(&event)),
            Err(RecvError::Lagged(_)) => {
                state.subscribed.0.subscribers_dropped.inc();
                None
            }
            Err(RecvError::Closed) => None,
        },
        _ = state.heartbeat.tick() => Some(Bytes::from_static(b": heartbeat\n\n")),
        _ = state.closing.changed() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actors::events::{Cause, NewEvent};
    use actors::{DeviceName, Metrics, UserId};

    fn change(n: usize) -> NewEvent {
        NewEvent {
            cluster: Arc::from("EU"),
            device: DeviceName::parse(&format!("SEP{n}")).unwrap(),
            before: None,
            after: Some(UserId::parse("alice").unwrap()),
            cause: Cause::Request,
            seen_by: None,
        }
    }

    fn state(hub: &Arc<EventHub>, closing: watch::Receiver<bool>) -> StreamState {
        let subscription = hub.subscribe(None);
        hub.subscribers.inc();
        StreamState {
            reset: subscription.reset,
            missed: subscription.missed.into(),
            live: subscription.live,
            heartbeat: tokio::time::interval(HEARTBEAT),
            closing,
            subscribed: Subscribed(hub.clone()),
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_fell_behind_is_dropped_and_counted() {
        let metrics = Metrics::new().unwrap();
        let hub = Arc::new(EventHub::new(10, &metrics));
        let (_closing, closing_seen) = watch::channel(false);
        let mut slow = state(&hub, closing_seen);
        // The first tick of the heartbeat is at once.
        assert_eq!(
            next_chunk(&mut slow).await.as_deref(),
            Some(&b": heartbeat\n\n"[..])
        );
        for n in 0..actors::events::SUBSCRIBER_LAG + 1 {
            hub.publish(change(n));
        }
        assert_eq!(next_chunk(&mut slow).await, None, "the stream ends");
        assert_eq!(metrics.event_subscribers_dropped.get(), 1);
        drop(slow);
        assert_eq!(metrics.event_subscribers.get(), 0);
    }

    #[tokio::test]
    async fn events_are_framed_and_shutdown_ends_the_stream() {
        let metrics = Metrics::new().unwrap();
        let hub = Arc::new(EventHub::new(10, &metrics));
        let (closing, closing_seen) = watch::channel(false);
        let mut subscriber = state(&hub, closing_seen);
        next_chunk(&mut subscriber).await;
        hub.publish(change(1));
        let frame = next_chunk(&mut subscriber).await.unwrap();
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(text.starts_with("event: change\nid: "), "{text}");
        assert!(text.contains("\"cause\":\"request\""), "{text}");
        assert!(
            text.contains("\"cluster\":\"EU\",\"device\":\"SEP1\",\"before\":null,\"after\":\"alice\",\"cause\":\"request\",\"source\":null}"),
            "{text}"
        );
        assert_eq!(text.matches('\n').count(), 4, "one data line: {text}");
        closing.send(true).unwrap();
        assert_eq!(next_chunk(&mut subscriber).await, None);
    }
}
