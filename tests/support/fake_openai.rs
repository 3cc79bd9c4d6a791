//! A strict fake of the OpenAI Realtime API (GA protocol): the upstream peer of callbridge in
//! end-to-end tests.
//!
//! It speaks `reference/protocols.md` B1–B6 and is at least as strict as the real service:
//! every handshake and every client event is validated, every deviation is recorded as a
//! *violation* (a test ends with [`FakeOpenAi::assert_no_violations`]), and where the real
//! service answers with an `error` event, the fake answers with one of the same shape
//! (`error.{type,code,message,param,event_id}`). A few checks are callbridge requirements
//! rather than API rules (µ-law both ways, no audio or `response.create` before the session is
//! configured); those are violations without an `error` event, as the real API would accept
//! them and silently misbehave.
//!
//! The fake never speaks on its own: the test scripts the model through [`FakeSession`]
//! (`start_response`, `audio_delta`, `speech_started`, …), and those scripts keep the state the
//! validator needs (the active response, the audio sent per item).
//!
//! Threads: actix's `HttpServer` runs its worker on its own thread, so per-connection state is
//! behind `Arc<Mutex<_>>`, and every frame for the service goes through one unbounded channel
//! per connection, drained by a writer task on the worker. Scripting methods push to that
//! channel *while holding the state lock*, so the order of frames on the wire is the order of
//! the state changes the validator sees. They are therefore plain (non-async) methods.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use actix_web::{
    dev::ServerHandle,
    http::{header, StatusCode},
    rt::time::sleep,
    web::{self, Bytes},
    App, HttpRequest, HttpResponse, HttpServer, ResponseError,
};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseReason};
use base64::prelude::*;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

/// How long the `async` waits of this module wait unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polling interval of the waits (state lives on another thread; polling keeps it simple).
const POLL: Duration = Duration::from_millis(5);

/// `input_audio_buffer.append` may carry up to 15 MiB (B6); leave room for the JSON around it.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Violations quote the offending event, clipped to this many bytes.
const CLIP: usize = 400;

/// Voices the GA API accepts by name (B2).
const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

/// Client event types of B3 and the keys each may carry besides `type` and `event_id`.
const CLIENT_EVENTS: &[(&str, &[&str])] = &[
    ("session.update", &["session"]),
    ("input_audio_buffer.append", &["audio"]),
    ("input_audio_buffer.commit", &[]),
    ("input_audio_buffer.clear", &[]),
    ("conversation.item.create", &["previous_item_id", "item"]),
    (
        "conversation.item.truncate",
        &["item_id", "content_index", "audio_end_ms"],
    ),
    ("conversation.item.delete", &["item_id"]),
    ("response.create", &["response"]),
    ("response.cancel", &["response_id"]),
];

/// GA `session` keys (B2). Everything else, beta keys included, is `unknown_parameter`.
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

/// GA `response.create` `response` keys (B3).
const RESPONSE_KEYS: &[&str] = &[
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "output_modalities",
    "audio",
    "conversation",
    "input",
    "metadata",
];

// ---------------------------------------------------------------------------------------------
// The server

/// Knobs a test turns while the fake runs.
#[derive(Default)]
struct Controls {
    /// New upgrades get HTTP 503 (to exhaust the service's restart budget).
    refuse: bool,
    /// New upgrades are accepted and closed at once with 1011.
    close_after_accept: bool,
}

/// One upgrade request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// Request path (must be `/v1/realtime`).
    pub path: String,
    /// The `model` query parameter, if any.
    pub model: Option<String>,
    /// The key from `Authorization: Bearer <key>`, if well formed.
    pub api_key: Option<String>,
    /// The `OpenAI-Beta` header, if sent (it must not be).
    pub beta_header: Option<String>,
    /// 101 when upgraded, else the HTTP status the fake answered.
    pub status: u16,
}

#[derive(Default)]
struct Shared {
    controls: Mutex<Controls>,
    /// Delay before `session.updated` is sent; shared with every session (see
    /// [`FakeOpenAi::set_session_updated_delay`]).
    updated_delay_ms: Arc<AtomicU64>,
    /// Violations found before a session exists (handshake, wrong path).
    handshake_violations: Mutex<Vec<String>>,
    handshakes: Mutex<Vec<Handshake>>,
    sessions: Mutex<Vec<Arc<SessionCore>>>,
    /// How many sessions `next_session` has handed out.
    handed_out: AtomicUsize,
}

/// The fake OpenAI Realtime server. Dropping it stops the server.
pub struct FakeOpenAi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    handle: ServerHandle,
}

impl FakeOpenAi {
    /// Starts the fake on `127.0.0.1:0` (one worker thread).
    pub async fn start() -> FakeOpenAi {
        let shared = Arc::new(Shared::default());
        let data = web::Data::from(shared.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/v1/realtime", web::get().to(realtime_upgrade))
                .default_service(web::to(unexpected_request))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .bind(("127.0.0.1", 0))
        .expect("FakeOpenAi: bind 127.0.0.1:0");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        FakeOpenAi {
            shared,
            addr,
            handle,
        }
    }

    /// `ws://127.0.0.1:PORT/v1/realtime` (the service appends `?model=…`).
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// While set, new upgrades are answered with HTTP 503 (existing sessions are untouched).
    pub fn set_refuse_connections(&self, refuse: bool) {
        lock(&self.shared.controls).refuse = refuse;
    }

    /// While set, new upgrades are accepted and closed at once with code 1011 (no
    /// `session.created`). Such connections are not handed out by `next_session`.
    pub fn set_close_after_accept(&self, close: bool) {
        lock(&self.shared.controls).close_after_accept = close;
    }

    /// Holds every `session.updated` for `ms` after the valid `session.update` (0 = answer at
    /// once, the default). While one is held, appends, `response.create` and
    /// `conversation.item.create` from the service are violations: this is how a test proves
    /// the service *waits* for `session.updated` (e.g. before the greeting).
    pub fn set_session_updated_delay(&self, ms: u64) {
        self.shared.updated_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Upgrade requests that reached `/v1/realtime`, refused ones included.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.handshakes).len()
    }

    /// Upgrade requests answered with 101 (beta-shaped and close-after-accept ones included).
    pub fn accepted_count(&self) -> usize {
        lock(&self.shared.handshakes)
            .iter()
            .filter(|h| h.status == 101)
            .count()
    }

    /// Every upgrade request to `/v1/realtime` so far, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        lock(&self.shared.handshakes).clone()
    }

    /// Sessions (normally accepted connections) so far.
    pub fn session_count(&self) -> usize {
        lock(&self.shared.sessions).len()
    }

    /// The next accepted session not yet handed out, waiting up to [`DEFAULT_TIMEOUT`].
    pub async fn next_session(&self) -> FakeSession {
        self.next_session_timeout(DEFAULT_TIMEOUT).await
    }

    /// [`Self::next_session`] with an explicit timeout; panics when it elapses.
    pub async fn next_session_timeout(&self, timeout: Duration) -> FakeSession {
        let index = self.shared.handed_out.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(core) = lock(&self.shared.sessions).get(index).cloned() {
                self.shared.handed_out.store(index + 1, Ordering::SeqCst);
                return FakeSession {
                    core,
                    consumed: HashSet::new(),
                };
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeOpenAi: timed out after {timeout:?} waiting for session #{index} \
                     (upgrade requests so far: {:?})",
                    self.handshakes()
                );
            }
            sleep(POLL).await;
        }
    }

    /// All violations: handshake ones, then each session's, prefixed with `[session N]`.
    pub fn violations(&self) -> Vec<String> {
        let mut all = lock(&self.shared.handshake_violations).clone();
        for core in lock(&self.shared.sessions).iter() {
            let st = lock(&core.state);
            all.extend(
                st.violations
                    .iter()
                    .map(|v| format!("[session {}] {v}", core.index)),
            );
        }
        all
    }

    /// Panics listing every violation, if there is any.
    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "FakeOpenAi recorded {} violation(s):\n  {}",
            v.len(),
            v.join("\n  ")
        );
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        // `stop` sends the command before returning its future; nothing to await here.
        drop(self.handle.stop(false));
    }
}

