//! Live call events for Server-Sent Events: `GET /calls/{call_sid}/events` (one call) and
//! `GET /events` (every call).
//!
//! One [`EventHub`] per process, shared as `Arc<EventHub>`. Whoever sees something happen on a
//! call [`EventHub::publish`]es a [`CallEvent`]; the hub gives it the call's next id (1, 2, …,
//! for the call's stream) and the process's next id (for `/events`), formats the SSE message
//! once per stream flavour, keeps it in a replay ring and hands it to every subscriber with a
//! non-blocking `try_send`. Publishing never waits for a subscriber: one whose queue
//! (`events.subscriber_queue` messages) is full is disconnected — its stream yields what was
//! queued, then `: dropped, reconnect with Last-Event-ID`, then ends — and counted
//! ([`EventHub::dropped_subscribers`], [`EventHub::on_subscriber_dropped`]).
//!
//! A subscriber first gets a replay of the recent messages (the last `events.replay_max` of the
//! call, or of the process for `/events`; after `Last-Event-ID`, only later ones), then live
//! ones, and a `: keep-alive` comment after every [`KEEP_ALIVE`] of silence. A call's stream ends
//! after its `ended` event. An ended call's ring is kept (the last [`ENDED_CALLS_KEPT`] ended
//! calls; older ones are forgotten) so that a subscriber arriving just after the end still gets
//! the replay ending with `ended`.
//!
//! Wire format of one message (the JSON is one line: serde_json never emits a raw newline):
//!
//! ```text
//! id: 7
//! event: transcript
//! data: {"call_sid":"CA…","ts":"2024-05-01T12:00:00.123Z","role":"caller","text":"hi","final":true}
//!
//! ```
//!
//! Events are a few a second per call, never per audio frame: one `std::sync::Mutex` guards the
//! hub, held only to assign ids, push into the rings and `try_send`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::session::usage::{CallUsage, TokenUsage};

/// Silence on a stream after which a `: keep-alive` comment is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Ended calls whose replay ring is kept; the oldest is forgotten beyond this.
pub const ENDED_CALLS_KEPT: usize = 100;
/// The comment sent every [`KEEP_ALIVE`] of silence.
pub const KEEP_ALIVE_COMMENT: &[u8] = b": keep-alive\n\n";
/// The last thing a subscriber that did not keep up receives (best effort: a slot of its queue
/// is reserved for it, so it is only lost if the client is gone).
pub const DROPPED_COMMENT: &[u8] = b": dropped, reconnect with Last-Event-ID\n\n";

/// Something that happened on a call. [`CallEvent::kind`] is the SSE `event:` type; the
/// variant's fields (serialized untagged, `final_` as `final`) plus `call_sid` and `ts` (RFC 3339,
/// UTC) are the JSON `data:`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CallEvent {
    /// `connecting`, `active`, `reconnecting` or `ending`.
    State {
        state: &'static str,
    },
    /// `role`: who spoke (e.g. `caller`, `assistant`); `final`: false for a partial transcript.
    Transcript {
        role: &'static str,
        text: String,
        #[serde(rename = "final")]
        final_: bool,
    },
    /// The caller spoke over the assistant, who had been heard for `heard_ms`.
    BargeIn {
        heard_ms: u64,
    },
    Dtmf {
        digit: String,
    },
    /// The AI leg was restarted after a failure.
    Restart {
        reason: String,
    },
    /// The AI leg was replaced by a fresh session on purpose.
    Rollover {
        reason: String,
    },
    Error {
        code: String,
    },
    ToolCall {
        name: String,
        outcome: String,
        ms: u64,
    },
    /// Realtime reports `tokens`, GPT-Live `seconds`; `cost_usd` is `null` when unknown.
    Usage {
        #[serde(skip_serializing_if = "Option::is_none")]
        tokens: Option<TokenUsage>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
        cost_usd: Option<f64>,
    },
    /// The last event of a call: its stream closes after it.
    Ended {
        reason: String,
        totals: serde_json::Value,
    },
}

