//! `CallActor`: one per call. It owns the call's state, supervises its two legs and routes typed
//! messages between them.
//!
//! - The Twilio leg (`TwilioStreamActor`) is started with the call and ends it: when Twilio says
//!   `stop` or its socket closes, the AI leg is closed and the call leaves the registry.
//! - The AI leg (`OpenAiRealtimeActor`, or `EchoUpstream`) is the supervised part. It is opened as
//!   soon as the media stream connects (before `start`, to save the connect time on the first
//!   turn). When it fails the call keeps the caller connected, restarts it after a backoff, sends
//!   `session.update` again (the leg does), replays the transcript as context, and audio flows
//!   again. When the restart budget is spent, the call ends cleanly.
//! - All call logic (buffers, marks, barge-in) is in [`CallSession`]; this actor feeds it events
//!   and performs the actions it returns.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::UpstreamKind;
use crate::echo::EchoUpstream;
use crate::engine::Engine;
use crate::messages::{
    AudioIn, AudioOut, CallIdentified, ClearAudio, Dtmf, GetSnapshot, MalformedFrame, MarkEchoed,
    PlayAudio, Role, Stop, StopReason, StreamStarted, Transcript, UpstreamCommand, UpstreamEvent,
};
use crate::openai_realtime::OpenAiRealtimeActor;
use crate::registry::{CallSnapshot, DroppedFrames, Register, TranscriptEntry, Unregister};
use crate::session::{Action, CallSession, Event, SessionConfig, BYTES_PER_MS};
use crate::twilio_stream::TwilioStreamActor;

/// A leg that stayed up this long has proven the upstream healthy again: its failure starts a
/// fresh restart budget. Shorter-lived legs count against the budget, so an upstream that accepts
/// and then fails every session cannot keep a call in a restart loop.
const STABLE_LEG: Duration = Duration::from_secs(30);

/// After a barge-in, time for the server to cancel the interrupted response itself (it does so
/// right after `speech_started` when `interrupt_response` is on) before we send `response.cancel`.
const CANCEL_GRACE_MS: u64 = 250;

/// The transcript entries replayed into a new session after a restart (the most recent ones).
const REPLAY_ENTRIES: usize = 50;

/// The AI leg as the call sees it: recipients, so OpenAI and echo legs are interchangeable.
struct UpstreamLeg {
    audio: Recipient<AudioIn>,
    control: Recipient<UpstreamCommand>,
    stop: Recipient<Stop>,
    ident: Recipient<CallIdentified>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegState {
    Connecting,
    Ready,
    Restarting,
}

pub struct CallActor {
    engine: Engine,
    /// Unique per media stream in this process (tells registrations of a reused SID apart).
    instance: u64,
    twilio: Addr<TwilioStreamActor>,
    /// `[CA…]` once `start` names the call; `[conn-N]` before.
    label: Arc<str>,
    session: CallSession,
    /// Reused for every event, so the audio path allocates no action vector.
    actions: Vec<Action>,
    /// Frames actually handed to each leg, for the log lines (the session's counters run ahead
    /// of these while a batch of held audio is being flushed).
    performed_in: u64,
    performed_out: u64,

    leg: Option<UpstreamLeg>,
    /// Number of the current (or next) leg; reports from older legs are ignored.
    leg_no: u32,
    leg_state: LegState,
    ready_since: Option<Instant>,
    /// Failed legs since the last stable one; compared with `openai.max_restarts`.
    consecutive_failures: u32,
    restarts: u32,
    upstream_errors: u64,
    malformed_frames: u64,

