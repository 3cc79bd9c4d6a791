//! `callbridge-sim fake-openai`: a stand-in for the OpenAI Realtime API (GA protocol,
//! `reference/protocols.md` B), for trials without a key and for benchmarks.
//!
//! It speaks the GA protocol as the real service does, as far as a bridge can observe it:
//! the upgrade needs `GET /v1/realtime?model=…` and `Authorization: Bearer …`; the first event
//! is `session.created`; `session.update` must carry `session.type:"realtime"` and only GA keys
//! (anything else is rejected with the real error codes and the session keeps its settings);
//! unknown client events and unknown keys are errors; `response.cancel` with nothing active,
//! a truncate past the audio sent and a second `response.create` get the documented errors.
//!
//! Instead of a model it echoes: every `input_audio_buffer.append` comes straight back as a
//! `response.output_audio.delta` carrying the same base64, inside a response with the GA event
//! order (`response.created` → `output_item.added` → `conversation.item.added` →
//! `content_part.added` → deltas … → the `.done` events → `response.done`). A response ends
//! after `turn_ms` of audio, and the next append opens a new one. With `barge_in_every_ms`, a
//! scripted caller turn interrupts: `speech_started` (the server cancels the response itself,
//! as with `interrupt_response: true`), `speech_stopped`, `committed`, the user item and its
//! `input_audio_transcription.completed`.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use callbridge_actors::protocol::base64_audio_len;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::{self, StatusCode},
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

/// µ-law at 8 kHz: 8 bytes per millisecond.
const BYTES_PER_MS: u64 = 8;

/// GA `session` keys (B2); anything else is `unknown_parameter`.
const SESSION_KEYS: &[&str] = &[
    "type",
    "instructions",
    "output_modalities",
    "audio",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "truncation",
    "tracing",
    "prompt",
    "include",
];

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// A response ends after this many ms of echoed audio (0: it never ends by itself).
    pub turn_ms: u64,
    /// Every this many ms of caller audio, a scripted caller turn interrupts (0: never).
    pub barge_in_every_ms: u64,
    /// When set, only this key is accepted; otherwise any bearer key is.
    pub api_key: Option<String>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            turn_ms: 5_000,
            barge_in_every_ms: 0,
            api_key: None,
        }
    }
}

/// Counters over every session, for the periodic summary.
#[derive(Debug, Default)]
pub struct FakeStats {
    pub sessions_opened: AtomicU64,
    pub sessions_open: AtomicU64,
    pub appends: AtomicU64,
    pub errors_sent: AtomicU64,
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: FakeConfig, stats: Arc<FakeStats>) {
    let config = Arc::new(config);
    let mut next = 0u64;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("fake-openai: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next += 1;
        tokio::spawn(connection(stream, config.clone(), stats.clone(), next));
    }
}

/// What the upgrade request said, checked after the handshake.
#[derive(Default)]
struct Upgrade {
    model: String,
    api_key: String,
    beta: bool,
}

fn http_error(status: StatusCode, code: Option<&str>, message: &str) -> ErrorResponse {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
        "param": null, "code": code}});
    let mut response = http::Response::new(Some(body.to_string()));
    *response.status_mut() = status;
    response
}

// The error type is tungstenite's handshake callback's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, upgrade: &mut Upgrade) -> Result<(), ErrorResponse> {
    if req.uri().path() != "/v1/realtime" {
        return Err(http_error(
            StatusCode::NOT_FOUND,
            None,
            &format!("Invalid URL (GET {})", req.uri().path()),
        ));
    }
    let model = req.uri().query().unwrap_or("").split('&').find_map(|pair| {
        pair.strip_prefix("model=")
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
    });
    let Some(model) = model else {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'.",
        ));
    };
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|k| !k.trim().is_empty());
    let Some(key) = key else {
        return Err(http_error(
            StatusCode::UNAUTHORIZED,
            None,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        ));
    };
    upgrade.model = model;
    upgrade.api_key = key.to_owned();
    upgrade.beta = req.headers().contains_key("openai-beta");
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

