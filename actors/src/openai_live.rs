//! `OpenAiLiveActor`: one GPT-Live session ("leg") for one call (`reference/gpt-live.md`).
//!
//! Lifecycle: connect (no query, `Authorization: Bearer`) → `session.start` (μ-law at 8 kHz,
//! the conversation so far as `input` for a continued session) → `session.started` → report
//! `Ready` (and when the session expires, for the rollover). Audio passes through undecoded both
//! ways, as with Realtime. What differs from Realtime stays here:
//! - the greeting (`CreateResponse` with instructions) is a `session.commentary.append`;
//! - keypad digits are collected and sent as one `session.instructions.append` when the call
//!   asks for a response (`call.dtmf_response_delay_ms` after the last digit);
//! - there is no barge-in (the model stops itself): `Cancel` and `Truncate` do nothing, and the
//!   call learns who is speaking from the transcripts (`CallerSpeaking`, and each assistant turn
//!   as a response);
//! - transcript fragments are grouped into turns ([`fragments::Turns`]);
//! - usage is the session's cumulative seconds, reported as it grows and once more at the end;
//! - ending is `session.close`, then the socket closes at `session.closed` or after
//!   `openai.live_close_timeout_ms`. The call does not wait for it.
//!
//! As with Realtime the leg never restarts itself: it reports `Closed` once and stops.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use awc::error::WsProtocolError;
use awc::ws::{self, Frame};
use bytes::{Bytes, BytesMut};
use futures_util::stream::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::ai_socket::{
    client_for, read_frame, redact, scrub, socket_ended, write_loop, Incoming, LegPort, Outbox,
};
use crate::call::LegRequest;
use crate::config::{CallConfig, OpenAiConfig};
use crate::messages::{
    AudioIn, AudioOut, CallCounters, CallIdentified, ContextLine, Role, Stop, StopReason,
    Transcript, UpstreamCommand, UpstreamEvent, UsageReport,
};
use crate::protocol::base64_audio_len;
use crate::protocol::live::{self as proto, LiveEvent};
use crate::session::fragments;
use crate::session::restart::LegFailure;

/// How often the turn gap and the stall are checked.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Digits collected for one instructions append, at most.
const MAX_DIGITS: usize = 32;
/// Error codes after which the session cannot be used.
const FATAL_CODES: &[&str] = &["invalid_api_key", "insufficient_quota"];

pub struct OpenAiLiveActor {
    call: LegPort,
    leg: u32,
    config: Arc<OpenAiConfig>,
    api_key: SecretString,
    label: Arc<str>,
    counters: Arc<CallCounters>,
    stall_timeout: Duration,
    dtmf_delay_ms: u64,
    outbox: Rc<RefCell<Outbox>>,
    twilio: Option<Recipient<AudioOut>>,
    connected: bool,
    /// `session.started` received.
    started: bool,
    /// `Closed` was reported, or the call asked us to stop: report no failure any more.
    done: bool,
    /// `session.close` sent: waiting for `session.closed`.
    closing: bool,
    /// Twilio's `start` arrived: the session may start (it is billed from then on).
    stream_started: bool,
    /// `session.start` was sent.
    start_sent: bool,
    fragments: Option<BytesMut>,
    history: Vec<ContextLine>,
    turns: fragments::Turns,
    /// Assistant turns so far (each is reported to the call as a response).
    assistant_turns: u64,
    digits: Vec<String>,
    /// The session's cumulative seconds so far.
    seconds: f64,
    /// GPT-Live's deltas have no ids: one pair for the whole session.
    ids: (Arc<str>, Arc<str>),
}