    call_sid: String,
    stream_sid: String,
    from: String,
    to: String,
    started_at: OffsetDateTime,
    started: Instant,
    transcript: VecDeque<TranscriptEntry>,
    /// Transcript entries the last ready session had seen; a restart replays these. Digits pressed
    /// during the outage reach the new session through the session's held text instead.
    replay_upto: usize,
    registered: bool,
    ending: bool,
}

impl CallActor {
    pub fn new(engine: Engine, instance: u64, twilio: Addr<TwilioStreamActor>) -> Self {
        let call_cfg = engine.call_config();
        let session = CallSession::new(SessionConfig {
            pre_start_buffer_bytes: call_cfg.pre_start_buffer_ms * BYTES_PER_MS,
            upstream_buffer_bytes: call_cfg.upstream_buffer_ms * BYTES_PER_MS,
            greeting: Some(engine.openai_config().greeting.clone()).filter(|g| !g.is_empty()),
            dtmf_response_delay_ms: call_cfg.dtmf_response_delay_ms,
            track_playback: engine.upstream() == UpstreamKind::OpenAi,
            mark_interval_bytes: call_cfg.mark_interval_ms * BYTES_PER_MS,
            cancel_grace_ms: CANCEL_GRACE_MS,
            fill_gaps_max_ms: call_cfg.fill_gaps_max_ms,
        });
        Self {
            instance,
            twilio,
            label: Arc::from(format!("[conn-{instance}]")),
            session,
            actions: Vec::with_capacity(8),
            performed_in: 0,
            performed_out: 0,
            leg: None,
            leg_no: 0,
            leg_state: LegState::Connecting,
            ready_since: None,
            consecutive_failures: 0,
            restarts: 0,
            upstream_errors: 0,
            malformed_frames: 0,
            call_sid: String::new(),
            stream_sid: String::new(),
            from: String::new(),
            to: String::new(),
            started_at: OffsetDateTime::now_utc(),
            started: Instant::now(),
            transcript: VecDeque::new(),
            replay_upto: 0,
            registered: false,
            ending: false,
            engine,
        }
    }

    /// Feeds one event to the session and performs what it asks for.
    fn apply(&mut self, event: Event, ctx: &mut Context<Self>) {
        let mut actions = std::mem::take(&mut self.actions);
        self.session.on_event(event, &mut actions);
        for action in actions.drain(..) {
            self.perform(action, ctx);
        }
        self.actions = actions;
    }

    fn perform(&mut self, action: Action, ctx: &mut Context<Self>) {
        match action {
            Action::TwilioMedia { payload, mark } => {
                self.twilio.do_send(PlayAudio { payload, mark });
                self.performed_out += 1;
                if self.performed_out == 1 {
                    log::info!("{} first audio frame to the caller", self.label);
                }
                self.log_frame_counts(self.performed_out);
            }
            Action::TwilioMark { name } => self.twilio.do_send(PlayAudio {
                payload: String::new(),
                mark: Some(name),
            }),
            Action::TwilioClear => self.twilio.do_send(ClearAudio),
            Action::UpstreamAudio { payload, bytes } => {
                if let Some(leg) = &self.leg {
                    leg.audio.do_send(AudioIn {
                        payload,
                        bytes,
                        timestamp_ms: None,
                    });
                }
                self.performed_in += 1;
                if self.performed_in == 1 {
                    log::info!("{} first audio frame from the caller", self.label);
                }
                self.log_frame_counts(self.performed_in);
            }
            Action::UpstreamUserText { text } => self.control(UpstreamCommand::UserText(text)),
            Action::UpstreamCreateResponse { instructions } => {
                self.control(UpstreamCommand::CreateResponse { instructions })
            }
            Action::UpstreamCancel { response_id } => {
                self.control(UpstreamCommand::Cancel { response_id })
            }
            Action::UpstreamTruncate {
                item_id,
                audio_end_ms,
            } => self.control(UpstreamCommand::Truncate {
                item_id,
                audio_end_ms,
            }),
            Action::ScheduleDtmfQuiet {
                generation,
                delay_ms,
            } => {
                ctx.run_later(Duration::from_millis(delay_ms), move |act, ctx| {
                    act.apply(Event::DtmfQuiet { generation }, ctx)
                });
            }
            Action::ScheduleCancelCheck {
                response_id,
                delay_ms,
            } => {
                ctx.run_later(Duration::from_millis(delay_ms), move |act, ctx| {
                    act.apply(Event::CancelCheck { response_id }, ctx)
                });
            }
            Action::BargedIn {
                cleared,
                truncated_ms,
                interrupted_response,
            } => {
                let truncated = match truncated_ms {
                    Some(ms) => format!("assistant item cut at {ms} ms"),
                    None => "nothing to truncate".into(),
                };
                log::info!(
                    "{} barge-in #{}: caller spoke over the assistant; {}{}, {}",
                    self.label,
                    self.session.stats.barge_ins,
                    if cleared {
                        "Twilio buffer cleared"
                    } else {
                        "nothing queued"
                    },
                    if interrupted_response {
                        ", response interrupted"
                    } else {
                        ""
                    },
                    truncated
                );
            }
        }
    }

    fn control(&self, command: UpstreamCommand) {
        match &self.leg {
            Some(leg) => leg.control.do_send(command),
            None => log::debug!("{} no AI leg for {command:?}", self.label),
        }
    }