#[allow(clippy::result_large_err)] // the handshake callback, as above
async fn connection(stream: TcpStream, config: Arc<FakeConfig>, stats: Arc<FakeStats>, n: u64) {
    // Audio every 20 ms: Nagle would add up to 40 ms to every echo.
    let _ = stream.set_nodelay(true);
    let mut upgrade = Upgrade::default();
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| check_upgrade(req, &mut upgrade).map(|()| resp),
        Some(crate::ws::config()),
    )
    .await;
    let Ok(mut ws) = ws else { return };

    let mut session = Session::new(n, &upgrade.model, config);
    if upgrade.beta {
        // Observed behaviour since the beta was removed (protocols.md §0.1).
        session.error(
            None,
            "beta_api_shape_disabled",
            "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
            None,
        );
        close_with(&mut ws, &mut session, 4000, "beta_api_shape_disabled").await;
        return;
    }
    if let Some(want) = &session.config.api_key {
        if *want != upgrade.api_key {
            session.error(None, "invalid_api_key", "Incorrect API key provided.", None);
            close_with(
                &mut ws,
                &mut session,
                3000,
                "invalid_request_error.invalid_api_key",
            )
            .await;
            return;
        }
    }

    stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
    stats.sessions_open.fetch_add(1, Ordering::Relaxed);
    let created = json!({"type": "session.created", "session": session.session.clone()});
    session.emit(created);
    if flush(&mut ws, &mut session).await.is_ok() {
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                Message::Text(text) => {
                    let appended = session.on_client_event(text.as_str());
                    if appended {
                        stats.appends.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Message::Binary(_) => session.error(
                    None,
                    "invalid_request_error",
                    "Binary frames are not supported.",
                    None,
                ),
                Message::Close(_) => break,
                _ => {}
            }
            stats
                .errors_sent
                .fetch_add(std::mem::take(&mut session.errors), Ordering::Relaxed);
            if flush(&mut ws, &mut session).await.is_err() {
                break;
            }
        }
    }
    stats.sessions_open.fetch_sub(1, Ordering::Relaxed);
}

async fn flush(ws: &mut Ws, session: &mut Session) -> Result<(), ()> {
    if session.out.is_empty() {
        return Ok(());
    }
    for text in session.out.drain(..) {
        ws.feed(Message::text(text)).await.map_err(|_| ())?;
    }
    ws.flush().await.map_err(|_| ())
}

async fn close_with(ws: &mut Ws, session: &mut Session, code: u16, reason: &str) {
    let _ = flush(ws, session).await;
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    let _ = ws.close(Some(frame)).await;
}

/// The response being produced.
struct Active {
    id: String,
    item_id: String,
    /// Audio sent in this response, in bytes.
    audio_bytes: u64,
}

/// One Realtime session: pure state, the connection task does the I/O.
struct Session {
    config: Arc<FakeConfig>,
    session: Value,
    conversation_id: String,
    prefix: String,
    next_id: u64,
    out: Vec<String>,
    errors: u64,
    active: Option<Active>,
    last_item: Option<String>,
    /// Assistant audio per item, in bytes, to check truncates against.
    item_audio: HashMap<String, u64>,
    /// Caller audio in the input buffer (for `commit`), in bytes.
    input_buffer_bytes: u64,
    /// All caller audio, in bytes (the VAD clock).
    input_total_bytes: u64,
    /// Caller audio since the last scripted turn, in bytes.
    since_turn_bytes: u64,
    turns: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    audio: Option<Cow<'a, str>>,
    session: Option<Value>,
    item: Option<Value>,
    // Accepted (the GA protocol has them) but not acted on by an echo server.
    #[allow(dead_code)]
    previous_item_id: Option<Value>,
    item_id: Option<String>,
    #[allow(dead_code)]
    content_index: Option<u64>,
    audio_end_ms: Option<u64>,
    #[allow(dead_code)]
    response: Option<Value>,
    response_id: Option<String>,
}

