//! A strict fake Twilio caller: a Media Streams client (`<Connect><Stream>`, bidirectional)
//! that sends exactly what Twilio sends (`reference/protocols.md` A2) and validates exactly
//! what the service may send back (A3), recording every deviation as a violation.
//!
//! What the service sends is judged by `callbridge_fakes::twilio::parse_service_message` and
//! `decode_payload` (the simulator's rules too), and played through
//! `callbridge_fakes::playback::Playback`, the one model of Twilio's outbound buffer, which is
//! what makes barge-in testable: outbound `media` is queued and played in order; a `mark` is
//! echoed when the audio queued before it has been played, or at once if nothing is buffered;
//! `clear` drops the queue and echoes every pending mark (so an echo does not prove playback,
//! protocols.md §0.4). In [`MarkMode::Immediate`] (the default) audio counts as played on
//! arrival; in [`MarkMode::Manual`] the test advances playback with [`FakeTwilio::play`].
//!
//! [`FakeTwilio::connect`] sends nothing: a test that never calls `send_start` keeps a stream
//! open that never starts. [`FakeTwilio::pause_reading`] stops reading the socket, so that
//! the service's writes back up.
//!
//! Everything runs on the test's actix runtime (awc is `!Send`): state is `Rc<RefCell<_>>`, a
//! background task reads the socket, and all writes go through one async lock on the sink so
//! that `sequenceNumber`s are allocated in wire order.

use std::{
    cell::{Cell, RefCell},
    pin::Pin,
    rc::Rc,
    time::{Duration, Instant},
};

use actix_web::rt::time::sleep;
use awc::{
    error::WsProtocolError,
    ws::{CloseCode, CloseReason, Frame, Message},
};
use base64::prelude::*;
use callbridge_fakes::{
    clip,
    playback::Playback,
    twilio::{decode_payload, parse_service_message, Caller, ServiceMessage},
};
use futures_util::{
    future::{AbortHandle, Abortable},
    lock::Mutex as AsyncMutex,
    Sink, SinkExt as _, Stream, StreamExt as _,
};
use serde_json::{json, Value};
use tokio::sync::watch;

/// How long the `async` waits of this module wait.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const POLL: Duration = Duration::from_millis(5);

/// µ-law at 8 kHz: 8 bytes per millisecond.
const BYTES_PER_MS: u64 = 8;

/// The account SID every fake call belongs to.
pub use callbridge_fakes::twilio::ACCOUNT_SID;

/// Violations quote the offending message, clipped to this many bytes.
const CLIP: usize = 300;

/// When marks are echoed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkMode {
    /// Audio counts as played the moment it arrives; every mark is echoed at once.
    Immediate,
    /// Audio is queued; [`FakeTwilio::play`] advances playback; marks are echoed when the
    /// audio before them has been played (or at once if nothing is buffered).
    Manual,
}

type WsSink = Pin<Box<dyn Sink<Message, Error = WsProtocolError>>>;
type WsStream = Pin<Box<dyn Stream<Item = Result<Frame, WsProtocolError>>>>;
type SharedSink = Rc<AsyncMutex<Option<WsSink>>>;

struct State {
    url: String,
    stream_sid: Option<String>,
    call_sid: Option<String>,
    start_sent: bool,
    /// What Twilio sends (`sequenceNumber`s, chunks, the media clock), built by
    /// `callbridge_fakes::twilio::Caller`; its ids are set by `send_start`.
    caller: Caller,
    violations: Vec<String>,
    /// Every message from the service, in order: parsed JSON (valid or not), non-JSON text as
    /// a JSON string, binary frames as `{"binary_frame": len}`.
    events: Vec<Value>,
    /// Decoded payloads of the valid outbound `media` messages.
    received_audio: Vec<u8>,
    media_count: usize,
    marks_received: Vec<String>,
    marks_echoed: Vec<String>,
    clear_count: usize,
    mode: MarkMode,
    /// Twilio's outbound buffer (in Immediate mode everything is played on arrival).
    playback: Playback,
    played_bytes: usize,
    cleared_bytes: usize,
    closed: bool,
    /// This side sent a close frame or dropped the connection first.
    we_closed: bool,
    service_close_code: Option<u16>,
    send_failures: usize,
}