impl OpenAiLiveActor {
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
            stream_started,
        } = req;
        let max_audio = (call_config.openai_queue_ms / 20).max(1) as usize;
        let session: Arc<str> = Arc::from(format!("live-{leg}"));
        Self {
            call,
            leg,
            api_key,
            label,
            stall_timeout: Duration::from_millis(call_config.stall_timeout_ms),
            dtmf_delay_ms: call_config.dtmf_response_delay_ms,
            outbox: Rc::new(RefCell::new(Outbox::new(max_audio, counters.clone()))),
            counters,
            twilio: Some(twilio),
            connected: false,
            started: false,
            done: false,
            closing: false,
            stream_started,
            start_sent: false,
            fragments: None,
            history,
            turns: fragments::Turns::new(Duration::from_millis(config.live_turn_gap_ms)),
            assistant_turns: 0,
            digits: Vec::new(),
            seconds: 0.0,
            ids: (session.clone(), session),
            config,
        }
    }

    /// Starts the leg with a bounded mailbox.
    pub fn start_leg(self, capacity: usize) -> Addr<Self> {
        let mut ctx = Context::new();
        ctx.set_mailbox_capacity(capacity);
        ctx.run(self)
    }

    fn send(&mut self, text: String) {
        if self.connected && !self.closing {
            self.outbox
                .borrow_mut()
                .push(ws::Message::Text(text.into()), false);
        }
    }

    /// Reports the leg as gone (once) and stops.
    fn fail(&mut self, ctx: &mut Context<Self>, failure: LegFailure) {
        self.flush_turns();
        if !self.done {
            self.done = true;
            self.report_seconds(true);
            let failure = scrub(failure, self.api_key.expose_secret());
            self.call.events.do_send(UpstreamEvent::Closed {
                leg: self.leg,
                failure,
            });
        }
        ctx.stop();
    }

    fn report_seconds(&self, last: bool) {
        if self.started {
            self.call
                .events
                .do_send(UpstreamEvent::Usage(UsageReport::Seconds {
                    leg: self.leg,
                    seconds: self.seconds,
                    last,
                }));
        }
    }

    /// A transcript turn closed (to the call's transcript) or opened: the call learns who
    /// speaks. Assistant turns are the call's responses; caller turns its speech (no barge-in).
    fn on_turn_change(&mut self, before: Option<Role>, closed: Option<(Role, String)>) {
        let now = self.turns.speaking();
        let ended = match &closed {
            Some((role, _)) => Some(*role),
            None => before.filter(|b| Some(*b) != now),
        };
        let began = now.filter(|n| Some(*n) != before || closed.is_some());
        if let Some((role, text)) = closed {
            self.call.transcripts.do_send(Transcript {
                role,
                text,
                item_id: None,
                partial: false,
            });
        }
        match ended {
            Some(Role::Assistant) => self.call.events.do_send(UpstreamEvent::ResponseDone {
                response_id: format!("live-turn-{}", self.assistant_turns),
                status: "completed".into(),
            }),
            Some(Role::Caller) if began != Some(Role::Caller) => self
                .call
                .events
                .do_send(UpstreamEvent::CallerSpeaking(false)),
            _ => {}
        }
        match began {
            Some(Role::Assistant) => {
                self.assistant_turns += 1;
                self.call.events.do_send(UpstreamEvent::ResponseCreated {
                    response_id: format!("live-turn-{}", self.assistant_turns),
                });
            }
            Some(Role::Caller) if ended != Some(Role::Caller) => self
                .call
                .events
                .do_send(UpstreamEvent::CallerSpeaking(true)),
            _ => {}
        }
    }

    fn fragment(&mut self, role: Role, delta: &str) {
        let before = self.turns.speaking();
        let closed = self.turns.fragment(role, delta, Instant::now());
        self.on_turn_change(before, closed);
        // The turn so far, for the live events (one per fragment, never per audio frame).
        if let Some((role, text)) = self.turns.open_text() {
            self.call.transcripts.do_send(Transcript {
                role,
                text: text.to_owned(),
                item_id: None,
                partial: true,
            });
        }
    }

    fn flush_turns(&mut self) {
        let before = self.turns.speaking();
        let closed = self.turns.flush();
        self.on_turn_change(before, closed);
    }

    /// Sends `session.start` once connected and once Twilio's stream has started; the session
    /// must then start within `openai.connect_timeout_ms`.
    fn start_session(&mut self, ctx: &mut Context<Self>) {
        if !self.connected || !self.stream_started || self.start_sent || self.done {
            return;
        }
        self.start_sent = true;
        let history = std::mem::take(&mut self.history);
        let start = proto::session_start(&self.config, &history);
        self.send(start);
        ctx.run_later(
            Duration::from_millis(self.config.connect_timeout_ms),
            |act, ctx| {
                if !act.started && !act.done {
                    let ms = act.config.connect_timeout_ms;
                    act.fail(ctx, LegFailure::NotConfigured { ms });
                }
            },
        );
    }

    fn send_digits(&mut self) {
        if self.digits.is_empty() {
            return;
        }
        let digits = std::mem::take(&mut self.digits);
        self.send(proto::instructions_append(&proto::digits_text(&digits)));
    }

    fn on_text(&mut self, frame: &Bytes, ctx: &mut Context<Self>) {
        let Ok(text) = std::str::from_utf8(frame) else {
            log::warn!("{} non-UTF-8 text from OpenAI", self.label);
            return;
        };
        let event = match proto::parse_server_event(text) {
            Ok(event) => event,
            Err(e) => {
                log::warn!("{} unreadable event from GPT-Live: {e}", self.label);
                self.error("unreadable_event", e.to_string());
                return;
            }
        };
        match event {
            LiveEvent::AudioDelta { delta } => {
                let Some(bytes) = base64_audio_len(&delta) else {
                    self.error(
                        "bad_audio_delta",
                        format!("audio delta is not base64 ({} chars)", delta.len()),
                    );
                    return;
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
                    response_id: self.ids.0.clone(),
                    item_id: self.ids.1.clone(),
                };
                if let Err(SendError::Full(_)) = twilio.try_send(audio) {
                    CallCounters::add(&self.counters.dropped_twilio_backpressure, 1);
                }
            }
            LiveEvent::InputTranscript { delta } => self.fragment(Role::Caller, &delta),
            LiveEvent::OutputTranscript { delta } => self.fragment(Role::Assistant, &delta),
            LiveEvent::Usage { seconds } => {
                self.seconds = self.seconds.max(seconds);
                self.report_seconds(false);
            }
            LiveEvent::Started { id, expires_at } => {
                if self.started {
                    return;
                }
                self.started = true;
                log::info!("{} GPT-Live session {id} started", self.label);
                if let Some(at) = expires_at {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    self.call.events.do_send(UpstreamEvent::Expires {
                        leg: self.leg,
                        in_s: at.saturating_sub(now).max(0) as u64,
                    });
                }
                self.call
                    .events
                    .do_send(UpstreamEvent::Ready { leg: self.leg });
            }
            LiveEvent::Closed { reason, seconds } => {
                if let Some(seconds) = seconds {
                    self.seconds = self.seconds.max(seconds);
                }
                if self.closing {
                    // The end we asked for: its final usage, then the socket.
                    self.flush_turns();
                    self.report_seconds(true);
                    self.started = false; // reported
                    self.outbox.borrow_mut().close(true);
                    ctx.stop();
                    return;
                }
                // Ended by the server: `LegFailure::class` says what the reason means (§12).
                log::info!(
                    "{} GPT-Live ended the session ({reason}, {:?})",
                    self.label,
                    proto::close_meaning(&reason)
                );
                self.fail(ctx, LegFailure::SessionEnded { reason });
            }
            LiveEvent::Error {
                code,
                message,
                client_event_id,
            } => {
                let code = code.unwrap_or_else(|| "unknown".into());
                let message = redact(&message, self.api_key.expose_secret());
                if !self.started
                    || client_event_id.as_deref() == Some(proto::SESSION_START_EVENT_ID)
                {
                    // An error before `session.started`: the session will not start, and the
                    // same configuration would fail the same way.
                    self.fail(
                        ctx,
                        LegFailure::SessionRejected(format!("{code}: {message}")),
                    );
                } else if FATAL_CODES.contains(&code.as_str()) {
                    self.fail(ctx, LegFailure::Fatal { code, message });
                } else if !self.closing {
                    self.call
                        .events
                        .do_send(UpstreamEvent::Error { code, message });
                }
            }
            LiveEvent::Delegation { id, target } => {
                if target == "client" {
                    // No backend answers client delegations here: say so, or the model would
                    // hold the conversation waiting (§9.1).
                    log::info!("{} GPT-Live delegated {id} to us: declined", self.label);
                    self.send(proto::decline_delegation(&id));
                } else {
                    log::debug!("{} GPT-Live delegation {id} to {target}", self.label);
                }
            }
            LiveEvent::FunctionCall {
                call_id,
                name,
                arguments,
                status,
            } => {
                if status == "completed" {
                    self.call.events.do_send(UpstreamEvent::ToolCall {
                        call_id,
                        name,
                        arguments,
                    });
                } else {
                    // Cut short: not to be run, and an output for it would be refused.
                    log::info!(
                        "{} GPT-Live function call {name} ({call_id}) {status}: not run",
                        self.label
                    );
                }
            }
            LiveEvent::DelegationDone {
                status,
                input_tokens,
                cached_tokens,
                output_tokens,
            } => {
                log::debug!(
                    "{} GPT-Live delegated response {status}: {input_tokens} input tokens \
                     ({cached_tokens} cached), {output_tokens} output",
                    self.label
                );
                self.call
                    .events
                    .do_send(UpstreamEvent::Usage(UsageReport::Delegated {
                        model: self.config.live_delegation_model.clone(),
                        input_tokens,
                        cached_tokens,
                        output_tokens,
                    }));
            }
            LiveEvent::Other { kind } => log::trace!("{} GPT-Live event {kind}", self.label),
        }
    }

    fn error(&self, code: &str, message: String) {
        self.call.events.do_send(UpstreamEvent::Error {
            code: code.into(),
            message,
        });
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let before = self.turns.speaking();
        let closed = self.turns.tick(Instant::now());
        if closed.is_some() {
            self.on_turn_change(before, closed);
        }
        let blocked = self.outbox.borrow().blocked_since();
        if !self.closing && blocked.is_some_and(|since| since.elapsed() >= self.stall_timeout) {
            let ms = self.stall_timeout.as_millis() as u64;
            log::warn!(
                "{} GPT-Live socket accepted nothing for {ms} ms: leg failed",
                self.label
            );
            self.fail(ctx, LegFailure::Stalled { ms });
        }
    }
}

