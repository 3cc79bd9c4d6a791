//! `OpenAiRealtimeActor`: one connection ("leg") to the OpenAI Realtime API for one call.
//!
//! Lifecycle: connect (awc, HTTP/1.1, `Authorization: Bearer`) → send `session.update` → wait for
//! `session.updated` → report `Ready`. The `CallActor` then routes caller audio here
//! ([`AudioIn`], from the Twilio leg directly). Deltas go straight to the Twilio leg's recipient,
//! handed over when the leg was created, as [`AudioOut`] sliced out of the frame they arrived in,
//! with `try_send` (a full mailbox drops and counts). Other server events go to the
//! `CallActor` as typed messages.
//!
//! Writing: events for the socket wait in a bounded `Outbox`, written by a future of this
//! actor that feeds the socket only as fast as it takes them and flushes once per batch. When
//! `call.openai_queue_ms` of appends wait, the oldest append is dropped and counted; control
//! events are never dropped. A write that has waited `call.stall_timeout_ms` for the socket is a
//! stall: the leg fails and the call restarts it.
//!
//! The leg never restarts itself: on any failure it reports `Closed` with a typed
//! [`LegFailure`] once and stops, and the `CallActor` decides whether a new leg follows. That
//! keeps the retry budget in one place.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use awc::error::WsProtocolError;
use awc::ws::{self, Frame};
use bytes::{Bytes, BytesMut};
use futures_util::stream::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::ai_socket::{
    client_for, read_frame, redact, scrub, socket_ended, write_loop, Incoming, Outbox,
};
pub use crate::ai_socket::{mailbox_capacity, LegPort};
use crate::call::LegRequest;
use crate::config::{CallConfig, OpenAiConfig};
use crate::messages::{
    AudioIn, AudioOut, CallCounters, CallIdentified, ContextLine, Role, Stop, StopReason,
    Transcript, UpstreamCommand, UpstreamEvent, UsageReport,
};
use crate::protocol::{base64_audio_len, openai as proto, openai::ServerEvent};
use crate::session::restart::LegFailure;

/// After asking the server to close, how long to wait for its close before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How often the stall check runs.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Error codes after which this session cannot be used (the server closes it, or every later
/// event would fail the same way).
const FATAL_CODES: &[&str] = &[
    "invalid_api_key",
    "session_expired",
    "beta_api_shape_disabled",
    "insufficient_quota",
];

pub struct OpenAiRealtimeActor {
    call: LegPort,
    /// Which leg of the call this is (0 first, then one per restart); stale reports are ignored.
    leg: u32,
    config: Arc<OpenAiConfig>,
    api_key: SecretString,
    label: Arc<str>,
    counters: Arc<CallCounters>,
    stall_timeout: Duration,
    outbox: Rc<RefCell<Outbox>>,
    /// Where assistant audio goes (the Twilio leg, or a test's stand-in).
    twilio: Option<Recipient<AudioOut>>,
    connected: bool,
    /// `session.updated` received.
    ready: bool,
    /// `Closed` was reported, or the call asked us to stop: report nothing more.
    done: bool,
    /// A text message arriving in fragments (rare, but legal websocket).
    fragments: Option<BytesMut>,
    /// Ids of the item being streamed, shared by every chunk of it (no allocation per delta).
    current_ids: Option<(Arc<str>, Arc<str>)>,
    /// The conversation so far, sent after `session.update` (a continued session).
    history: Vec<ContextLine>,
}