impl State {
    fn violate(&mut self, msg: String) {
        self.violations.push(msg);
    }

    fn buffered_bytes(&self) -> usize {
        self.playback.buffered()
    }

    /// Handles one text frame from the service; returns the marks to echo now.
    fn on_text(&mut self, text: &str) -> Vec<String> {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.events.push(Value::String(text.to_owned()));
                self.violate(format!(
                    "31951 Invalid Message: not JSON ({e}): {}",
                    clip(text, CLIP)
                ));
                return Vec::new();
            }
        };
        self.events.push(value);
        match self.validate(text) {
            Ok(outbound) => self.apply(outbound),
            Err(why) => {
                // Twilio drops an invalid message (and warns once per stream).
                self.violate(format!(
                    "31951 Invalid Message: {why}: {}",
                    clip(text, CLIP)
                ));
                Vec::new()
            }
        }
    }

    /// The A3 rules (`callbridge_fakes::twilio`: exact key sets, no `sequenceNumber` or
    /// `track`, this stream's `streamSid`, strict base64 of raw µ-law), and nothing before
    /// `start`.
    fn validate(&self, text: &str) -> Result<Outbound, String> {
        if !self.start_sent {
            return Err("message sent before Twilio sent `start` (no streamSid exists yet)".into());
        }
        let sid = self.stream_sid.as_deref().unwrap_or_default();
        match parse_service_message(text, sid)? {
            ServiceMessage::Media { payload } => {
                let mut audio = Vec::new();
                decode_payload(&payload, &mut audio)?;
                Ok(Outbound::Media(audio))
            }
            ServiceMessage::Mark { name } => Ok(Outbound::Mark(name.into_owned())),
            ServiceMessage::Clear => Ok(Outbound::Clear),
        }
    }

    /// The playback model; returns the marks to echo now.
    fn apply(&mut self, outbound: Outbound) -> Vec<String> {
        match outbound {
            Outbound::Media(audio) => {
                self.media_count += 1;
                self.playback.push_audio(&audio);
                self.received_audio.extend_from_slice(&audio);
                if self.mode == MarkMode::Immediate {
                    self.advance(usize::MAX)
                } else {
                    Vec::new()
                }
            }
            Outbound::Mark(name) => {
                self.marks_received.push(name.clone());
                self.playback.push_mark(name).into_iter().collect()
            }
            Outbound::Clear => {
                self.clear_count += 1;
                let cleared = self.playback.clear();
                self.cleared_bytes += cleared.bytes;
                cleared.marks
            }
        }
    }

    /// Plays up to `bytes` of queued audio; returns the marks whose audio is now played.
    fn advance(&mut self, bytes: usize) -> Vec<String> {
        let played = self.playback.advance(bytes);
        self.played_bytes += played.bytes;
        played.marks
    }
}

/// A valid message from the service.
enum Outbound {
    Media(Vec<u8>),
    Mark(String),
    Clear,
}

/// The fake caller. Dropping it drops the connection.
pub struct FakeTwilio {
    state: Rc<RefCell<State>>,
    sink: SharedSink,
    reader: AbortHandle,
    /// `true` while the reader must not read the socket.
    paused: watch::Sender<bool>,
    /// Clears already returned by `wait_clear`.
    clears_awaited: Cell<usize>,
}

impl FakeTwilio {
    /// Opens the Media Streams websocket (e.g. `ws://127.0.0.1:PORT/media-stream`); panics if
    /// the upgrade fails.
    pub async fn connect(ws_url: &str) -> FakeTwilio {
        FakeTwilio::connect_with_headers(ws_url, &[]).await
    }

    /// [`Self::connect`] with extra request headers (e.g. `X-Twilio-Signature`).
    pub async fn connect_with_headers(ws_url: &str, headers: &[(&str, &str)]) -> FakeTwilio {
        match open(ws_url, headers).await {
            Ok((sink, stream)) => FakeTwilio::from_parts(ws_url, sink, stream),
            Err(e) => panic!("FakeTwilio: websocket upgrade to {ws_url} failed: {e}"),
        }
    }

