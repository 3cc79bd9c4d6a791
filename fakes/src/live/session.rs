//! One GPT-Live session as the fake server keeps it: where it is in its life (start, started,
//! closing, closed), the configuration fixed at start, the session timeline, delegations and
//! function calls, and every check of what the service sends. Pure state: the connection
//! tasks do the I/O and run the timers this asks for ([`Handled`]); every server event goes
//! out through one outbox, pushed while the state lock is held, so the wire order is the
//! order of the state changes the validator sees.
//!
//! Scripted mode (tests) records everything received; echo mode (simulator) records nothing
//! (a load runs for hours) and takes a fast path for appends that builds no
//! `serde_json::Value`.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{
    server::Knobs,
    validate::{
        bridge_findings, bytes_per_ms, decode_audio, error_event, merge_delegation,
        validate_fixture, validate_item, validate_start, validate_text_append, validate_update,
        ItemKind, CLIENT_EVENTS, MAX_APPEND_BYTES,
    },
    FakeStats, LiveEchoConfig, LiveError,
};
use crate::checks::{invalid_type, missing, object, string, unknown, Checked, Reject};

/// Violations quote the offending event, clipped to this many bytes.
const CLIP: usize = 400;

/// A session keeps at most this many violation messages (an echo session under load could
/// otherwise grow without bound); the count goes on.
const MAX_VIOLATIONS: usize = 1_000;

/// Twilio's inbound frame: 20 ms of µ-law at 8 kHz (`protocols.md` A3).
const FRAME_BYTES: usize = 160;

/// What the writer task sends to the service.
#[derive(Debug)]
pub(crate) enum Out {
    Text(String),
    /// Echo mode's `session.output_audio.delta` and how much audio it carries (paced, see
    /// `pace`).
    Audio(String, Duration),
    Close(u16, String),
    /// End the connection without a close frame (the service sees an abnormal closure, 1006).
    Drop,
    /// Nothing to send: echo mode's connection task, woken, writes what was queued inline.
    Wake,
}

/// Who ended the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closer {
    Service,
    Fake,
}

/// A timed answer the connection runs for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Send the `session.started` the delay knob held back.
    Started,
    /// Send the `session.closed` the delay knob held back.
    Closed,
    /// The audio fixture has drained: `…fixture.played`.
    FixturePlayed,
    /// `expires_at` has come: `session.closed` with reason `expired`.
    Expire,
}

/// What handling one frame (or timer) asks of the connection, besides what it emitted.
#[derive(Debug, Default)]
pub(crate) struct Handled {
    pub(crate) timers: Vec<(Duration, Timer)>,
}

/// Where a session is in its life, as far as the service's events are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// No valid `session.start` yet.
    NoStart,
    /// `session.start` accepted, `session.started` held back by the delay knob.
    StartPending,
    /// `session.start` refused: the session will not start (§3).
    Failed,
    Live,
    /// `session.close` received, `session.closed` not yet sent.
    Closing,
    /// `session.closed` sent (answered or server-initiated).
    Closed,
}

/// Which append event (§6, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendKind {
    /// `session.commentary.append`: speakable.
    Commentary,
    /// `session.instructions.append`: developer text (callbridge: DTMF).
    Instructions,
    /// `session.thinking.append`: silent context.
    Thinking,
}

impl AppendKind {
    fn from_type(kind: &str) -> Option<AppendKind> {
        match kind {
            "session.commentary.append" => Some(AppendKind::Commentary),
            "session.instructions.append" => Some(AppendKind::Instructions),
            "session.thinking.append" => Some(AppendKind::Thinking),
            _ => None,
        }
    }

    /// `commentary`, `instructions`, `thinking`: the middle of the event types.
    fn name(self) -> &'static str {
        match self {
            AppendKind::Commentary => "commentary",
            AppendKind::Instructions => "instructions",
            AppendKind::Thinking => "thinking",
        }
    }
}

/// One accepted append event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextAppend {
    pub kind: AppendKind,
    /// `null` (session-wide) or the id of a client delegation.
    pub delegation_id: Option<String>,
    pub content: String,
    pub event_id: Option<String>,
    /// Position on the session timeline when it arrived (its ack's `start_ms`).
    pub at_ms: u64,
}

/// A function call the fake scripted (§9.2) and whether the service answered it.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) answered: bool,
}

/// A function call echo mode scripted (§9.2), from its delegation to its `response.completed`.
#[derive(Clone, Debug)]
struct EchoCall {
    delegation_id: String,
    response_id: String,
    call_id: String,
    /// The service's `function_call_output`, once it came.
    output: Option<String>,
}

/// What `session.start` fixed (§2).
#[derive(Clone, Debug)]
pub(crate) struct Started {
    /// The `session` object as the service sent it.
    pub(crate) raw: Value,
    /// Its resolved form, with server defaults (what `session.started` echoes).
    pub(crate) resolved: Value,
    bytes_per_ms: usize,
}

/// An `session.input_audio.append` read without building a JSON tree. Any frame this does
/// not parse (another type, a JSON escape, a duplicate key, a wrong type…) goes the slow way,
/// which is the authority on what is valid.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FastAppend<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default, deserialize_with = "present_str")]
    event_id: Option<&'a str>,
    audio: &'a str,
}