impl Actor for OpenAiLiveActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let request = client_for(timeout)
            .ws(self.config.live_url.as_str())
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
                    act.start_session(ctx);
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
            if !act.connected && !act.done {
                let ms = act.config.connect_timeout_ms;
                act.fail(ctx, LegFailure::NotConfigured { ms });
            }
        });
        ctx.run_interval(CHECK_EVERY, |act, ctx| act.check(ctx));
    }
}

impl StreamHandler<Result<Frame, WsProtocolError>> for OpenAiLiveActor {
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

/// Caller audio, passed through.
impl Handler<AudioIn> for OpenAiLiveActor {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        if !self.started || self.closing {
            CallCounters::add(&self.counters.dropped_upstream_not_ready, 1);
            return;
        }
        // invariant: the Twilio leg forwards only checked base64 (ASCII).
        let audio = std::str::from_utf8(&msg.payload).unwrap_or_default();
        self.outbox
            .borrow_mut()
            .push(ws::Message::Text(proto::audio_append(audio).into()), true);
    }
}

/// The call's commands, in GPT-Live's terms.
impl Handler<UpstreamCommand> for OpenAiLiveActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamCommand, _: &mut Context<Self>) {
        match msg {
            UpstreamCommand::Digit(digit) => {
                if self.digits.len() >= MAX_DIGITS {
                    self.digits.remove(0);
                }
                self.digits.push(digit);
                if self.dtmf_delay_ms == 0 {
                    self.send_digits(); // no quiet time to wait for: each digit at once
                }
            }
            UpstreamCommand::CreateResponse {
                instructions: Some(greeting),
            } => self.send(proto::commentary_append(&greeting)),
            // The model answers on its own; what it is owed is the digits pressed.
            UpstreamCommand::CreateResponse { instructions: None } => self.send_digits(),
            // The delegated backend gets the output and, unless the call is ending, goes on at
            // once (as Twilio's provider does); the live model keeps talking meanwhile.
            UpstreamCommand::ToolOutput {
                call_id,
                output,
                respond,
            } => {
                self.send(proto::function_call_output(&call_id, &output));
                if respond {
                    self.send(proto::response_create());
                }
            }
            UpstreamCommand::Cancel { .. } | UpstreamCommand::Truncate { .. } => {
                log::debug!("{} GPT-Live: {msg:?} has no equivalent", self.label)
            }
        }
    }
}