impl OpenAiRealtimeActor {
    pub fn new(
        req: LegRequest,
        config: Arc<OpenAiConfig>,
        call_config: &CallConfig,
        api_key: SecretString,
    ) -> Self {
        let LegRequest {
            port: call,
            twilio_audio: twilio,
            leg_no: leg,
            label,
            counters,
            history,
            // Realtime bills tokens, not session time: its session starts at once.
            stream_started: _,
        } = req;
        // One append carries 20 ms of audio.
        let max_audio = (call_config.openai_queue_ms / 20).max(1) as usize;
        Self {
            call,
            leg,
            config,
            api_key,
            label,
            stall_timeout: Duration::from_millis(call_config.stall_timeout_ms),
            outbox: Rc::new(RefCell::new(Outbox::new(max_audio, counters.clone()))),
            counters,
            twilio: Some(twilio),
            connected: false,
            ready: false,
            done: false,
            fragments: None,
            current_ids: None,
            history,
        }
    }

    /// Starts the leg with a bounded mailbox ([`mailbox_capacity`]).
    pub fn start_leg(self, capacity: usize) -> Addr<Self> {
        let mut ctx = Context::new();
        ctx.set_mailbox_capacity(capacity);
        ctx.run(self)
    }

    fn send(&mut self, text: String) {
        if self.connected {
            self.outbox
                .borrow_mut()
                .push(ws::Message::Text(text.into()), false);
        }
    }

    /// Reports the leg as gone (once) and stops.
    fn fail(&mut self, ctx: &mut Context<Self>, failure: LegFailure) {
        if !self.done {
            self.done = true;
            let failure = scrub(failure, self.api_key.expose_secret());
            self.call.events.do_send(UpstreamEvent::Closed {
                leg: self.leg,
                failure,
            });
        }
        ctx.stop();
    }

    fn error(&self, code: &str, message: String) {
        self.call.events.do_send(UpstreamEvent::Error {
            code: code.into(),
            message,
        });
    }