/// Any request outside `/v1/realtime`: the service built the wrong URL.
async fn unexpected_request(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    lock(&shared.handshake_violations).push(format!(
        "request to an unexpected path: {} {} (expected GET /v1/realtime?model=…)",
        req.method(),
        req.uri()
    ));
    HttpResponse::NotFound().json(json!({"error": {
        "message": format!("Invalid URL ({} {})", req.method(), req.path()),
        "type": "invalid_request_error", "param": null, "code": null}}))
}

/// `GET /v1/realtime`: the handshake checks of B1, then the session.
async fn realtime_upgrade(
    req: HttpRequest,
    body: web::Payload,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default();
    let header_str = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned())
    };
    let mut handshake = Handshake {
        path: req.path().to_owned(),
        model: query.get("model").cloned(),
        api_key: header_str(header::AUTHORIZATION.as_str())
            .and_then(|a| a.strip_prefix("Bearer ").map(|k| k.trim().to_owned()))
            .filter(|k| !k.is_empty()),
        beta_header: header_str("openai-beta"),
        status: 101,
    };
    let refuse = |status: StatusCode, handshake: &mut Handshake, body: Value| {
        handshake.status = status.as_u16();
        lock(&shared.handshakes).push(handshake.clone());
        HttpResponse::build(status).json(body)
    };
    let violate = |msg: String| lock(&shared.handshake_violations).push(msg);

    let (refuse_all, close_after_accept) = {
        let c = lock(&shared.controls);
        (c.refuse, c.close_after_accept)
    };
    if refuse_all {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &mut handshake,
            api_error(
                "The server is overloaded (fake: refusing connections).",
                None,
            ),
        );
    }
    if handshake.api_key.is_none() {
        violate(format!(
            "handshake without `Authorization: Bearer <key>` (got {:?})",
            header_str(header::AUTHORIZATION.as_str())
        ));
        return refuse(
            StatusCode::UNAUTHORIZED,
            &mut handshake,
            api_error(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
            ),
        );
    }
    if handshake.model.as_deref().is_none_or(str::is_empty) {
        // Decision: the GA API needs the model in the URL (it cannot be set by
        // session.update); the fake refuses with 400 rather than guessing a default.
        violate(format!(
            "handshake without a `model` query parameter: {}",
            req.uri()
        ));
        return refuse(
            StatusCode::BAD_REQUEST,
            &mut handshake,
            api_error(
                "Missing required parameter: 'model'.",
                Some("missing_required_parameter"),
            ),
        );
    }
    let (response, session, stream) = match actix_ws::handle(&req, body) {
        Ok(parts) => parts,
        Err(e) => {
            violate(format!("not a websocket upgrade request: {e}"));
            let status = e.as_response_error().status_code();
            handshake.status = status.as_u16();
            lock(&shared.handshakes).push(handshake);
            return e.as_response_error().error_response();
        }
    };
    let stream = stream
        .max_frame_size(MAX_FRAME)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME);
    lock(&shared.handshakes).push(handshake.clone());

    if let Some(beta) = &handshake.beta_header {
        // What the real service has done since May 2026 (protocols.md §0.1).
        violate(format!(
            "handshake carries `OpenAI-Beta: {beta}`: the beta API is gone; the real service \
             answers beta_api_shape_disabled and closes 4000"
        ));
        let mut session = session;
        actix_web::rt::spawn(async move {
            let error = json!({"type": "error", "event_id": "event_beta0001", "error": {
                "type": "invalid_request_error", "code": "beta_api_shape_disabled",
                "message": "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
                "param": null, "event_id": null}});
            let _ = session.text(error.to_string()).await;
            let _ = session
                .close(Some(CloseReason {
                    code: 4000.into(),
                    description: Some("beta_api_shape_disabled".into()),
                }))
                .await;
            drop(stream);
        });
        return response;
    }
    if close_after_accept {
        actix_web::rt::spawn(async move {
            let _ = session
                .close(Some(CloseReason {
                    code: 1011.into(),
                    description: Some("fake: closing right after accept".into()),
                }))
                .await;
            drop(stream);
        });
        return response;
    }

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let core = {
        let mut sessions = lock(&shared.sessions);
        let index = sessions.len();
        let core = Arc::new(SessionCore {
            index,
            state: Mutex::new(SessionState::new(
                index,
                handshake.model.clone().unwrap_or_default(),
                handshake.api_key.clone().unwrap_or_default(),
            )),
            out: out_tx,
            updated_delay_ms: shared.updated_delay_ms.clone(),
        });
        sessions.push(core.clone());
        core
    };
    {
        let mut st = lock(&core.state);
        let created = json!({"type": "session.created", "session": st.session.clone()});
        core.emit(&mut st, created);
    }
    actix_web::rt::spawn(write_loop(session, out_rx));
    actix_web::rt::spawn(read_loop(core, stream));
    response
}

/// An OpenAI HTTP error body.
fn api_error(message: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}})
}

// ---------------------------------------------------------------------------------------------
// One connection

/// What the writer task sends to the service.
enum Out {
    Text(String),
    Pong(Bytes),
    Close(u16, String),
    /// End the connection without a close frame (the service sees an abnormal closure, 1006).
    Drop,
}

/// Owns the `actix_ws::Session` (the only handle, so that dropping it ends the response body,
/// which makes actix-http close the TCP connection: that is `drop_connection`).
async fn write_loop(mut session: actix_ws::Session, mut rx: mpsc::UnboundedReceiver<Out>) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Out::Text(text) => session.text(text).await,
            Out::Pong(bytes) => session.pong(&bytes).await,
            Out::Close(code, reason) => {
                let description = (!reason.is_empty()).then_some(reason);
                let _ = session
                    .close(Some(CloseReason {
                        code: code.into(),
                        description,
                    }))
                    .await;
                return;
            }
            Out::Drop => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Reads the service's frames until the socket ends; never panics.
async fn read_loop(core: Arc<SessionCore>, mut stream: AggregatedMessageStream) {
    loop {
        match stream.recv().await {
            Some(Ok(AggregatedMessage::Text(text))) => core.on_text(&text),
            Some(Ok(AggregatedMessage::Binary(bytes))) => core.on_binary(bytes.len()),
            Some(Ok(AggregatedMessage::Ping(bytes))) => {
                let _ = core.out.send(Out::Pong(bytes));
            }
            Some(Ok(AggregatedMessage::Pong(_))) => {}
            Some(Ok(AggregatedMessage::Close(reason))) => {
                core.on_close_frame(reason.map(|r| u16::from(r.code)));
                break;
            }
            Some(Err(e)) => {
                core.on_protocol_error(&e);
                break;
            }
            None => break,
        }
    }
    core.on_socket_end();
}

/// Who ended the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closer {
    Service,
    Fake,
}

/// Facts about a conversation item the validator needs.
#[derive(Clone, Debug)]
struct ItemInfo {
    /// `message` role (`user`/`assistant`/`system`), when a message.
    role: Option<String>,
    /// An assistant audio item produced by this session (the only kind `truncate` accepts).
    assistant_audio: bool,
    /// Output audio bytes the fake has sent for it (after truncation: what is left).
    audio_bytes: usize,
}

/// The response the fake is "generating" (between `start_response` and its `response.done`).
#[derive(Clone, Debug)]
struct ActiveResponse {
    response_id: String,
    item_id: String,
}

