//! One Realtime session as the fake server keeps it: the effective configuration, the
//! conversation's items, the response being produced, and every check of what the service
//! sends. Pure state: the connection tasks do the I/O, and every server event goes out through
//! one unbounded channel (the outbox), pushed while the state lock is held so that the wire
//! order is the order of the state changes the validator sees.
//!
//! Two modes share it. *Scripted* (tests): the fake never speaks on its own, a test drives the
//! model through `FakeSession`, and everything received is recorded. *Echo* (simulator): each
//! append comes back as a delta inside GA-ordered responses, nothing is recorded (a load runs
//! for hours), and appends take a fast path that builds no `serde_json::Value`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{
    flood::FloodShared,
    validate::{
        invalid_type, merge_session, missing, object, string, unknown, validate_item,
        validate_response, validate_session, Checked, Reject, CLIENT_EVENTS,
    },
    EchoConfig, FakeStats, Fault,
};

/// Violations quote the offending event, clipped to this many bytes.
const CLIP: usize = 400;

/// A session keeps at most this many violation messages (an echo session under load could
/// otherwise grow without bound); the count goes on.
const MAX_VIOLATIONS: usize = 1_000;

/// The start of every `response.output_audio.delta`, up to its `event_id`'s value.
const DELTA_PREFIX: &str = r#"{"type":"response.output_audio.delta","event_id":""#;

/// The rest of a delta after its `event_id`. Ids are the fake's own or a test's (plain
/// ASCII); base64 needs no escaping.
fn write_delta_tail(text: &mut String, response_id: &str, item_id: &str, b64: &str) {
    // invariant: writing to a String cannot fail.
    let _ = write!(
        text,
        r#"","response_id":"{response_id}","item_id":"{item_id}","output_index":0,"content_index":0,"delta":"{b64}"}}"#
    );
}

/// What the writer task sends to the service.
#[derive(Debug)]
pub(crate) enum Out {
    Text(String),
    /// A delta of a flood: when written, `audio_bytes` are credited to the flood and one slot
    /// of its window is freed.
    Flood {
        text: String,
        audio_bytes: usize,
        flood: Arc<FloodShared>,
    },
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

/// Facts about a conversation item the validator needs.
#[derive(Clone, Debug)]
pub(crate) struct ItemInfo {
    /// An assistant audio item produced by this session (the only kind `truncate` accepts).
    pub(crate) assistant_audio: bool,
    /// Output audio bytes the fake has sent for it (after truncation: what is left).
    pub(crate) audio_bytes: usize,
}

/// The response the fake is "generating" (between its `response.created` and `response.done`).
#[derive(Clone, Debug)]
pub(crate) struct ActiveResponse {
    pub(crate) response_id: String,
    pub(crate) item_id: String,
    /// Audio sent in this response (echo mode ends a turn on it).
    pub(crate) audio_bytes: usize,
}

/// What handling one client frame asks of the connection, besides what it emitted.
#[derive(Debug, Default)]
pub(crate) struct Handled {
    /// A `session.updated` to send after this many ms (the delay knob).
    pub(crate) delayed_update: Option<(u64, Value)>,
}

pub(crate) struct SessionState {
    pub(crate) index: usize,
    pub(crate) session_id: String,
    conversation_id: String,
    pub(crate) model: String,
    pub(crate) api_key: String,
    event_seq: u64,
    item_seq: u64,
    response_seq: u64,
    out: mpsc::UnboundedSender<Out>,
    /// Echo mode queues here instead of in `out`: its one connection task writes the queue
    /// after each frame it reads, so the hot path needs no channel and no wake-up (see
    /// `server::echo_loop`).
    inline: Option<Vec<Out>>,
    /// Echo mode's settings; `None` in scripted mode.
    echo: Option<Arc<EchoConfig>>,
    stats: Arc<FakeStats>,
    updated_delay_ms: Arc<AtomicU64>,
    /// Every client frame in order (scripted mode only): parsed JSON, or the raw text as a
    /// JSON string when it was not JSON, or `{"binary_frame": len}`.
    pub(crate) log: Vec<Value>,
    pub(crate) violations: Vec<String>,
    pub(crate) violation_count: usize,
    /// The effective session configuration (what `session.updated` echoes).
    pub(crate) session: Value,
    /// A valid `session.update` has been processed.
    configured: bool,
    /// The model has sent output audio (the voice is then fixed).
    pub(crate) audio_produced: bool,
    /// `session.updated` replies held back by the delay knob.
    updates_pending: usize,
    pub(crate) updates_accepted: usize,
    /// The "audio before session.updated" violation is recorded once per session.
    early_audio_reported: bool,
    /// Decoded appended audio (scripted mode only).
    pub(crate) audio: Vec<u8>,
    pub(crate) append_count: usize,
    /// Input bytes appended since the last commit/clear.
    uncommitted: usize,
    pub(crate) items: HashMap<String, ItemInfo>,
    pub(crate) last_item: Option<String>,
    pub(crate) active: Option<ActiveResponse>,
    pub(crate) truncates: Vec<Value>,
    pub(crate) response_creates: Vec<Value>,
    pub(crate) closed: bool,
    pub(crate) closer: Option<Closer>,
    /// Close code of the close frame the service sent, if it sent one.
    pub(crate) service_close_code: Option<u16>,
    /// Echo mode: all caller audio (the VAD clock) and since the last scripted turn, bytes.
    input_total_bytes: usize,
    since_turn_bytes: usize,
    /// Caller audio since the last scripted tool call (echo mode).
    since_tool_bytes: usize,
    /// A scripted tool call waits for the service's `response.create` (echo mode).
    awaiting_tool_output: bool,
    /// Scripted tool calls so far.
    tool_calls: u64,
    turns: u64,
    /// Reused by every append: decoding needs no allocation per frame.
    scratch: Vec<u8>,
    /// Echo mode: the fault planned for this session, until it fires.
    fault: Option<Fault>,
    /// Echo mode: a fault has closed (or dropped) the session; appends are no longer echoed.
    faulted_out: bool,
}

/// The default GA session of `session.created` (before any `session.update`).
fn default_session(session_id: &str, model: &str) -> Value {
    json!({
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": null,
        "prompt": null,
        "truncation": "auto",
        "expires_at": 0,
        "include": null,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": null,
                "noise_reduction": null,
                "turn_detection": {
                    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                    "silence_duration_ms": 200, "idle_timeout_ms": null,
                    "create_response": true, "interrupt_response": true
                }
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "alloy",
                "speed": 1.0
            }
        }
    })
}

