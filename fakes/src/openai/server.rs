//! The listening side: the upgrade checks of B1, one reader and one writer task per
//! connection, and the knobs a test turns on the whole server.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt as _, StreamExt as _,
};
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_tungstenite::{
    tungstenite::{
        self,
        handshake::server::{ErrorResponse, Request, Response},
        http::{self, StatusCode},
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};

use super::{
    lock,
    scripting::FakeSession,
    session::{Closer, Out, SessionState},
    EchoConfig, FakeStats, Fault, DEFAULT_TIMEOUT, POLL,
};

/// `input_audio_buffer.append` may carry up to 15 MiB (B6); leave room for the JSON around it.
const MAX_FRAME: usize = 16 * 1024 * 1024;

type Ws = WebSocketStream<TcpStream>;

/// Socket buffers sized for 20 ms frames: tungstenite's defaults (128 KiB each way) would make
/// a thousand echo sessions cost 250 MiB on the machine that is being measured. With a write
/// buffer of 0 every frame goes to the socket as it is fed, so "written" means handed to the
/// kernel once the flush returns.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// Knobs a test turns while the fake runs.
#[derive(Default)]
struct Controls {
    /// New upgrades get HTTP 503 (to exhaust the service's restart budget).
    refuse: bool,
    /// New upgrades get this HTTP status instead (401, 403, 429, 500…), with the API's error
    /// body for it.
    refuse_status: Option<u16>,
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

/// What every connection of one server shares.
struct Shared {
    controls: Mutex<Controls>,
    /// Delay before `session.updated` is sent (see [`FakeOpenAi::set_session_updated_delay`]).
    updated_delay_ms: Arc<AtomicU64>,
    /// Violations found before a session exists (handshake, wrong path).
    handshake_violations: Mutex<Vec<String>>,
    handshakes: Mutex<Vec<Handshake>>,
    /// Scripted mode: every session, in accept order (index = position).
    sessions: Mutex<Vec<Arc<SessionCore>>>,
    /// How many sessions `next_session` has handed out.
    handed_out: AtomicUsize,
    /// Echo mode's settings; `None` when scripted.
    echo: Option<Arc<EchoConfig>>,
    /// Echo mode numbers sessions here (it keeps none).
    next_index: AtomicUsize,
    stats: Arc<FakeStats>,
}

impl Shared {
    fn new(echo: Option<EchoConfig>, stats: Arc<FakeStats>) -> Shared {
        Shared {
            controls: Mutex::default(),
            updated_delay_ms: Arc::default(),
            handshake_violations: Mutex::default(),
            handshakes: Mutex::default(),
            sessions: Mutex::default(),
            handed_out: AtomicUsize::new(0),
            echo: echo.map(Arc::new),
            next_index: AtomicUsize::new(0),
            stats,
        }
    }

    /// Scripted mode records handshakes and sessions; echo mode only counts.
    fn recording(&self) -> bool {
        self.echo.is_none()
    }

    fn violate(&self, msg: String) {
        self.stats.violations.fetch_add(1, Ordering::Relaxed);
        if self.recording() {
            lock(&self.handshake_violations).push(msg);
        }
    }

    fn record(&self, handshake: &Handshake) {
        if self.recording() {
            lock(&self.handshakes).push(handshake.clone());
        }
    }
}

/// The fake OpenAI Realtime server. Dropping it stops accepting and drops every scripted
/// session's connection.
pub struct FakeOpenAi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl FakeOpenAi {
    /// Starts a scripted fake on `127.0.0.1:0`.
    pub async fn start() -> FakeOpenAi {
        FakeOpenAi::start_with(None).await
    }

    /// Starts an echo-mode fake on `127.0.0.1:0` (nothing is recorded: use [`Self::stats`]).
    pub async fn start_echo(config: EchoConfig) -> FakeOpenAi {
        FakeOpenAi::start_with(Some(config)).await
    }

    async fn start_with(echo: Option<EchoConfig>) -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("FakeOpenAi: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("FakeOpenAi: a bound listener has an address");
        let shared = Arc::new(Shared::new(echo, Arc::default()));
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeOpenAi {
            shared,
            addr,
            accept,
        }
    }

    /// `ws://127.0.0.1:PORT/v1/realtime` (the service appends `?model=…`).
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters over every session.
    pub fn stats(&self) -> Arc<FakeStats> {
        self.shared.stats.clone()
    }

    /// While set, new upgrades are answered with HTTP 503 (existing sessions are untouched).
    pub fn set_refuse_connections(&self, refuse: bool) {
        lock(&self.shared.controls).refuse = refuse;
    }

    /// While set, new upgrades are answered with this HTTP status (401, 403, 429, 500…) and
    /// the error body the API sends with it; `None` accepts them again.
    pub fn set_refuse_status(&self, status: Option<u16>) {
        lock(&self.shared.controls).refuse_status = status;
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
        assert!(
            self.shared.recording(),
            "FakeOpenAi: an echo-mode fake keeps no sessions to hand out"
        );
        let index = self.shared.handed_out.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(core) = lock(&self.shared.sessions).get(index).cloned() {
                self.shared.handed_out.store(index + 1, Ordering::SeqCst);
                return FakeSession::new(core);
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeOpenAi: timed out after {timeout:?} waiting for session #{index} \
                     (upgrade requests so far: {:?})",
                    self.handshakes()
                );
            }
            tokio::time::sleep(POLL).await;
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
        self.accept.abort();
        for core in lock(&self.shared.sessions).iter() {
            lock(&core.state).send_raw(Out::Drop);
        }
    }
}

/// Echo mode for `callbridge-sim fake-openai`: accepts connections on `listener` until the
/// task is dropped, counting into `stats`.
pub async fn serve(listener: TcpListener, config: EchoConfig, stats: Arc<FakeStats>) {
    accept_loop(listener, Arc::new(Shared::new(Some(config), stats))).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("fake-openai: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, shared.clone()));
    }
}

// ---------------------------------------------------------------------------------------------
// The upgrade (B1)

/// An OpenAI HTTP error response.
fn http_error(status: StatusCode, message: &str, code: Option<&str>) -> ErrorResponse {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
        "param": null, "code": code}});
    let mut response = http::Response::new(Some(body.to_string()));
    *response.status_mut() = status;
    response
}