impl CallEvent {
    /// The SSE `event:` type.
    pub fn kind(&self) -> &'static str {
        match self {
            CallEvent::State { .. } => "state",
            CallEvent::Transcript { .. } => "transcript",
            CallEvent::BargeIn { .. } => "barge_in",
            CallEvent::Dtmf { .. } => "dtmf",
            CallEvent::Restart { .. } => "restart",
            CallEvent::Rollover { .. } => "rollover",
            CallEvent::Error { .. } => "error",
            CallEvent::ToolCall { .. } => "tool_call",
            CallEvent::Usage { .. } => "usage",
            CallEvent::Ended { .. } => "ended",
        }
    }

    /// A `usage` event from a call's usage report.
    pub fn usage(usage: &CallUsage) -> Self {
        CallEvent::Usage {
            tokens: usage.tokens,
            seconds: usage.seconds,
            cost_usd: usage.cost_usd,
        }
    }

    /// The JSON `data:` of this event (one line): `call_sid`, `ts`, then the event's fields.
    pub fn data_json(&self, call_sid: &str, ts: &str) -> String {
        #[derive(Serialize)]
        struct Data<'a> {
            call_sid: &'a str,
            ts: &'a str,
            #[serde(flatten)]
            event: &'a CallEvent,
        }
        serde_json::to_string(&Data {
            call_sid,
            ts,
            event: self,
        })
        .unwrap_or_else(|e| {
            // Only a non-finite float can fail; keep the stream well-formed anyway.
            serde_json::json!({ "call_sid": call_sid, "ts": ts, "encoding_error": e.to_string() })
                .to_string()
        })
    }
}

/// The id in a `Last-Event-ID` request header, if it is one (a decimal `u64`, spaces trimmed).
pub fn parse_last_event_id(header: Option<&str>) -> Option<u64> {
    header?.trim().parse().ok()
}

/// One SSE message: `id: {id}\nevent: {kind}\ndata: {data}\n\n`.
fn sse_message(id: u64, kind: &str, data: &str) -> Bytes {
    debug_assert!(!data.contains('\n') && !data.contains('\r'));
    let mut s = String::with_capacity(data.len() + kind.len() + 32);
    let _ = write!(s, "id: {id}\nevent: {kind}\ndata: {data}\n\n");
    Bytes::from(s)
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

type Ring = VecDeque<(u64, Bytes)>;

fn push_ring(ring: &mut Ring, max: usize, id: u64, msg: &Bytes) {
    if max == 0 {
        return;
    }
    while ring.len() >= max {
        ring.pop_front();
    }
    ring.push_back((id, msg.clone()));
}

fn replay_after(ring: &Ring, last_event_id: Option<u64>) -> VecDeque<Bytes> {
    let after = last_event_id.unwrap_or(0);
    ring.iter()
        .filter(|(id, _)| *id > after)
        .map(|(_, m)| m.clone())
        .collect()
}

/// Hands `msg` to every subscriber without waiting; removes those that are gone or full (a
/// full one gets [`DROPPED_COMMENT`] in its reserved slot). Returns how many were full.
fn fan_out(subs: &mut Vec<mpsc::Sender<Bytes>>, msg: &Bytes) -> u64 {
    let mut dropped = 0;
    subs.retain(|tx| {
        if tx.is_closed() {
            return false;
        }
        // Each channel holds `subscriber_queue + 1`: the last free slot is for the comment.
        if tx.capacity() <= 1 {
            let _ = tx.try_send(Bytes::from_static(DROPPED_COMMENT));
            dropped += 1;
            return false;
        }
        match tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped += 1;
                false
            }
        }
    });
    dropped
}

#[derive(Default)]
struct CallStream {
    /// The id of the call's last event (0: none yet).
    last_id: u64,
    ring: Ring,
    subs: Vec<mpsc::Sender<Bytes>>,
    ended: bool,
}