    fn on_text(&mut self, frame: &Bytes, ctx: &mut Context<Self>) {
        let Ok(text) = std::str::from_utf8(frame) else {
            log::warn!("{} non-UTF-8 text from OpenAI", self.label);
            return;
        };
        let event = match proto::parse_server_event(text) {
            Ok(event) => event,
            Err(e) => {
                log::warn!("{} unreadable event from OpenAI: {e}", self.label);
                self.error("unreadable_event", e.to_string());
                return;
            }
        };
        match event {
            ServerEvent::AudioDelta {
                response_id,
                item_id,
                delta,
            } => {
                let Some(bytes) = base64_audio_len(&delta) else {
                    self.error(
                        "bad_audio_delta",
                        format!("audio delta is not base64 ({} chars)", delta.len()),
                    );
                    return;
                };
                let ids = match &self.current_ids {
                    Some((r, i)) if **r == *response_id && **i == *item_id => {
                        (r.clone(), i.clone())
                    }
                    _ => {
                        let ids: (Arc<str>, Arc<str>) =
                            (Arc::from(response_id.as_ref()), Arc::from(item_id.as_ref()));
                        self.current_ids = Some(ids.clone());
                        ids
                    }
                };
                let Some(twilio) = &self.twilio else {
                    CallCounters::add(&self.counters.dropped_upstream_not_ready, 1);
                    return;
                };
                // Zero-copy: the payload is a slice of the frame it came in.
                let payload = match delta {
                    std::borrow::Cow::Borrowed(s) => frame.slice_ref(s.as_bytes()),
                    std::borrow::Cow::Owned(s) => Bytes::from(s),
                };
                let audio = AudioOut {
                    payload,
                    bytes: bytes as u32,
                    response_id: ids.0,
                    item_id: ids.1,
                };
                if let Err(SendError::Full(_)) = twilio.try_send(audio) {
                    CallCounters::add(&self.counters.dropped_twilio_backpressure, 1);
                }
            }
            ServerEvent::SpeechStarted => self.call.events.do_send(UpstreamEvent::SpeechStarted),
            ServerEvent::SpeechStopped => self.call.events.do_send(UpstreamEvent::SpeechStopped),
            ServerEvent::ResponseCreated { response_id } => self
                .call
                .events
                .do_send(UpstreamEvent::ResponseCreated { response_id }),
            ServerEvent::ResponseDone {
                response_id,
                status,
                usage,
                calls,
            } => {
                if let Some(tokens) = usage {
                    self.call
                        .events
                        .do_send(UpstreamEvent::Usage(UsageReport::Tokens(tokens)));
                }
                // Only a completed response's calls run (a cancelled one's were cut short).
                let completed = status == "completed";
                self.call.events.do_send(UpstreamEvent::ResponseDone {
                    response_id,
                    status,
                });
                if completed {
                    for call in calls {
                        self.call.events.do_send(UpstreamEvent::ToolCall {
                            call_id: call.call_id,
                            name: call.name,
                            arguments: call.arguments,
                        });
                    }
                }
            }
            ServerEvent::AssistantTranscript {
                transcript,
                item_id,
            } if !transcript.trim().is_empty() => self.call.transcripts.do_send(Transcript {
                role: Role::Assistant,
                text: transcript,
                item_id,
                partial: false,
            }),
            ServerEvent::CallerTranscript { transcript } if !transcript.trim().is_empty() => {
                self.call.transcripts.do_send(Transcript {
                    role: Role::Caller,
                    text: transcript,
                    item_id: None,
                    partial: false,
                })
            }
            ServerEvent::AssistantTranscript { .. } | ServerEvent::CallerTranscript { .. } => {}
            ServerEvent::CallerTranscriptFailed { message } => {
                log::warn!("{} caller transcription failed: {message}", self.label)
            }
            ServerEvent::SessionCreated => {
                log::debug!("{} OpenAI session created", self.label)
            }
            ServerEvent::SessionUpdated => {
                if !self.ready {
                    self.ready = true;
                    self.call
                        .events
                        .do_send(UpstreamEvent::Ready { leg: self.leg });
                }
            }
            ServerEvent::Error {
                code,
                message,
                event_id,
            } => {
                let code = code.unwrap_or_else(|| "unknown".into());
                let message = redact(&message, self.api_key.expose_secret());
                if event_id.as_deref() == Some(proto::SESSION_UPDATE_EVENT_ID) {
                    // Without our configuration the model would read μ-law as 24 kHz PCM.
                    self.fail(
                        ctx,
                        LegFailure::SessionRejected(format!("{code}: {message}")),
                    );
                } else if FATAL_CODES.contains(&code.as_str()) {
                    self.fail(ctx, LegFailure::Fatal { code, message });
                } else {
                    self.call
                        .events
                        .do_send(UpstreamEvent::Error { code, message });
                }
            }
            ServerEvent::Other { kind } => log::trace!("{} OpenAI event {kind}", self.label),
        }
    }

    fn check_stall(&mut self, ctx: &mut Context<Self>) {
        let blocked = self.outbox.borrow().blocked_since();
        if blocked.is_some_and(|since| since.elapsed() >= self.stall_timeout) {
            let ms = self.stall_timeout.as_millis() as u64;
            log::warn!(
                "{} OpenAI socket accepted nothing for {ms} ms: leg failed",
                self.label
            );
            self.fail(ctx, LegFailure::Stalled { ms });
        }
    }
}