/// `event_id` when present must be a string: `null` fails here (and so takes the slow path,
/// where it is an `invalid_type`), unlike a plain `Option`.
fn present_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    <&str>::deserialize(d).map(Some)
}

pub(crate) struct SessionState {
    pub(crate) index: usize,
    pub(crate) session_id: String,
    pub(crate) api_key: String,
    event_seq: u64,
    out: mpsc::UnboundedSender<Out>,
    /// Echo mode queues here instead of in `out`: its one connection task writes the queue
    /// after each frame it reads (see `server::echo_loop`).
    inline: Option<Vec<Out>>,
    echo: Option<Arc<LiveEchoConfig>>,
    stats: Arc<FakeStats>,
    knobs: Arc<Knobs>,
    /// Every client frame in order (scripted mode only): parsed JSON, or the raw text as a
    /// JSON string when it was not JSON, or `{"binary_frame": len}`.
    pub(crate) log: Vec<Value>,
    pub(crate) violations: Vec<String>,
    pub(crate) violation_count: usize,

    // ----- life
    /// The accepted `session.start`.
    pub(crate) start: Option<Started>,
    start_event_id: Option<String>,
    start_failed: bool,
    started_sent: bool,
    started_at: Option<Instant>,
    expires_at: u64,
    /// `session.close` received, with its `event_id`.
    close_received: Option<Option<String>>,
    /// The reason of the `session.closed` sent, if any.
    pub(crate) closed_reason: Option<String>,
    pub(crate) final_usage: Option<f64>,
    /// Violations of the kind "audio at the wrong moment" are recorded once per session (a
    /// service that streams early would flood the list).
    misplaced_audio_reported: bool,
    framing_reported: bool,

    // ----- what the service sent
    /// Decoded appended audio (scripted mode only).
    pub(crate) audio: Vec<u8>,
    pub(crate) append_count: usize,
    /// Input audio bytes: the session timeline (§4.1).
    input_bytes: usize,
    pub(crate) text_appends: Vec<TextAppend>,
    pub(crate) item_creates: Vec<Value>,
    pub(crate) response_creates: usize,
    pub(crate) updates_accepted: usize,
    pub(crate) muted: bool,
    /// The playing audio fixture's client event id (`Some(None)`: playing, no id).
    fixture: Option<Option<String>>,
    pub(crate) fixtures_played: usize,

    // ----- the model's side
    /// Delegations announced by the fake: id → target (`client` / `responses`).
    pub(crate) delegations: HashMap<String, String>,
    /// Function calls the fake scripted, by `call_id`.
    pub(crate) calls: HashMap<String, Call>,
    /// Next `sequence_number` of the nested Responses events.
    pub(crate) response_seq: u64,
    /// Last `usage.seconds` sent (cumulative, §11).
    pub(crate) usage_sent: f64,
    /// When set, the final `usage.seconds` of `session.closed`.
    pub(crate) usage_override: Option<f64>,

    // ----- the socket
    pub(crate) closed: bool,
    pub(crate) closer: Option<Closer>,
    /// Close code of the close frame the service sent, if it sent one.
    pub(crate) service_close_code: Option<u16>,
    /// The service ended the socket after `session.close` but before `session.closed`.
    pub(crate) closed_before_session_closed: bool,

    // ----- echo mode
    echo_since_transcript: usize,
    echo_since_usage: usize,
    /// Caller audio since the last scripted function call, bytes (not counted while a call
    /// waits for its output).
    echo_since_tool: usize,
    /// Function calls scripted so far (the number in their ids).
    echo_tool_calls: u64,
    /// Scripted calls not completed yet: waiting for their output, or answered and waiting
    /// for the `response.create` that lets the backend finish.
    echo_calls: Vec<EchoCall>,
    /// Reused by every append: decoding needs no allocation per frame.
    scratch: Vec<u8>,
}