#[derive(Default)]
struct Inner {
    /// The id of the process's last event (0: none yet).
    last_global_id: u64,
    /// Live calls, plus the last `ended_kept` ended ones.
    calls: HashMap<String, CallStream>,
    /// Ended calls still in `calls`, oldest first.
    ended: VecDeque<String>,
    global_ring: Ring,
    all_subs: Vec<mpsc::Sender<Bytes>>,
}

/// The process's live-event hub (see the module docs). `Send + Sync`; share as `Arc<EventHub>`.
pub struct EventHub {
    replay_max: usize,
    subscriber_queue: usize,
    keep_alive: Duration,
    ended_kept: usize,
    on_dropped: Option<Box<dyn Fn() + Send + Sync>>,
    dropped: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("replay_max", &self.replay_max)
            .field("subscriber_queue", &self.subscriber_queue)
            .field("keep_alive", &self.keep_alive)
            .field("ended_kept", &self.ended_kept)
            .field("dropped", &self.dropped_subscribers())
            .finish_non_exhaustive()
    }
}

impl EventHub {
    /// `replay_max`: messages kept for replay per call, and for `/events` (the process's last
    /// `replay_max` messages, all calls together). `subscriber_queue`: messages a subscriber may
    /// have waiting before it is disconnected (at least 1).
    pub fn new(replay_max: usize, subscriber_queue: usize) -> Self {
        EventHub {
            replay_max,
            subscriber_queue: subscriber_queue.max(1),
            keep_alive: KEEP_ALIVE,
            ended_kept: ENDED_CALLS_KEPT,
            on_dropped: None,
            dropped: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Silence after which a stream sends `: keep-alive` (default [`KEEP_ALIVE`]).
    pub fn with_keep_alive(mut self, every: Duration) -> Self {
        self.keep_alive = every;
        self
    }

    /// How many ended calls keep their replay ring (default [`ENDED_CALLS_KEPT`]).
    pub fn with_ended_calls_kept(mut self, n: usize) -> Self {
        self.ended_kept = n;
        self
    }

    /// Called once per subscriber disconnected for not keeping up (e.g. to bump a Prometheus
    /// counter). Called outside the hub's lock, on the publishing thread: keep it quick.
    pub fn on_subscriber_dropped(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_dropped = Some(Box::new(hook));
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `event` for `call_sid` and hands it to the call's and `/events`' subscribers.
    /// Never blocks on a subscriber. An event after the call's `ended` is ignored. `Ended`
    /// closes the call's streams after delivering it.
    pub fn publish(&self, call_sid: &str, event: CallEvent) {
        let data = event.data_json(call_sid, &now_rfc3339());
        let kind = event.kind();
        let is_end = matches!(event, CallEvent::Ended { .. });
        let dropped = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let call = inner.calls.entry(call_sid.to_owned()).or_default();
            if call.ended {
                log::debug!("event {kind} for {call_sid} after its end: not published");
                return;
            }
            call.last_id += 1;
            inner.last_global_id += 1;
            let call_msg = sse_message(call.last_id, kind, &data);
            let all_msg = sse_message(inner.last_global_id, kind, &data);
            push_ring(&mut call.ring, self.replay_max, call.last_id, &call_msg);
            push_ring(
                &mut inner.global_ring,
                self.replay_max,
                inner.last_global_id,
                &all_msg,
            );
            let mut dropped = fan_out(&mut call.subs, &call_msg);
            dropped += fan_out(&mut inner.all_subs, &all_msg);
            if is_end {
                call.ended = true;
                // Dropping the senders ends each stream once it has yielded what is queued.
                call.subs.clear();
                inner.ended.push_back(call_sid.to_owned());
                while inner.ended.len() > self.ended_kept {
                    if let Some(old) = inner.ended.pop_front() {
                        inner.calls.remove(&old);
                    }
                }
            }
            dropped
        };
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            log::info!("{dropped} event subscriber(s) did not keep up: disconnected");
            if let Some(hook) = &self.on_dropped {
                for _ in 0..dropped {
                    hook();
                }
            }
        }
    }

    fn channel(&self) -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>) {
        mpsc::channel(self.subscriber_queue + 1)
    }