    /// Attempts an upgrade that the service should refuse; returns the HTTP status (101 if it
    /// was accepted after all, in which case the socket is closed again).
    pub async fn connect_expect_status(ws_url: &str, headers: &[(&str, &str)]) -> u16 {
        match open(ws_url, headers).await {
            Ok((mut sink, _stream)) => {
                let _ = sink.send(Message::Close(None)).await;
                101
            }
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => status.as_u16(),
            Err(e) => panic!("FakeTwilio: upgrade to {ws_url} failed without an HTTP status: {e}"),
        }
    }

    fn from_parts(url: &str, sink: WsSink, stream: WsStream) -> FakeTwilio {
        let state = Rc::new(RefCell::new(State {
            url: url.to_owned(),
            stream_sid: None,
            call_sid: None,
            start_sent: false,
            caller: Caller::new("", ""),
            violations: Vec::new(),
            events: Vec::new(),
            received_audio: Vec::new(),
            media_count: 0,
            marks_received: Vec::new(),
            marks_echoed: Vec::new(),
            clear_count: 0,
            mode: MarkMode::Immediate,
            playback: Playback::new(false),
            played_bytes: 0,
            cleared_bytes: 0,
            closed: false,
            we_closed: false,
            service_close_code: None,
            send_failures: 0,
        }));
        let sink: SharedSink = Rc::new(AsyncMutex::new(Some(sink)));
        let (reader, registration) = AbortHandle::new_pair();
        let (paused, paused_rx) = watch::channel(false);
        let task = read_loop(stream, state.clone(), sink.clone(), paused_rx);
        let st = state.clone();
        actix_web::rt::spawn(async move {
            let _ = Abortable::new(task, registration).await;
            st.borrow_mut().closed = true;
        });
        FakeTwilio {
            state,
            sink,
            reader,
            paused,
            clears_awaited: Cell::new(0),
        }
    }

    // ----- what Twilio sends (A2)

    /// `{"event":"connected","protocol":"Call","version":"1.0.0"}` (no sequenceNumber).
    pub async fn send_connected(&self) -> bool {
        self.send_text(|st| st.caller.connected()).await
    }

    /// The `start` message; from now on the service may (and must use this `streamSid` to)
    /// send media, marks and clears.
    pub async fn send_start(
        &self,
        stream_sid: &str,
        call_sid: &str,
        custom_parameters: &[(&str, &str)],
    ) -> bool {
        let params: Vec<(String, String)> = custom_parameters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.send_text(|st| {
            st.stream_sid = Some(stream_sid.to_owned());
            st.call_sid = Some(call_sid.to_owned());
            st.start_sent = true;
            st.caller.set_ids(stream_sid, call_sid);
            st.caller.start(&params)
        })
        .await
    }

    /// `connected` then `start`.
    pub async fn start_call(
        &self,
        stream_sid: &str,
        call_sid: &str,
        custom_parameters: &[(&str, &str)],
    ) -> bool {
        self.send_connected().await
            && self
                .send_start(stream_sid, call_sid, custom_parameters)
                .await
    }

    /// `connected` then `start`, with the `<Parameter>`s of `twiml`'s `<Stream>`, as Twilio
    /// starts the stream that TwiML asked for.
    pub async fn start_from(
        &self,
        twiml: &callbridge_fakes::twiml::Twiml,
        stream_sid: &str,
        call_sid: &str,
    ) -> bool {
        let (_, params) = twiml.stream().expect("the TwiML has a <Connect><Stream>");
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.start_call(stream_sid, call_sid, &params).await
    }

    /// An inbound `media` message carrying `payload` (raw µ-law, base64-encoded here). `chunk`
    /// counts from 1; `timestamp` is the presentation time (0 for the first chunk) and
    /// advances by the payload's duration (20 ms per 160 bytes).
    pub async fn send_media(&self, payload: &[u8]) -> bool {
        self.send_text(|st| st.caller.media(payload)).await
    }