    fn log_frame_counts(&self, count: u64) {
        let every = self.engine.call_config().frame_log_interval;
        if every > 0 && count % every == 0 {
            let stats = &self.session.stats;
            log::info!(
                "{} frames in={} out={} barge_ins={}",
                self.label,
                stats.frames_in,
                stats.frames_out,
                stats.barge_ins
            );
        }
    }

    /// Opens a new AI leg (the first, or a restart).
    fn start_leg(&mut self, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        let call = ctx.address();
        let leg_no = self.leg_no;
        let leg = match self.engine.upstream() {
            UpstreamKind::OpenAi => {
                // invariant: the engine refuses to build in OpenAI mode without a key.
                let key = self.engine.api_key().expect("OpenAI mode has a key");
                let addr = OpenAiRealtimeActor::new(
                    call,
                    leg_no,
                    self.engine.openai_config_arc(),
                    key,
                    self.label.clone(),
                )
                .start();
                UpstreamLeg {
                    audio: addr.clone().recipient(),
                    control: addr.clone().recipient(),
                    stop: addr.clone().recipient(),
                    ident: addr.recipient(),
                }
            }
            UpstreamKind::Echo => {
                let addr = EchoUpstream::new(call, leg_no).start();
                UpstreamLeg {
                    audio: addr.clone().recipient(),
                    control: addr.clone().recipient(),
                    stop: addr.clone().recipient(),
                    ident: addr.recipient(),
                }
            }
        };
        self.leg = Some(leg);
    }

    fn on_leg_closed(&mut self, reason: String, ctx: &mut Context<Self>) {
        self.leg = None;
        self.apply(Event::UpstreamLost, ctx);
        if let Some(ready_since) = self.ready_since.take() {
            self.replay_upto = self.transcript.len();
            if ready_since.elapsed() >= STABLE_LEG {
                self.consecutive_failures = 0;
            }
        }
        let budget = self.engine.openai_config().max_restarts;
        if self.consecutive_failures >= budget {
            log::error!(
                "{} AI leg lost: {reason}; restart budget spent ({budget} restarts), ending the call",
                self.label
            );
            self.end_call(
                StopReason::UpstreamFailed(format!(
                    "{reason} (after {} consecutive failed restarts)",
                    self.consecutive_failures
                )),
                ctx,
            );
            return;
        }
        self.consecutive_failures += 1;
        self.restarts += 1;
        self.leg_no += 1;
        self.leg_state = LegState::Restarting;
        let delay = self
            .engine
            .openai_config()
            .restart_delay_ms(self.consecutive_failures);
        log::warn!(
            "{} AI leg lost: {reason}; restarting in {delay} ms (attempt {} of {budget}); the caller stays connected",
            self.label,
            self.consecutive_failures
        );
        ctx.run_later(Duration::from_millis(delay), |act, ctx| act.start_leg(ctx));
    }

    /// Replays the conversation so far into a fresh session, so the assistant keeps its context.
    fn replay_transcript(&self) {
        let Some(leg) = &self.leg else { return };
        let known = self.replay_upto.min(self.transcript.len());
        let skip = known.saturating_sub(REPLAY_ENTRIES);
        for entry in self.transcript.iter().take(known).skip(skip) {
            let command = match entry.role {
                Role::Assistant => UpstreamCommand::AssistantText(entry.text.clone()),
                Role::Caller => UpstreamCommand::UserText(entry.text.clone()),
                Role::Dtmf => UpstreamCommand::UserText(format!(
                    "The caller pressed the key {} on the phone keypad.",
                    entry.text
                )),
            };
            leg.control.do_send(command);
        }
    }

    fn record(&mut self, role: Role, text: String) {
        let max = self.engine.call_config().transcript_max_entries;
        while self.transcript.len() >= max {
            self.transcript.pop_front();
            self.replay_upto = self.replay_upto.saturating_sub(1);
        }
        self.transcript.push_back(TranscriptEntry {
            role,
            text,
            at: now_rfc3339(),
        });
    }