    /// The stream of one call: the replay (ids after `last_event_id`), then live events, until
    /// `ended`. `None` if the hub has not seen the call (or forgot it long after its end): 404.
    pub fn subscribe_call(
        &self,
        call_sid: &str,
        last_event_id: Option<u64>,
    ) -> Option<Subscription> {
        let mut inner = self.lock();
        let call = inner.calls.get_mut(call_sid)?;
        let replay = replay_after(&call.ring, last_event_id);
        let rx = if call.ended {
            None
        } else {
            let (tx, rx) = self.channel();
            call.subs.push(tx);
            Some(rx)
        };
        Some(Subscription::new(replay, rx, self.keep_alive))
    }

    /// The stream of every call (`/events`): the replay (ids after `last_event_id`), then live
    /// events. Never ends on its own.
    pub fn subscribe_all(&self, last_event_id: Option<u64>) -> Subscription {
        let mut inner = self.lock();
        let replay = replay_after(&inner.global_ring, last_event_id);
        let (tx, rx) = self.channel();
        inner.all_subs.push(tx);
        Subscription::new(replay, Some(rx), self.keep_alive)
    }

    /// Connected subscribers (call streams and `/events`), for `/health`. One whose client went
    /// away is not counted.
    pub fn subscribers(&self) -> usize {
        let inner = self.lock();
        let live = |subs: &Vec<mpsc::Sender<Bytes>>| subs.iter().filter(|t| !t.is_closed()).count();
        inner.calls.values().map(|c| live(&c.subs)).sum::<usize>() + live(&inner.all_subs)
    }