    /// Advances the inbound clock without sending (a lost or late packet).
    pub fn skip_inbound_ms(&self, ms: u64) {
        self.state.borrow_mut().caller.skip_ms(ms);
    }

    /// A `dtmf` message (note Twilio's `inbound_track` spelling here).
    pub async fn send_dtmf(&self, digit: &str) -> bool {
        self.send_text(|st| st.caller.dtmf(digit)).await
    }

    /// A `stop` message (the call ended). Twilio then closes the socket: see [`Self::hang_up`].
    pub async fn send_stop(&self) -> bool {
        self.send_text(|st| st.caller.stop()).await
    }

    /// What Twilio does when the caller hangs up: `stop`, then close the socket.
    pub async fn hang_up(&self) {
        self.send_stop().await;
        self.close().await;
    }

    /// Sends a text frame as is (malformed-input tests). Does not touch sequence numbers.
    pub async fn send_text_raw(&self, text: &str) -> bool {
        let text = text.to_owned();
        self.write(move |_| Some(Message::Text(text.into()))).await
    }

    /// Sends a binary frame (Twilio never does).
    pub async fn send_binary(&self, bytes: &[u8]) -> bool {
        let bytes = bytes.to_vec();
        self.write(move |_| Some(Message::Binary(bytes.into())))
            .await
    }

    /// Closes the socket (close frame 1000) without `stop`.
    pub async fn close(&self) {
        self.write(|st| {
            st.we_closed = !st.closed;
            Some(Message::Close(Some(CloseReason {
                code: CloseCode::Normal,
                description: None,
            })))
        })
        .await;
    }

    /// Ends the TCP connection without a close frame.
    pub async fn drop_connection(&self) {
        {
            let mut st = self.state.borrow_mut();
            st.we_closed = !st.closed;
        }
        self.reader.abort();
        self.sink.lock().await.take();
    }

    /// Stops reading the socket: from now on nothing the service sends is read (its writes
    /// back up in the kernel buffers, then in the service), while this side can still send.
    /// Messages already read stay recorded.
    pub fn pause_reading(&self) {
        self.paused.send_replace(true);
    }

    /// Reads the socket again (what the service wrote meanwhile is then read in order).
    pub fn resume_reading(&self) {
        self.paused.send_replace(false);
    }

    /// Reading is paused by [`Self::pause_reading`].
    pub fn is_reading_paused(&self) -> bool {
        *self.paused.borrow()
    }

    // ----- playback

    /// Chooses when marks are echoed. Switching to `Immediate` plays out whatever is queued
    /// (its marks are echoed in the background).
    pub fn set_mark_mode(&self, mode: MarkMode) {
        let echoes = {
            let mut st = self.state.borrow_mut();
            st.mode = mode;
            if mode == MarkMode::Immediate {
                st.advance(usize::MAX)
            } else {
                Vec::new()
            }
        };
        if !echoes.is_empty() {
            let (sink, state) = (self.sink.clone(), self.state.clone());
            actix_web::rt::spawn(async move { echo_marks(&sink, &state, echoes).await });
        }
    }

    /// Manual mode: plays `ms` of queued audio (8 bytes per ms) and echoes the marks whose
    /// audio has now been played. A no-op in Immediate mode.
    pub async fn play(&self, ms: u64) {
        let echoes = self
            .state
            .borrow_mut()
            .advance((ms * BYTES_PER_MS) as usize);
        echo_marks(&self.sink, &self.state, echoes).await;
    }

    /// Outbound audio bytes played so far (Immediate: all received).
    pub fn played_bytes(&self) -> usize {
        self.state.borrow().played_bytes
    }

    /// Outbound audio bytes queued and not yet played.
    pub fn buffered_bytes(&self) -> usize {
        self.state.borrow().buffered_bytes()
    }

    /// Outbound audio bytes dropped by `clear`.
    pub fn cleared_bytes(&self) -> usize {
        self.state.borrow().cleared_bytes
    }

    // ----- what the service sent

    /// Every message from the service, in order (invalid ones included).
    pub fn events(&self) -> Vec<Value> {
        self.state.borrow().events.clone()
    }