    fn end_call(&mut self, reason: StopReason, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.ending = true;
        let stats = &self.session.stats;
        log::info!(
            "{} call ended: {reason}; {} ms, frames in={} out={}, barge_ins={}, upstream_restarts={}, malformed={}, dropped={}",
            self.label,
            self.started.elapsed().as_millis(),
            stats.frames_in,
            stats.frames_out,
            stats.barge_ins,
            self.restarts,
            self.malformed_frames,
            stats.dropped_pre_start + stats.dropped_upstream + stats.dropped_interrupted,
        );
        if let Some(leg) = self.leg.take() {
            leg.stop.do_send(Stop {
                reason: reason.clone(),
            });
        }
        if !matches!(reason, StopReason::TwilioStop | StopReason::TwilioClosed(_)) {
            self.twilio.do_send(Stop { reason });
        }
        ctx.stop();
    }

    fn snapshot(&self, with_transcript: bool) -> CallSnapshot {
        let stats = &self.session.stats;
        CallSnapshot {
            call_sid: self.call_sid.clone(),
            stream_sid: self.stream_sid.clone(),
            state: match (self.ending, self.leg_state) {
                (true, _) => "ending",
                (false, LegState::Ready) => "active",
                (false, LegState::Connecting) => "connecting",
                (false, LegState::Restarting) => "reconnecting",
            },
            started_at: self.started_at.format(&Rfc3339).unwrap_or_default(),
            duration_ms: self.started.elapsed().as_millis() as u64,
            from: self.from.clone(),
            to: self.to.clone(),
            upstream: self.engine.upstream().as_str(),
            upstream_state: match self.leg_state {
                LegState::Connecting => "connecting",
                LegState::Ready => "ready",
                LegState::Restarting => "restarting",
            },
            frames_in: stats.frames_in,
            frames_out: stats.frames_out,
            barge_ins: stats.barge_ins,
            upstream_restarts: self.restarts,
            upstream_errors: self.upstream_errors,
            malformed_frames: self.malformed_frames,
            marks_pending: self.session.marks_pending(),
            dropped_frames: DroppedFrames {
                pre_start: stats.dropped_pre_start,
                upstream_not_ready: stats.dropped_upstream,
                interrupted: stats.dropped_interrupted,
            },
            silence_filled_ms: stats.silence_filled_ms,
            transcript: with_transcript.then(|| self.transcript.iter().cloned().collect()),
        }
    }

    fn redact_number<'a>(&self, number: &'a str) -> std::borrow::Cow<'a, str> {
        if self.engine.call_config().redact_numbers_in_logs {
            std::borrow::Cow::Owned(redact_number(number))
        } else {
            std::borrow::Cow::Borrowed(number)
        }
    }
}

impl Actor for CallActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::debug!("{} media stream connected", self.label);
        self.start_leg(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if self.registered {
            self.engine.registry().do_send(Unregister {
                call_sid: self.call_sid.clone(),
                instance: self.instance,
            });
        }
        // A call stopped without `end_call` (its runtime shutting down) still closes its AI leg.
        if let Some(leg) = self.leg.take() {
            leg.stop.do_send(Stop {
                reason: StopReason::Shutdown,
            });
        }
    }
}

/// Twilio's `start`: the call has a SID, audio can go out.
impl Handler<StreamStarted> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: StreamStarted, ctx: &mut Context<Self>) {
        let start = msg.start;
        let param = |name: &str| {
            start
                .custom_parameters
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        self.from = param("From");
        self.to = param("To");
        self.call_sid = start.call_sid.clone();
        self.stream_sid = start.stream_sid.clone();
        let earlier =
            std::mem::replace(&mut self.label, Arc::from(format!("[{}]", start.call_sid)));
        log::info!(
            "{} stream started (was {earlier} until now): stream {}, from {}, to {}, upstream {}",
            self.label,
            self.stream_sid,
            self.redact_number(&self.from),
            self.redact_number(&self.to),
            self.engine.upstream().as_str()
        );
        self.twilio.do_send(CallIdentified {
            label: self.label.clone(),
        });
        if let Some(leg) = &self.leg {
            leg.ident.do_send(CallIdentified {
                label: self.label.clone(),
            });
        }
        self.engine.registry().do_send(Register {
            call_sid: self.call_sid.clone(),
            instance: self.instance,
            snapshot: ctx.address().recipient(),
        });
        self.registered = true;
        self.apply(Event::TwilioStarted, ctx);
    }
}

/// Caller audio from Twilio.
impl Handler<AudioIn> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, ctx: &mut Context<Self>) {
        self.apply(
            Event::CallerAudio {
                payload: msg.payload,
                bytes: msg.bytes,
                timestamp_ms: msg.timestamp_ms,
            },
            ctx,
        );
    }
}