/// An `input_audio_buffer.append` read without building a JSON tree. Any frame this does not
/// parse (another type, a JSON escape, a duplicate key, a wrong type…) goes the slow way,
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

impl SessionState {
    pub(crate) fn new(
        index: usize,
        model: String,
        api_key: String,
        out: mpsc::UnboundedSender<Out>,
        echo: Option<Arc<EchoConfig>>,
        stats: Arc<FakeStats>,
        updated_delay_ms: Arc<AtomicU64>,
    ) -> SessionState {
        let session_id = format!("sess_fake{index:04}");
        SessionState {
            index,
            conversation_id: format!("conv_fake{index:04}"),
            session: default_session(&session_id, &model),
            session_id,
            model,
            api_key,
            event_seq: 0,
            item_seq: 0,
            response_seq: 0,
            out,
            inline: echo.is_some().then(Vec::new),
            echo,
            stats,
            updated_delay_ms,
            log: Vec::new(),
            violations: Vec::new(),
            violation_count: 0,
            configured: false,
            audio_produced: false,
            updates_pending: 0,
            updates_accepted: 0,
            early_audio_reported: false,
            audio: Vec::new(),
            append_count: 0,
            uncommitted: 0,
            items: HashMap::new(),
            last_item: None,
            active: None,
            truncates: Vec::new(),
            response_creates: Vec::new(),
            closed: false,
            closer: None,
            service_close_code: None,
            input_total_bytes: 0,
            since_turn_bytes: 0,
            since_tool_bytes: 0,
            awaiting_tool_output: false,
            tool_calls: 0,
            turns: 0,
            scratch: Vec::new(),
            fault: None,
            faulted_out: false,
        }
    }

    /// Scripted mode records everything received; echo mode nothing.
    fn recording(&self) -> bool {
        self.echo.is_none()
    }

