//! The test's handle on one session: what the service sent, and the model's side scripted by
//! the test. Scripting methods are plain (non-async): each emits while holding the session
//! lock, so the wire order is the order of the calls.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc, MutexGuard},
    time::{Duration, Instant},
};

use base64::prelude::*;
use serde_json::{json, Value};

use super::{
    flood::Flood,
    lock,
    server::SessionCore,
    session::{Closer, Out, SessionState},
    DEFAULT_TIMEOUT, POLL,
};

/// One accepted connection of a scripted [`super::FakeOpenAi`].
pub struct FakeSession {
    core: Arc<SessionCore>,
    /// Indices of `received()` already returned by `recv_event`.
    consumed: HashSet<usize>,
}

impl FakeSession {
    pub(crate) fn new(core: Arc<SessionCore>) -> FakeSession {
        FakeSession {
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
                    "FakeSession #{}: timed out after {timeout:?} waiting for a client event \
                     `{type_name}`; received so far: {:?}",
                    self.core.index,
                    self.received_types()
                );
            }
            tokio::time::sleep(POLL).await;
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
            tokio::time::sleep(POLL).await;
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

    // ----- the socket

    /// Stops reading this session's socket: from the next frame on, nothing the service sends
    /// is read (so its writes back up in the kernel buffers and then in the service), while
    /// the fake can still push events. Frames already read stay recorded.
    pub fn pause_reading(&self) {
        self.core.read_ctl.send_modify(|c| c.paused = true);
    }

    /// Reads the socket again (what the service wrote meanwhile is then read in order).
    pub fn resume_reading(&self) {
        self.core.read_ctl.send_modify(|c| c.paused = false);
    }

    /// Reading is paused by [`Self::pause_reading`].
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
            st.register_item(&id, false);
        }
        st.emit(event);
    }

    /// Sends `text` as it is, in a text frame (garbage, for the service's resilience tests).
    pub fn send_raw_text(&self, text: &str) {
        self.state().send_raw(Out::Text(text.to_owned()));
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
        st.open_response(response_id, item_id);
    }

    /// `response.output_audio.delta` carrying `b64` (standard base64 of µ-law bytes). Sent
    /// even when the response is no longer active (late deltas after a cancel are real).
    pub fn audio_delta(&self, response_id: &str, item_id: &str, b64: &str) {
        let bytes = BASE64_STANDARD.decode(b64).unwrap_or_else(|e| {
            panic!("FakeSession::audio_delta: invalid base64 in the test: {e}")
        });
        let mut st = self.state();
        st.book_output_audio(item_id, bytes.len());
        st.emit(json!({"type": "response.output_audio.delta",
            "response_id": response_id, "item_id": item_id, "output_index": 0,
            "content_index": 0, "delta": b64}));
    }

    /// [`Self::audio_delta`] from raw bytes.
    pub fn audio_delta_bytes(&self, response_id: &str, item_id: &str, audio: &[u8]) {
        self.audio_delta(response_id, item_id, &BASE64_STANDARD.encode(audio));
    }

    /// Sends `total_bytes` of µ-law silence as `response.output_audio.delta`s of
    /// `chunk_bytes` each (the last may be shorter), as fast as the service's socket accepts
    /// them, from a background task. At most four deltas are queued ahead of the socket, so
    /// a service that stops reading stalls the flood ([`Flood::bytes_written`] then stops
    /// growing). The deltas count as the item's audio (for truncation checks) and take their
    /// place among scripted events in the order they are emitted. Start the response first
    /// ([`Self::start_response`]) and finish it after ([`Flood::is_finished`]).
    pub fn flood_audio(
        &self,
        response_id: &str,
        item_id: &str,
        total_bytes: usize,
        chunk_bytes: usize,
    ) -> Flood {
        Flood::start(
            self.core.clone(),
            response_id,
            item_id,
            total_bytes,
            chunk_bytes,
        )
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
        let item = st.close_item(response_id, item_id, transcript, status);
        if still_active {
            st.active = None;
            let done = json!({"type": "response.done", "response": st.response_object(
                response_id, "completed", Value::Null, json!([item]))});
            st.emit(done);
            st.emit(json!({"type": "rate_limits.updated", "rate_limits": [
                {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
                {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5}]}));
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
        st.register_item(item_id, false);
        st.emit(json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": audio_start_ms, "item_id": item_id}));
        if server_cancel && st.server_interrupts() {
            if let Some(active) = st.active.take() {
                st.cancelled_done(&active, "turn_detected");
            }
        }
    }

    /// `input_audio_buffer.speech_stopped`.
    pub fn speech_stopped(&self, item_id: &str, audio_end_ms: u64) {
        self.state()
            .emit(json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": audio_end_ms, "item_id": item_id}));
    }

    /// `conversation.item.input_audio_transcription.completed` for the caller's item.
    pub fn caller_transcript(&self, item_id: &str, text: &str) {
        let mut st = self.state();
        st.register_item(item_id, false);
        st.emit(
            json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": text,
            "usage": {"type": "duration", "seconds": 1.0}}),
        );
    }

    /// An `error` event (`invalid_request_error`, no param, no client event id).
    pub fn error_event(&self, code: &str, message: &str) {
        self.state().emit(json!({"type": "error", "error": {
            "type": "invalid_request_error", "code": code, "message": message,
            "param": null, "event_id": null}}));
    }

    /// The 60-minute limit (B6): `session_expired` error, then close 1001 with that message.
    pub fn session_expired(&self) {
        let msg = "Your session hit the maximum duration of 60 minutes.";
        self.error_event("session_expired", msg);
        self.close(1001, msg);
    }

    /// Sends a close frame (then the connection ends once the service answers it; while
    /// reading is paused its answer is not read).
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
}
