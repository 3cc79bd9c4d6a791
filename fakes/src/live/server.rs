//! The listening side: the upgrade checks of §1, one reader and one writer task per
//! connection (one task in echo mode), the timers sessions ask for, and the knobs a test
//! turns on the whole server.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt as _, StreamExt as _,
};
use serde_json::json;
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
    pace::{Paced, PACE_SLACK},
    scripting::FakeLiveSession,
    session::{Closer, Handled, Out, SessionState, Timer},
    FakeStats, LiveEchoConfig, LiveError, DEFAULT_SESSION_SECS, DEFAULT_TIMEOUT, PATH, POLL,
};

/// One append may carry up to 15 MiB (as Realtime; unconfirmed for Live, §4.1); leave room
/// for the JSON around it.
const MAX_FRAME: usize = 16 * 1024 * 1024;

type Ws = WebSocketStream<TcpStream>;

/// Socket buffers sized for 20 ms frames, as the Realtime fake's (see there): with a write
/// buffer of 0 every frame goes to the socket as it is fed.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// Knobs a test turns for new upgrades.
#[derive(Default)]
struct Controls {
    /// New upgrades get HTTP 503.
    refuse: bool,
    /// New upgrades get this HTTP status and error body instead.
    refuse_with: Option<(u16, LiveError)>,
    /// New upgrades are accepted and closed at once with 1011.
    close_after_accept: bool,
    /// When set, only this bearer key is accepted (else 401 `invalid_api_key`).
    api_key: Option<String>,
}

/// Knobs every session of a server reads when it needs them (so a change applies to sessions
/// already open).
pub(crate) struct Knobs {
    /// Delay of `session.started` after a valid `session.start` (0: at once).
    pub(crate) started_delay_ms: AtomicU64,
    /// Delay of `session.closed` after `session.close` (0: at once).
    pub(crate) closed_delay_ms: AtomicU64,
    /// `session.close` is never answered.
    pub(crate) ignore_close: AtomicBool,
    /// Session duration: `expires_at`, then `session.closed` reason `expired`.
    pub(crate) session_secs: AtomicU64,
    /// Every `session.start` is answered with this error (the session does not start).
    pub(crate) start_error: Mutex<Option<LiveError>>,
}

impl Knobs {
    pub(crate) fn new(session_secs: u64) -> Knobs {
        Knobs {
            started_delay_ms: AtomicU64::new(0),
            closed_delay_ms: AtomicU64::new(0),
            ignore_close: AtomicBool::new(false),
            session_secs: AtomicU64::new(session_secs),
            start_error: Mutex::new(None),
        }
    }
}

/// One upgrade request to the Live path as the fake saw it.
#[derive(Clone, Debug)]
pub struct Handshake {
    /// Request path (`/v1/live/sessions`).
    pub path: String,
    /// The query string, if any (there must be none, §1).
    pub query: Option<String>,
    /// The key from `Authorization: Bearer <key>`, if well formed.
    pub api_key: Option<String>,
    /// The `OpenAI-Beta` header, if sent (it must not be).
    pub beta_header: Option<String>,
    pub user_agent: Option<String>,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// 101 when upgraded, else the HTTP status the fake answered.
    pub status: u16,
}

/// What every connection of one server shares.
struct Shared {
    controls: Mutex<Controls>,
    knobs: Arc<Knobs>,
    /// Violations found before a session exists (handshake, wrong path).
    handshake_violations: Mutex<Vec<String>>,
    handshakes: Mutex<Vec<Handshake>>,
    /// Scripted mode: every session, in accept order (index = position).
    sessions: Mutex<Vec<Arc<SessionCore>>>,
    /// How many sessions `next_session` has handed out.
    handed_out: AtomicUsize,
    /// Echo mode's settings; `None` when scripted.
    echo: Option<Arc<LiveEchoConfig>>,
    /// Echo mode numbers sessions here (it keeps none).
    next_index: AtomicUsize,
    stats: Arc<FakeStats>,
}