/// The checks of B1 on the upgrade request; `Ok` with the handshake to go on with, and the
/// fault echo mode planned for the session (see [`EchoConfig::fault_every`]). The handshake
/// faults are answered here.
// The error type is tungstenite's handshake callback's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn check_upgrade(
    req: &Request,
    shared: &Shared,
) -> Result<(Handshake, Option<Fault>), ErrorResponse> {
    let path = req.uri().path().to_owned();
    if path != "/v1/realtime" {
        shared.violate(format!(
            "request to an unexpected path: {} {} (expected GET /v1/realtime?model=…)",
            req.method(),
            req.uri()
        ));
        return Err(http_error(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({} {path})", req.method()),
            None,
        ));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned())
    };
    let model = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("model=").map(str::to_owned));
    let handshake = Handshake {
        path,
        model,
        api_key: header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(|k| k.trim().to_owned()))
            .filter(|k| !k.is_empty()),
        beta_header: header("openai-beta"),
        status: 101,
    };
    let refuse = |mut handshake: Handshake, status: StatusCode, message: &str, code| {
        handshake.status = status.as_u16();
        shared.record(&handshake);
        Err(http_error(status, message, code))
    };
    let refuse_status = lock(&shared.controls).refuse_status;
    if let Some(status) = refuse_status.and_then(|s| StatusCode::from_u16(s).ok()) {
        let (message, code) = match status.as_u16() {
            401 => ("Incorrect API key provided.", Some("invalid_api_key")),
            403 => ("You are not allowed to use this model.", None),
            429 => ("Rate limit reached.", Some("rate_limit_exceeded")),
            _ => ("The server had an error (fake).", None),
        };
        return refuse(handshake, status, message, code);
    }
    if lock(&shared.controls).refuse {
        return refuse(
            handshake,
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is overloaded (fake: refusing connections).",
            None,
        );
    }
    if handshake.api_key.is_none() {
        shared.violate(format!(
            "handshake without `Authorization: Bearer <key>` (got {:?})",
            header("authorization")
        ));
        return refuse(
            handshake,
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            None,
        );
    }
    if handshake.model.as_deref().is_none_or(str::is_empty) {
        // Decision: the GA API needs the model in the URL (it cannot be set by
        // session.update); the fake refuses with 400 rather than guessing a default.
        shared.violate(format!(
            "handshake without a `model` query parameter: {}",
            req.uri()
        ));
        return refuse(
            handshake,
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'model'.",
            Some("missing_required_parameter"),
        );
    }
    let fault = shared.echo.as_ref().and_then(|echo| {
        let attempt = shared.stats.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        echo.fault_for(attempt)
    });
    match fault {
        Some(Fault::Refuse503) => {
            shared.stats.faults.count(Fault::Refuse503);
            return refuse(
                handshake,
                StatusCode::SERVICE_UNAVAILABLE,
                "The server is overloaded (fake: injected fault).",
                None,
            );
        }
        Some(Fault::Refuse429) => {
            shared.stats.faults.count(Fault::Refuse429);
            return refuse(
                handshake,
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached (fake: injected fault).",
                Some("rate_limit_exceeded"),
            );
        }
        _ => {}
    }
    shared.record(&handshake);
    Ok((handshake, fault))
}