    /// Subscribers disconnected for not keeping up, since start.
    pub fn dropped_subscribers(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Calls the hub holds (live and recently ended).
    pub fn calls_known(&self) -> usize {
        self.lock().calls.len()
    }
}

/// One subscriber's SSE byte stream, for actix-web's `HttpResponse::streaming` (serve it with
/// `Content-Type: text/event-stream`). Yields the replay, then live messages, with a
/// `: keep-alive` comment after each silence of the hub's keep-alive interval; ends after a
/// call's `ended`, or after [`DROPPED_COMMENT`] if it did not keep up.
pub struct Subscription {
    replay: VecDeque<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    keep_alive: Duration,
    /// Created on the first wait (inside the runtime).
    timer: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("replay_left", &self.replay.len())
            .field("live", &self.rx.is_some())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    fn new(
        replay: VecDeque<Bytes>,
        rx: Option<mpsc::Receiver<Bytes>>,
        keep_alive: Duration,
    ) -> Self {
        Subscription {
            replay,
            rx,
            keep_alive,
            timer: None,
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(msg) = this.replay.pop_front() {
            return Poll::Ready(Some(Ok(msg)));
        }
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(msg)) => {
                if let Some(timer) = this.timer.as_mut() {
                    timer.as_mut().reset(Instant::now() + this.keep_alive);
                }
                Poll::Ready(Some(Ok(msg)))
            }
            Poll::Ready(None) => {
                this.rx = None;
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let keep_alive = this.keep_alive;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(keep_alive)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        timer.as_mut().reset(Instant::now() + keep_alive);
                        Poll::Ready(Some(Ok(Bytes::from_static(KEEP_ALIVE_COMMENT))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::Arc;

    /// One parsed SSE message: a comment, or an event with all three fields.
    #[derive(Debug, PartialEq)]
    enum Sse {
        Comment(String),
        Event {
            id: u64,
            event: String,
            data: serde_json::Value,
        },
    }

    /// A strict parser for one chunk the hub yields: exactly one message, `\n` line endings,
    /// ending with a blank line; an event has `id`, `event`, `data` once each, in that order,
    /// `data` being a JSON object with a string `call_sid` and `ts`.
    fn parse(chunk: &[u8]) -> Sse {
        let text = std::str::from_utf8(chunk).expect("utf-8");
        assert!(text.ends_with("\n\n"), "blank-line terminator: {text:?}");
        assert!(!text.contains('\r'), "no CR: {text:?}");
        let body = &text[..text.len() - 2];
        assert!(!body.contains("\n\n"), "one message per chunk: {text:?}");
        let lines: Vec<&str> = body.split('\n').collect();
        if let Some(comment) = lines[0].strip_prefix(':') {
            assert_eq!(lines.len(), 1, "{text:?}");
            return Sse::Comment(comment.trim().to_owned());
        }
        assert_eq!(lines.len(), 3, "id, event, data: {text:?}");
        let field = |line: &str, name: &str| -> String {
            let (k, v) = line.split_once(':').expect("field: value");
            assert_eq!(k, name, "{text:?}");
            v.strip_prefix(' ').unwrap_or(v).to_owned()
        };
        let id: u64 = field(lines[0], "id").parse().expect("numeric id");
        let event = field(lines[1], "event");
        assert!(!event.is_empty() && event.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        let data: serde_json::Value =
            serde_json::from_str(&field(lines[2], "data")).expect("JSON data");
        assert!(data["call_sid"].is_string(), "call_sid: {data}");
        let ts = data["ts"].as_str().expect("ts");
        OffsetDateTime::parse(ts, &Rfc3339).expect("RFC 3339 ts");
        Sse::Event { id, event, data }
    }

    /// (id, event type, call_sid) of an event message.
    fn key(m: &Sse) -> (u64, String, String) {
        match m {
            Sse::Event { id, event, data } => (
                *id,
                event.clone(),
                data["call_sid"].as_str().unwrap().to_owned(),
            ),
            Sse::Comment(c) => panic!("expected an event, got comment {c:?}"),
        }
    }

    /// The next chunk within a second; `None` if the stream ended.
    async fn next(sub: &mut Subscription) -> Option<Sse> {
        actix_rt::time::timeout(Duration::from_secs(1), sub.next())
            .await
            .expect("a message within 1 s")
            .map(|r| parse(&r.unwrap()))
    }

    async fn take(sub: &mut Subscription, n: usize) -> Vec<(u64, String, String)> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(key(&next(sub).await.expect("stream still open")));
        }
        out
    }

    /// Nothing is waiting on the stream right now.
    fn idle(sub: &mut Subscription) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(sub).poll_next(&mut cx).is_pending()
    }

    fn state(s: &'static str) -> CallEvent {
        CallEvent::State { state: s }
    }

    fn ended() -> CallEvent {
        CallEvent::Ended {
            reason: "caller_hangup".into(),
            totals: serde_json::json!({"turns": 2}),
        }
    }

    fn k(id: u64, event: &str, sid: &str) -> (u64, String, String) {
        (id, event.to_owned(), sid.to_owned())
    }

    #[test]
    fn data_has_call_sid_ts_and_the_fields_on_one_line() {
        let ev = CallEvent::Transcript {
            role: "caller",
            text: "two\nlines \"quoted\"".into(),
            final_: true,
        };
        let msg = sse_message(7, ev.kind(), &ev.data_json("CA1", &now_rfc3339()));
        let Sse::Event { id, event, data } = parse(&msg) else {
            panic!()
        };
        assert_eq!((id, event.as_str()), (7, "transcript"));
        assert_eq!(data["call_sid"], "CA1");
        assert_eq!(data["role"], "caller");
        assert_eq!(data["text"], "two\nlines \"quoted\"");
        assert_eq!(data["final"], true);
        assert!(data.get("final_").is_none());

        let usage = CallEvent::Usage {
            tokens: None,
            seconds: Some(61.5),
            cost_usd: None,
        };
        let data: serde_json::Value = serde_json::from_str(&usage.data_json("CA1", "t")).unwrap();
        assert_eq!(data["seconds"], 61.5);
        assert!(data["cost_usd"].is_null());
        assert!(data.get("tokens").is_none());

        let kinds: Vec<&str> = [
            state("active"),
            CallEvent::BargeIn { heard_ms: 5 },
            CallEvent::Dtmf { digit: "5".into() },
            CallEvent::Restart { reason: "x".into() },
            CallEvent::Rollover { reason: "x".into() },
            CallEvent::Error { code: "x".into() },
            CallEvent::ToolCall {
                name: "n".into(),
                outcome: "ok".into(),
                ms: 3,
            },
            ended(),
        ]
        .iter()
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(&e.data_json("CA1", "t")).unwrap();
            assert!(data.as_object().unwrap().len() >= 3, "{data}");
            e.kind()
        })
        .collect();
        assert_eq!(
            kinds,
            [
                "state",
                "barge_in",
                "dtmf",
                "restart",
                "rollover",
                "error",
                "tool_call",
                "ended"
            ]
        );
    }