    pub(crate) fn violate(&mut self, msg: String) {
        self.violation_count += 1;
        self.stats.violations.fetch_add(1, Ordering::Relaxed);
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(msg);
        }
    }

    fn next_item_id(&mut self) -> String {
        self.item_seq += 1;
        format!("item_fake{:02}{:05}", self.index, self.item_seq)
    }

    fn next_response_id(&mut self) -> String {
        self.response_seq += 1;
        format!("resp_fake{:02}{:05}", self.index, self.response_seq)
    }

    /// Appends a fresh `event_id` to `buf`.
    fn write_event_id(&mut self, buf: &mut String) {
        self.event_seq += 1;
        // invariant: writing to a String cannot fail.
        let _ = write!(buf, "event_fake{:02}{:06}", self.index, self.event_seq);
    }

    pub(crate) fn register_item(&mut self, id: &str, assistant_audio: bool) {
        self.items.entry(id.to_owned()).or_insert(ItemInfo {
            assistant_audio,
            audio_bytes: 0,
        });
        self.last_item = Some(id.to_owned());
    }

    // ----- sending

    /// Sends a server event, giving it an `event_id`.
    pub(crate) fn emit(&mut self, mut event: Value) {
        let mut id = String::with_capacity(24);
        self.write_event_id(&mut id);
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

    /// Events emitted outside the handling of a frame (a delayed reply) must wake echo mode's
    /// connection task; in scripted mode the channel has done so already.
    pub(crate) fn wake(&self) {
        if self.inline.is_some() {
            let _ = self.out.send(Out::Wake);
        }
    }

    /// A `response.output_audio.delta` carrying `b64` (already checked base64), built by hand:
    /// in echo mode this runs for every append.
    pub(crate) fn audio_delta_text(
        &mut self,
        response_id: &str,
        item_id: &str,
        b64: &str,
    ) -> String {
        let mut text = String::with_capacity(200 + b64.len());
        text.push_str(DELTA_PREFIX);
        self.write_event_id(&mut text);
        write_delta_tail(&mut text, response_id, item_id, b64);
        text
    }

    /// Books `bytes` of output audio for `item_id` (what a truncate is checked against).
    pub(crate) fn book_output_audio(&mut self, item_id: &str, bytes: usize) {
        self.audio_produced = true;
        match self.items.get_mut(item_id) {
            Some(item) => item.audio_bytes += bytes,
            None => {
                self.items.insert(
                    item_id.to_owned(),
                    ItemInfo {
                        assistant_audio: true,
                        audio_bytes: bytes,
                    },
                );
            }
        }
        if let Some(active) = self.active.as_mut().filter(|a| a.item_id == item_id) {
            active.audio_bytes += bytes;
        }
    }

    fn error(&mut self, reject: &Reject, client_event_id: Option<&str>) {
        self.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
        self.emit(reject.to_event(client_event_id));
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

    /// Bytes per millisecond of the effective format of `dir` (`input` / `output`).
    pub(crate) fn bytes_per_ms(&self, dir: &str) -> usize {
        match self.session["audio"][dir]["format"]["type"].as_str() {
            Some("audio/pcm") => 48,
            _ => 8,
        }
    }

    /// With server/semantic VAD and `interrupt_response` (default true), the real server
    /// cancels the active response itself on `speech_started` (B5).
    pub(crate) fn server_interrupts(&self) -> bool {
        let td = &self.session["audio"]["input"]["turn_detection"];
        td.is_object() && td["interrupt_response"].as_bool() != Some(false)
    }

    pub(crate) fn response_object(
        &self,
        response_id: &str,
        status: &str,
        details: Value,
        output: Value,
    ) -> Value {
        json!({
            "object": "realtime.response",
            "id": response_id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {
                "format": self.session["audio"]["output"]["format"].clone(),
                "voice": self.session["audio"]["output"]["voice"].clone()}},
            "usage": if status == "in_progress" { Value::Null } else { json!({
                "total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
                "output_token_details": {"text_tokens": 0, "audio_tokens": 0}}) },
            "metadata": null
        })
    }

    // ----- the model's side (shared by the scripts and echo mode)

    /// `session.created`, the first event of every session.
    pub(crate) fn created(&mut self) {
        let created = json!({"type": "session.created", "session": self.session.clone()});
        self.emit(created);
    }

    /// Opens an audio response (B4 order): `response.created` (in_progress),
    /// `response.output_item.added`, `conversation.item.added`, `response.content_part.added`.
    pub(crate) fn open_response(&mut self, response_id: &str, item_id: &str) {
        let previous = self.last_item.clone();
        self.register_item(item_id, true);
        self.active = Some(ActiveResponse {
            response_id: response_id.into(),
            item_id: item_id.into(),
            audio_bytes: 0,
        });
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": "in_progress", "role": "assistant", "content": []});
        let created = json!({"type": "response.created",
            "response": self.response_object(response_id, "in_progress", Value::Null, json!([]))});
        self.emit(created);
        self.emit(json!({"type": "response.output_item.added",
            "response_id": response_id, "output_index": 0, "item": item}));
        self.emit(json!({"type": "conversation.item.added",
            "previous_item_id": previous, "item": item}));
        self.emit(json!({"type": "response.content_part.added",
            "response_id": response_id, "item_id": item_id, "output_index": 0,
            "content_index": 0, "part": {"type": "audio", "transcript": ""}}));
    }

    /// The item-level end of an audio response (B4 order): `response.output_audio.done`,
    /// `response.output_audio_transcript.done`, `response.content_part.done`,
    /// `response.output_item.done`, `conversation.item.done`. Returns the final item.
    pub(crate) fn close_item(
        &mut self,
        response_id: &str,
        item_id: &str,
        transcript: &str,
        item_status: &str,
    ) -> Value {
        let part = json!({"type": "audio", "transcript": transcript});
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": item_status, "role": "assistant", "content": [
                {"type": "output_audio", "transcript": transcript}]});
        let ids = |mut v: Value| {
            v["response_id"] = response_id.into();
            v["item_id"] = item_id.into();
            v["output_index"] = 0.into();
            v["content_index"] = 0.into();
            v
        };
        self.emit(ids(json!({"type": "response.output_audio.done"})));
        self.emit(ids(
            json!({"type": "response.output_audio_transcript.done", "transcript": transcript}),
        ));
        self.emit(ids(
            json!({"type": "response.content_part.done", "part": part}),
        ));
        self.emit(json!({"type": "response.output_item.done",
            "response_id": response_id, "output_index": 0, "item": item}));
        self.emit(json!({"type": "conversation.item.done",
            "previous_item_id": Value::Null, "item": item}));
        item
    }

    /// `response.done` for a response cancelled for `reason` (`client_cancelled` /
    /// `turn_detected`).
    pub(crate) fn cancelled_done(&mut self, active: &ActiveResponse, reason: &str) {
        let item = json!({"id": active.item_id, "type": "message", "object": "realtime.item",
            "status": "incomplete", "role": "assistant",
            "content": [{"type": "output_audio", "transcript": ""}]});
        let done = json!({"type": "response.done", "response": self.response_object(
            &active.response_id, "cancelled", json!({"type": "cancelled", "reason": reason}),
            json!([item]))});
        self.emit(done);
    }

    // ----- client events

    /// A binary frame: client events are JSON text.
    pub(crate) fn on_binary(&mut self, len: usize) {
        if self.recording() {
            self.log.push(json!({ "binary_frame": len }));
        }
        self.violate(format!(
            "binary frame of {len} bytes: client events are JSON text frames"
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
        if !self.recording() {
            if let Ok(fast) = serde_json::from_str::<FastAppend<'_>>(text) {
                if fast.kind == "input_audio_buffer.append" {
                    if let Err(reject) = self.append(fast.audio) {
                        self.reject(reject, text, fast.event_id);
                    }
                    return Handled::default();
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
                return Handled::default();
            }
        };
        if self.recording() {
            self.log.push(value.clone());
        }
        let client_event_id = value
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut handled = Handled::default();
        if let Err(reject) = self.dispatch(&value, &mut handled) {
            self.reject(reject, text, client_event_id.as_deref());
        }
        handled
    }

    fn dispatch(&mut self, value: &Value, handled: &mut Handled) -> Checked {
        let Some(event) = value.as_object() else {
            return Err(invalid_type("", "an object", value));
        };
        if let Some(id) = event.get("event_id") {
            if !id.is_string() {
                return Err(invalid_type("event_id", "a string", id));
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
        for key in event.keys() {
            if key != "type" && key != "event_id" && !allowed.contains(&key.as_str()) {
                return Err(unknown(key));
            }
        }
        match kind {
            "session.update" => self.session_update(event, handled),
            "input_audio_buffer.append" => {
                let audio = string(event.get("audio").ok_or_else(|| missing("audio"))?, "audio")?;
                self.append(audio)
            }
            "input_audio_buffer.commit" => self.commit(),
            "input_audio_buffer.clear" => {
                self.uncommitted = 0;
                self.emit(json!({"type": "input_audio_buffer.cleared"}));
                Ok(())
            }
            "conversation.item.create" => self.item_create(event),
            "conversation.item.truncate" => self.truncate(event, value),
            "conversation.item.delete" => self.item_delete(event),
            "response.create" => self.response_create(event, value),
            "response.cancel" => self.response_cancel(event),
            _ => unreachable!("listed in CLIENT_EVENTS"),
        }
    }

    fn session_update(&mut self, event: &Map<String, Value>, handled: &mut Handled) -> Checked {
        let session = event.get("session").ok_or_else(|| missing("session"))?;
        let session = object(session, "session")?;
        validate_session(session)?;
        let new_voice = &session.get("audio").unwrap_or(&Value::Null)["output"]["voice"];
        if self.audio_produced
            && !new_voice.is_null()
            && *new_voice != self.session["audio"]["output"]["voice"]
        {
            // B2: "voice can change only until the model has produced audio once".
            return Err(Reject::new(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.".into(),
                Some("session.audio.output.voice"),
            ));
        }

        merge_session(&mut self.session, session);
        self.configured = true;
        self.updates_accepted += 1;
        for dir in ["input", "output"] {
            let effective = self.session["audio"][dir]["format"].clone();
            if effective != json!({"type": "audio/pcmu"}) {
                self.violate(format!(
                    "callbridge requires audio.{dir}.format {{\"type\":\"audio/pcmu\"}} (Twilio \
                     µ-law passthrough); the effective format after this session.update is \
                     {effective}"
                ));
            }
        }
        let reply = json!({"type": "session.updated", "session": self.session.clone()});
        let delay = self.updated_delay_ms.load(Ordering::SeqCst);
        if delay == 0 {
            self.emit(reply);
        } else {
            self.updates_pending += 1;
            handled.delayed_update = Some((delay, reply));
        }
        Ok(())
    }

    /// Sends a `session.updated` the delay knob held back.
    pub(crate) fn deliver_delayed_update(&mut self, reply: Value) {
        self.updates_pending = self.updates_pending.saturating_sub(1);
        self.emit(reply);
        self.wake();
    }

    /// Violation (no error: the real API would accept) for traffic that depends on the session
    /// configuration but comes before `session.updated`.
    fn check_configured(&mut self, what: &str) {
        if !self.configured {
            self.violate(format!(
                "{what} sent before session.updated: would be read as pcm 24k \
                 (no valid session.update yet)"
            ));
        } else if self.updates_pending > 0 {
            self.violate(format!(
                "{what} sent before session.updated was delivered (the service did not wait \
                 for it)"
            ));
        }
    }

    /// `input_audio_buffer.append`: non-empty strict base64 (the real API refuses anything
    /// else; `"AB=="` is not canonical and is refused too).
    fn append(&mut self, audio: &str) -> Checked {
        if audio.is_empty() {
            return Err(Reject::invalid_value(
                "audio",
                "Invalid 'audio': empty string. Expected base64-encoded audio bytes.".into(),
            ));
        }
        self.scratch.clear();
        STANDARD.decode_vec(audio, &mut self.scratch).map_err(|e| {
            Reject::invalid_value(
                "audio",
                format!("Invalid 'audio'. Expected base64-encoded audio bytes: {e}."),
            )
        })?;
        let bytes = self.scratch.len();
        if !self.early_audio_reported && (!self.configured || self.updates_pending > 0) {
            // Once per session: a service that streams early would flood the list.
            self.early_audio_reported = true;
            self.check_configured("audio");
        }
        self.append_count += 1;
        self.uncommitted += bytes;
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        if self.recording() {
            self.audio.extend_from_slice(&self.scratch);
        }
        if self.faulted_out {
            self.stats
                .faults
                .unechoed_appends
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(echo) = self.echo.clone() {
            self.echo_append(&echo, audio, bytes);
            if self.fault.is_some() && self.append_count as u64 >= echo.fault_after_appends {
                self.fire_fault();
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Checked {
        let ms = self.uncommitted as f64 / self.bytes_per_ms("input") as f64;
        if ms < 100.0 {
            return Err(Reject::new(
                "input_audio_buffer_commit_empty",
                format!(
                    "Error committing input audio buffer: buffer too small. Expected at least \
                     100ms of audio, but buffer only has {ms:.2}ms of audio."
                ),
                None,
            ));
        }
        let item_id = self.next_item_id();
        if self.echo.is_some() {
            self.commit_user_turn(item_id);
        } else {
            let previous = self.last_item.clone();
            self.register_item(&item_id, false);
            self.uncommitted = 0;
            self.emit(json!({"type": "input_audio_buffer.committed",
                "previous_item_id": previous, "item_id": item_id}));
        }
        Ok(())
    }

    fn item_create(&mut self, event: &Map<String, Value>) -> Checked {
        if let Some(prev) = event.get("previous_item_id") {
            match prev {
                Value::Null => {}
                Value::String(p) if p == "root" || self.items.contains_key(p) => {}
                Value::String(p) => {
                    return Err(Reject::invalid_value(
                        "previous_item_id",
                        format!("Invalid 'previous_item_id': item '{p}' not found."),
                    ))
                }
                other => return Err(invalid_type("previous_item_id", "a string", other)),
            }
        }
        let item = event.get("item").ok_or_else(|| missing("item"))?;
        validate_item(item)?;
        // Only while a delayed `session.updated` is pending: items do not depend on the audio
        // format, so creating one before any session.update is legal.
        if self.configured && self.updates_pending > 0 {
            self.check_configured("conversation.item.create");
        }

        let mut item = item.clone();
        let obj = item
            .as_object_mut()
            .expect("invariant: validate_item checked an object");
        let id = match obj.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => self.next_item_id(),
        };
        obj.insert("id".into(), id.clone().into());
        obj.insert("object".into(), "realtime.item".into());
        obj.insert("status".into(), "completed".into());
        let previous = match event.get("previous_item_id") {
            Some(Value::String(p)) => Some(p.clone()),
            _ => self.last_item.clone(),
        };
        self.register_item(&id, false);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
        Ok(())
    }

    fn truncate(&mut self, event: &Map<String, Value>, raw: &Value) -> Checked {
        if self.recording() {
            self.truncates.push(raw.clone());
        }
        let item_id = string(
            event.get("item_id").ok_or_else(|| missing("item_id"))?,
            "item_id",
        )?;
        let content_index = event
            .get("content_index")
            .ok_or_else(|| missing("content_index"))?;
        match content_index.as_u64() {
            Some(0) => {}
            Some(_) => {
                return Err(Reject::invalid_value(
                    "content_index",
                    "Invalid 'content_index': only 0 is supported for audio truncation.".into(),
                ))
            }
            None => return Err(invalid_type("content_index", "an integer", content_index)),
        }
        let end = event
            .get("audio_end_ms")
            .ok_or_else(|| missing("audio_end_ms"))?;
        let Some(end_ms) = end.as_u64() else {
            return Err(invalid_type("audio_end_ms", "a non-negative integer", end));
        };
        let per_ms = self.bytes_per_ms("output");
        let Some(item) = self.items.get_mut(item_id).filter(|i| i.assistant_audio) else {
            return Err(Reject::new(
                "item_truncate_invalid_item_id",
                format!("Item with item_id not found: {item_id}"),
                Some("item_id"),
            ));
        };
        if end_ms as usize * per_ms > item.audio_bytes {
            return Err(Reject::invalid_value(
                "audio_end_ms",
                format!(
                    "Audio content of {} ms is already shorter than {end_ms} ms",
                    item.audio_bytes / per_ms
                ),
            ));
        }
        item.audio_bytes = end_ms as usize * per_ms;
        let item_id = item_id.to_owned();
        self.emit(
            json!({"type": "conversation.item.truncated", "item_id": item_id,
            "content_index": 0, "audio_end_ms": end_ms}),
        );
        Ok(())
    }

    fn item_delete(&mut self, event: &Map<String, Value>) -> Checked {
        let item_id = string(
            event.get("item_id").ok_or_else(|| missing("item_id"))?,
            "item_id",
        )?;
        if self.items.remove(item_id).is_none() {
            // Decision: code modelled on item_truncate_invalid_item_id (not in the reference).
            return Err(Reject::new(
                "item_delete_invalid_item_id",
                format!("Item with item_id not found: {item_id}"),
                Some("item_id"),
            ));
        }
        let item_id = item_id.to_owned();
        self.emit(json!({"type": "conversation.item.deleted", "item_id": item_id}));
        Ok(())
    }

    fn response_create(&mut self, event: &Map<String, Value>, raw: &Value) -> Checked {
        if self.recording() {
            self.response_creates.push(raw.clone());
        }
        if let Some(response) = event.get("response") {
            validate_response(object(response, "response")?)?;
        }
        if let Some(active) = &self.active {
            return Err(Reject::new(
                "conversation_already_has_active_response",
                format!(
                    "Conversation already has an active response in progress: {}. Wait until \
                     the response is finished before creating a new one.",
                    active.response_id
                ),
                None,
            ));
        }
        if !self.configured || self.updates_pending > 0 {
            self.check_configured("response.create");
        }
        if self.echo.is_some() {
            self.awaiting_tool_output = false;
            let (response_id, item_id) = (self.next_response_id(), self.next_item_id());
            self.open_response(&response_id, &item_id);
        }
        // Scripted: the fake does not answer by itself; the test scripts the response.
        Ok(())
    }

    fn response_cancel(&mut self, event: &Map<String, Value>) -> Checked {
        let wanted = match event.get("response_id") {
            None => None,
            Some(v) => Some(string(v, "response_id")?.to_owned()),
        };
        let active = match &self.active {
            Some(a) if wanted.as_deref().is_none_or(|w| w == a.response_id) => a.clone(),
            _ => {
                return Err(Reject::new(
                    "response_cancel_not_active",
                    "Cancellation failed: no active response found".into(),
                    None,
                ))
            }
        };
        if self.echo.is_some() {
            self.end_echo_response("cancelled", Some("client_cancelled"));
        } else {
            self.active = None;
            self.cancelled_done(&active, "client_cancelled");
        }
        Ok(())
    }

    // ----- echo mode

    /// Plans `fault` for this session: a session fault fires once the session has echoed
    /// `fault_after_appends` appends (handshake faults never reach a session).
    pub(crate) fn arm_fault(&mut self, fault: Fault) {
        if !fault.at_handshake() {
            self.fault = Some(fault);
        }
    }

    /// Injects the planned fault, after the echo of the append that triggered it.
    fn fire_fault(&mut self) {
        let Some(fault) = self.fault.take() else {
            return;
        };
        self.stats.faults.count(fault);
        self.faulted_out = fault.ends_session();
        match fault {
            Fault::Drop => {
                self.closer = Some(Closer::Fake);
                self.send_raw(Out::Drop);
            }
            Fault::SessionExpired => {
                let msg = "Your session hit the maximum duration of 60 minutes.";
                self.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
                self.emit(json!({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "session_expired",
                    "message": msg, "param": null, "event_id": null}}));
                self.closer = Some(Closer::Fake);
                self.send_raw(Out::Close(1001, msg.to_owned()));
            }
            Fault::Close1011 => {
                self.closer = Some(Closer::Fake);
                self.send_raw(Out::Close(
                    1011,
                    "fake: internal server error (injected fault)".to_owned(),
                ));
            }
            Fault::Garbage => {
                self.send_raw(Out::Text("fake garbage, not JSON: {\"type\": ".to_owned()));
            }
            Fault::Refuse503 | Fault::Refuse429 => {}
        }
    }

    /// Echoes one append as a delta of the active response, opening one if needed; every
    /// `barge_in_every_ms` of caller audio a scripted caller turn interrupts instead.
    fn echo_append(&mut self, echo: &EchoConfig, audio: &str, bytes: usize) {
        self.input_total_bytes += bytes;
        self.since_turn_bytes += bytes;
        let per_ms = self.bytes_per_ms("input");
        let every = echo.barge_in_every_ms as usize * per_ms;
        if every > 0 && self.since_turn_bytes >= every {
            self.since_turn_bytes = 0;
            self.scripted_turn();
            return;
        }
        if let (Some((name, arguments)), true) = (&echo.tool_call, echo.tool_call_every_ms > 0) {
            if self.awaiting_tool_output {
                return; // the model waits for the tool's output
            }
            self.since_tool_bytes += bytes;
            if self.since_tool_bytes >= echo.tool_call_every_ms as usize * per_ms {
                self.since_tool_bytes = 0;
                self.echo_tool_call(name, arguments);
                return;
            }
        }
        if self.active.is_none() {
            let (response_id, item_id) = (self.next_response_id(), self.next_item_id());
            self.open_response(&response_id, &item_id);
        }
        let mut text = String::with_capacity(200 + audio.len());
        text.push_str(DELTA_PREFIX);
        self.write_event_id(&mut text);
        // Disjoint fields: the active response, the items, the flag.
        let Some(active) = self.active.as_mut() else {
            return;
        };
        write_delta_tail(&mut text, &active.response_id, &active.item_id, audio);
        active.audio_bytes += bytes;
        if let Some(item) = self.items.get_mut(&active.item_id) {
            item.audio_bytes += bytes;
        }
        self.audio_produced = true;
        self.send_raw(Out::Text(text));
        let turn = echo.turn_ms as usize * self.bytes_per_ms("output");
        if turn > 0 && self.active.as_ref().is_some_and(|a| a.audio_bytes >= turn) {
            self.end_echo_response("completed", None);
        }
    }

    /// The model calls a tool: the echo response in progress ends, then a completed response
    /// whose only output is the `function_call` item.
    fn echo_tool_call(&mut self, name: &str, arguments: &str) {
        if self.active.is_some() {
            self.end_echo_response("completed", None);
        }
        self.tool_calls += 1;
        let response_id = self.next_response_id();
        let item_id = self.next_item_id();
        let call_id = format!("call_echo_{}", self.tool_calls);
        self.register_item(&item_id, false);
        let item = json!({"id": item_id, "type": "function_call", "object": "realtime.item",
            "status": "completed", "name": name, "call_id": call_id, "arguments": arguments});
        let created = self.response_object(&response_id, "in_progress", Value::Null, json!([]));
        self.emit(json!({"type": "response.created", "response": created}));
        let done = self.response_object(&response_id, "completed", Value::Null, json!([item]));
        self.emit(json!({"type": "response.done", "response": done}));
        self.awaiting_tool_output = true;
    }

    /// Ends the active echo response: the item-level `.done` events, then `response.done`.
    fn end_echo_response(&mut self, status: &str, reason: Option<&str>) {
        let Some(active) = self.active.take() else {
            return;
        };
        let item_status = if status == "completed" {
            "completed"
        } else {
            "incomplete"
        };
        let item = self.close_item(&active.response_id, &active.item_id, "(echo)", item_status);
        let details = match reason {
            Some(reason) => json!({"type": status, "reason": reason}),
            None => Value::Null,
        };
        let response = self.response_object(&active.response_id, status, details, json!([item]));
        self.emit(json!({"type": "response.done", "response": response}));
    }

    /// The caller's turn is over: commit the buffer as a user item and transcribe it.
    fn commit_user_turn(&mut self, item_id: String) {
        let previous = self.last_item.clone();
        self.emit(json!({"type": "input_audio_buffer.committed",
            "previous_item_id": previous, "item_id": item_id}));
        self.uncommitted = 0;
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": null}]});
        self.register_item(&item_id, false);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
        self.turns += 1;
        let transcript = format!("scripted caller turn {}", self.turns);
        self.emit(
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": transcript,
            "usage": {"type": "duration", "seconds": 1.0}}),
        );
    }

    /// What server VAD does when the caller talks over the assistant (B5).
    fn scripted_turn(&mut self) {
        let item_id = self.next_item_id();
        let at_ms = (self.input_total_bytes / self.bytes_per_ms("input")) as u64;
        self.emit(json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": at_ms.saturating_sub(300), "item_id": item_id}));
        if self.active.is_some() {
            self.end_echo_response("cancelled", Some("turn_detected"));
        }
        self.emit(json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": at_ms, "item_id": item_id}));
        self.commit_user_turn(item_id);
    }
}

#[cfg(test)]
mod tests;