impl Session {
    fn new(n: u64, model: &str, config: Arc<FakeConfig>) -> Session {
        let prefix = format!("{n:06x}");
        let session = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": format!("sess_fake{prefix}"),
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
                    "turn_detection": {"type": "server_vad", "threshold": 0.5,
                        "prefix_padding_ms": 300, "silence_duration_ms": 200,
                        "idle_timeout_ms": null, "create_response": true,
                        "interrupt_response": true}
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "alloy", "speed": 1.0}
            }
        });
        Session {
            config,
            session,
            conversation_id: format!("conv_fake{prefix}"),
            prefix,
            next_id: 0,
            out: Vec::new(),
            errors: 0,
            active: None,
            last_item: None,
            item_audio: HashMap::new(),
            input_buffer_bytes: 0,
            input_total_bytes: 0,
            since_turn_bytes: 0,
            turns: 0,
        }
    }

    fn id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{kind}_{}{:06}", self.prefix, self.next_id)
    }

    /// Queues a server event, with a fresh `event_id` first as the real service sends it.
    fn emit(&mut self, event: Value) {
        let Value::Object(fields) = event else { return };
        let mut with_id = Map::with_capacity(fields.len() + 1);
        let event_id = self.id("event");
        let mut fields = fields.into_iter();
        if let Some((k, v)) = fields.next() {
            with_id.insert(k, v);
        }
        with_id.insert("event_id".into(), Value::String(event_id));
        with_id.extend(fields);
        self.out.push(Value::Object(with_id).to_string());
    }

    fn error(
        &mut self,
        client_event_id: Option<&str>,
        code: &str,
        message: &str,
        param: Option<&str>,
    ) {
        self.errors += 1;
        self.emit(json!({"type": "error", "error": {
            "type": "invalid_request_error", "code": code, "message": message,
            "param": param, "event_id": client_event_id}}));
    }

    /// Handles one client frame; true when it was an audio append.
    fn on_client_event(&mut self, text: &str) -> bool {
        let event: ClientEvent<'_> = match serde_json::from_str(text) {
            Ok(event) => event,
            Err(e) => {
                let msg = e.to_string();
                if let Some(key) = msg
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    let message = format!("Unknown parameter: '{key}'.");
                    self.error(None, "unknown_parameter", &message, Some(key));
                } else {
                    let message =
                        format!("We could not parse the JSON body of your request. ({msg})");
                    self.error(None, "invalid_json", &message, None);
                }
                return false;
            }
        };
        let eid = event.event_id.as_deref().map(str::to_owned);
        let eid = eid.as_deref();
        match event.kind.as_ref() {
            "input_audio_buffer.append" => {
                let Some(audio) = event.audio else {
                    self.missing(eid, "audio");
                    return false;
                };
                let Some(bytes) = base64_audio_len(&audio).map(|n| n as u64) else {
                    self.error(
                        eid,
                        "invalid_value",
                        "Invalid 'audio'. Expected base64-encoded audio.",
                        Some("audio"),
                    );
                    return false;
                };
                self.append(&audio, bytes);
                return true;
            }
            "session.update" => self.session_update(eid, event.session),
            "input_audio_buffer.commit" => {
                if self.input_buffer_bytes < 100 * BYTES_PER_MS {
                    let ms = self.input_buffer_bytes as f64 / BYTES_PER_MS as f64;
                    let message = format!("Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only has {ms:.2}ms of audio.");
                    self.error(eid, "input_audio_buffer_commit_empty", &message, None);
                } else {
                    self.commit_user_turn(None);
                }
            }
            "input_audio_buffer.clear" => {
                self.input_buffer_bytes = 0;
                self.emit(json!({"type": "input_audio_buffer.cleared"}));
            }
            "conversation.item.create" => {
                let Some(Value::Object(mut item)) = event.item else {
                    self.missing(eid, "item");
                    return false;
                };
                let id = match item.get("id").and_then(Value::as_str) {
                    Some(id) => id.to_owned(),
                    None => self.id("item"),
                };
                item.insert("id".into(), Value::String(id.clone()));
                item.insert("object".into(), json!("realtime.item"));
                item.insert("status".into(), json!("completed"));
                self.add_item(Value::Object(item), &id);
            }
            "conversation.item.truncate" => {
                let (Some(item_id), Some(end_ms)) = (event.item_id, event.audio_end_ms) else {
                    self.missing(eid, "item_id");
                    return false;
                };
                match self.item_audio.get(&item_id) {
                    None => {
                        let message = format!("Item with item_id not found: {item_id}");
                        self.error(
                            eid,
                            "item_truncate_invalid_item_id",
                            &message,
                            Some("item_id"),
                        );
                    }
                    Some(&bytes) if end_ms * BYTES_PER_MS > bytes => {
                        let message = format!(
                            "Audio content of {}ms is already shorter than {end_ms}ms",
                            bytes / BYTES_PER_MS
                        );
                        self.error(eid, "invalid_value", &message, Some("audio_end_ms"));
                    }
                    Some(_) => {
                        self.item_audio
                            .insert(item_id.clone(), end_ms * BYTES_PER_MS);
                        self.emit(json!({"type": "conversation.item.truncated",
                            "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms}));
                    }
                }
            }
            "conversation.item.delete" => match event.item_id {
                Some(id)
                    if self.item_audio.remove(&id).is_some()
                        || self.last_item.as_deref() == Some(&id) =>
                {
                    self.emit(json!({"type": "conversation.item.deleted", "item_id": id}));
                }
                _ => self.error(
                    eid,
                    "item_delete_invalid_item_id",
                    "Item not found.",
                    Some("item_id"),
                ),
            },
            "response.create" => {
                if let Some(active) = &self.active {
                    let message = format!("Conversation already has an active response in progress: {}. Wait until the response is finished before creating a new one.", active.id);
                    self.error(
                        eid,
                        "conversation_already_has_active_response",
                        &message,
                        None,
                    );
                } else {
                    self.start_response();
                }
            }
            "response.cancel" => {
                let matches = match (&self.active, &event.response_id) {
                    (Some(active), Some(id)) => active.id == *id,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if matches {
                    self.finish_response("cancelled", Some("client_cancelled"));
                } else {
                    self.error(
                        eid,
                        "response_cancel_not_active",
                        "Cancellation failed: no active response found",
                        None,
                    );
                }
            }
            other => {
                let message = format!("Invalid value: '{other}'. Supported values are: 'session.update', 'input_audio_buffer.append', 'input_audio_buffer.commit', 'input_audio_buffer.clear', 'conversation.item.create', 'conversation.item.truncate', 'conversation.item.delete', 'response.create', and 'response.cancel'.");
                self.error(eid, "invalid_value", &message, Some("type"));
            }
        }
        false
    }

    fn missing(&mut self, eid: Option<&str>, param: &str) {
        let message = format!("Missing required parameter: '{param}'.");
        self.error(eid, "missing_required_parameter", &message, Some(param));
    }

    fn session_update(&mut self, eid: Option<&str>, update: Option<Value>) {
        let Some(Value::Object(update)) = update else {
            self.missing(eid, "session");
            return;
        };
        if let Some(key) = update.keys().find(|k| !SESSION_KEYS.contains(&k.as_str())) {
            let param = format!("session.{key}");
            let message = format!("Unknown parameter: '{param}'.");
            self.error(eid, "unknown_parameter", &message, Some(&param));
            return;
        }
        if update.get("type").and_then(Value::as_str) != Some("realtime") {
            self.missing(eid, "session.type");
            return;
        }
        merge(&mut self.session, Value::Object(update));
        let updated = json!({"type": "session.updated", "session": self.session.clone()});
        self.emit(updated);
    }

    /// Echoes one append as a delta of the active response, opening one if needed.
    fn append(&mut self, audio: &str, bytes: u64) {
        self.input_buffer_bytes += bytes;
        self.input_total_bytes += bytes;
        self.since_turn_bytes += bytes;
        let every = self.config.barge_in_every_ms * BYTES_PER_MS;
        if every > 0 && self.since_turn_bytes >= every {
            self.since_turn_bytes = 0;
            self.scripted_turn();
            return;
        }
        if self.active.is_none() {
            self.start_response();
        }
        let event_id = self.id("event");
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.audio_bytes += bytes;
        *self.item_audio.entry(active.item_id.clone()).or_default() += bytes;
        // The hot path: built by hand, the payload is base64 and needs no escaping.
        self.out.push(format!(
            r#"{{"type":"response.output_audio.delta","event_id":"{event_id}","response_id":"{}","item_id":"{}","output_index":0,"content_index":0,"delta":"{audio}"}}"#,
            active.id, active.item_id
        ));
        let turn = self.config.turn_ms * BYTES_PER_MS;
        if turn > 0 && active.audio_bytes >= turn {
            self.finish_response("completed", None);
        }
    }

    fn response_object(&self, id: &str, status: &str, details: Value, output: Value) -> Value {
        let output_format = self.session["audio"]["output"].clone();
        json!({"object": "realtime.response", "id": id, "status": status,
            "status_details": details, "output": output,
            "conversation_id": self.conversation_id, "output_modalities": ["audio"],
            "max_output_tokens": "inf", "audio": {"output": output_format},
            "usage": if status == "in_progress" { Value::Null } else {
                json!({"total_tokens": 0, "input_tokens": 0, "output_tokens": 0})
            },
            "metadata": null})
    }

    fn start_response(&mut self) {
        let id = self.id("resp");
        let item_id = self.id("item");
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": "in_progress", "role": "assistant", "content": []});
        let created = self.response_object(&id, "in_progress", Value::Null, json!([]));
        self.emit(json!({"type": "response.created", "response": created}));
        self.emit(
            json!({"type": "response.output_item.added", "response_id": id,
            "output_index": 0, "item": item}),
        );
        let previous = self.last_item.replace(item_id.clone());
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous,
            "item": item}),
        );
        self.emit(
            json!({"type": "response.content_part.added", "response_id": id,
            "item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "audio", "transcript": ""}}),
        );
        self.item_audio.insert(item_id.clone(), 0);
        self.active = Some(Active {
            id,
            item_id,
            audio_bytes: 0,
        });
    }

    fn finish_response(&mut self, status: &str, reason: Option<&str>) {
        let Some(active) = self.active.take() else {
            return;
        };
        let (id, item_id) = (active.id, active.item_id);
        let transcript = "(echo)";
        let ids = |mut v: Value| {
            v["response_id"] = json!(id);
            v["item_id"] = json!(item_id);
            v["output_index"] = json!(0);
            v["content_index"] = json!(0);
            v
        };
        self.emit(ids(json!({"type": "response.output_audio.done"})));
        self.emit(ids(
            json!({"type": "response.output_audio_transcript.done", "transcript": transcript}),
        ));
        self.emit(ids(json!({"type": "response.content_part.done",
            "part": {"type": "audio", "transcript": transcript}})));
        let item_status = if status == "completed" {
            "completed"
        } else {
            "incomplete"
        };
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": item_status, "role": "assistant",
            "content": [{"type": "output_audio", "transcript": transcript}]});
        self.emit(
            json!({"type": "response.output_item.done", "response_id": id,
            "output_index": 0, "item": item}),
        );
        self.emit(json!({"type": "conversation.item.done", "item": item}));
        let details = match reason {
            Some(reason) => json!({"type": status, "reason": reason}),
            None => Value::Null,
        };
        let response = self.response_object(&id, status, details, json!([item]));
        self.emit(json!({"type": "response.done", "response": response}));
    }

    fn add_item(&mut self, item: Value, id: &str) {
        let previous = self.last_item.replace(id.to_owned());
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
    }

    /// The caller's turn is over: commit the buffer as a user item and transcribe it.
    fn commit_user_turn(&mut self, item_id: Option<String>) {
        let item_id = item_id.unwrap_or_else(|| self.id("item"));
        let previous = self.last_item.clone();
        self.emit(json!({"type": "input_audio_buffer.committed",
            "previous_item_id": previous, "item_id": item_id}));
        self.input_buffer_bytes = 0;
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": null}]});
        self.add_item(item, &item_id);
        self.turns += 1;
        let transcript = format!("scripted caller turn {}", self.turns);
        self.emit(
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": transcript,
            "usage": {"type": "duration", "seconds": 1.0}}),
        );
    }

    /// What server VAD does when the caller talks over the assistant.
    fn scripted_turn(&mut self) {
        let item_id = self.id("item");
        let at_ms = self.input_total_bytes / BYTES_PER_MS;
        self.emit(json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": at_ms.saturating_sub(300), "item_id": item_id}));
        if self.active.is_some() {
            self.finish_response("cancelled", Some("turn_detected"));
        }
        self.emit(json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": at_ms, "item_id": item_id}));
        self.commit_user_turn(Some(item_id));
    }
}

/// GA `session.update` semantics: only the fields present change; objects merge key by key.
fn merge(into: &mut Value, update: Value) {
    match (into, update) {
        (Value::Object(into), Value::Object(update)) => {
            for (k, v) in update {
                match into.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        into.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(turn_ms: u64, barge_in_every_ms: u64) -> Session {
        let config = FakeConfig {
            turn_ms,
            barge_in_every_ms,
            api_key: None,
        };
        let mut s = Session::new(1, "gpt-realtime", Arc::new(config));
        s.out.clear();
        s
    }

    fn types(s: &mut Session) -> Vec<String> {
        s.out
            .drain(..)
            .map(|t| {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert!(v["event_id"].is_string(), "no event_id in {t}");
                v["type"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    fn frame() -> String {
        use base64::prelude::*;
        BASE64_STANDARD.encode([0xFFu8; 160])
    }

    fn append() -> String {
        format!(
            r#"{{"type":"input_audio_buffer.append","audio":"{}"}}"#,
            frame()
        )
    }

    /// Appends come back as deltas of one response, opened and closed in the GA order.
    #[test]
    fn echoes_appends_inside_a_response() {
        let mut s = session(40, 0);
        let append = append();
        assert!(s.on_client_event(&append));
        let delta: Value = serde_json::from_str(s.out.last().unwrap()).unwrap();
        assert_eq!(delta["delta"], frame());
        assert_eq!(
            types(&mut s),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "response.content_part.added",
                "response.output_audio.delta"
            ]
        );
        assert!(s.on_client_event(&append));
        assert_eq!(
            types(&mut s),
            [
                "response.output_audio.delta",
                "response.output_audio.done",
                "response.output_audio_transcript.done",
                "response.content_part.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done"
            ]
        );
    }

    /// A GA update is applied and answered; beta keys and a missing type are rejected.
    #[test]
    fn session_update_is_checked() {
        let mut s = session(0, 0);
        s.on_client_event(r#"{"type":"session.update","session":{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcmu"}}}}}"#);
        let updated: Value = serde_json::from_str(&s.out.pop().unwrap()).unwrap();
        assert_eq!(updated["type"], "session.updated");
        assert_eq!(
            updated["session"]["audio"]["input"]["format"]["type"],
            "audio/pcmu"
        );
        assert_eq!(updated["session"]["audio"]["output"]["voice"], "alloy");
        for bad in [
            r#"{"type":"session.update","session":{"type":"realtime","temperature":0.8}}"#,
            r#"{"type":"session.update","session":{"instructions":"x"}}"#,
            r#"{"type":"session.update","session":{"type":"realtime"},"extra":1}"#,
            r#"{"type":"response.cancel"}"#,
            r#"{"type":"input_audio_buffer.commit"}"#,
            r#"{"type":"no.such.event"}"#,
        ] {
            s.on_client_event(bad);
            assert_eq!(types(&mut s), ["error"], "for {bad}");
        }
    }

    /// A scripted caller turn interrupts the response the way server VAD does.
    #[test]
    fn scripted_barge_in() {
        let mut s = session(0, 40);
        let append = append();
        s.on_client_event(&append);
        s.out.clear();
        s.on_client_event(&append);
        let t = types(&mut s);
        assert_eq!(t[0], "input_audio_buffer.speech_started");
        assert!(t.contains(&"response.done".to_owned()));
        assert_eq!(
            t.last().unwrap(),
            "conversation.item.input_audio_transcription.completed"
        );
    }

    /// Base64 is checked without decoding (with the bridge's own checker).
    #[test]
    fn base64_length() {
        assert_eq!(base64_audio_len("//8="), Some(2));
        assert_eq!(base64_audio_len(&frame()), Some(160));
        assert_eq!(base64_audio_len("abc"), None);
        assert_eq!(base64_audio_len("ab!="), None);
    }
}