    #[test]
    fn last_event_id_header() {
        assert_eq!(parse_last_event_id(None), None);
        assert_eq!(parse_last_event_id(Some("")), None);
        assert_eq!(parse_last_event_id(Some("abc")), None);
        assert_eq!(parse_last_event_id(Some("-1")), None);
        assert_eq!(parse_last_event_id(Some(" 42 ")), Some(42));
        assert_eq!(parse_last_event_id(Some("0")), Some(0));
    }

    #[actix_rt::test]
    async fn ids_count_per_call_and_per_process() {
        let hub = EventHub::new(100, 16);
        let mut all = hub.subscribe_all(None);
        hub.publish("CA_A", state("connecting"));
        hub.publish("CA_B", state("connecting"));
        let mut a = hub.subscribe_call("CA_A", None).unwrap();
        hub.publish("CA_A", state("active"));
        hub.publish("CA_B", state("active"));
        hub.publish("CA_A", CallEvent::Dtmf { digit: "1".into() });

        assert_eq!(
            take(&mut a, 3).await,
            [
                k(1, "state", "CA_A"),
                k(2, "state", "CA_A"),
                k(3, "dtmf", "CA_A")
            ]
        );
        assert!(idle(&mut a));
        let mut b = hub.subscribe_call("CA_B", None).unwrap();
        assert_eq!(
            take(&mut b, 2).await,
            [k(1, "state", "CA_B"), k(2, "state", "CA_B")]
        );
        assert_eq!(
            take(&mut all, 5).await,
            [
                k(1, "state", "CA_A"),
                k(2, "state", "CA_B"),
                k(3, "state", "CA_A"),
                k(4, "state", "CA_B"),
                k(5, "dtmf", "CA_A"),
            ]
        );
        assert!(idle(&mut all));
        assert_eq!(hub.subscribers(), 3);
        drop(b);
        assert_eq!(hub.subscribers(), 2, "a closed client is not counted");
    }