    /// Decoded payloads of all valid outbound `media`, in order.
    pub fn received_audio(&self) -> Vec<u8> {
        self.state.borrow().received_audio.clone()
    }

    /// Valid outbound `media` messages.
    pub fn media_count(&self) -> usize {
        self.state.borrow().media_count
    }

    /// Names of the valid marks the service sent, in order.
    pub fn marks_received(&self) -> Vec<String> {
        self.state.borrow().marks_received.clone()
    }

    /// Names of the marks echoed back to the service, in order.
    pub fn marks_echoed(&self) -> Vec<String> {
        self.state.borrow().marks_echoed.clone()
    }

    /// Valid `clear` messages.
    pub fn clear_count(&self) -> usize {
        self.state.borrow().clear_count
    }

    /// The `streamSid` sent in `start`.
    pub fn stream_sid(&self) -> Option<String> {
        self.state.borrow().stream_sid.clone()
    }

    /// Writes that failed because the socket was gone.
    pub fn send_failures(&self) -> usize {
        self.state.borrow().send_failures
    }

    /// Waits until at least `n` outbound audio bytes arrived; returns all received audio.
    pub async fn recv_audio_bytes(&self, n: usize) -> Vec<u8> {
        self.wait_for(&format!("{n} bytes of outbound audio"), || {
            let st = self.state.borrow();
            (st.received_audio.len() >= n).then(|| st.received_audio.clone())
        })
        .await
    }

    /// Waits until at least `n` marks arrived; returns their names.
    pub async fn wait_marks(&self, n: usize) -> Vec<String> {
        self.wait_for(&format!("{n} marks from the service"), || {
            let st = self.state.borrow();
            (st.marks_received.len() >= n).then(|| st.marks_received.clone())
        })
        .await
    }

    /// Waits for the next `clear` not yet returned by an earlier `wait_clear`.
    pub async fn wait_clear(&self) {
        let want = self.clears_awaited.get() + 1;
        self.wait_for(&format!("clear #{want} from the service"), || {
            (self.state.borrow().clear_count >= want).then_some(())
        })
        .await;
        self.clears_awaited.set(want);
    }

