//! The test's handle on one Live session: what the service sent, and the model's side
//! scripted by the test. Scripting methods are plain (non-async): each emits while holding
//! the session lock, so the wire order is the order of the calls. Methods that script the
//! model panic on a script bug (an unknown delegation, invalid base64 from the test), never
//! on what the service sent.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, MutexGuard,
    },
    time::{Duration, Instant},
};

use base64::prelude::*;
use serde_json::{json, Value};

use super::{
    lock,
    server::{Handshake, SessionCore},
    session::{AppendKind, Closer, Out, SessionState, TextAppend},
    LiveError, DEFAULT_TIMEOUT, POLL,
};

/// `session.closed` reasons (§12).
const CLOSE_REASONS: &[&str] = &[
    "close_requested",
    "expired",
    "content",
    "remote_hangup",
    "connection_lost",
];

/// One accepted connection of a scripted [`super::FakeLive`].
pub struct FakeLiveSession {
    core: Arc<SessionCore>,
    /// Indices of `received()` already returned by `recv_event`.
    consumed: HashSet<usize>,
}

impl FakeLiveSession {
    pub(crate) fn new(core: Arc<SessionCore>) -> FakeLiveSession {
        FakeLiveSession {
            core,
            consumed: HashSet::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, SessionState> {
        lock(&self.core.state)
    }

    /// 0 for the first session the server accepted, 1 for the next, …
    pub fn index(&self) -> usize {
        self.core.index
    }

    /// The upgrade request of this connection.
    pub fn handshake(&self) -> Handshake {
        self.core.handshake.clone()
    }

    /// The key from `Authorization: Bearer <key>`.
    pub fn api_key(&self) -> String {
        self.state().api_key.clone()
    }

    /// The session id `session.started` carries (`live_fake0000`, …).
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
            let found = {
                let st = self.state();
                st.log
                    .iter()
                    .enumerate()
                    .find(|(i, v)| {
                        !self.consumed.contains(i) && v["type"].as_str() == Some(type_name)
                    })
                    .map(|(i, v)| (i, v.clone()))
            };
            if let Some((i, v)) = found {
                self.consumed.insert(i);
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeLiveSession #{}: timed out after {timeout:?} waiting for a client \
                     event `{type_name}`; received so far: {:?}",
                    self.core.index,
                    self.received_types()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The `session` object of the accepted `session.start`, as the service sent it.
    pub fn session_start(&self) -> Option<Value> {
        self.state().start.as_ref().map(|s| s.raw.clone())
    }

    /// Waits up to [`DEFAULT_TIMEOUT`] for an accepted `session.start`; returns its `session`.
    pub async fn wait_session_start(&self) -> Value {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            if let Some(session) = self.session_start() {
                return session;
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeLiveSession #{}: no valid session.start within {DEFAULT_TIMEOUT:?}; \
                     received so far: {:?}; violations: {:?}",
                    self.core.index,
                    self.received_types(),
                    self.violations()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The resolved configuration (what `session.started` carried, with later
    /// `session.update`s of the delegation applied); `Null` before a valid start.
    pub fn session_config(&self) -> Value {
        self.state()
            .start
            .as_ref()
            .map_or(Value::Null, |s| s.resolved.clone())
    }

    /// The startup history (`session.input`) of the accepted start; empty when none.
    pub fn input_history(&self) -> Vec<Value> {
        self.session_start()
            .and_then(|s| s.get("input").and_then(Value::as_array).cloned())
            .unwrap_or_default()
    }

    /// All decoded `session.input_audio.append` bytes, in order.
    pub fn appended_audio(&self) -> Vec<u8> {
        self.state().audio.clone()
    }

    /// Number of accepted `session.input_audio.append` events.
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
                    "FakeLiveSession #{}: timed out waiting for {n} appended audio bytes \
                     (have {})",
                    self.core.index,
                    audio.len()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The session timeline now, in ms (input audio so far, §4.1).
    pub fn timeline_ms(&self) -> u64 {
        self.state().timeline_ms()
    }

    /// Every accepted append event (commentary, instructions, thinking), in order.
    pub fn text_appends(&self) -> Vec<TextAppend> {
        self.state().text_appends.clone()
    }

    fn appends_of(&self, kind: AppendKind) -> Vec<TextAppend> {
        let st = self.state();
        st.text_appends
            .iter()
            .filter(|a| a.kind == kind)
            .cloned()
            .collect()
    }

    /// Accepted `session.commentary.append`s (greeting, delegation answers).
    pub fn commentary(&self) -> Vec<TextAppend> {
        self.appends_of(AppendKind::Commentary)
    }

    /// Accepted `session.instructions.append`s (callbridge: DTMF).
    pub fn instructions_appends(&self) -> Vec<TextAppend> {
        self.appends_of(AppendKind::Instructions)
    }

    /// Accepted `session.thinking.append`s.
    pub fn thinking(&self) -> Vec<TextAppend> {
        self.appends_of(AppendKind::Thinking)
    }

    /// Waits up to [`DEFAULT_TIMEOUT`] for at least `n` accepted appends of `kind`.
    pub async fn wait_text_appends(&self, kind: AppendKind, n: usize) -> Vec<TextAppend> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let found = self.appends_of(kind);
            if found.len() >= n {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "FakeLiveSession #{}: timed out waiting for {n} {kind:?} appends (have \
                     {found:?}); received so far: {:?}",
                    self.core.index,
                    self.received_types()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The `item`s of accepted `response.item.create`s.
    pub fn item_creates(&self) -> Vec<Value> {
        self.state().item_creates.clone()
    }

    /// Accepted `response.create`s.
    pub fn response_create_count(&self) -> usize {
        self.state().response_creates
    }

    /// `call_id`s of scripted function calls still waiting for their output.
    pub fn calls_awaiting_output(&self) -> Vec<String> {
        let st = self.state();
        let mut ids: Vec<String> = st
            .calls
            .iter()
            .filter(|(_, c)| !c.answered)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Accepted `session.update`s.
    pub fn session_updates_accepted(&self) -> usize {
        self.state().updates_accepted
    }

    /// Input is muted (`session.input_audio.mute` more recent than `unmute`).
    pub fn is_muted(&self) -> bool {
        self.state().muted
    }

    /// Audio fixtures that have finished playing.
    pub fn fixtures_played(&self) -> usize {
        self.state().fixtures_played
    }

    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "FakeLiveSession #{} recorded {} violation(s):\n  {}",
            self.core.index,
            v.len(),
            v.join("\n  ")
        );
    }

    // ----- the socket

    /// Stops reading this session's socket: from the next frame on, nothing the service sends
    /// is read (so its writes back up), while the fake can still push events.
    pub fn pause_reading(&self) {
        self.core.read_ctl.send_modify(|c| c.paused = true);
    }

    /// Reads the socket again (what the service wrote meanwhile is then read in order).
    pub fn resume_reading(&self) {
        self.core.read_ctl.send_modify(|c| c.paused = false);
    }

    pub fn is_reading_paused(&self) -> bool {
        self.core.read_ctl.borrow().paused
    }

    /// Payload bytes of every frame written (flushed) to the service's socket so far.
    pub fn bytes_written(&self) -> usize {
        self.core.bytes_written.load(Ordering::Relaxed) as usize
    }

    /// Payload bytes of every frame read from the service's socket so far.
    pub fn bytes_read(&self) -> usize {
        self.core.bytes_read.load(Ordering::Relaxed) as usize
    }

    // ----- scripting the model: audio and transcripts

    /// Sends a raw server event (an `event_id` is added).
    pub fn send(&self, event: Value) {
        self.state().emit(event);
    }

    /// `session.output_audio.delta` carrying `b64` (standard base64 of µ-law bytes), with no
    /// `event_id` as on a primary WebSocket (§4.2).
    pub fn audio_delta(&self, b64: &str) {
        if let Err(e) = BASE64_STANDARD.decode(b64) {
            panic!("FakeLiveSession::audio_delta: invalid base64 in the test: {e}");
        }
        let text = SessionState::audio_delta_text(b64);
        self.state().send_raw(Out::Text(text));
    }

    /// [`Self::audio_delta`] from raw bytes.
    pub fn audio_delta_bytes(&self, audio: &[u8]) {
        self.audio_delta(&BASE64_STANDARD.encode(audio));
    }

    /// Sends `audio` as deltas of `frame_bytes` (the last may be shorter) at real-time pace
    /// (8 bytes a ms, §4.2), from a background task that stops when the socket ends.
    pub fn stream_audio(&self, audio: Vec<u8>, frame_bytes: usize) -> AudioStream {
        AudioStream::start(Arc::downgrade(&self.core), audio, frame_bytes.max(1))
    }

    /// `session.input_transcript.delta`: a fragment of the caller's speech on the session
    /// timeline (§5). Also how an interruption looks on the wire: there is no barge-in event
    /// (§8); the caller's fragment arrives and the model's audio stops.
    pub fn input_transcript(&self, delta: &str, start_ms: u64, end_ms: u64) {
        self.state().emit(
            json!({"type": "session.input_transcript.delta", "delta": delta,
            "start_ms": start_ms, "end_ms": end_ms}),
        );
    }

    /// `session.output_transcript.delta`: a fragment of the assistant's speech (§5).
    pub fn output_transcript(&self, delta: &str, start_ms: u64, end_ms: u64) {
        self.state().emit(
            json!({"type": "session.output_transcript.delta", "delta": delta,
            "start_ms": start_ms, "end_ms": end_ms}),
        );
    }

    /// An `info` notice (§13).
    pub fn info(&self, code: &str, message: &str) {
        self.state()
            .emit(json!({"type": "info", "code": code, "message": message}));
    }

    /// Ends the playing audio fixture now (`…fixture.played`) rather than after its
    /// duration; false if none plays.
    pub fn fixture_played(&self) -> bool {
        self.state().end_fixture()
    }

    // ----- delegation and tools (§9)

    /// `session.delegation.created` with target `client` at the current timeline position;
    /// the service may then answer with appends carrying `delegation_id`.
    pub fn delegate_to_client(&self, delegation_id: &str) {
        self.delegate(delegation_id, "client", None);
    }

    /// `session.delegation.created` with target `responses` and the backend's `response_id`.
    pub fn delegate_to_responses(&self, delegation_id: &str, response_id: &str) {
        self.delegate(delegation_id, "responses", Some(response_id));
    }

    fn delegate(&self, id: &str, target: &str, response_id: Option<&str>) {
        self.state().delegate(id, target, response_id);
    }

    /// A `response.event` wrapping a backend Responses streaming event; a `sequence_number`
    /// is added when the event has none.
    pub fn response_event(&self, delegation_id: &str, event: Value) {
        let mut st = self.state();
        assert!(
            st.delegations.contains_key(delegation_id),
            "FakeLiveSession::response_event: no delegation '{delegation_id}' was scripted"
        );
        st.response_event(delegation_id, event);
    }

    /// A completed function call of the backend (`response.output_item.done`, item
    /// `function_call`, status `completed`, §9.2): the service must answer it with one
    /// `response.item.create` `function_call_output` and a `response.create`.
    pub fn function_call(&self, delegation_id: &str, call_id: &str, name: &str, arguments: &str) {
        self.function_call_item(delegation_id, call_id, name, arguments, "completed");
    }

    /// A function call cut short (`status` `incomplete` / `in_progress`): not to be run, and
    /// an output for it is refused.
    pub fn function_call_cut_short(
        &self,
        delegation_id: &str,
        call_id: &str,
        name: &str,
        status: &str,
    ) {
        self.function_call_item(delegation_id, call_id, name, "{", status);
    }

    fn function_call_item(
        &self,
        delegation_id: &str,
        call_id: &str,
        name: &str,
        arguments: &str,
        status: &str,
    ) {
        let mut st = self.state();
        assert!(
            st.delegations.contains_key(delegation_id),
            "FakeLiveSession::function_call: no delegation '{delegation_id}' was scripted"
        );
        st.function_call_item(delegation_id, call_id, name, arguments, status);
    }

    /// The backend response is over (`response.completed`, with token usage).
    pub fn response_completed(&self, delegation_id: &str, response_id: &str) {
        let mut st = self.state();
        assert!(
            st.delegations.contains_key(delegation_id),
            "FakeLiveSession::response_completed: no delegation '{delegation_id}' was scripted"
        );
        st.response_completed(delegation_id, response_id);
    }

    // ----- usage, errors and the end of the session

    /// `session.usage.updated` with cumulative `seconds` (§11); `usage_ratio` as
    /// `context_window` when given.
    pub fn usage_updated(&self, seconds: f64, usage_ratio: Option<f64>) {
        self.state().send_usage(seconds, usage_ratio);
    }

    /// The `usage.seconds` `session.closed` will carry (default: session time since
    /// `session.started`, at least the last usage sent).
    pub fn set_final_usage(&self, seconds: f64) {
        self.state().usage_override = Some(seconds);
    }

    /// An `error` event (not tied to a client command).
    pub fn error(&self, error: LiveError) {
        self.state().send_error(&error, None);
    }

    /// An `invalid_request_error` with this code (no param, no client event id).
    pub fn error_event(&self, code: &str, message: &str) {
        self.error(LiveError::invalid_request(code, message));
    }

    /// A server-initiated `session.closed` with `reason` (`expired`, `content`,
    /// `remote_hangup`, `connection_lost`, …) and the final usage; the socket stays open for
    /// the service to close (§12). Panics on a reason the API does not have.
    pub fn session_closed(&self, reason: &str) {
        assert!(
            CLOSE_REASONS.contains(&reason),
            "FakeLiveSession::session_closed: '{reason}' is none of {CLOSE_REASONS:?}"
        );
        self.state().send_closed(reason);
    }

    /// The session reached `expires_at`: `session.closed` with reason `expired`.
    pub fn session_expired(&self) {
        self.session_closed("expired");
    }

    /// The reason of the `session.closed` sent, if one was.
    pub fn session_closed_reason(&self) -> Option<String> {
        self.state().closed_reason.clone()
    }

    /// The `usage.seconds` of the `session.closed` sent, if one was.
    pub fn final_usage(&self) -> Option<f64> {
        self.state().final_usage
    }

    /// Sends a close frame (then the connection ends once the service answers it).
    pub fn close(&self, code: u16, reason: &str) {
        let mut st = self.mark_fake_closer();
        st.send_raw(Out::Close(code, reason.to_owned()));
    }

    /// Ends the TCP connection without a close frame (the service sees an abnormal closure).
    pub fn drop_connection(&self) {
        let mut st = self.mark_fake_closer();
        st.send_raw(Out::Drop);
    }

    fn mark_fake_closer(&self) -> MutexGuard<'_, SessionState> {
        let mut st = self.state();
        if st.closer.is_none() {
            st.closer = Some(Closer::Fake);
        }
        st
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
            tokio::time::sleep(POLL).await;
        }
    }

    /// The code of the close frame the service sent (1005 if it had none), or `None` if the
    /// service sent no close frame (yet).
    pub fn service_close_code(&self) -> Option<u16> {
        self.state().service_close_code
    }

    /// The service closed the socket after `session.close` but before the fake sent
    /// `session.closed` (its bounded wait ran out, or it did not wait).
    pub fn socket_closed_before_session_closed(&self) -> bool {
        self.state().closed_before_session_closed
    }
}

/// Audio sent at real-time pace by [`FakeLiveSession::stream_audio`]. Dropping the handle
/// does not stop it.
#[derive(Clone, Debug)]
pub struct AudioStream {
    shared: Arc<StreamShared>,
}

#[derive(Debug, Default)]
struct StreamShared {
    stop: AtomicBool,
    sent: AtomicUsize,
    finished: AtomicBool,
}

impl AudioStream {
    fn start(
        core: std::sync::Weak<SessionCore>,
        audio: Vec<u8>,
        frame_bytes: usize,
    ) -> AudioStream {
        let shared = Arc::new(StreamShared::default());
        let task = shared.clone();
        tokio::spawn(async move {
            // µ-law: 8 bytes a ms (a zero period would make `interval` panic).
            let period = Duration::from_millis((frame_bytes as u64 / 8).max(1));
            let mut tick = tokio::time::interval(period);
            for frame in audio.chunks(frame_bytes) {
                tick.tick().await;
                let Some(core) = core.upgrade() else { break };
                if task.stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut st = lock(&core.state);
                if st.closed {
                    break;
                }
                let text = SessionState::audio_delta_text(&BASE64_STANDARD.encode(frame));
                if !st.send_raw(Out::Text(text)) {
                    break;
                }
                task.sent.fetch_add(frame.len(), Ordering::Relaxed);
            }
            task.finished.store(true, Ordering::SeqCst);
        });
        AudioStream { shared }
    }

    /// Stops before the next frame.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Audio bytes handed to the writer so far.
    pub fn bytes_sent(&self) -> usize {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Everything was sent, it was stopped, or the socket ended.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Waits (at most `timeout`) until [`Self::is_finished`]; returns the bytes sent.
    pub async fn wait_finished(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() {
            if Instant::now() >= deadline {
                panic!(
                    "AudioStream: not finished after {timeout:?} ({} bytes sent)",
                    self.bytes_sent()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        self.bytes_sent()
    }
}