    #[actix_rt::test]
    async fn late_subscribers_get_the_newest_replay_then_live() {
        let hub = EventHub::new(5, 16);
        for i in 0..12 {
            hub.publish("CA_A", CallEvent::BargeIn { heard_ms: i });
        }
        let mut late = hub.subscribe_call("CA_A", None).unwrap();
        let ids: Vec<u64> = take(&mut late, 5).await.iter().map(|m| m.0).collect();
        assert_eq!(ids, [8, 9, 10, 11, 12], "the newest replay_max");
        assert!(idle(&mut late));
        hub.publish("CA_A", state("ending"));
        assert_eq!(take(&mut late, 1).await, [k(13, "state", "CA_A")]);

        let mut resumed = hub.subscribe_call("CA_A", Some(10)).unwrap();
        let ids: Vec<u64> = take(&mut resumed, 3).await.iter().map(|m| m.0).collect();
        assert_eq!(ids, [11, 12, 13], "only after Last-Event-ID");
        assert!(idle(&mut resumed));
        let mut current = hub.subscribe_call("CA_A", Some(13)).unwrap();
        assert!(idle(&mut current));

        hub.publish("CA_B", state("connecting"));
        let mut all = hub.subscribe_all(None);
        let ids: Vec<u64> = take(&mut all, 5).await.iter().map(|m| m.0).collect();
        assert_eq!(
            ids,
            [10, 11, 12, 13, 14],
            "/events: the process's newest replay_max"
        );
        let mut all = hub.subscribe_all(Some(13));
        assert_eq!(take(&mut all, 1).await, [k(14, "state", "CA_B")]);
        assert!(idle(&mut all));
    }

    #[actix_rt::test]
    async fn a_call_stream_ends_after_ended() {
        let hub = EventHub::new(100, 16);
        hub.publish("CA_A", state("connecting"));
        let mut before = hub.subscribe_call("CA_A", None).unwrap();
        let mut all = hub.subscribe_all(None);
        hub.publish("CA_A", state("active"));
        hub.publish("CA_A", ended());
        hub.publish("CA_A", state("active")); // after the end: ignored
        assert_eq!(
            take(&mut before, 3).await,
            [
                k(1, "state", "CA_A"),
                k(2, "state", "CA_A"),
                k(3, "ended", "CA_A")
            ]
        );
        assert_eq!(next(&mut before).await, None, "closed after ended");
        assert_eq!(hub.subscribers(), 1, "only /events");

        let mut after = hub.subscribe_call("CA_A", None).unwrap();
        let got = take(&mut after, 3).await;
        assert_eq!(got.last().unwrap(), &k(3, "ended", "CA_A"));
        assert_eq!(next(&mut after).await, None, "replay, then closed");
        let mut after = hub.subscribe_call("CA_A", Some(3)).unwrap();
        assert_eq!(next(&mut after).await, None);

        // `/events` goes on.
        assert_eq!(take(&mut all, 3).await.len(), 3);
        assert!(idle(&mut all));
        hub.publish("CA_B", state("connecting"));
        assert_eq!(take(&mut all, 1).await, [k(4, "state", "CA_B")]);
    }

    #[actix_rt::test]
    async fn a_slow_subscriber_is_dropped_counted_and_never_slows_publishing() {
        let hooked = Arc::new(AtomicU64::new(0));
        let h = hooked.clone();
        let hub = EventHub::new(100, 4).on_subscriber_dropped(move || {
            h.fetch_add(1, Ordering::Relaxed);
        });
        hub.publish("CA_A", state("connecting"));
        let mut slow_call = hub.subscribe_call("CA_A", Some(1)).unwrap();
        let mut slow_all = hub.subscribe_all(Some(1));
        assert_eq!(hub.subscribers(), 2);

        let started = std::time::Instant::now();
        for i in 0..10_000 {
            hub.publish("CA_A", CallEvent::BargeIn { heard_ms: i });
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "10 000 publishes took {took:?}"
        );
        assert_eq!(hub.dropped_subscribers(), 2);
        assert_eq!(hooked.load(Ordering::Relaxed), 2);
        assert_eq!(hub.subscribers(), 0);

        for sub in [&mut slow_call, &mut slow_all] {
            let ids: Vec<u64> = take(sub, 4).await.iter().map(|m| m.0).collect();
            assert_eq!(ids, [2, 3, 4, 5], "what was queued");
            assert_eq!(
                next(sub).await,
                Some(Sse::Comment("dropped, reconnect with Last-Event-ID".into()))
            );
            assert_eq!(next(sub).await, None);
        }
        // Reconnecting with Last-Event-ID resumes from the replay.
        let mut again = hub.subscribe_call("CA_A", Some(9_990)).unwrap();
        assert_eq!(take(&mut again, 11).await.last().unwrap().0, 10_001);
        assert!(idle(&mut again));
    }