    /// Waits up to [`DEFAULT_TIMEOUT`] for the socket to end; true when the *service* closed
    /// it, false on timeout or when this side closed it first.
    pub async fn wait_closed(&self) -> bool {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            {
                let st = self.state.borrow();
                if st.closed {
                    return !st.we_closed;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(POLL).await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }

    /// Code of the close frame the service sent, if any.
    pub fn service_close_code(&self) -> Option<u16> {
        self.state.borrow().service_close_code
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.borrow().violations.clone()
    }

    pub fn assert_no_violations(&self) {
        let st = self.state.borrow();
        assert!(
            st.violations.is_empty(),
            "FakeTwilio ({}) recorded {} violation(s):\n  {}",
            st.url,
            st.violations.len(),
            st.violations.join("\n  ")
        );
    }

    // ----- internals

    async fn wait_for<T>(&self, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            if let Some(v) = ready() {
                return v;
            }
            if Instant::now() >= deadline {
                let st = self.state.borrow();
                panic!(
                    "FakeTwilio: timed out after {DEFAULT_TIMEOUT:?} waiting for {what} \
                     (media {}, audio bytes {}, marks {:?}, clears {}, closed {}, events {})",
                    st.media_count,
                    st.received_audio.len(),
                    st.marks_received,
                    st.clear_count,
                    st.closed,
                    st.events.len()
                );
            }
            sleep(POLL).await;
        }
    }

    async fn send_text(&self, build: impl FnOnce(&mut State) -> String) -> bool {
        self.write(|st| Some(Message::Text(build(st).into()))).await
    }

    async fn write(&self, build: impl FnOnce(&mut State) -> Option<Message>) -> bool {
        write_with(&self.sink, &self.state, build).await
    }
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Connects with awc over HTTP/1.1 (h2 would break the upgrade).
async fn open(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(WsSink, WsStream), awc::error::WsClientError> {
    let client = awc::Client::builder()
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
    let mut request = client.ws(url).max_frame_size(1024 * 1024);
    for (name, value) in headers {
        request = request.set_header(*name, *value);
    }
    let (_response, framed) = request.connect().await?;
    let (sink, stream) = framed.split();
    Ok((Box::pin(sink), Box::pin(stream)))
}

/// One write under the sink lock: `build` runs (allocating sequence numbers, updating state)
/// only once the lock is held, so sequence numbers follow wire order.
async fn write_with(
    sink: &SharedSink,
    state: &Rc<RefCell<State>>,
    build: impl FnOnce(&mut State) -> Option<Message>,
) -> bool {
    let mut guard = sink.lock().await;
    let message = {
        let mut st = state.borrow_mut();
        if st.closed || guard.is_none() {
            st.send_failures += 1;
            return false;
        }
        build(&mut st)
    };
    let (Some(sink), Some(message)) = (guard.as_mut(), message) else {
        return true;
    };
    if sink.send(message).await.is_err() {
        state.borrow_mut().send_failures += 1;
        return false;
    }
    true
}

/// Echoes marks as Twilio does: `{"event":"mark","sequenceNumber":…,"streamSid":…,"mark":{"name":…}}`.
async fn echo_marks(sink: &SharedSink, state: &Rc<RefCell<State>>, names: Vec<String>) {
    for name in names {
        write_with(sink, state, |st| {
            st.marks_echoed.push(name.clone());
            Some(Message::Text(st.caller.mark(&name).into()))
        })
        .await;
    }
}

/// Reads the service's frames until the socket ends; never panics.
async fn read_loop(
    mut stream: WsStream,
    state: Rc<RefCell<State>>,
    sink: SharedSink,
    mut paused: watch::Receiver<bool>,
) {
    loop {
        if *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                break;
            }
            continue;
        }
        // A pause interrupts the wait for a frame; `next` loses nothing when cancelled.
        // `biased`: a pause that comes with a frame ready wins, so nothing is read after it.
        let frame = tokio::select! {
            biased;
            changed = paused.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            frame = stream.next() => frame,
        };
        let Some(frame) = frame else { break };
        match frame {
            Ok(Frame::Text(bytes)) => {
                let echoes = match std::str::from_utf8(&bytes) {
                    Ok(text) => state.borrow_mut().on_text(text),
                    Err(_) => {
                        let mut st = state.borrow_mut();
                        st.events.push(json!({"invalid_utf8_text": bytes.len()}));
                        st.violate("31951 Invalid Message: text frame is not UTF-8".into());
                        Vec::new()
                    }
                };
                echo_marks(&sink, &state, echoes).await;
            }
            Ok(Frame::Binary(bytes)) => {
                let mut st = state.borrow_mut();
                st.events.push(json!({"binary_frame": bytes.len()}));
                st.violate(format!(
                    "31950 Malformed Message: binary frame of {} bytes (JSON text only)",
                    bytes.len()
                ));
            }
            Ok(Frame::Continuation(_)) => state.borrow_mut().violate(
                "fragmented message (continuation frame): send each message as one frame".into(),
            ),
            Ok(Frame::Ping(payload)) => {
                write_with(&sink, &state, |_| Some(Message::Pong(payload))).await;
            }
            Ok(Frame::Pong(_)) => {}
            Ok(Frame::Close(reason)) => {
                let code = reason.map(|r| u16::from(r.code));
                // 1005 = "no status code present" (RFC 6455 §7.4.1): only ever reported.
                state.borrow_mut().service_close_code = Some(code.unwrap_or(1005));
                // Answer the close handshake (unless we started it).
                let we_closed = state.borrow().we_closed;
                if !we_closed {
                    write_with(&sink, &state, |_| {
                        Some(Message::Close(Some(CloseReason {
                            code: code.unwrap_or(1000).into(),
                            description: None,
                        })))
                    })
                    .await;
                }
                break;
            }
            Err(e) => {
                // A connection that just ends is not a protocol error of the service; a
                // malformed frame is.
                if !matches!(e, WsProtocolError::Io(_)) {
                    state
                        .borrow_mut()
                        .violate(format!("31924 websocket protocol error: {e}"));
                }
                break;
            }
        }
    }
    state.borrow_mut().closed = true;
}