impl Handler<CallIdentified> for OpenAiLiveActor {
    type Result = ();

    fn handle(&mut self, msg: CallIdentified, ctx: &mut Context<Self>) {
        self.label = msg.label;
        // The call is identified at Twilio's `start`, after its stream token was checked.
        self.stream_started = true;
        self.start_session(ctx);
    }
}

/// The call is over (or a newer session took over): `session.close`, then the socket closes at
/// `session.closed` or after `openai.live_close_timeout_ms`, with the final usage reported.
impl Handler<Stop> for OpenAiLiveActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) {
        self.done = true;
        self.twilio = None;
        if !self.connected {
            ctx.stop();
            return;
        }
        if !self.started {
            // No session to finalize.
            self.outbox.borrow_mut().close(true);
            ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
            return;
        }
        {
            let mut outbox = self.outbox.borrow_mut();
            if msg.reason != StopReason::Rollover {
                // Caller audio still queued is of no use any more; on a rollover it goes first.
                outbox.drop_audio();
            }
            outbox.push(ws::Message::Text(proto::session_close().into()), false);
        }
        self.closing = true;
        let wait = Duration::from_millis(self.config.live_close_timeout_ms);
        ctx.run_later(wait, |act, ctx| {
            log::warn!(
                "{} GPT-Live: no session.closed within {} ms; closing the socket (final usage unconfirmed)",
                act.label,
                act.config.live_close_timeout_ms
            );
            act.flush_turns();
            act.report_seconds(true);
            act.started = false;
            act.outbox.borrow_mut().close(true);
            ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
        });
    }
}