/// Sends `error` then a close frame, and waits (briefly) for the service's close.
async fn refuse_session(mut ws: Ws, error: Option<Value>, code: u16, reason: &str) {
    if let Some(error) = error {
        let _ = ws.send(Message::text(error.to_string())).await;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    let _ = ws.close(Some(frame)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn error_event(event_id: &str, code: &str, message: &str) -> Value {
    json!({"type": "error", "event_id": event_id, "error": {
        "type": "invalid_request_error", "code": code, "message": message,
        "param": null, "event_id": null}})
}

#[allow(clippy::result_large_err)] // the handshake callback, as above
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    // Audio every 20 ms: Nagle would add up to 40 ms to every echo.
    let _ = stream.set_nodelay(true);
    let mut checked: Option<Result<(Handshake, Option<Fault>), ()>> = None;
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| match check_upgrade(req, &shared) {
            Ok(handshake) => {
                checked = Some(Ok(handshake));
                Ok(resp)
            }
            Err(refusal) => {
                checked = Some(Err(()));
                Err(refusal)
            }
        },
        Some(ws_config()),
    )
    .await;
    let (ws, handshake, fault) = match (accepted, checked) {
        (Ok(ws), Some(Ok((handshake, fault)))) => (ws, handshake, fault),
        // The request never reached the checks: a malformed upgrade is the service's fault;
        // a connection that ends before its request (an aborted connect) is not.
        (Err(e), None) => {
            use tungstenite::{error::ProtocolError, Error};
            if !matches!(
                e,
                Error::Io(_)
                    | Error::ConnectionClosed
                    | Error::AlreadyClosed
                    | Error::Protocol(ProtocolError::HandshakeIncomplete)
            ) {
                shared.violate(format!("not a websocket upgrade request: {e}"));
            }
            return;
        }
        // Refused by the checks (already recorded), or the socket failed after them.
        _ => return,
    };

    if let Some(beta) = &handshake.beta_header {
        // What the real service has done since May 2026 (protocols.md §0.1).
        shared.violate(format!(
            "handshake carries `OpenAI-Beta: {beta}`: the beta API is gone; the real service \
             answers beta_api_shape_disabled and closes 4000"
        ));
        shared.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
        let error = error_event(
            "event_beta0001",
            "beta_api_shape_disabled",
            "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
        );
        refuse_session(ws, Some(error), 4000, "beta_api_shape_disabled").await;
        return;
    }
    if lock(&shared.controls).close_after_accept {
        refuse_session(ws, None, 1011, "fake: closing right after accept").await;
        return;
    }
    if let Some(want) = shared.echo.as_ref().and_then(|e| e.api_key.as_ref()) {
        if handshake.api_key.as_ref() != Some(want) {
            shared.stats.errors_sent.fetch_add(1, Ordering::Relaxed);
            let error = error_event(
                "event_key0001",
                "invalid_api_key",
                "Incorrect API key provided.",
            );
            refuse_session(
                ws,
                Some(error),
                3000,
                "invalid_request_error.invalid_api_key",
            )
            .await;
            return;
        }
    }

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (read_ctl, read_rx) = watch::channel(ReadControl::default());
    let core = {
        let mut sessions = lock(&shared.sessions);
        let index = if shared.recording() {
            sessions.len()
        } else {
            shared.next_index.fetch_add(1, Ordering::Relaxed)
        };
        let core = Arc::new(SessionCore {
            index,
            state: Mutex::new(SessionState::new(
                index,
                handshake.model.clone().unwrap_or_default(),
                handshake.api_key.clone().unwrap_or_default(),
                out_tx,
                shared.echo.clone(),
                shared.stats.clone(),
                shared.updated_delay_ms.clone(),
            )),
            read_ctl,
            bytes_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        });
        if shared.recording() {
            sessions.push(core.clone());
        }
        core
    };
    shared.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
    shared.stats.sessions_open.fetch_add(1, Ordering::Relaxed);
    {
        let mut st = lock(&core.state);
        st.created();
        if let Some(fault) = fault {
            st.arm_fault(fault);
        }
    }
    if shared.recording() {
        let (sink, stream) = ws.split();
        tokio::spawn(write_loop(sink, out_rx, core.clone()));
        read_loop(stream, read_rx, core).await;
    } else {
        echo_loop(ws, out_rx, core).await;
    }
    shared.stats.sessions_open.fetch_sub(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// One connection

/// What the reader obeys, set by the test (`pause_reading`) or by the writer (`killed`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadControl {
    /// Stop reading the socket (the service's writes then back up).
    pub(crate) paused: bool,
    /// The connection is being dropped without a close frame: stop and drop the stream.
    pub(crate) killed: bool,
}

/// One connection's state, shared by its reader, its writer and the test's [`FakeSession`].
pub(crate) struct SessionCore {
    pub(crate) index: usize,
    pub(crate) state: Mutex<SessionState>,
    pub(crate) read_ctl: watch::Sender<ReadControl>,
    /// Payload bytes of the frames written to the socket (flushed) and read from it.
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
}

impl SessionCore {
    fn on_text(self: &Arc<Self>, text: &str) {
        let handled = lock(&self.state).on_text(text);
        if let Some((delay, reply)) = handled.delayed_update {
            let core = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                lock(&core.state).deliver_delayed_update(reply);
            });
        }
    }

    fn on_close_frame(&self, code: Option<u16>) {
        let mut st = lock(&self.state);
        // 1005 = "no status code present" (RFC 6455 §7.4.1): only ever reported.
        st.service_close_code = Some(code.unwrap_or(1005));
        if st.closer.is_none() {
            st.closer = Some(Closer::Service);
        }
        // tungstenite answers the close itself.
    }

    fn on_error(&self, e: &tungstenite::Error) {
        use tungstenite::error::ProtocolError;
        match e {
            // The connection just ended without a close frame: abrupt, but not a protocol
            // violation (see `FakeSession::service_close_code`).
            tungstenite::Error::Io(_)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {}
            other => lock(&self.state).violate(format!(
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
        // Ends the writer (it holds no other way to learn that the socket is gone).
        st.send_raw(Out::Drop);
    }

    fn kill(&self) {
        self.read_ctl.send_modify(|c| c.killed = true);
    }
}

/// Whether the connection goes on after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

/// Handles one frame (or the end) of the service's socket.
fn on_frame(core: &Arc<SessionCore>, frame: Option<Result<Message, tungstenite::Error>>) -> Flow {
    match frame {
        Some(Ok(Message::Text(text))) => {
            core.bytes_read
                .fetch_add(text.len() as u64, Ordering::Relaxed);
            core.on_text(text.as_str());
        }
        Some(Ok(Message::Binary(bytes))) => {
            core.bytes_read
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            lock(&core.state).on_binary(bytes.len());
        }
        // tungstenite answers pings itself.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
        Some(Ok(Message::Close(frame))) => {
            core.on_close_frame(frame.map(|f| u16::from(f.code)));
            // Go on reading: that sends tungstenite's reply, then the stream ends.
        }
        Some(Err(e)) => {
            core.on_error(&e);
            return Flow::End;
        }
        None => return Flow::End,
    }
    Flow::Continue
}

/// Echo mode's connection: one task that reads a frame, then writes what it produced, as the
/// simulator's fake always did. The events go through the session's inline queue, not a
/// channel: a channel would wake this very task once per frame for nothing, and a hop to a
/// writer task would wake another worker thread, each costing the benchmark floor a syscall or
/// two per frame. Like the real service under a client that does not read, it stops reading
/// while its writes are blocked. Events emitted outside a frame (a delayed `session.updated`)
/// wake it through the channel.
async fn echo_loop(mut ws: Ws, mut rx: mpsc::UnboundedReceiver<Out>, core: Arc<SessionCore>) {
    let mut batch = Vec::new();
    let mut closing = false;
    'conn: loop {
        lock(&core.state).take_inline(&mut batch);
        if !batch.is_empty() && !closing {
            let mut fed = 0u64;
            for out in batch.drain(..) {
                let text = match out {
                    // No flood in echo mode (it has no `FakeSession` to start one).
                    Out::Text(text) | Out::Flood { text, .. } => text,
                    Out::Wake => continue,
                    Out::Close(code, reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        };
                        closing = true;
                        if ws.send(Message::Close(Some(frame))).await.is_err() {
                            break 'conn;
                        }
                        break;
                    }
                    Out::Drop => break 'conn,
                };
                fed += text.len() as u64;
                if ws.feed(Message::text(text)).await.is_err() {
                    break 'conn;
                }
            }
            if !closing && ws.flush().await.is_err() {
                break;
            }
            core.bytes_written.fetch_add(fed, Ordering::Relaxed);
        }
        batch.clear();
        tokio::select! {
            biased;
            wake = rx.recv() => if matches!(wake, None | Some(Out::Drop)) {
                break;
            },
            frame = ws.next() => if on_frame(&core, frame) == Flow::End {
                break;
            },
        }
    }
    core.on_socket_end();
}

/// Reads the service's frames until the socket ends or the connection is dropped; pauses
/// while told to. Never panics.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    mut ctl: watch::Receiver<ReadControl>,
    core: Arc<SessionCore>,
) {
    loop {
        let control = *ctl.borrow_and_update();
        if control.killed {
            break;
        }
        if control.paused {
            if ctl.changed().await.is_err() {
                break;
            }
            continue;
        }
        // A change of control (pause, kill) interrupts the wait for a frame; `next` loses
        // nothing when cancelled.
        // `biased`: a pause that comes with a frame ready wins, so nothing is read after it.
        let frame = tokio::select! {
            biased;
            changed = ctl.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            frame = stream.next() => frame,
        };
        if on_frame(&core, frame) == Flow::End {
            break;
        }
    }
    core.on_socket_end();
}