struct SessionState {
    index: usize,
    session_id: String,
    conversation_id: String,
    model: String,
    api_key: String,
    event_seq: u64,
    item_seq: u64,
    /// Every client frame in order: parsed JSON, or the raw text as a JSON string when it was
    /// not JSON, or `{"binary_frame": len}`.
    log: Vec<Value>,
    violations: Vec<String>,
    /// The effective session configuration (what `session.updated` echoes).
    session: Value,
    /// A valid `session.update` has been processed.
    configured: bool,
    /// The model has sent output audio (the voice is then fixed).
    audio_produced: bool,
    /// `session.updated` replies held back by the delay knob.
    updates_pending: usize,
    updates_accepted: usize,
    /// The "audio before session.updated" violation is recorded once per session.
    early_audio_reported: bool,
    audio: Vec<u8>,
    append_count: usize,
    /// Input bytes appended since the last commit/clear.
    uncommitted: usize,
    items: HashMap<String, ItemInfo>,
    last_item: Option<String>,
    active: Option<ActiveResponse>,
    truncates: Vec<Value>,
    response_creates: Vec<Value>,
    closed: bool,
    closer: Option<Closer>,
    /// Close code of the close frame the service sent, if it sent one.
    service_close_code: Option<u16>,
}

impl SessionState {
    fn new(index: usize, model: String, api_key: String) -> SessionState {
        let session_id = format!("sess_fake{index:04}");
        let session = json!({
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
        });
        SessionState {
            index,
            conversation_id: format!("conv_fake{index:04}"),
            session_id,
            model,
            api_key,
            event_seq: 0,
            item_seq: 0,
            log: Vec::new(),
            violations: Vec::new(),
            session,
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
        }
    }

    fn violate(&mut self, msg: String) {
        self.violations.push(msg);
    }

    fn next_item_id(&mut self) -> String {
        self.item_seq += 1;
        format!("item_fake{:02}{:05}", self.index, self.item_seq)
    }

    fn register_item(&mut self, id: &str, role: Option<&str>, assistant_audio: bool) {
        self.items.entry(id.to_owned()).or_insert_with(|| ItemInfo {
            role: role.map(str::to_owned),
            assistant_audio,
            audio_bytes: 0,
        });
        self.last_item = Some(id.to_owned());
    }

    fn format_type(&self, dir: &str) -> String {
        self.session["audio"][dir]["format"]["type"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    }

    /// Bytes per millisecond of the effective format of `dir` (`input` / `output`).
    fn bytes_per_ms(&self, dir: &str) -> usize {
        match self.format_type(dir).as_str() {
            "audio/pcm" => 48,
            _ => 8,
        }
    }

    /// With server/semantic VAD and `interrupt_response` (default true), the real server
    /// cancels the active response itself on `speech_started` (B5).
    fn server_interrupts(&self) -> bool {
        let td = &self.session["audio"]["input"]["turn_detection"];
        td.is_object() && td["interrupt_response"].as_bool() != Some(false)
    }

    fn response_object(
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
}

struct SessionCore {
    index: usize,
    state: Mutex<SessionState>,
    out: mpsc::UnboundedSender<Out>,
    updated_delay_ms: Arc<AtomicU64>,
}

impl SessionCore {
    /// Sends a server event, giving it an `event_id`. Call with the state lock held, so the
    /// wire order is the state-change order.
    fn emit(&self, st: &mut SessionState, mut event: Value) {
        st.event_seq += 1;
        if let Some(obj) = event.as_object_mut() {
            obj.insert(
                "event_id".into(),
                format!("event_fake{:02}{:06}", st.index, st.event_seq).into(),
            );
        }
        let _ = self.out.send(Out::Text(event.to_string()));
    }

    fn on_binary(&self, len: usize) {
        let mut st = lock(&self.state);
        st.log.push(json!({ "binary_frame": len }));
        st.violate(format!(
            "binary frame of {len} bytes: client events are JSON text frames"
        ));
        let err = Reject::new(
            "invalid_json",
            "The server could not parse the event: binary frames are not supported.".into(),
            None,
        );
        self.emit(&mut st, err.to_event(None));
    }

    fn on_close_frame(&self, code: Option<u16>) {
        let mut st = lock(&self.state);
        st.service_close_code = Some(code.unwrap_or(1005));
        if st.closer.is_none() {
            st.closer = Some(Closer::Service);
        }
        // Echo the close like a real server, then the writer ends the connection.
        let _ = self
            .out
            .send(Out::Close(code.unwrap_or(1000), String::new()));
    }

    fn on_protocol_error(&self, e: &actix_ws::ProtocolError) {
        let mut st = lock(&self.state);
        match e {
            // The TCP connection went away without a close frame: abrupt, but not a protocol
            // violation (see `FakeSession::service_close_code`).
            actix_ws::ProtocolError::Io(_) => {}
            other => st.violate(format!(
                "websocket protocol error from the service: {other}"
            )),
        }
    }

    fn on_socket_end(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        if st.closer.is_none() {
            st.closer = Some(Closer::Service);
        }
    }

    fn on_text(self: &Arc<Self>, text: &str) {
        let mut st = lock(&self.state);
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                st.log.push(Value::String(text.to_owned()));
                st.violate(format!(
                    "client frame is not JSON ({e}): {}",
                    super::clip(text, CLIP)
                ));
                let err = Reject::new(
                    "invalid_json",
                    format!("The server could not parse the JSON payload of the event: {e}"),
                    None,
                );
                self.emit(&mut st, err.to_event(None));
                return;
            }
        };
        st.log.push(value.clone());
        let client_event_id = value
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Err(reject) = self.dispatch(&mut st, &value) {
            st.violate(format!(
                "{} ({}): {}",
                reject.code,
                reject.message,
                super::clip(text, CLIP)
            ));
            self.emit(&mut st, reject.to_event(client_event_id.as_deref()));
        }
    }