impl Shared {
    fn new(echo: Option<LiveEchoConfig>, stats: Arc<FakeStats>) -> Shared {
        let session_secs = echo
            .as_ref()
            .map_or(DEFAULT_SESSION_SECS, |e| e.session_secs);
        let controls = Controls {
            api_key: echo.as_ref().and_then(|e| e.api_key.clone()),
            ..Controls::default()
        };
        Shared {
            controls: Mutex::new(controls),
            knobs: Arc::new(Knobs::new(session_secs)),
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

/// The fake GPT-Live server. Dropping it stops accepting and drops every scripted session's
/// connection.
pub struct FakeLive {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl FakeLive {
    /// Starts a scripted fake on `127.0.0.1:0`.
    pub async fn start() -> FakeLive {
        FakeLive::start_with(None).await
    }

    /// Starts an echo-mode fake on `127.0.0.1:0` (nothing is recorded: use [`Self::stats`]).
    pub async fn start_echo(config: LiveEchoConfig) -> FakeLive {
        FakeLive::start_with(Some(config)).await
    }

    async fn start_with(echo: Option<LiveEchoConfig>) -> FakeLive {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("FakeLive: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("FakeLive: a bound listener has an address");
        let shared = Arc::new(Shared::new(echo, Arc::default()));
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeLive {
            shared,
            addr,
            accept,
        }
    }

    /// `ws://127.0.0.1:PORT/v1/live/sessions`, the service's `openai.live_url`.
    pub fn url(&self) -> String {
        format!("ws://{}{PATH}", self.addr)
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
    /// an OpenAI error body for it (`{"error":{"message","type","param","code"}}`, §1); `None`
    /// accepts them again.
    pub fn set_refuse_status(&self, status: Option<u16>) {
        lock(&self.shared.controls).refuse_with = status.map(|s| (s, default_refusal(s)));
    }

    /// [`Self::set_refuse_status`] with a chosen error body, e.g.
    /// `(429, LiveError::insufficient_quota())`.
    pub fn set_refuse_error(&self, refusal: Option<(u16, LiveError)>) {
        lock(&self.shared.controls).refuse_with = refusal;
    }

    /// While set, new upgrades are accepted and closed at once with code 1011 (no session).
    /// Such connections are not handed out by `next_session`.
    pub fn set_close_after_accept(&self, close: bool) {
        lock(&self.shared.controls).close_after_accept = close;
    }

    /// When set, only this bearer key is accepted; any other gets HTTP 401
    /// `invalid_api_key` (a refusal the test provoked, not a violation).
    pub fn set_api_key(&self, key: Option<&str>) {
        lock(&self.shared.controls).api_key = key.map(str::to_owned);
    }

    /// Holds every `session.started` for `ms` after the valid `session.start` (0 = at once,
    /// the default). While one is held, what the service sends besides `session.close` is a
    /// violation: this is how a test proves the service *waits* for `session.started` (§3).
    pub fn set_session_started_delay(&self, ms: u64) {
        self.shared
            .knobs
            .started_delay_ms
            .store(ms, Ordering::SeqCst);
    }

    /// Holds every `session.closed` for `ms` after `session.close` (0 = at once, the default):
    /// the server draining (§12).
    pub fn set_session_closed_delay(&self, ms: u64) {
        self.shared
            .knobs
            .closed_delay_ms
            .store(ms, Ordering::SeqCst);
    }

    /// While set, `session.close` is never answered (the service's bounded wait must end it).
    pub fn set_ignore_session_close(&self, ignore: bool) {
        self.shared
            .knobs
            .ignore_close
            .store(ignore, Ordering::SeqCst);
    }

    /// Sessions started from now on expire after `secs` (`expires_at`, then `session.closed`
    /// reason `expired`; the socket stays open for the service to close). Default
    /// [`DEFAULT_SESSION_SECS`].
    pub fn set_session_duration_secs(&self, secs: u64) {
        self.shared.knobs.session_secs.store(secs, Ordering::SeqCst);
    }

    /// While set, every `session.start` is answered with this `error` instead of
    /// `session.started` (e.g. [`LiveError::insufficient_quota`]): the session will not start
    /// (§3). Not a violation.
    pub fn set_start_error(&self, error: Option<LiveError>) {
        *lock(&self.shared.knobs.start_error) = error;
    }

    /// Upgrade requests that reached the Live path, refused ones included.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.handshakes).len()
    }

    /// Upgrade requests answered with 101 (close-after-accept ones included).
    pub fn accepted_count(&self) -> usize {
        lock(&self.shared.handshakes)
            .iter()
            .filter(|h| h.status == 101)
            .count()
    }

    /// Every upgrade request to the Live path so far, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        lock(&self.shared.handshakes).clone()
    }

    /// Sessions (accepted connections) so far.
    pub fn session_count(&self) -> usize {
        lock(&self.shared.sessions).len()
    }

    /// The next accepted session not yet handed out, waiting up to [`DEFAULT_TIMEOUT`].
    pub async fn next_session(&self) -> FakeLiveSession {
        self.next_session_timeout(DEFAULT_TIMEOUT).await
    }

    /// [`Self::next_session`] with an explicit timeout; panics when it elapses.
    pub async fn next_session_timeout(&self, timeout: Duration) -> FakeLiveSession {
        assert!(
            self.shared.recording(),
            "FakeLive: an echo-mode fake keeps no sessions to hand out"
        );
        let index = self.shared.handed_out.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(core) = lock(&self.shared.sessions).get(index).cloned() {
                self.shared.handed_out.store(index + 1, Ordering::SeqCst);
                return FakeLiveSession::new(core);
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeLive: timed out after {timeout:?} waiting for session #{index} \
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
            "FakeLive recorded {} violation(s):\n  {}",
            v.len(),
            v.join("\n  ")
        );
    }
}

impl Drop for FakeLive {
    fn drop(&mut self) {
        self.accept.abort();
        for core in lock(&self.shared.sessions).iter() {
            let mut st = lock(&core.state);
            if st.closer.is_none() {
                st.closer = Some(Closer::Fake);
            }
            st.send_raw(Out::Drop);
        }
    }
}

/// Echo mode for `callbridge-sim`: accepts connections on `listener` until the task is
/// dropped, counting into `stats`.
pub async fn serve_live(listener: TcpListener, config: LiveEchoConfig, stats: Arc<FakeStats>) {
    accept_loop(listener, Arc::new(Shared::new(Some(config), stats))).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("fake-live: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, shared.clone()));
    }
}

// ---------------------------------------------------------------------------------------------
// The upgrade (§1)

/// An OpenAI HTTP error response (§1: `{"error":{"message":…}}`).
fn http_error(status: StatusCode, error: &LiveError) -> ErrorResponse {
    let body = json!({"error": {"message": error.message, "type": error.kind,
        "param": error.param, "code": error.code}});
    let mut response = http::Response::new(Some(body.to_string()));
    *response.status_mut() = status;
    response
}

/// The error body the fake sends with a refused status (which cause maps to which status is
/// unconfirmed for Live, §1; these are OpenAI's usual ones).
fn default_refusal(status: u16) -> LiveError {
    match status {
        400 => LiveError::invalid_request("invalid_request", "Bad request (fake refusal)."),
        401 => LiveError::invalid_api_key(),
        403 => LiveError::invalid_request(
            "model_not_allowed",
            "You are not allowed to use this model (fake refusal).",
        ),
        429 => LiveError::rate_limit_exceeded(),
        503 => LiveError::new(
            "server_error",
            "overloaded",
            "The server is overloaded or not ready yet (fake refusal).",
        ),
        _ => LiveError::server_error(),
    }
}

/// The checks of §1 on the upgrade request; `Ok` with the handshake to go on with.
// The error type is tungstenite's handshake callback's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, shared: &Shared) -> Result<Handshake, ErrorResponse> {
    let path = req.uri().path().to_owned();
    if path != PATH {
        shared.violate(format!(
            "request to an unexpected path: {} {} (expected GET {PATH})",
            req.method(),
            req.uri()
        ));
        let error = LiveError::invalid_request(
            "not_found",
            &format!("Invalid URL ({} {path})", req.method()),
        );
        return Err(http_error(StatusCode::NOT_FOUND, &error));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ascii>").to_owned())
    };
    let handshake = Handshake {
        path,
        query: req.uri().query().map(str::to_owned),
        api_key: header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(|k| k.trim().to_owned()))
            .filter(|k| !k.is_empty()),
        beta_header: header("openai-beta"),
        user_agent: header("user-agent"),
        organization: header("openai-organization"),
        project: header("openai-project"),
        status: 101,
    };
    let refuse = |mut handshake: Handshake, status: StatusCode, error: &LiveError| {
        handshake.status = status.as_u16();
        shared.record(&handshake);
        Err(http_error(status, error))
    };
    let controls = lock(&shared.controls);
    if let Some((status, error)) = &controls.refuse_with {
        if let Ok(status) = StatusCode::from_u16(*status) {
            return refuse(handshake, status, error);
        }
    }
    if controls.refuse {
        return refuse(
            handshake,
            StatusCode::SERVICE_UNAVAILABLE,
            &default_refusal(503),
        );
    }
    if handshake.api_key.is_none() {
        shared.violate(format!(
            "handshake without `Authorization: Bearer <key>` (got {:?})",
            header("authorization")
        ));
        let error = LiveError::invalid_request(
            "missing_api_key",
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        );
        return refuse(handshake, StatusCode::UNAUTHORIZED, &error);
    }
    if let Some(query) = &handshake.query {
        // Decision: the SDK builds this URL with no query at all and the model goes in
        // session.start (§1); the fake refuses a query (e.g. Realtime's `?model=`) outright.
        shared.violate(format!(
            "handshake with a query `?{query}`: the Live URL takes none (the model goes in \
             session.start, §1)"
        ));
        let param = query.split(['=', '&']).next().unwrap_or_default();
        let error = LiveError::invalid_request(
            "unknown_parameter",
            &format!("Unknown parameter: '{param}'."),
        )
        .with_param(param);
        return refuse(handshake, StatusCode::BAD_REQUEST, &error);
    }
    if let Some(beta) = &handshake.beta_header {
        // Decision: violation only; what the service does with the header is unconfirmed.
        shared.violate(format!(
            "handshake carries `OpenAI-Beta: {beta}`: GPT-Live takes no OpenAI-Beta header (§1)"
        ));
    }
    if let Some(want) = &controls.api_key {
        if handshake.api_key.as_ref() != Some(want) {
            return refuse(
                handshake,
                StatusCode::UNAUTHORIZED,
                &LiveError::invalid_api_key(),
            );
        }
    }
    shared.record(&handshake);
    Ok(handshake)
}

#[allow(clippy::result_large_err)] // the handshake callback, as above
async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    // Audio every 20 ms: Nagle would add up to 40 ms to every echo.
    let _ = stream.set_nodelay(true);
    let mut checked: Option<Result<Handshake, ()>> = None;
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
    let (mut ws, handshake) = match (accepted, checked) {
        (Ok(ws), Some(Ok(handshake))) => (ws, handshake),
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

    if lock(&shared.controls).close_after_accept {
        let frame = CloseFrame {
            code: CloseCode::from(1011),
            reason: "fake: closing right after accept".into(),
        };
        let _ = ws.close(Some(frame)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        return;
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
                handshake.api_key.clone().unwrap_or_default(),
                out_tx,
                shared.echo.clone(),
                shared.stats.clone(),
                shared.knobs.clone(),
            )),
            handshake,
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

/// One connection's state, shared by its reader, its writer, its timers and the test's
/// [`FakeLiveSession`].
pub(crate) struct SessionCore {
    pub(crate) index: usize,
    pub(crate) state: Mutex<SessionState>,
    pub(crate) handshake: Handshake,
    pub(crate) read_ctl: watch::Sender<ReadControl>,
    /// Payload bytes of the frames written to the socket (flushed) and read from it.
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
}

impl SessionCore {
    fn on_text(self: &Arc<Self>, text: &str) {
        let handled = lock(&self.state).on_text(text);
        self.schedule(handled);
    }

    /// Starts the timers a session asked for. They hold the connection weakly: a session
    /// that is gone (echo mode forgets its sessions) needs no answer.
    pub(crate) fn schedule(self: &Arc<Self>, handled: Handled) {
        for (delay, timer) in handled.timers {
            let core: Weak<SessionCore> = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(core) = core.upgrade() {
                    core.fire(timer);
                }
            });
        }
    }

    pub(crate) fn fire(self: &Arc<Self>, timer: Timer) {
        let handled = {
            let mut st = lock(&self.state);
            let handled = st.fire(timer);
            st.wake();
            handled
        };
        self.schedule(handled);
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
            // violation (see `FakeLiveSession::service_close_code`).
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
        st.socket_ended();
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

/// Echo mode's connection: one task that reads a frame, then writes what is due (see the
/// Realtime fake's `echo_loop` for why no channel and no writer task). What the session emits
/// goes through a [`Paced`] queue: echoed audio at real-time pace (when the config asks for
/// it), every other event in its place behind it. Events emitted outside a frame (a timer's)
/// wake it through the channel; queued events that come due wake it by their time.
async fn echo_loop(mut ws: Ws, mut rx: mpsc::UnboundedReceiver<Out>, core: Arc<SessionCore>) {
    let pace = lock(&core.state).paces_output();
    let mut batch = Vec::new();
    let mut queue: Paced<Out> = Paced::new(PACE_SLACK);
    let mut closing = false;
    'conn: loop {
        lock(&core.state).take_inline(&mut batch);
        let now = tokio::time::Instant::now();
        for out in batch.drain(..) {
            match out {
                Out::Wake => {}
                Out::Drop => break 'conn,
                Out::Audio(text, duration) if pace => {
                    queue.push_audio(now, duration, Out::Text(text));
                }
                other => {
                    queue.push(now, other);
                }
            }
        }
        if !closing {
            let mut fed = 0u64;
            let mut any = false;
            while let Some(out) = queue.pop_due(now) {
                let text = match out {
                    Out::Text(text) | Out::Audio(text, _) => text,
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
                any = true;
                if ws.feed(Message::text(text)).await.is_err() {
                    break 'conn;
                }
            }
            if any && !closing && ws.flush().await.is_err() {
                break;
            }
            core.bytes_written.fetch_add(fed, Ordering::Relaxed);
        }
        if closing {
            // Nothing more goes out after our close frame.
            queue.clear();
        }
        let due = queue.next_at();
        tokio::select! {
            biased;
            wake = rx.recv() => if matches!(wake, None | Some(Out::Drop)) {
                break;
            },
            frame = ws.next() => if on_frame(&core, frame) == Flow::End {
                break;
            },
            () = tokio::time::sleep_until(due.unwrap_or(now)), if due.is_some() => {}
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
        // `biased`: a pause that comes with a frame ready wins, so nothing is read after it;
        // `next` loses nothing when cancelled.
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
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    core: Arc<SessionCore>,
) {
    // Whether the reader must be stopped when this ends: not after a close frame of ours,
    // whose reply the reader waits for (the connection then ends on its own).
    let mut kill = true;
    'outer: while let Some(first) = rx.recv().await {
        let mut fed = 0u64;
        let mut next = Some(first);
        let mut close = None;
        while let Some(out) = next.take() {
            let text = match out {
                Out::Text(text) | Out::Audio(text, _) => text,
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
        if let Some(frame) = close {
            kill = sink.send(Message::Close(Some(frame))).await.is_err();
            break;
        }
    }
    if kill {
        core.kill();
    }
}