    #[actix_rt::test]
    async fn a_subscriber_that_keeps_up_is_not_dropped() {
        let hub = EventHub::new(10, 4);
        hub.publish("CA_A", state("connecting"));
        let mut sub = hub.subscribe_call("CA_A", None).unwrap();
        take(&mut sub, 1).await;
        for i in 0..100 {
            for _ in 0..4 {
                hub.publish("CA_A", CallEvent::BargeIn { heard_ms: i });
            }
            assert_eq!(take(&mut sub, 4).await.len(), 4);
        }
        assert_eq!(hub.dropped_subscribers(), 0);
        assert_eq!(hub.subscribers(), 1);
    }

    #[test]
    fn an_unknown_call_has_no_stream() {
        let hub = EventHub::new(100, 16);
        assert!(hub.subscribe_call("CA_nope", None).is_none());
        hub.publish("CA_A", state("connecting"));
        assert!(hub.subscribe_call("CA_nope", None).is_none());
        assert!(hub.subscribe_call("CA_A", None).is_some());
    }

    #[test]
    fn ended_calls_kept_are_bounded() {
        let hub = EventHub::new(100, 16);
        for i in 0..500 {
            let sid = format!("CA{i}");
            hub.publish(&sid, state("connecting"));
            hub.publish(&sid, ended());
        }
        assert!(
            hub.calls_known() <= ENDED_CALLS_KEPT,
            "{}",
            hub.calls_known()
        );
        assert!(
            hub.subscribe_call("CA499", None).is_some(),
            "the newest kept"
        );
        assert!(hub.subscribe_call("CA400", None).is_some());
        assert!(
            hub.subscribe_call("CA399", None).is_none(),
            "the oldest forgotten"
        );
        assert_eq!(hub.lock().ended.len(), ENDED_CALLS_KEPT);
        assert!(hub.lock().global_ring.len() <= 100);

        let hub = EventHub::new(100, 16).with_ended_calls_kept(3);
        hub.publish("live", state("active"));
        for i in 0..10 {
            hub.publish(&format!("CA{i}"), ended());
        }
        assert_eq!(hub.calls_known(), 4, "3 ended and the live one");
        assert!(hub.subscribe_call("live", None).is_some());
    }

    #[actix_rt::test]
    async fn keep_alive_comments_fill_silence() {
        let hub = EventHub::new(100, 16).with_keep_alive(Duration::from_millis(50));
        let mut all = hub.subscribe_all(None);
        let started = std::time::Instant::now();
        assert_eq!(
            next(&mut all).await,
            Some(Sse::Comment("keep-alive".into()))
        );
        assert!(started.elapsed() >= Duration::from_millis(45));
        hub.publish("CA_A", state("connecting"));
        assert_eq!(take(&mut all, 1).await, [k(1, "state", "CA_A")]);
        assert_eq!(
            next(&mut all).await,
            Some(Sse::Comment("keep-alive".into()))
        );

        hub.publish("CA_A", state("active"));
        let mut call = hub.subscribe_call("CA_A", None).unwrap();
        assert_eq!(take(&mut call, 2).await.len(), 2);
        assert_eq!(
            next(&mut call).await,
            Some(Sse::Comment("keep-alive".into()))
        );
    }

    #[actix_rt::test]
    async fn a_subscription_is_what_actix_web_streams() {
        let hub = Arc::new(EventHub::new(100, 16));
        hub.publish("CA_A", state("connecting"));
        let sub = hub.subscribe_call("CA_A", None).unwrap();
        let resp = actix_web::HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(sub);
        assert_eq!(resp.status(), 200);
        fn shared<T: Send + Sync + 'static>(_: &T) {}
        shared(&hub);
    }
}