    fn dispatch(self: &Arc<Self>, st: &mut SessionState, value: &Value) -> Checked {
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
            "session.update" => self.session_update(st, event),
            "input_audio_buffer.append" => self.append(st, event),
            "input_audio_buffer.commit" => self.commit(st),
            "input_audio_buffer.clear" => {
                st.uncommitted = 0;
                self.emit(st, json!({"type": "input_audio_buffer.cleared"}));
                Ok(())
            }
            "conversation.item.create" => self.item_create(st, event),
            "conversation.item.truncate" => self.truncate(st, event, value),
            "conversation.item.delete" => self.item_delete(st, event),
            "response.create" => self.response_create(st, event, value),
            "response.cancel" => self.response_cancel(st, event),
            _ => unreachable!("listed in CLIENT_EVENTS"),
        }
    }

    fn session_update(
        self: &Arc<Self>,
        st: &mut SessionState,
        event: &Map<String, Value>,
    ) -> Checked {
        let session = event.get("session").ok_or_else(|| missing("session"))?;
        let session = object(session, "session")?;
        validate_session(session)?;
        let new_voice = &session.get("audio").unwrap_or(&Value::Null)["output"]["voice"];
        if st.audio_produced
            && !new_voice.is_null()
            && *new_voice != st.session["audio"]["output"]["voice"]
        {
            // B2: "voice can change only until the model has produced audio once".
            return Err(Reject::new(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.".into(),
                Some("session.audio.output.voice"),
            ));
        }

        merge_session(&mut st.session, session);
        st.configured = true;
        st.updates_accepted += 1;
        for dir in ["input", "output"] {
            let effective = st.session["audio"][dir]["format"].clone();
            if effective != json!({"type": "audio/pcmu"}) {
                st.violate(format!(
                    "callbridge requires audio.{dir}.format {{\"type\":\"audio/pcmu\"}} (Twilio \
                     µ-law passthrough); the effective format after this session.update is \
                     {effective}"
                ));
            }
        }
        let reply = json!({"type": "session.updated", "session": st.session.clone()});
        let delay = self.updated_delay_ms.load(Ordering::SeqCst);
        if delay == 0 {
            self.emit(st, reply);
        } else {
            st.updates_pending += 1;
            let core = self.clone();
            actix_web::rt::spawn(async move {
                sleep(Duration::from_millis(delay)).await;
                let mut st = lock(&core.state);
                st.updates_pending -= 1;
                core.emit(&mut st, reply);
            });
        }
        Ok(())
    }

    /// Violation (no error: the real API would accept) for traffic that depends on the session
    /// configuration but comes before `session.updated`.
    fn check_configured(st: &mut SessionState, what: &str) {
        if !st.configured {
            st.violate(format!(
                "{what} sent before session.updated: would be read as pcm 24k \
                 (no valid session.update yet)"
            ));
        } else if st.updates_pending > 0 {
            st.violate(format!(
                "{what} sent before session.updated was delivered (the service did not wait \
                 for it)"
            ));
        }
    }

    fn append(&self, st: &mut SessionState, event: &Map<String, Value>) -> Checked {
        let audio = string(event.get("audio").ok_or_else(|| missing("audio"))?, "audio")?;
        if audio.is_empty() {
            return Err(Reject::invalid_value(
                "audio",
                "Invalid 'audio': empty string. Expected base64-encoded audio bytes.".into(),
            ));
        }
        let bytes = BASE64_STANDARD.decode(audio).map_err(|e| {
            Reject::invalid_value(
                "audio",
                format!("Invalid 'audio'. Expected base64-encoded audio bytes: {e}."),
            )
        })?;
        if !st.early_audio_reported && (!st.configured || st.updates_pending > 0) {
            // Once per session: a service that streams early would flood the list.
            st.early_audio_reported = true;
            Self::check_configured(st, "audio");
        }
        st.append_count += 1;
        st.uncommitted += bytes.len();
        st.audio.extend_from_slice(&bytes);
        Ok(())
    }

    fn commit(&self, st: &mut SessionState) -> Checked {
        let ms = st.uncommitted as f64 / st.bytes_per_ms("input") as f64;
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
        let previous = st.last_item.clone();
        let item_id = st.next_item_id();
        st.register_item(&item_id, Some("user"), false);
        st.uncommitted = 0;
        self.emit(
            st,
            json!({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id}),
        );
        Ok(())
    }

    fn item_create(&self, st: &mut SessionState, event: &Map<String, Value>) -> Checked {
        if let Some(prev) = event.get("previous_item_id") {
            match prev {
                Value::Null => {}
                Value::String(p) if p == "root" || st.items.contains_key(p) => {}
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
        Self::check_configured_soft(st, "conversation.item.create");

        let mut item = item.clone();
        let obj = item
            .as_object_mut()
            .expect("invariant: validate_item checked an object");
        let id = match obj.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => st.next_item_id(),
        };
        obj.insert("id".into(), id.clone().into());
        obj.insert("object".into(), "realtime.item".into());
        obj.insert("status".into(), "completed".into());
        let role = obj.get("role").and_then(Value::as_str).map(str::to_owned);
        let previous = match event.get("previous_item_id") {
            Some(Value::String(p)) => Some(p.clone()),
            _ => st.last_item.clone(),
        };
        st.register_item(&id, role.as_deref(), false);
        self.emit(
            st,
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            st,
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
        Ok(())
    }

    /// Only while a delayed `session.updated` is pending (items do not depend on the audio
    /// format, so creating one before any session.update is legal).
    fn check_configured_soft(st: &mut SessionState, what: &str) {
        if st.configured && st.updates_pending > 0 {
            Self::check_configured(st, what);
        }
    }

    fn truncate(&self, st: &mut SessionState, event: &Map<String, Value>, raw: &Value) -> Checked {
        st.truncates.push(raw.clone());
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
        let per_ms = st.bytes_per_ms("output");
        let Some(item) = st.items.get_mut(item_id).filter(|i| i.assistant_audio) else {
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
            st,
            json!({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms}),
        );
        Ok(())
    }

    fn item_delete(&self, st: &mut SessionState, event: &Map<String, Value>) -> Checked {
        let item_id = string(
            event.get("item_id").ok_or_else(|| missing("item_id"))?,
            "item_id",
        )?;
        if st.items.remove(item_id).is_none() {
            // Decision: code modelled on item_truncate_invalid_item_id (not in the reference).
            return Err(Reject::new(
                "item_delete_invalid_item_id",
                format!("Item with item_id not found: {item_id}"),
                Some("item_id"),
            ));
        }
        let item_id = item_id.to_owned();
        self.emit(
            st,
            json!({"type": "conversation.item.deleted", "item_id": item_id}),
        );
        Ok(())
    }

    fn response_create(
        &self,
        st: &mut SessionState,
        event: &Map<String, Value>,
        raw: &Value,
    ) -> Checked {
        st.response_creates.push(raw.clone());
        if let Some(response) = event.get("response") {
            validate_response(object(response, "response")?)?;
        }
        if let Some(active) = &st.active {
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
        if !st.configured || st.updates_pending > 0 {
            Self::check_configured(st, "response.create");
        }
        // The fake does not answer by itself: the test scripts the response (start_response…).
        Ok(())
    }

    fn response_cancel(&self, st: &mut SessionState, event: &Map<String, Value>) -> Checked {
        let wanted = match event.get("response_id") {
            None => None,
            Some(v) => Some(string(v, "response_id")?.to_owned()),
        };
        let active = match &st.active {
            Some(a) if wanted.as_deref().is_none_or(|w| w == a.response_id) => a.clone(),
            _ => {
                return Err(Reject::new(
                    "response_cancel_not_active",
                    "Cancellation failed: no active response found".into(),
                    None,
                ))
            }
        };
        st.active = None;
        let done = done_response(st, &active, "cancelled", "client_cancelled");
        self.emit(st, done);
        Ok(())
    }
}

/// `response.done` for a response cancelled for `reason` (`client_cancelled`/`turn_detected`).
fn done_response(st: &SessionState, active: &ActiveResponse, status: &str, reason: &str) -> Value {
    let item = json!({"id": active.item_id, "type": "message", "object": "realtime.item",
        "status": "incomplete", "role": "assistant",
        "content": [{"type": "output_audio", "transcript": ""}]});
    json!({"type": "response.done", "response": st.response_object(
        &active.response_id, status, json!({"type": status, "reason": reason}), json!([item]))})
}

// ---------------------------------------------------------------------------------------------
// The test's handle on one session

/// One accepted connection: what the service sent, and the model's side scripted by the test.
pub struct FakeSession {
    core: Arc<SessionCore>,
    /// Indices of `received()` already returned by `recv_event`.
    consumed: HashSet<usize>,
}

impl FakeSession {
    fn state(&self) -> MutexGuard<'_, SessionState> {
        lock(&self.core.state)
    }

    /// 0 for the first session the server accepted, 1 for the next, …
    pub fn index(&self) -> usize {
        self.core.index
    }

    /// The `model` query parameter of the handshake.
    pub fn model(&self) -> String {
        self.state().model.clone()
    }

    /// The key from `Authorization: Bearer <key>`.
    pub fn api_key(&self) -> String {
        self.state().api_key.clone()
    }

    pub fn session_id(&self) -> String {
        self.state().session_id.clone()
    }

    // ----- what the service sent

    /// Every client frame so far (JSON; non-JSON text as a JSON string; binary as
    /// `{"binary_frame": len}`), valid or not.
    pub fn received(&self) -> Vec<Value> {
        self.state().log.clone()
    }

    /// The `type`s of every client event so far, in order.
    pub fn received_types(&self) -> Vec<String> {
        self.state()
            .log
            .iter()
            .map(|v| v["type"].as_str().unwrap_or("<no type>").to_owned())
            .collect()
    }

    /// All client events of one type so far (consumed or not).
    pub fn events_of_type(&self, type_name: &str) -> Vec<Value> {
        self.state()
            .log
            .iter()
            .filter(|v| v["type"] == type_name)
            .cloned()
            .collect()
    }

    /// The next client event of `type_name` not yet returned by `recv_event`, waiting up to
    /// [`DEFAULT_TIMEOUT`].
    pub async fn recv_event(&mut self, type_name: &str) -> Value {
        self.recv_event_timeout(type_name, DEFAULT_TIMEOUT).await
    }

    pub async fn recv_event_timeout(&mut self, type_name: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = lock(&self.core.state);
                let found = st.log.iter().enumerate().find(|(i, v)| {
                    !self.consumed.contains(i) && v["type"].as_str() == Some(type_name)
                });
                if let Some((i, v)) = found {
                    let v = v.clone();
                    drop(st);
                    self.consumed.insert(i);
                    return v;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeSession #{}: timed out after {timeout:?} waiting for a client event \
                     `{type_name}`; received so far: {:?}",
                    self.core.index,
                    self.received_types()
                );
            }
            sleep(POLL).await;
        }
    }

    /// All decoded `input_audio_buffer.append` bytes, in order.
    pub fn appended_audio(&self) -> Vec<u8> {
        self.state().audio.clone()
    }

    /// Number of valid `input_audio_buffer.append` events.
    pub fn append_count(&self) -> usize {
        self.state().append_count
    }

    /// Waits until at least `n` appended bytes arrived; returns all appended bytes.
    pub async fn wait_appended_bytes(&self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let audio = self.appended_audio();
            if audio.len() >= n {
                return audio;
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeSession #{}: timed out waiting for {n} appended audio bytes (have {})",
                    self.core.index,
                    audio.len()
                );
            }
            sleep(POLL).await;
        }
    }

    /// Every `conversation.item.truncate` received (valid or not; invalid ones are also
    /// violations).
    pub fn truncates(&self) -> Vec<Value> {
        self.state().truncates.clone()
    }

    /// Every `response.create` received (rejected ones included).
    pub fn response_creates(&self) -> Vec<Value> {
        self.state().response_creates.clone()
    }

    /// The effective session configuration (what the last `session.updated` carried).
    pub fn session_config(&self) -> Value {
        self.state().session.clone()
    }

    /// Valid `session.update`s so far.
    pub fn session_updates_accepted(&self) -> usize {
        self.state().updates_accepted
    }

    /// The id of the response the fake is generating, if any.
    pub fn active_response(&self) -> Option<String> {
        self.state().active.as_ref().map(|a| a.response_id.clone())
    }

    /// Output audio bytes sent for an assistant item (after truncation: what is left).
    pub fn item_audio_bytes(&self, item_id: &str) -> Option<usize> {
        self.state().items.get(item_id).map(|i| i.audio_bytes)
    }

    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "FakeSession #{} recorded {} violation(s):\n  {}",
            self.core.index,
            v.len(),
            v.join("\n  ")
        );
    }

    // ----- scripting the model

    /// Sends a raw server event (an `event_id` is added). Item ids it mentions become known
    /// items, so `previous_item_id` references to them validate.
    pub fn send(&self, event: Value) {
        let mut st = self.state();
        let item_id = event["item"]["id"]
            .as_str()
            .or_else(|| event["item_id"].as_str())
            .map(str::to_owned);
        if let Some(id) = item_id {
            let role = event["item"]["role"].as_str().map(str::to_owned);
            st.register_item(&id, role.as_deref(), false);
        }
        self.core.emit(&mut st, event);
    }

    /// Starts an audio response (B4 order): `response.created` (in_progress),
    /// `response.output_item.added`, `conversation.item.added`, `response.content_part.added`.
    /// Panics if another scripted response is still active (a test-script bug).
    pub fn start_response(&self, response_id: &str, item_id: &str) {
        let mut st = self.state();
        if let Some(a) = &st.active {
            panic!(
                "FakeSession::start_response({response_id}): response {} is still active; \
                 finish or cancel it first",
                a.response_id
            );
        }
        let previous = st.last_item.clone();
        st.register_item(item_id, Some("assistant"), true);
        st.active = Some(ActiveResponse {
            response_id: response_id.into(),
            item_id: item_id.into(),
        });
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": "in_progress", "role": "assistant", "content": []});
        let created = json!({"type": "response.created",
            "response": st.response_object(response_id, "in_progress", Value::Null, json!([]))});
        self.core.emit(&mut st, created);
        self.core.emit(
            &mut st,
            json!({"type": "response.output_item.added",
            "response_id": response_id, "output_index": 0, "item": item}),
        );
        self.core.emit(
            &mut st,
            json!({"type": "conversation.item.added",
            "previous_item_id": previous, "item": item}),
        );
        self.core.emit(
            &mut st,
            json!({"type": "response.content_part.added",
            "response_id": response_id, "item_id": item_id, "output_index": 0,
            "content_index": 0, "part": {"type": "audio", "transcript": ""}}),
        );
    }

    /// `response.output_audio.delta` carrying `b64` (standard base64 of µ-law bytes). Sent
    /// even when the response is no longer active (late deltas after a cancel are real).
    pub fn audio_delta(&self, response_id: &str, item_id: &str, b64: &str) {
        let bytes = BASE64_STANDARD.decode(b64).unwrap_or_else(|e| {
            panic!("FakeSession::audio_delta: invalid base64 in the test: {e}")
        });
        let mut st = self.state();
        st.audio_produced = true;
        st.items
            .entry(item_id.to_owned())
            .or_insert_with(|| ItemInfo {
                role: Some("assistant".into()),
                assistant_audio: true,
                audio_bytes: 0,
            })
            .audio_bytes += bytes.len();
        self.core.emit(
            &mut st,
            json!({"type": "response.output_audio.delta",
            "response_id": response_id, "item_id": item_id, "output_index": 0,
            "content_index": 0, "delta": b64}),
        );
    }

    /// [`Self::audio_delta`] from raw bytes.
    pub fn audio_delta_bytes(&self, response_id: &str, item_id: &str, audio: &[u8]) {
        self.audio_delta(response_id, item_id, &BASE64_STANDARD.encode(audio));
    }

    /// Ends an audio response (B4 order): `response.output_audio.done`,
    /// `response.output_audio_transcript.done`, `response.content_part.done`,
    /// `response.output_item.done`, `conversation.item.done`, then `response.done` (completed)
    /// and `rate_limits.updated`. If the response was already cancelled (by `response.cancel`
    /// or by the server on `speech_started`), the item-level `.done` events are still sent
    /// (the real server does so for interrupted responses) but no second `response.done`.
    pub fn finish_response(&self, response_id: &str, item_id: &str, transcript: &str) {
        let mut st = self.state();
        let still_active = st
            .active
            .as_ref()
            .is_some_and(|a| a.response_id == response_id);
        let status = if still_active {
            "completed"
        } else {
            "incomplete"
        };
        let part = json!({"type": "audio", "transcript": transcript});
        let item = json!({"id": item_id, "type": "message", "object": "realtime.item",
            "status": status, "role": "assistant", "content": [
                {"type": "output_audio", "transcript": transcript}]});
        let ids = |mut v: Value| {
            v["response_id"] = response_id.into();
            v["item_id"] = item_id.into();
            v["output_index"] = 0.into();
            v["content_index"] = 0.into();
            v
        };
        self.core
            .emit(&mut st, ids(json!({"type": "response.output_audio.done"})));
        self.core.emit(
            &mut st,
            ids(json!({"type": "response.output_audio_transcript.done", "transcript": transcript})),
        );
        self.core.emit(
            &mut st,
            ids(json!({"type": "response.content_part.done", "part": part})),
        );
        self.core.emit(
            &mut st,
            json!({"type": "response.output_item.done",
            "response_id": response_id, "output_index": 0, "item": item}),
        );
        let previous = Value::Null;
        self.core.emit(
            &mut st,
            json!({"type": "conversation.item.done",
            "previous_item_id": previous, "item": item}),
        );
        if still_active {
            st.active = None;
            let done = json!({"type": "response.done", "response": st.response_object(
                response_id, "completed", Value::Null, json!([item]))});
            self.core.emit(&mut st, done);
            self.core.emit(
                &mut st,
                json!({"type": "rate_limits.updated", "rate_limits": [
                {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
                {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5}]}),
            );
        }
    }

    /// `input_audio_buffer.speech_started`, behaving like the real server: when the session's
    /// turn detection has `interrupt_response` (true by default) and a scripted response is
    /// active, it is followed at once by `response.done` status `cancelled`, reason
    /// `turn_detected`, and the response is no longer active (a `response.cancel` from the
    /// service after this is `response_cancel_not_active`).
    pub fn speech_started(&self, item_id: &str, audio_start_ms: u64) {
        self.speech_started_inner(item_id, audio_start_ms, true);
    }

    /// `input_audio_buffer.speech_started` without the server-side cancel, whatever the
    /// session says: the response stays active, as when the service configured
    /// `interrupt_response: false` or its `response.cancel` races the server's.
    pub fn speech_started_without_server_cancel(&self, item_id: &str, audio_start_ms: u64) {
        self.speech_started_inner(item_id, audio_start_ms, false);
    }

    fn speech_started_inner(&self, item_id: &str, audio_start_ms: u64, server_cancel: bool) {
        let mut st = self.state();
        st.register_item(item_id, Some("user"), false);
        self.core.emit(
            &mut st,
            json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": audio_start_ms, "item_id": item_id}),
        );
        if server_cancel && st.server_interrupts() {
            if let Some(active) = st.active.take() {
                let done = done_response(&st, &active, "cancelled", "turn_detected");
                self.core.emit(&mut st, done);
            }
        }
    }

    /// `input_audio_buffer.speech_stopped`.
    pub fn speech_stopped(&self, item_id: &str, audio_end_ms: u64) {
        let mut st = self.state();
        self.core.emit(
            &mut st,
            json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": audio_end_ms, "item_id": item_id}),
        );
    }

    /// `conversation.item.input_audio_transcription.completed` for the caller's item.
    pub fn caller_transcript(&self, item_id: &str, text: &str) {
        let mut st = self.state();
        st.register_item(item_id, Some("user"), false);
        self.core.emit(
            &mut st,
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": text,
            "usage": {"type": "duration", "seconds": 1.0}}),
        );
    }

    /// An `error` event (`invalid_request_error`, no param, no client event id).
    pub fn error_event(&self, code: &str, message: &str) {
        let mut st = self.state();
        self.core.emit(
            &mut st,
            json!({"type": "error", "error": {
            "type": "invalid_request_error", "code": code, "message": message,
            "param": null, "event_id": null}}),
        );
    }

    /// The 60-minute limit (B6): `session_expired` error, then close 1001 with that message.
    pub fn session_expired(&self) {
        let msg = "Your session hit the maximum duration of 60 minutes.";
        self.error_event("session_expired", msg);
        self.close(1001, msg);
    }

    /// Sends a close frame (then the connection ends).
    pub fn close(&self, code: u16, reason: &str) {
        let mut st = self.state();
        if st.closer.is_none() {
            st.closer = Some(Closer::Fake);
        }
        let _ = self.core.out.send(Out::Close(code, reason.to_owned()));
    }

    /// Ends the TCP connection without a close frame (the service sees an abnormal closure).
    pub fn drop_connection(&self) {
        let mut st = self.state();
        if st.closer.is_none() {
            st.closer = Some(Closer::Fake);
        }
        let _ = self.core.out.send(Out::Drop);
    }

    /// The socket has ended (whoever ended it).
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Waits up to [`DEFAULT_TIMEOUT`] for the socket to end; true when the *service* ended it
    /// (close frame or TCP end it started), false on timeout or when the fake closed it.
    pub async fn wait_closed(&self) -> bool {
        self.wait_closed_timeout(DEFAULT_TIMEOUT).await
    }

    pub async fn wait_closed_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.state();
                if st.closed {
                    return st.closer == Some(Closer::Service);
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(POLL).await;
        }
    }

    /// The code of the close frame the service sent (1005 if it had none), or `None` if the
    /// service sent no close frame (yet).
    pub fn service_close_code(&self) -> Option<u16> {
        self.state().service_close_code
    }
}