/// Writes what the session emits, in order: everything queued is fed, then flushed once.
/// Counts what reached the socket, and frees flood windows as their deltas are written.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    core: Arc<SessionCore>,
) {
    let mut floods = Vec::new();
    // Whether the reader must be stopped when this ends: not after a close frame of ours,
    // whose reply the reader waits for (the connection then ends on its own).
    let mut kill = true;
    'outer: while let Some(first) = rx.recv().await {
        let mut fed = 0u64;
        let mut next = Some(first);
        let mut close = None;
        while let Some(out) = next.take() {
            let text = match out {
                Out::Text(text) => text,
                Out::Flood {
                    text,
                    audio_bytes,
                    flood,
                } => {
                    floods.push((flood, audio_bytes));
                    text
                }
                Out::Close(code, reason) => {
                    close = Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    });
                    break;
                }
                Out::Drop => break 'outer,
                Out::Wake => {
                    next = rx.try_recv().ok();
                    continue;
                }
            };
            fed += text.len() as u64;
            if sink.feed(Message::text(text)).await.is_err() {
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            break;
        }
        core.bytes_written.fetch_add(fed, Ordering::Relaxed);
        for (flood, bytes) in floods.drain(..) {
            flood.written(bytes);
        }
        if let Some(frame) = close {
            kill = sink.send(Message::Close(Some(frame))).await.is_err();
            break;
        }
    }
    if kill {
        core.kill();
    }
    // Floods waiting for a window must learn that none will come.
    rx.close();
    for (flood, _) in floods.drain(..) {
        flood.abandon();
    }
    while let Ok(out) = rx.try_recv() {
        if let Out::Flood { flood, .. } = out {
            flood.abandon();
        }
    }
}