/// Assistant audio from the AI leg.
impl Handler<AudioOut> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: AudioOut, ctx: &mut Context<Self>) {
        self.apply(
            Event::AssistantAudio {
                response_id: msg.response_id,
                item_id: msg.item_id,
                payload: msg.payload,
                bytes: msg.bytes,
            },
            ctx,
        );
    }
}

/// Twilio played (or flushed) the audio before a mark.
impl Handler<MarkEchoed> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: MarkEchoed, ctx: &mut Context<Self>) {
        self.apply(Event::MarkEchoed { name: msg.name }, ctx);
    }
}

/// A keypad digit: into the record and to the model.
impl Handler<Dtmf> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Dtmf, ctx: &mut Context<Self>) {
        log::info!("{} dtmf: {}", self.label, msg.digit);
        self.record(Role::Dtmf, msg.digit.clone());
        self.apply(Event::Dtmf { digit: msg.digit }, ctx);
    }
}

/// A frame from Twilio was rejected (the stream actor logged it).
impl Handler<MalformedFrame> for CallActor {
    type Result = ();

    fn handle(&mut self, _: MalformedFrame, _: &mut Context<Self>) {
        self.malformed_frames += 1;
    }
}

/// A transcript line from the AI leg.
impl Handler<Transcript> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Transcript, _: &mut Context<Self>) {
        if self.engine.call_config().log_transcripts {
            log::info!("{} {}: {}", self.label, msg.role.as_str(), msg.text);
        }
        self.record(msg.role, msg.text);
    }
}

/// What happened in the AI session.
impl Handler<UpstreamEvent> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamEvent, ctx: &mut Context<Self>) {
        match msg {
            UpstreamEvent::Connected { leg } if leg == self.leg_no => {
                if self.engine.upstream() == UpstreamKind::OpenAi {
                    log::info!("{} connected to OpenAI (leg {leg})", self.label);
                }
            }
            UpstreamEvent::Ready { leg } if leg == self.leg_no => {
                self.leg_state = LegState::Ready;
                self.ready_since = Some(Instant::now());
                if leg == 0 {
                    log::info!(
                        "{} session configured ({}), audio can flow",
                        self.label,
                        self.engine.upstream().as_str()
                    );
                } else {
                    log::info!(
                        "{} AI leg restarted (restart {}), session configured, audio flowing again",
                        self.label,
                        self.restarts
                    );
                    if self.engine.openai_config().replay_transcript_on_restart {
                        self.replay_transcript();
                    }
                }
                self.apply(Event::UpstreamReady, ctx);
            }
            UpstreamEvent::Closed { leg, reason } if leg == self.leg_no && !self.ending => {
                self.on_leg_closed(reason, ctx)
            }
            UpstreamEvent::SpeechStarted => self.apply(Event::SpeechStarted, ctx),
            UpstreamEvent::ResponseCreated { response_id } => {
                self.apply(Event::ResponseCreated { response_id }, ctx)
            }
            UpstreamEvent::ResponseDone {
                response_id,
                status,
            } => {
                log::debug!("{} response {response_id} {status}", self.label);
                self.apply(Event::ResponseDone { response_id }, ctx)
            }
            UpstreamEvent::Error { code, message } => {
                self.upstream_errors += 1;
                log::warn!("{} OpenAI error {code}: {message}", self.label);
            }
            UpstreamEvent::Connected { .. }
            | UpstreamEvent::Ready { .. }
            | UpstreamEvent::Closed { .. } => {
                log::debug!("{} report from a replaced AI leg ignored", self.label)
            }
        }
    }
}

/// End the call (from the Twilio leg, or the shell on shutdown).
impl Handler<Stop> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) {
        self.end_call(msg.reason, ctx);
    }
}

/// The registry asks for `/calls`.
impl Handler<GetSnapshot> for CallActor {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, msg: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot(msg.with_transcript))
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// `+14155550123` → `+1415***0123`: enough to tell calls apart in a log, not enough to dial.
pub fn redact_number(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() <= 6 {
        return "***".into();
    }
    let head: String = chars[..chars.len().min(5)].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    if chars.len() <= 9 {
        return format!("***{tail}");
    }
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_number;

    #[test]
    fn numbers_are_masked_in_the_middle() {
        assert_eq!(redact_number("+14155550123"), "+1415***0123");
        assert_eq!(redact_number("12345"), "***");
        assert_eq!(redact_number("+4412345"), "***2345");
        assert_eq!(redact_number(""), "***");
    }
}