// ---------------------------------------------------------------------------------------------
// Validation (pure)

/// A rejected client event: becomes an `error` event and a violation.
#[derive(Debug)]
struct Reject {
    code: String,
    message: String,
    param: Option<String>,
}

type Checked = Result<(), Reject>;

impl Reject {
    fn new(code: &str, message: String, param: Option<&str>) -> Reject {
        Reject {
            code: code.into(),
            message,
            param: param.map(str::to_owned),
        }
    }

    fn invalid_value(param: &str, message: String) -> Reject {
        Reject::new("invalid_value", message, Some(param))
    }

    /// The B4 error event shape; `event_id` of the failed client event is echoed.
    fn to_event(&self, client_event_id: Option<&str>) -> Value {
        json!({"type": "error", "error": {"type": "invalid_request_error", "code": self.code,
            "message": self.message, "param": self.param, "event_id": client_event_id}})
    }
}

fn unknown(param: &str) -> Reject {
    Reject::new(
        "unknown_parameter",
        format!("Unknown parameter: '{param}'."),
        Some(param),
    )
}

fn missing(param: &str) -> Reject {
    Reject::new(
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
        Some(param),
    )
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid_type(param: &str, expected: &str, got: &Value) -> Reject {
    Reject::new(
        "invalid_type",
        format!(
            "Invalid type for '{param}': expected {expected}, but got {}.",
            kind_of(got)
        ),
        (!param.is_empty()).then_some(param),
    )
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Checked {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(unknown(&join(prefix, k))),
        None => Ok(()),
    }
}

fn object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, Reject> {
    v.as_object()
        .ok_or_else(|| invalid_type(param, "an object", v))
}

fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, Reject> {
    v.as_str().ok_or_else(|| invalid_type(param, "a string", v))
}

fn boolean(v: &Value, param: &str) -> Checked {
    v.as_bool()
        .map(|_| ())
        .ok_or_else(|| invalid_type(param, "a boolean", v))
}

fn non_negative_int(v: &Value, param: &str) -> Checked {
    v.as_u64()
        .map(|_| ())
        .ok_or_else(|| invalid_type(param, "a non-negative integer", v))
}

fn one_of(v: &Value, param: &str, allowed: &[&str]) -> Checked {
    let s = string(v, param)?;
    if allowed.contains(&s) {
        Ok(())
    } else {
        let list: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
        Err(Reject::invalid_value(
            param,
            format!(
                "Invalid value: '{s}'. Supported values are: {}.",
                list.join(", ")
            ),
        ))
    }
}

fn validate_session(s: &Map<String, Value>) -> Checked {
    check_keys(s, SESSION_KEYS, "session")?;
    match s.get("type") {
        None => return Err(missing("session.type")),
        Some(Value::String(t)) if t == "realtime" => {}
        // The real API also knows "transcription" sessions; callbridge must never send one.
        Some(other) => one_of(other, "session.type", &["realtime"])?,
    }
    if let Some(v) = s.get("instructions") {
        string(v, "session.instructions")?;
    }
    if let Some(v) = s.get("output_modalities") {
        validate_modalities(v, "session.output_modalities")?;
    }
    if let Some(v) = s.get("audio") {
        let audio = object(v, "session.audio")?;
        check_keys(audio, &["input", "output"], "session.audio")?;
        if let Some(v) = audio.get("input") {
            validate_audio_input(object(v, "session.audio.input")?)?;
        }
        if let Some(v) = audio.get("output") {
            validate_audio_output(
                object(v, "session.audio.output")?,
                "session.audio.output",
                true,
            )?;
        }
    }
    if let Some(v) = s.get("tools") {
        validate_tools(v, "session.tools")?;
    }
    if let Some(v) = s.get("tool_choice") {
        validate_tool_choice(v, "session.tool_choice")?;
    }
    if let Some(v) = s.get("max_output_tokens") {
        validate_max_tokens(v, "session.max_output_tokens")?;
    }
    if let Some(v) = s.get("truncation") {
        if !v.is_object() {
            one_of(v, "session.truncation", &["auto", "disabled"])?;
        }
    }
    if let Some(v) = s.get("tracing") {
        if !v.is_null() && !v.is_object() {
            one_of(v, "session.tracing", &["auto"])?;
        }
    }
    if let Some(v) = s.get("prompt") {
        if !v.is_null() {
            object(v, "session.prompt")?;
        }
    }
    if let Some(v) = s.get("include") {
        if !v.is_null() {
            let list = v
                .as_array()
                .ok_or_else(|| invalid_type("session.include", "an array", v))?;
            for (i, entry) in list.iter().enumerate() {
                one_of(
                    entry,
                    &format!("session.include[{i}]"),
                    &["item.input_audio_transcription.logprobs"],
                )?;
            }
        }
    }
    Ok(())
}

fn validate_modalities(v: &Value, param: &str) -> Checked {
    if *v == json!(["audio"]) || *v == json!(["text"]) {
        return Ok(());
    }
    if !v.is_array() {
        return Err(invalid_type(param, "an array", v));
    }
    Err(Reject::invalid_value(
        param,
        format!("Invalid value for '{param}': {v}. Supported values are ['audio'] or ['text'] (not both)."),
    ))
}

fn validate_audio_input(input: &Map<String, Value>) -> Checked {
    let p = "session.audio.input";
    check_keys(
        input,
        &[
            "format",
            "noise_reduction",
            "transcription",
            "turn_detection",
        ],
        p,
    )?;
    if let Some(v) = input.get("format") {
        validate_format(v, &join(p, "format"))?;
    }
    if let Some(v) = input.get("noise_reduction") {
        if !v.is_null() {
            let nr = object(v, "session.audio.input.noise_reduction")?;
            check_keys(nr, &["type"], "session.audio.input.noise_reduction")?;
            if let Some(t) = nr.get("type") {
                one_of(
                    t,
                    "session.audio.input.noise_reduction.type",
                    &["near_field", "far_field"],
                )?;
            }
        }
    }
    if let Some(v) = input.get("transcription") {
        if !v.is_null() {
            let p = "session.audio.input.transcription";
            let t = object(v, p)?;
            check_keys(t, &["model", "language", "prompt"], p)?;
            for key in ["model", "language", "prompt"] {
                if let Some(v) = t.get(key) {
                    string(v, &join(p, key))?;
                }
            }
        }
    }
    if let Some(v) = input.get("turn_detection") {
        validate_turn_detection(v)?;
    }
    Ok(())
}

fn validate_turn_detection(v: &Value) -> Checked {
    let p = "session.audio.input.turn_detection";
    if v.is_null() {
        return Ok(());
    }
    let td = object(v, p)?;
    let kind = string(
        td.get("type").ok_or_else(|| missing(&join(p, "type")))?,
        &join(p, "type"),
    )?;
    match kind {
        "server_vad" => {
            check_keys(
                td,
                &[
                    "type",
                    "threshold",
                    "prefix_padding_ms",
                    "silence_duration_ms",
                    "create_response",
                    "interrupt_response",
                    "idle_timeout_ms",
                ],
                p,
            )?;
            if let Some(t) = td.get("threshold") {
                let x = t
                    .as_f64()
                    .ok_or_else(|| invalid_type(&join(p, "threshold"), "a number", t))?;
                if !(0.0..=1.0).contains(&x) {
                    return Err(Reject::invalid_value(
                        &join(p, "threshold"),
                        format!("Invalid 'threshold': {x}. Expected a value between 0.0 and 1.0."),
                    ));
                }
            }
            for key in ["prefix_padding_ms", "silence_duration_ms"] {
                if let Some(v) = td.get(key) {
                    non_negative_int(v, &join(p, key))?;
                }
            }
            if let Some(v) = td.get("idle_timeout_ms") {
                if !v.is_null() {
                    non_negative_int(v, &join(p, "idle_timeout_ms"))?;
                }
            }
        }
        "semantic_vad" => {
            check_keys(
                td,
                &["type", "eagerness", "create_response", "interrupt_response"],
                p,
            )?;
            if let Some(v) = td.get("eagerness") {
                one_of(v, &join(p, "eagerness"), &["low", "medium", "high", "auto"])?;
            }
        }
        _ => one_of(
            &td["type"],
            &join(p, "type"),
            &["server_vad", "semantic_vad"],
        )?,
    }
    for key in ["create_response", "interrupt_response"] {
        if let Some(v) = td.get(key) {
            boolean(v, &join(p, key))?;
        }
    }
    Ok(())
}

/// `audio.output` of a session (`format`, `voice`, `speed`) or of a response (`format`,
/// `voice`).
fn validate_audio_output(out: &Map<String, Value>, p: &str, with_speed: bool) -> Checked {
    let keys: &[&str] = if with_speed {
        &["format", "voice", "speed"]
    } else {
        &["format", "voice"]
    };
    check_keys(out, keys, p)?;
    if let Some(v) = out.get("format") {
        validate_format(v, &join(p, "format"))?;
    }
    if let Some(v) = out.get("voice") {
        match v {
            Value::Object(o) => {
                check_keys(o, &["id"], &join(p, "voice"))?;
                string(
                    o.get("id").ok_or_else(|| missing(&join(p, "voice.id")))?,
                    &join(p, "voice.id"),
                )?;
            }
            other => one_of(other, &join(p, "voice"), VOICES)?,
        }
    }
    if let Some(v) = out.get("speed") {
        let x = v
            .as_f64()
            .ok_or_else(|| invalid_type(&join(p, "speed"), "a number", v))?;
        if !(0.25..=1.5).contains(&x) {
            return Err(Reject::invalid_value(
                &join(p, "speed"),
                format!("Invalid 'speed': {x}. Expected a value between 0.25 and 1.5."),
            ));
        }
    }
    Ok(())
}

fn validate_format(v: &Value, p: &str) -> Checked {
    let f = object(v, p)?;
    let kind = string(
        f.get("type").ok_or_else(|| missing(&join(p, "type")))?,
        &join(p, "type"),
    )?;
    match kind {
        "audio/pcm" => {
            check_keys(f, &["type", "rate"], p)?;
            if let Some(rate) = f.get("rate") {
                if rate.as_u64() != Some(24000) {
                    return Err(Reject::invalid_value(
                        &join(p, "rate"),
                        format!("Invalid value: {rate}. Supported values are: 24000."),
                    ));
                }
            }
            Ok(())
        }
        "audio/pcmu" | "audio/pcma" => check_keys(f, &["type"], p),
        _ => one_of(
            &f["type"],
            &join(p, "type"),
            &["audio/pcm", "audio/pcmu", "audio/pcma"],
        ),
    }
}

fn validate_tools(v: &Value, p: &str) -> Checked {
    let tools = v.as_array().ok_or_else(|| invalid_type(p, "an array", v))?;
    for (i, tool) in tools.iter().enumerate() {
        let tp = format!("{p}[{i}]");
        let t = object(tool, &tp)?;
        let kind = t.get("type").ok_or_else(|| missing(&join(&tp, "type")))?;
        one_of(kind, &join(&tp, "type"), &["function", "mcp"])?;
        if kind == "function" {
            check_keys(t, &["type", "name", "description", "parameters"], &tp)?;
            string(
                t.get("name").ok_or_else(|| missing(&join(&tp, "name")))?,
                &join(&tp, "name"),
            )?;
            if let Some(d) = t.get("description") {
                string(d, &join(&tp, "description"))?;
            }
            if let Some(params) = t.get("parameters") {
                object(params, &join(&tp, "parameters"))?;
            }
        }
    }
    Ok(())
}

fn validate_tool_choice(v: &Value, p: &str) -> Checked {
    match v {
        Value::Object(o) => {
            let kind = o.get("type").ok_or_else(|| missing(&join(p, "type")))?;
            one_of(kind, &join(p, "type"), &["function", "mcp"])?;
            if kind == "function" {
                check_keys(o, &["type", "name"], p)?;
                string(
                    o.get("name").ok_or_else(|| missing(&join(p, "name")))?,
                    &join(p, "name"),
                )?;
            }
            Ok(())
        }
        other => one_of(other, p, &["auto", "none", "required"]),
    }
}

fn validate_max_tokens(v: &Value, p: &str) -> Checked {
    match v {
        Value::String(s) if s == "inf" => Ok(()),
        Value::Number(n) => match n.as_u64() {
            Some(1..=4096) => Ok(()),
            _ => Err(Reject::invalid_value(
                p,
                format!("Invalid '{p}': {n}. Expected an integer between 1 and 4096, or 'inf'."),
            )),
        },
        other => Err(invalid_type(p, "an integer or 'inf'", other)),
    }
}

fn validate_response(r: &Map<String, Value>) -> Checked {
    check_keys(r, RESPONSE_KEYS, "response")?;
    if let Some(v) = r.get("instructions") {
        string(v, "response.instructions")?;
    }
    if let Some(v) = r.get("output_modalities") {
        validate_modalities(v, "response.output_modalities")?;
    }
    if let Some(v) = r.get("audio") {
        let audio = object(v, "response.audio")?;
        check_keys(audio, &["output"], "response.audio")?;
        if let Some(v) = audio.get("output") {
            validate_audio_output(
                object(v, "response.audio.output")?,
                "response.audio.output",
                false,
            )?;
        }
    }
    if let Some(v) = r.get("tools") {
        validate_tools(v, "response.tools")?;
    }
    if let Some(v) = r.get("tool_choice") {
        validate_tool_choice(v, "response.tool_choice")?;
    }
    if let Some(v) = r.get("max_output_tokens") {
        validate_max_tokens(v, "response.max_output_tokens")?;
    }
    if let Some(v) = r.get("conversation") {
        one_of(v, "response.conversation", &["auto", "none"])?;
    }
    if let Some(v) = r.get("input") {
        v.as_array()
            .ok_or_else(|| invalid_type("response.input", "an array", v))?;
    }
    if let Some(v) = r.get("metadata") {
        if !v.is_null() {
            let m = object(v, "response.metadata")?;
            if m.len() > 16 {
                return Err(Reject::invalid_value(
                    "response.metadata",
                    format!(
                        "Invalid 'response.metadata': too many pairs ({} > 16).",
                        m.len()
                    ),
                ));
            }
            for (k, v) in m {
                string(v, &format!("response.metadata.{k}"))?;
            }
        }
    }
    Ok(())
}

fn validate_item(item: &Value) -> Checked {
    let it = object(item, "item")?;
    let kind = string(
        it.get("type").ok_or_else(|| missing("item.type"))?,
        "item.type",
    )?;
    let common = ["id", "type", "object", "status"];
    let keys = |extra: &[&'static str]| -> Vec<&'static str> {
        common.iter().chain(extra.iter()).copied().collect()
    };
    match kind {
        "message" => check_keys(it, &keys(&["role", "content"]), "item")?,
        "function_call" => check_keys(it, &keys(&["call_id", "name", "arguments"]), "item")?,
        "function_call_output" => check_keys(it, &keys(&["call_id", "output"]), "item")?,
        _ => one_of(
            &it["type"],
            "item.type",
            &["message", "function_call", "function_call_output"],
        )?,
    }
    if let Some(v) = it.get("id") {
        string(v, "item.id")?;
    }
    if let Some(v) = it.get("object") {
        one_of(v, "item.object", &["realtime.item"])?;
    }
    if let Some(v) = it.get("status") {
        one_of(
            v,
            "item.status",
            &["completed", "incomplete", "in_progress"],
        )?;
    }
    match kind {
        "function_call" => {
            for key in ["call_id", "name", "arguments"] {
                string(
                    it.get(key).ok_or_else(|| missing(&join("item", key)))?,
                    &join("item", key),
                )?;
            }
            Ok(())
        }
        "function_call_output" => {
            for key in ["call_id", "output"] {
                string(
                    it.get(key).ok_or_else(|| missing(&join("item", key)))?,
                    &join("item", key),
                )?;
            }
            Ok(())
        }
        _ => validate_message(it),
    }
}

fn validate_message(it: &Map<String, Value>) -> Checked {
    let role_v = it.get("role").ok_or_else(|| missing("item.role"))?;
    one_of(role_v, "item.role", &["user", "assistant", "system"])?;
    let role = role_v.as_str().unwrap_or_default();
    let content_v = it.get("content").ok_or_else(|| missing("item.content"))?;
    let content = content_v
        .as_array()
        .ok_or_else(|| invalid_type("item.content", "an array", content_v))?;
    for (i, part) in content.iter().enumerate() {
        let p = format!("item.content[{i}]");
        let part = object(part, &p)?;
        let kind_v = part.get("type").ok_or_else(|| missing(&join(&p, "type")))?;
        let kind = string(kind_v, &join(&p, "type"))?;
        match (role, kind) {
            ("user" | "system", "input_text") | ("assistant", "output_text") => {
                check_keys(part, &["type", "text"], &p)?;
                string(
                    part.get("text").ok_or_else(|| missing(&join(&p, "text")))?,
                    &join(&p, "text"),
                )?;
            }
            ("user", "input_audio") => {
                check_keys(part, &["type", "audio", "transcript"], &p)?;
                let audio = string(
                    part.get("audio")
                        .ok_or_else(|| missing(&join(&p, "audio")))?,
                    &join(&p, "audio"),
                )?;
                if BASE64_STANDARD.decode(audio).is_err() {
                    return Err(Reject::invalid_value(
                        &join(&p, "audio"),
                        "Invalid 'audio'. Expected base64-encoded audio bytes.".into(),
                    ));
                }
            }
            ("user", "input_image") => {
                check_keys(part, &["type", "image_url", "detail"], &p)?;
            }
            ("assistant", "output_audio") => {
                return Err(Reject::invalid_value(
                    &join(&p, "type"),
                    "Assistant audio cannot be created by the client: an assistant message \
                     may only carry 'output_text' content."
                        .into(),
                ))
            }
            _ => {
                let allowed: &[&str] = match role {
                    "user" => &["input_text", "input_audio", "input_image"],
                    "system" => &["input_text"],
                    _ => &["output_text"],
                };
                one_of(kind_v, &join(&p, "type"), allowed)?;
            }
        }
    }
    Ok(())
}

/// GA `session.update` semantics: only present fields change; `audio.input` and
/// `audio.output` merge key by key; everything else (including `turn_detection`,
/// `transcription`, `format`) is replaced as a whole.
fn merge_session(effective: &mut Value, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if key == "audio" {
            for dir in ["input", "output"] {
                if let Some(fields) = value.get(dir).and_then(Value::as_object) {
                    for (k, v) in fields {
                        effective["audio"][dir][k] = v.clone();
                    }
                }
            }
        } else {
            effective[key] = value.clone();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Locks, ignoring poisoning: a panicking test must not turn every later check into a
/// `PoisonError` that hides the real failure.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