impl SessionState {
    pub(crate) fn new(
        index: usize,
        api_key: String,
        out: mpsc::UnboundedSender<Out>,
        echo: Option<Arc<LiveEchoConfig>>,
        stats: Arc<FakeStats>,
        knobs: Arc<Knobs>,
    ) -> SessionState {
        SessionState {
            index,
            session_id: format!("live_fake{index:04}"),
            api_key,
            event_seq: 0,
            out,
            inline: echo.is_some().then(Vec::new),
            echo,
            stats,
            knobs,
            log: Vec::new(),
            violations: Vec::new(),
            violation_count: 0,
            start: None,
            start_event_id: None,
            start_failed: false,
            started_sent: false,
            started_at: None,
            expires_at: 0,
            close_received: None,
            closed_reason: None,
            final_usage: None,
            misplaced_audio_reported: false,
            framing_reported: false,
            audio: Vec::new(),
            append_count: 0,
            input_bytes: 0,
            text_appends: Vec::new(),
            item_creates: Vec::new(),
            response_creates: 0,
            updates_accepted: 0,
            muted: false,
            fixture: None,
            fixtures_played: 0,
            delegations: HashMap::new(),
            calls: HashMap::new(),
            response_seq: 0,
            usage_sent: 0.0,
            usage_override: None,
            closed: false,
            closer: None,
            service_close_code: None,
            closed_before_session_closed: false,
            echo_since_transcript: 0,
            echo_since_usage: 0,
            echo_since_tool: 0,
            echo_tool_calls: 0,
            echo_calls: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Scripted mode records everything received; echo mode nothing.
    fn recording(&self) -> bool {
        self.echo.is_none()
    }

    /// Echo mode with its output at real-time pace.
    pub(crate) fn paces_output(&self) -> bool {
        self.echo.as_ref().is_some_and(|e| e.pace_output)
    }

    pub(crate) fn violate(&mut self, msg: String) {
        self.violation_count += 1;
        self.stats.violations.fetch_add(1, Ordering::Relaxed);
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(msg);
        }
    }

    fn stage(&self) -> Stage {
        if self.closed_reason.is_some() {
            Stage::Closed
        } else if self.close_received.is_some() {
            Stage::Closing
        } else if self.start_failed {
            Stage::Failed
        } else if self.start.is_none() {
            Stage::NoStart
        } else if !self.started_sent {
            Stage::StartPending
        } else {
            Stage::Live
        }
    }

    /// The position on the session timeline, in ms: input audio so far (§4.1).
    pub(crate) fn timeline_ms(&self) -> u64 {
        let per_ms = self.start.as_ref().map_or(8, |s| s.bytes_per_ms);
        (self.input_bytes / per_ms) as u64
    }

    /// The delegation type fixed at start (`client` when there is no start yet).
    pub(crate) fn delegation_type(&self) -> &str {
        self.start
            .as_ref()
            .and_then(|s| s.resolved["delegation"]["type"].as_str())
            .unwrap_or("client")
    }

    /// Cumulative billable seconds now: the test's override, else session time since
    /// `session.started` (silence included, §11) to a tenth of a second, never less than what
    /// was already reported.
    pub(crate) fn usage_now(&self) -> f64 {
        if let Some(seconds) = self.usage_override {
            return seconds;
        }
        let elapsed = self
            .started_at
            .map_or(0.0, |t| (t.elapsed().as_secs_f64() * 10.0).floor() / 10.0);
        elapsed.max(self.usage_sent)
    }

    // ----- sending

    /// Sends a server event, giving it an `event_id`.
    pub(crate) fn emit(&mut self, mut event: Value) {
        self.event_seq += 1;
        let id = format!("evt_fake{:02}{:06}", self.index, self.event_seq);
        if let Some(obj) = event.as_object_mut() {
            obj.insert("event_id".into(), id.into());
        }
        self.send_raw(Out::Text(event.to_string()));
    }

    pub(crate) fn send_raw(&mut self, out: Out) -> bool {
        match &mut self.inline {
            Some(queue) => {
                queue.push(out);
                true
            }
            None => self.out.send(out).is_ok(),
        }
    }

    /// Echo mode: swaps the queued events into `batch` (empty; the two buffers take turns, so
    /// the hot path allocates none).
    pub(crate) fn take_inline(&mut self, batch: &mut Vec<Out>) {
        if let Some(queue) = &mut self.inline {
            std::mem::swap(queue, batch);
        }
    }

    /// Events emitted outside the handling of a frame (a timer) must wake echo mode's
    /// connection task; in scripted mode the channel has done so already.
    pub(crate) fn wake(&self) {
        if self.inline.is_some() {
            let _ = self.out.send(Out::Wake);
        }
    }

    /// A `session.output_audio.delta` (§4.2): only `type` and `delta`, no `event_id` on a
    /// primary WebSocket. Built by hand: in echo mode this runs for every append. `b64` is
    /// checked base64, which needs no JSON escaping.
    pub(crate) fn audio_delta_text(b64: &str) -> String {
        let mut text = String::with_capacity(48 + b64.len());
        text.push_str(r#"{"type":"session.output_audio.delta","delta":""#);
        text.push_str(b64);
        text.push_str(r#""}"#);
        text
    }

    fn error(&mut self, reject: &Reject, client_event_id: Option<&str>) {
        self.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
        self.emit(error_event(reject, client_event_id));
    }

    /// A scripted or configured error (no violation: the test asked for it).
    pub(crate) fn send_error(&mut self, error: &LiveError, client_event_id: Option<&str>) {
        self.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
        self.emit(json!({"type": "error", "client_event_id": client_event_id,
            "error": error.to_json(client_event_id)}));
    }

    /// A rejected client event: a violation quoting it, and the `error` the real API sends.
    fn reject(&mut self, reject: Reject, text: &str, client_event_id: Option<&str>) {
        self.violate(format!(
            "{} ({}): {}",
            reject.code,
            reject.message,
            crate::clip(text, CLIP)
        ));
        self.error(&reject, client_event_id);
    }

    /// The session snapshot of `session.updated` / `session.closed` (§10, §12): identity,
    /// model and audio, with the delegation when asked.
    fn snapshot(&self, with_delegation: bool) -> Value {
        let Some(start) = &self.start else {
            return Value::Null;
        };
        let r = &start.resolved;
        let mut snap = json!({"id": r["id"], "status": "active", "expires_at": r["expires_at"],
            "model": r["model"], "audio": r["audio"]});
        if with_delegation {
            snap["delegation"] = r["delegation"].clone();
        }
        snap
    }

    // ----- the model's side (answers, timers, and what the scripts share)

    /// `session.started` for the accepted start (§3), the session clock starts, and its
    /// expiry is scheduled; a `session.close` that came while it was held is answered next.
    fn send_started(&mut self, handled: &mut Handled) {
        if self.started_sent || self.closed_reason.is_some() {
            return;
        }
        let Some(start) = &self.start else {
            return;
        };
        let session = start.resolved.clone();
        let client_event_id = self.start_event_id.clone();
        self.emit(
            json!({"type": "session.started", "client_event_id": client_event_id,
            "session": session}),
        );
        self.started_sent = true;
        self.started_at = Some(Instant::now());
        let secs = self.knobs.session_secs.load(Ordering::SeqCst);
        handled
            .timers
            .push((Duration::from_secs(secs), Timer::Expire));
        if self.close_received.is_some() {
            self.answer_close(handled);
        }
    }

    /// Answers a received `session.close`, now or after the delay knob (never, when told to
    /// ignore it).
    fn answer_close(&mut self, handled: &mut Handled) {
        if self.knobs.ignore_close.load(Ordering::SeqCst) {
            return;
        }
        let delay = self.knobs.closed_delay_ms.load(Ordering::SeqCst);
        if delay == 0 {
            self.send_closed("close_requested");
        } else {
            handled
                .timers
                .push((Duration::from_millis(delay), Timer::Closed));
        }
    }

    /// `session.closed` with `reason`, the final snapshot and the final usage (§12). Once per
    /// session. The socket stays open: the bridge closes it.
    pub(crate) fn send_closed(&mut self, reason: &str) {
        if self.closed_reason.is_some() {
            return;
        }
        let seconds = self.usage_now();
        let client_event_id = match (&self.close_received, reason) {
            (Some(id), "close_requested") => id.clone(),
            _ => None,
        };
        let session = self.snapshot(false);
        self.emit(
            json!({"type": "session.closed", "client_event_id": client_event_id,
            "reason": reason, "usage": {"seconds": seconds}, "session": session}),
        );
        self.closed_reason = Some(reason.to_owned());
        self.final_usage = Some(seconds);
        self.usage_sent = seconds;
    }

    /// A `session.usage.updated` (§11).
    pub(crate) fn send_usage(&mut self, seconds: f64, usage_ratio: Option<f64>) {
        let mut event = json!({"type": "session.usage.updated", "usage": {"seconds": seconds}});
        if let Some(ratio) = usage_ratio {
            event["context_window"] = json!({ "usage_ratio": ratio });
        }
        self.emit(event);
        self.usage_sent = seconds;
    }

    /// `session.delegation.created` (§9) at the current timeline position; the delegation is
    /// remembered (appends and outputs are judged against it).
    pub(crate) fn delegate(&mut self, id: &str, target: &str, response_id: Option<&str>) {
        self.delegations.insert(id.to_owned(), target.to_owned());
        let mut delegation = json!({"type": "delegation", "id": id, "target": target});
        if let Some(response_id) = response_id {
            delegation["response_id"] = response_id.into();
        }
        let offset_ms = self.timeline_ms();
        self.emit(
            json!({"type": "session.delegation.created", "offset_ms": offset_ms,
            "delegation": delegation}),
        );
    }

    /// A `response.event` wrapping a backend Responses streaming event (§9.2); a
    /// `sequence_number` is added when the event has none.
    pub(crate) fn response_event(&mut self, delegation_id: &str, mut event: Value) {
        if event.get("sequence_number").is_none() {
            event["sequence_number"] = self.response_seq.into();
        }
        self.response_seq += 1;
        self.emit(
            json!({"type": "response.event", "delegation_id": delegation_id,
            "event": event}),
        );
    }

    /// A backend function call (`response.output_item.done`, item `function_call`, §9.2). A
    /// `completed` one is registered: the service owes it exactly one output; any other
    /// status (cut short) is not, and an output for it is refused.
    pub(crate) fn function_call_item(
        &mut self,
        delegation_id: &str,
        call_id: &str,
        name: &str,
        arguments: &str,
        status: &str,
    ) {
        if status == "completed" {
            self.calls
                .insert(call_id.to_owned(), Call { answered: false });
        }
        let item = json!({"type": "function_call", "id": format!("fc_{call_id}"),
            "call_id": call_id, "name": name, "arguments": arguments, "status": status});
        self.response_event(
            delegation_id,
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        );
    }

    /// The backend response is over (`response.completed`, with token usage, §9.2).
    pub(crate) fn response_completed(&mut self, delegation_id: &str, response_id: &str) {
        let response = json!({"id": response_id, "object": "response", "created_at": 0,
            "model": "gpt-5.5", "status": "completed", "output": [], "tools": [],
            "tool_choice": "auto", "parallel_tool_calls": true,
            "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 10, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 110}});
        self.response_event(
            delegation_id,
            json!({"type": "response.completed", "response": response}),
        );
    }

    /// Runs a timer the connection scheduled.
    pub(crate) fn fire(&mut self, timer: Timer) -> Handled {
        let mut handled = Handled::default();
        if self.closed {
            // Nobody to answer: the socket is gone.
            return handled;
        }
        match timer {
            Timer::Started => self.send_started(&mut handled),
            Timer::Closed => self.send_closed("close_requested"),
            Timer::Expire => {
                if self.started_sent {
                    self.send_closed("expired");
                }
            }
            Timer::FixturePlayed => {
                if let Some(id) = self.fixture.take() {
                    self.fixtures_played += 1;
                    self.emit(json!({"type": "session.output_audio.fixture.played",
                        "client_event_id": id}));
                }
            }
        }
        handled
    }

    /// The fixture playing now ends (a script's `fixture_played`); false if none plays.
    pub(crate) fn end_fixture(&mut self) -> bool {
        self.fire(Timer::FixturePlayed);
        self.fixture.is_none()
    }

    // ----- the socket's end

    /// The socket is gone. A service that ends a started session without `session.close`
    /// (and without a `session.closed` of the server's) leaves it unfinalized (§0.6, §12).
    pub(crate) fn socket_ended(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.closer.is_none() {
            self.closer = Some(Closer::Service);
        }
        if self.closer != Some(Closer::Service) {
            return;
        }
        match (&self.close_received, &self.closed_reason) {
            (None, None) if self.started_sent => self.violate(
                "the service closed the socket of a started session without session.close: \
                 finalization and the final usage stay unconfirmed (end with session.close, \
                 then wait for session.closed)"
                    .to_owned(),
            ),
            (Some(_), None) => self.closed_before_session_closed = true,
            _ => {}
        }
    }

    // ----- client events

    /// A binary frame: client events are JSON text.
    pub(crate) fn on_binary(&mut self, len: usize) {
        if self.recording() {
            self.log.push(json!({ "binary_frame": len }));
        }
        self.violate(format!(
            "binary frame of {len} bytes: client events are JSON text frames (§1)"
        ));
        let err = Reject::new(
            "invalid_json",
            "The server could not parse the event: binary frames are not supported.".into(),
            None,
        );
        self.error(&err, None);
    }

    /// One text frame from the service.
    pub(crate) fn on_text(&mut self, text: &str) -> Handled {
        let mut handled = Handled::default();
        if !self.recording() {
            if let Ok(fast) = serde_json::from_str::<FastAppend<'_>>(text) {
                if fast.kind == "session.input_audio.append" {
                    if let Err(reject) = self.append(fast.audio) {
                        self.reject(reject, text, fast.event_id);
                    }
                    return handled;
                }
            }
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                if self.recording() {
                    self.log.push(Value::String(text.to_owned()));
                }
                self.violate(format!(
                    "client frame is not JSON ({e}): {}",
                    crate::clip(text, CLIP)
                ));
                let err = Reject::new(
                    "invalid_json",
                    format!("The server could not parse the JSON payload of the event: {e}"),
                    None,
                );
                self.error(&err, None);
                return handled;
            }
        };
        if self.recording() {
            self.log.push(value.clone());
        }
        let client_event_id = value
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Err(reject) = self.dispatch(&value, client_event_id.as_deref(), &mut handled) {
            self.reject(reject, text, client_event_id.as_deref());
        }
        handled
    }

    fn dispatch(&mut self, value: &Value, id: Option<&str>, handled: &mut Handled) -> Checked {
        let Some(event) = value.as_object() else {
            return Err(invalid_type("", "an object", value));
        };
        if let Some(event_id) = event.get("event_id") {
            if !event_id.is_string() {
                return Err(invalid_type("event_id", "a string", event_id));
            }
        }
        let kind = match event.get("type") {
            None => return Err(missing("type")),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(invalid_type("type", "a string", other)),
        };
        let Some((_, allowed)) = CLIENT_EVENTS.iter().find(|(name, _)| *name == kind) else {
            let names: Vec<String> = CLIENT_EVENTS
                .iter()
                .map(|(n, _)| format!("'{n}'"))
                .collect();
            return Err(Reject::invalid_value(
                "type",
                format!(
                    "Invalid value: '{kind}'. Supported values are: {}.",
                    names.join(", ")
                ),
            ));
        };
        if let Some(key) = event
            .keys()
            .find(|k| *k != "type" && *k != "event_id" && !allowed.contains(&k.as_str()))
        {
            return Err(unknown(key));
        }
        match kind {
            "session.start" => self.session_start(event, id, handled),
            "session.update" => self.session_update(event),
            "session.input_audio.append" => {
                let audio = string(event.get("audio").ok_or_else(|| missing("audio"))?, "audio")?;
                self.append(audio)
            }
            "session.input_audio.mute" | "session.input_audio.unmute" => {
                if self.admit(kind) {
                    let mute = kind.ends_with(".mute");
                    self.muted = mute;
                    let ack = if mute { "muted" } else { "unmuted" };
                    self.emit(json!({"type": format!("session.input_audio.{ack}"),
                        "client_event_id": id}));
                }
                Ok(())
            }
            "session.output_audio.fixture.play" => self.fixture_play(event, id, handled),
            "response.item.create" => self.item_create(event),
            "response.create" => {
                if self.admit(kind) {
                    self.require_responses(kind)?;
                    self.response_creates += 1;
                    if self.echo.is_some() {
                        self.echo_complete_answered();
                    }
                }
                Ok(())
            }
            "session.close" => {
                self.session_close(id, handled);
                Ok(())
            }
            _ => {
                let append =
                    AppendKind::from_type(kind).expect("invariant: listed in CLIENT_EVENTS");
                self.text_append(append, event, id)
            }
        }
    }

    /// Whether an event that needs a session is processed now. Events before `session.start`,
    /// after a refused one or after `session.close` are violations and ignored; events while
    /// `session.started` is held back are violations and processed (the real service's
    /// handling of either is unconfirmed, §3). Audio is reported once per session.
    fn admit(&mut self, kind: &str) -> bool {
        let (why, process) = match self.stage() {
            Stage::Live => return true,
            Stage::StartPending => (
                "before session.started was delivered (the service did not wait for it, §3)",
                true,
            ),
            Stage::NoStart => ("before session.start: there is no session yet", false),
            Stage::Failed => (
                "after its session.start was refused: the session will not start (§3)",
                false,
            ),
            Stage::Closing => ("after session.close (§12)", false),
            Stage::Closed => ("after session.closed: the session is over (§12)", false),
        };
        let audio = kind == "session.input_audio.append";
        if !audio || !self.misplaced_audio_reported {
            self.misplaced_audio_reported |= audio;
            self.violate(format!("{kind} sent {why}"));
        }
        process
    }

    fn require_responses(&self, kind: &str) -> Checked {
        if self.delegation_type() == "responses" {
            return Ok(());
        }
        Err(Reject::new(
            "responses_delegation_required",
            format!(
                "{kind} requires Responses delegation; this session's delegation is '{}'.",
                self.delegation_type()
            ),
            None,
        ))
    }

    fn session_start(
        &mut self,
        event: &Map<String, Value>,
        id: Option<&str>,
        handled: &mut Handled,
    ) -> Checked {
        match self.stage() {
            Stage::NoStart => {}
            Stage::StartPending | Stage::Live => {
                return Err(Reject::new(
                    "session_already_started",
                    "This connection already has a session: its configuration is fixed at \
                     start (open a new connection for a new session)."
                        .into(),
                    None,
                ))
            }
            Stage::Failed | Stage::Closing | Stage::Closed => {
                self.admit("session.start");
                return Ok(());
            }
        }
        let session = event.get("session").ok_or_else(|| missing("session"));
        let checked = session
            .and_then(|s| object(s, "session"))
            .and_then(|s| validate_start(s).map(|()| s));
        let session = match checked {
            Ok(session) => session,
            Err(reject) => {
                self.start_failed = true;
                return Err(reject);
            }
        };
        for finding in bridge_findings(session) {
            self.violate(finding);
        }
        self.start_event_id = id.map(str::to_owned);
        let start_error = crate::lock(&self.knobs.start_error).clone();
        if let Some(error) = start_error {
            // The test asked for a startup failure (quota, model access…): no violation.
            self.start_failed = true;
            self.send_error(&error, id);
            return Ok(());
        }
        let secs = self.knobs.session_secs.load(Ordering::SeqCst);
        self.expires_at = unix_now() + secs;
        self.start = Some(self.resolve(session));
        let delay = self.knobs.started_delay_ms.load(Ordering::SeqCst);
        if delay == 0 {
            self.send_started(handled);
        } else {
            handled
                .timers
                .push((Duration::from_millis(delay), Timer::Started));
        }
        Ok(())
    }

    /// The configuration with server defaults: voice `marin`, client delegation, no history,
    /// no store; pcm 24 kHz when no format was given (unconfirmed, and a violation for
    /// callbridge anyway).
    fn resolve(&self, s: &Map<String, Value>) -> Started {
        let get = |key: &str| s.get(key).filter(|v| !v.is_null());
        let audio = get("audio").cloned().unwrap_or(json!({}));
        let format = audio
            .get("format")
            .filter(|f| !f.is_null())
            .cloned()
            .unwrap_or(json!({"type": "audio/pcm", "rate": 24000}));
        let voice = audio["output"]
            .get("voice")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(json!("marin"));
        let mut resolved = json!({
            "id": self.session_id,
            "status": "active",
            "expires_at": self.expires_at,
            "model": s["model"],
            "audio": {"format": format, "output": {"voice": voice}},
            "delegation": get("delegation").cloned().unwrap_or(json!({"type": "client"})),
            "input": get("input").cloned().unwrap_or(json!([])),
            "store": get("store").cloned().unwrap_or(json!(false)),
        });
        if let Some(instructions) = get("instructions") {
            resolved["instructions"] = instructions.clone();
        }
        Started {
            raw: Value::Object(s.clone()),
            bytes_per_ms: bytes_per_ms(&format),
            resolved,
        }
    }

    fn session_update(&mut self, event: &Map<String, Value>) -> Checked {
        let session = object(
            event.get("session").ok_or_else(|| missing("session"))?,
            "session",
        )?;
        validate_update(session)?;
        if !self.admit("session.update") {
            return Ok(());
        }
        if session.contains_key("triggers") {
            self.violate("session.update with triggers: Decisions are not for a bridge".into());
        }
        if let Some(patch) = session.get("delegation") {
            let current = self.delegation_type().to_owned();
            let wanted = patch["type"].as_str().unwrap_or("client");
            if wanted != current {
                return Err(Reject::invalid_value(
                    "session.delegation.type",
                    format!(
                        "Invalid 'session.delegation.type': '{wanted}'. The delegation type \
                         cannot change after startup (this session's is '{current}')."
                    ),
                ));
            }
            if let (Some(start), Some(patch)) = (self.start.as_mut(), patch.as_object()) {
                merge_delegation(&mut start.resolved["delegation"], patch);
            }
        }
        self.updates_accepted += 1;
        let session = self.snapshot(true);
        let client_event_id = event.get("event_id").cloned();
        self.emit(
            json!({"type": "session.updated", "client_event_id": client_event_id,
            "session": session}),
        );
        Ok(())
    }

    /// `session.input_audio.append` (§4.1): non-empty strict base64, no acknowledgement.
    fn append(&mut self, audio: &str) -> Checked {
        decode_audio(audio, &mut self.scratch, MAX_APPEND_BYTES, "audio")?;
        if !self.admit("session.input_audio.append") {
            return Ok(());
        }
        let bytes = self.scratch.len();
        let per_ms = self.start.as_ref().map_or(8, |s| s.bytes_per_ms);
        // G.711 (1 byte a sample) in Twilio's 20 ms frames; PCM16 in whole samples.
        let (whole, unit) = if per_ms == 8 {
            (bytes % FRAME_BYTES == 0, "20 ms µ-law frames (160 bytes)")
        } else {
            (bytes % 2 == 0, "PCM16 samples (2 bytes)")
        };
        if !whole && !self.framing_reported {
            self.framing_reported = true;
            self.violate(format!(
                "session.input_audio.append of {bytes} bytes is not whole {unit}: callbridge \
                 passes Twilio's frames through unchanged (reported once per session)"
            ));
        }
        self.append_count += 1;
        self.input_bytes += bytes;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        if self.recording() {
            self.audio.extend_from_slice(&self.scratch);
        }
        if let Some(echo) = self.echo.clone() {
            self.echo_append(&echo, audio, bytes, per_ms);
        }
        Ok(())
    }

    /// The three append events (§6, §7), acknowledged by `session.<name>.appended`.
    fn text_append(
        &mut self,
        kind: AppendKind,
        event: &Map<String, Value>,
        id: Option<&str>,
    ) -> Checked {
        let (delegation_id, content) = validate_text_append(event)?;
        let type_name = format!("session.{}.append", kind.name());
        if !self.admit(&type_name) {
            return Ok(());
        }
        if self.fixture.is_some() {
            return Err(fixture_active(&format!(
                "{type_name} is refused while an audio fixture plays."
            )));
        }
        if let Some(d) = delegation_id {
            if self.delegation_type() == "responses" {
                return Err(Reject::invalid_value(
                    "delegation_id",
                    "Invalid 'delegation_id': non-null ids are not accepted with Responses \
                     delegation."
                        .into(),
                ));
            }
            match self.delegations.get(d).map(String::as_str) {
                Some("client") => {}
                Some(_) => {
                    return Err(Reject::invalid_value(
                        "delegation_id",
                        format!("Invalid 'delegation_id': '{d}' is not a client delegation."),
                    ))
                }
                None => {
                    return Err(Reject::invalid_value(
                        "delegation_id",
                        format!(
                            "Invalid 'delegation_id': no delegation '{d}' was created in this \
                             session."
                        ),
                    ))
                }
            }
        }
        let at_ms = self.timeline_ms();
        if self.recording() {
            self.text_appends.push(TextAppend {
                kind,
                delegation_id: delegation_id.map(str::to_owned),
                content: content.to_owned(),
                event_id: id.map(str::to_owned),
                at_ms,
            });
        }
        self.emit(json!({"type": format!("session.{}.appended", kind.name()),
            "client_event_id": id, "start_ms": at_ms, "end_ms": at_ms}));
        Ok(())
    }

    /// `session.output_audio.fixture.play` (§8): one clip at a time; `playing` at once,
    /// `played` once its duration has passed.
    fn fixture_play(
        &mut self,
        event: &Map<String, Value>,
        id: Option<&str>,
        handled: &mut Handled,
    ) -> Checked {
        let audio = string(event.get("audio").ok_or_else(|| missing("audio"))?, "audio")?;
        let ms = validate_fixture(audio, &mut self.scratch)?;
        if !self.admit("session.output_audio.fixture.play") {
            return Ok(());
        }
        if self.fixture.is_some() {
            return Err(fixture_active("Only one audio fixture can play at a time."));
        }
        self.fixture = Some(id.map(str::to_owned));
        self.emit(json!({"type": "session.output_audio.fixture.playing", "client_event_id": id}));
        handled
            .timers
            .push((Duration::from_millis(ms), Timer::FixturePlayed));
        Ok(())
    }

    /// `response.item.create` (§9.2): Responses delegation, one output per scripted call.
    fn item_create(&mut self, event: &Map<String, Value>) -> Checked {
        let item = event.get("item").ok_or_else(|| missing("item"))?;
        let kind = validate_item(item)?;
        if !self.admit("response.item.create") {
            return Ok(());
        }
        self.require_responses("response.item.create")?;
        if let ItemKind::FunctionCallOutput { call_id } = kind {
            match self.calls.get_mut(call_id) {
                None => {
                    return Err(Reject::invalid_value(
                        "item.call_id",
                        format!(
                            "Invalid 'item.call_id': no function call '{call_id}' is waiting \
                             for output in this session."
                        ),
                    ))
                }
                Some(call) if call.answered => {
                    return Err(Reject::invalid_value(
                        "item.call_id",
                        format!(
                            "Invalid 'item.call_id': function call '{call_id}' already has an \
                             output (one output per call)."
                        ),
                    ))
                }
                Some(call) => call.answered = true,
            }
            if let Some(call) = self.echo_calls.iter_mut().find(|c| c.call_id == call_id) {
                call.output = Some(item["output"].as_str().unwrap_or_default().to_owned());
            }
        }
        if self.recording() {
            self.item_creates.push(item.clone());
        }
        Ok(())
    }

    /// `session.close` (§12): `session.closed` follows (after `session.started`, when that is
    /// still held back).
    fn session_close(&mut self, id: Option<&str>, handled: &mut Handled) {
        match self.stage() {
            Stage::Live => {
                self.close_received = Some(id.map(str::to_owned));
                self.answer_close(handled);
            }
            // Closing before the session answered is fine; `send_started` answers it.
            Stage::StartPending => self.close_received = Some(id.map(str::to_owned)),
            _ => {
                self.admit("session.close");
            }
        }
    }

    // ----- echo mode

    /// Echoes one append as an output delta; now and then an output transcript fragment and a
    /// usage update.
    fn echo_append(&mut self, echo: &LiveEchoConfig, audio: &str, bytes: usize, per_ms: usize) {
        let duration = Duration::from_micros((bytes * 1_000 / per_ms.max(1)) as u64);
        self.send_raw(Out::Audio(Self::audio_delta_text(audio), duration));
        self.echo_since_transcript += bytes;
        self.echo_since_usage += bytes;
        let every = echo.transcript_every_ms as usize * per_ms;
        if every > 0 && self.echo_since_transcript >= every {
            self.echo_since_transcript = 0;
            let end = self.timeline_ms();
            self.emit(
                json!({"type": "session.output_transcript.delta", "delta": " echo",
                "start_ms": end.saturating_sub(echo.transcript_every_ms), "end_ms": end}),
            );
        }
        let every = echo.usage_every_ms as usize * per_ms;
        if every > 0 && self.echo_since_usage >= every {
            self.echo_since_usage = 0;
            let seconds = self.usage_now();
            self.send_usage(seconds, None);
        }
        if echo.tool_call_every_ms > 0 {
            if let Some((name, arguments)) = &echo.tool_call {
                let every = echo.tool_call_every_ms as usize * per_ms;
                self.echo_tool_tick(name, arguments, bytes, every);
            }
        }
    }

    /// Counts caller audio towards the next function call and scripts it when due: with
    /// Responses delegation, `session.delegation.created` then the backend's completed
    /// `function_call` (registered, so its output is judged like a scripted one's). While a
    /// call waits for its output, the model waits too.
    fn echo_tool_tick(&mut self, name: &str, arguments: &str, bytes: usize, every: usize) {
        if self.echo_calls.iter().any(|c| c.output.is_none()) {
            return;
        }
        self.echo_since_tool += bytes;
        if self.echo_since_tool < every {
            return;
        }
        self.echo_since_tool = 0;
        if self.delegation_type() != "responses" {
            return; // client delegation: the server sends no function calls
        }
        self.echo_tool_calls += 1;
        let n = self.echo_tool_calls;
        let call = EchoCall {
            delegation_id: format!("dlg_echo{:02}_{n}", self.index),
            response_id: format!("resp_echo{:02}_{n}", self.index),
            call_id: format!("call_echo{:02}_{n}", self.index),
            output: None,
        };
        self.delegate(&call.delegation_id, "responses", Some(&call.response_id));
        self.function_call_item(
            &call.delegation_id,
            &call.call_id,
            name,
            arguments,
            "completed",
        );
        self.echo_calls.push(call);
    }

    /// A `response.create` lets the backend finish the delegations whose calls have their
    /// output: `response.completed`, then the live model says what the tool said (an output
    /// transcript fragment), so the round trip shows in the service's transcript.
    fn echo_complete_answered(&mut self) {
        if !self.echo_calls.iter().any(|c| c.output.is_some()) {
            return;
        }
        let (done, waiting) = std::mem::take(&mut self.echo_calls)
            .into_iter()
            .partition(|c| c.output.is_some());
        self.echo_calls = waiting;
        for call in done {
            self.response_completed(&call.delegation_id, &call.response_id);
            let output = call.output.unwrap_or_default();
            let said: String = output.chars().take(60).collect();
            let at = self.timeline_ms();
            self.emit(json!({"type": "session.output_transcript.delta",
                "delta": format!(" tool said: {said}"), "start_ms": at, "end_ms": at}));
        }
    }
}

fn fixture_active(message: &str) -> Reject {
    Reject::new("audio_fixture_active", message.to_owned(), None)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