impl Actor for OpenAiRealtimeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let request = client_for(timeout)
            .ws(self.config.connect_url())
            .max_frame_size(self.config.max_frame_bytes)
            .bearer_auth(self.api_key.expose_secret());
        async move { request.connect().await }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok((_response, framed)) => {
                    if act.done {
                        return; // stopped while connecting
                    }
                    let (sink, stream) = framed.split();
                    ctx.add_stream(stream);
                    act.connected = true;
                    write_loop(act.outbox.clone(), sink)
                        .into_actor(act)
                        .map(|result, act, ctx| {
                            if let Err(e) = result {
                                act.fail(ctx, LegFailure::Protocol(format!("write: {e}")));
                            }
                        })
                        .spawn(ctx);
                    act.call
                        .events
                        .do_send(UpstreamEvent::Connected { leg: act.leg });
                    // Events on one socket are ordered: the update is in force before any audio,
                    // and a continued session has the conversation before it hears the caller.
                    let update = proto::session_update(&act.config);
                    act.send(update);
                    for line in std::mem::take(&mut act.history) {
                        let item = match line.role {
                            Role::Assistant => proto::assistant_text_item(&line.as_text()),
                            Role::Caller | Role::Dtmf | Role::Tool => {
                                proto::user_text_item(&line.as_text())
                            }
                        };
                        act.send(item);
                    }
                }
                Err(awc::error::WsClientError::InvalidResponseStatus(status)) => act.fail(
                    ctx,
                    LegFailure::HandshakeStatus {
                        status: status.as_u16(),
                    },
                ),
                Err(e) => act.fail(ctx, LegFailure::Connect(e.to_string())),
            })
            .spawn(ctx);
        ctx.run_later(timeout, |act, ctx| {
            if !act.ready && !act.done {
                let ms = act.config.connect_timeout_ms;
                act.fail(ctx, LegFailure::NotConfigured { ms });
            }
        });
        ctx.run_interval(CHECK_EVERY, |act, ctx| act.check_stall(ctx));
    }
}

impl StreamHandler<Result<Frame, WsProtocolError>> for OpenAiRealtimeActor {
    fn handle(&mut self, frame: Result<Frame, WsProtocolError>, ctx: &mut Context<Self>) {
        let max = self.config.max_frame_bytes;
        match read_frame(frame, &mut self.fragments, max, &self.label) {
            Incoming::Text(bytes) => self.on_text(&bytes, ctx),
            Incoming::Ping(p) => self.outbox.borrow_mut().push(ws::Message::Pong(p), false),
            Incoming::Nothing => {}
            Incoming::Failed(failure) => self.fail(ctx, failure),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.fail(ctx, socket_ended());
    }
}

/// Appends caller audio to the model's input buffer.
impl Handler<AudioIn> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        if !self.connected {
            CallCounters::add(&self.counters.dropped_upstream_not_ready, 1);
            return;
        }
        // invariant: the Twilio leg forwards only checked base64 (ASCII).
        let audio = std::str::from_utf8(&msg.payload).unwrap_or_default();
        let event = proto::audio_append(audio);
        self.outbox
            .borrow_mut()
            .push(ws::Message::Text(event.into()), true);
    }
}

/// Sends one control event to the session.
impl Handler<UpstreamCommand> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamCommand, _: &mut Context<Self>) {
        let event = match &msg {
            UpstreamCommand::ToolOutput {
                call_id, output, ..
            } => proto::function_call_output_item(call_id, output),
            UpstreamCommand::Digit(digit) => proto::user_text_item(&format!(
                "The caller pressed the key {digit} on the phone keypad."
            )),
            UpstreamCommand::CreateResponse { instructions } => {
                proto::response_create(instructions.as_deref())
            }
            UpstreamCommand::Cancel { response_id } => proto::response_cancel(response_id),
            UpstreamCommand::Truncate {
                item_id,
                audio_end_ms,
            } => proto::item_truncate(item_id, *audio_end_ms),
        };
        self.send(event);
    }
}

/// Uses the call SID in log lines from now on.
impl Handler<CallIdentified> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: CallIdentified, _: &mut Context<Self>) {
        self.label = msg.label;
    }
}

/// The call is over (or replaced this leg): close the socket cleanly and stop.
impl Handler<Stop> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) {
        self.done = true;
        self.twilio = None;
        if self.connected {
            // On a rollover, the caller audio still queued goes out first: every frame routed
            // here reaches this session, the ones after the switch the next one. Otherwise what
            // waits is of no use any more: only the close goes out.
            self.outbox
                .borrow_mut()
                .close(msg.reason != StopReason::Rollover);
            // The server answers with its close and the stream ends; do not wait forever.
            ctx.run_later(CLOSE_GRACE, |_, ctx| ctx.stop());
        } else {
            ctx.stop();
        }
    }
}
