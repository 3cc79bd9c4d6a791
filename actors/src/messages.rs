//! Every message that crosses actors, named as the design names them. Each says
//! "sender → receiver: meaning". Actor-private messages (timer ticks) stay in the actor's file.
//!
//! Two planes:
//! - **Audio** (`AudioIn`, `AudioOut`) goes leg to leg, 50 times a second per call, with
//!   `try_send` on a `Recipient` the `CallActor` handed out: to the Twilio leg with
//!   [`RouteCallerAudio`] when an AI session is ready (taken back when it is lost), and to each AI
//!   leg when it is created (assistant audio only ever comes from a live session). `try_send` respects the receiver's mailbox capacity (set when
//!   each leg starts); when it is full the frame is dropped and counted in [`CallCounters`],
//!   never queued without bound. Payloads are `Bytes` slices of the frame they arrived in.
//! - **Control** (everything else) goes through the `CallActor`, which makes every decision.
//!   Control messages are rare (a few per turn) and go with `do_send`, or `send` where the answer
//!   matters ([`ClearAudio`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use serde::Serialize;

use crate::registry::CallSnapshot;
use crate::session::restart::LegFailure;

/// TwilioStreamActor → AI leg: a chunk of caller audio, base64 μ-law, checked canonical.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AudioIn {
    /// Base64 text: a slice of the Twilio frame it came in (or 20 ms of silence).
    pub payload: Bytes,
    /// Bytes of audio in `payload`.
    pub bytes: u32,
}

/// AI leg → TwilioStreamActor: a chunk of assistant audio, base64 μ-law, checked canonical.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AudioOut {
    /// Base64 text: a slice of the OpenAI frame it came in.
    pub payload: Bytes,
    /// Bytes of audio in `payload`.
    pub bytes: u32,
    /// The response and item the audio belongs to (barge-in truncates by item).
    pub response_id: Arc<str>,
    pub item_id: Arc<str>,
}

/// Who said a transcript line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Caller,
    Assistant,
    /// A keypad digit.
    Dtmf,
    /// A tool call and its outcome.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Caller => "caller",
            Role::Assistant => "assistant",
            Role::Dtmf => "dtmf",
            Role::Tool => "tool",
        }
    }
}

/// AI leg → CallActor: a line of the conversation as text.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Transcript {
    pub role: Role,
    pub text: String,
    /// For the assistant: the item it belongs to (a barge-in says how much of it was heard).
    pub item_id: Option<String>,
    /// A turn still being spoken (GPT-Live: the fragments so far): for the live events only,
    /// not the transcript.
    pub partial: bool,
}

/// Why a call or a leg stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Twilio sent `stop`: the call ended.
    TwilioStop,
    /// The Twilio socket closed without `stop`.
    TwilioClosed(String),
    /// The Twilio socket accepted nothing for `call.stall_timeout_ms` while audio waited.
    TwilioStalled { ms: u64 },
    /// The media stream connected but Twilio never sent `start`.
    NoStart { ms: u64 },
    /// The stream's `start` did not carry the stream token `/voice` issued for its `callSid`.
    BadStreamToken,
    /// The AI leg failed more often than the restart budget allows.
    UpstreamFailed(String),
    /// The AI leg failed in a way no retry can mend (key, quota, configuration).
    UpstreamRefused(String),
    /// The breaker is open: OpenAI was not tried for this call.
    BreakerOpen(String),
    /// The service is shutting down.
    Shutdown,
    /// To an AI leg only: a newer session has taken over this call (a rollover). Send what is
    /// queued, then close.
    Rollover,
    /// callbridge ended the call through Twilio's REST API (an operator or the model asked).
    HungUp,
    /// callbridge transferred the call through Twilio's REST API (`<Dial>`).
    Transferred,
}

impl StopReason {
    /// A short, stable name for `/calls` and the end-of-call log line.
    pub fn code(&self) -> &'static str {
        match self {
            StopReason::TwilioStop => "twilio_stop",
            StopReason::TwilioClosed(_) => "twilio_closed",
            StopReason::TwilioStalled { .. } => "twilio_stalled",
            StopReason::NoStart { .. } => "no_start",
            StopReason::BadStreamToken => "bad_stream_token",
            StopReason::UpstreamFailed(_) => "upstream_failed",
            StopReason::UpstreamRefused(_) => "upstream_refused",
            StopReason::BreakerOpen(_) => "breaker_open",
            StopReason::Shutdown => "shutdown",
            StopReason::Rollover => "rollover",
            StopReason::HungUp => "hung_up",
            StopReason::Transferred => "transferred",
        }
    }

    /// Whether the Twilio socket is already gone (nothing to close on that side).
    pub fn twilio_gone(&self) -> bool {
        matches!(
            self,
            StopReason::TwilioStop
                | StopReason::TwilioClosed(_)
                | StopReason::HungUp
                | StopReason::Transferred
        )
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::TwilioStop => write!(f, "caller hung up (Twilio stop)"),
            StopReason::TwilioClosed(why) => write!(f, "Twilio socket closed without stop: {why}"),
            StopReason::TwilioStalled { ms } => write!(
                f,
                "twilio_stalled: Twilio took nothing (or echoed no mark) for {ms} ms"
            ),
            StopReason::NoStart { ms } => {
                write!(f, "no_start: Twilio sent no start within {ms} ms")
            }
            StopReason::BadStreamToken => write!(
                f,
                "bad_stream_token: start carried no valid stream token for its callSid (not \
                 from this service's TwiML: a replayed or forged stream)"
            ),
            StopReason::UpstreamFailed(why) => write!(f, "AI leg failed: {why}"),
            StopReason::UpstreamRefused(why) => write!(f, "AI leg failed for good: {why}"),
            StopReason::BreakerOpen(why) => write!(
                f,
                "OpenAI not tried: the breaker is open after repeated permanent failures ({why})"
            ),
            StopReason::Shutdown => write!(f, "service shutting down"),
            StopReason::Rollover => write!(f, "a new session took over (rollover)"),
            StopReason::HungUp => write!(f, "hung up through Twilio's REST API"),
            StopReason::Transferred => write!(f, "transferred through Twilio's REST API"),
        }
    }
}

/// Any → CallActor: end the call. CallActor → a leg: close your socket and stop.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Stop {
    pub reason: StopReason,
}

/// TwilioStreamActor → CallActor: Twilio's `start` arrived.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StreamStarted {
    pub start: crate::protocol::twilio::StreamStart,
}

/// TwilioStreamActor → CallActor: the caller pressed a key.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Dtmf {
    pub digit: String,
}

/// CallActor → TwilioStreamActor: where caller audio goes from now on. `Some`: a configured AI
/// session (audio held meanwhile is sent to it first). `None`: the AI leg is gone; hold caller
/// audio (bounded) and forget the lost session's item (it cannot be truncated any more).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteCallerAudio {
    pub to: Option<Recipient<AudioIn>>,
    /// With `to: None`: the AI leg is restarting, play the hold audio (`call.hold_audio`) until
    /// a leg is routed again or speaks.
    pub hold: bool,
}

/// CallActor → TwilioStreamActor: barge-in. Drop the caller's queued audio (`clear` to Twilio
/// if any was sent), drop later chunks of `interrupted` (the response in flight), and answer
/// with what the caller heard of the item that was playing.
#[derive(Message, Debug, Clone)]
#[rtype(result = "ClearOutcome")]
pub struct ClearAudio {
    pub interrupted: Option<Arc<str>>,
}

/// The Twilio leg's answer to [`ClearAudio`].
#[derive(Debug, Clone, Default, PartialEq, Eq, actix::MessageResponse)]
pub struct ClearOutcome {
    /// `clear` was sent to Twilio.
    pub cleared: bool,
    /// The item that was playing and the audio of it the caller heard, ms (marks confirmed).
    pub truncate: Option<(Arc<str>, u64)>,
    /// Audio was queued or playing: this speech interrupted the assistant.
    pub interrupted_audio: bool,
}

/// CallActor → TwilioStreamActor: a response is done; mark the tail of its audio so its end is
/// confirmed when it has played.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MarkTail;

/// CallActor → a leg: the call SID is known; use it in log lines.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CallIdentified {
    pub label: Arc<str>,
}

/// A line of the conversation so far, handed to a new session (after a restart or at a
/// rollover) so the assistant keeps its context. Assistant lines the caller interrupted say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLine {
    pub role: Role,
    pub text: String,
}

impl ContextLine {
    /// The line as the new session should read it.
    pub fn as_text(&self) -> String {
        match self.role {
            Role::Tool => format!("(A tool was used: {})", self.text),
            Role::Dtmf => format!(
                "The caller pressed the key {} on the phone keypad.",
                self.text
            ),
            _ => self.text.clone(),
        }
    }
}

/// CallActor → AI leg: a control event for the AI session.
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub enum UpstreamCommand {
    /// The caller pressed a keypad key (`0-9 * # A-D`).
    Digit(String),
    /// The output of the tool call `call_id` (the model is then asked to go on, or not).
    ToolOutput {
        call_id: String,
        output: String,
        /// The model is asked to go on (not after `end_call`). Realtime leaves that to the
        /// call's turns; GPT-Live's delegated backend is asked at once (`response.create`).
        respond: bool,
    },
    /// Ask the model to respond, optionally with instructions for this response.
    CreateResponse { instructions: Option<String> },
    /// Cancel the response in flight.
    Cancel { response_id: String },
    /// Cut an assistant item at what the caller heard.
    Truncate { item_id: String, audio_end_ms: u64 },
}

/// AI leg → CallActor: what happened in the AI session (other than audio and transcripts).
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub enum UpstreamEvent {
    /// The socket is open; `session.update` is on its way.
    Connected {
        leg: u32,
    },
    /// Connected and configured (`session.updated`): audio may flow.
    Ready {
        leg: u32,
    },
    /// The caller started speaking.
    SpeechStarted,
    /// The caller stopped speaking.
    SpeechStopped,
    /// The caller is (or is no longer) speaking, known from transcripts: no barge-in follows
    /// (GPT-Live, where the model handles interruptions itself).
    CallerSpeaking(bool),
    ResponseCreated {
        response_id: String,
    },
    ResponseDone {
        response_id: String,
        status: String,
    },
    /// An `error` event the session survives.
    Error {
        code: String,
        message: String,
    },
    /// The model called a tool (a completed response's `function_call` item).
    ToolCall {
        call_id: String,
        name: String,
        /// As the model wrote them (JSON text, perhaps not valid).
        arguments: String,
    },
    /// What the session used: Realtime reports each response's tokens, GPT-Live its cumulative
    /// seconds (`last`: the final figure of `session.closed`, or the last known one).
    Usage(UsageReport),
    /// The session expires in this many seconds (GPT-Live's `expires_at`): plan the rollover.
    Expires {
        leg: u32,
        in_s: u64,
    },
    /// The leg is gone; it has stopped itself. The call decides whether a new leg follows.
    Closed {
        leg: u32,
        failure: LegFailure,
    },
}

/// Usage reported by an AI leg.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageReport {
    /// A Realtime response's tokens (added up).
    Tokens(crate::session::usage::TokenUsage),
    /// A GPT-Live session's cumulative seconds (replaces that session's previous value).
    Seconds { leg: u32, seconds: f64, last: bool },
    /// A GPT-Live delegated backend response's tokens (added up; not in the session's price).
    Delegated {
        model: String,
        input_tokens: u64,
        cached_tokens: u64,
        output_tokens: u64,
    },
}

/// The operator API → a live call (through the registry).
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "Result<(), ControlRefused>")]
pub enum CallControl {
    /// End the call through Twilio's REST API, after the assistant said `goodbye` (instructions)
    /// and it played, or at once.
    Hangup { goodbye: Option<String> },
    /// Move the call to `to` (already checked against `call.transfer_allow`) with `<Dial>`, after
    /// the assistant said `announce` and it played.
    Transfer {
        to: String,
        announce: Option<String>,
    },
    /// The assistant says `text` as its next turn.
    Say { text: String },
}

/// Why a call refused a [`CallControl`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlRefused {
    #[error("the call is ending")]
    Ending,
    #[error("the call has not started yet")]
    NotStarted,
    #[error("a hang-up or transfer of this call is already under way")]
    Busy,
    #[error(
        "Twilio's REST API is not configured: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or \
         TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET)"
    )]
    NoRest,
    #[error("the call has no AI session to speak")]
    NoAssistant,
}

/// CallRegistry → CallActor: describe yourself for `/calls`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "CallSnapshot")]
pub struct GetSnapshot {
    /// Include the transcript (for `/calls/{sid}`).
    pub with_transcript: bool,
}

/// The counters of one call, shared by its actors (all on one worker thread, so the relaxed
/// atomics cost no more than plain adds). The legs count the audio they move and drop; the
/// `CallActor` reads them for `/calls` and the end-of-call log line.
#[derive(Debug, Default)]
pub struct CallCounters {
    /// Caller frames handed to an AI leg (silence fill included).
    pub frames_in: AtomicU64,
    /// Assistant frames written to Twilio.
    pub frames_out: AtomicU64,
    /// Frames from Twilio that could not be used (logged, skipped).
    pub malformed_frames: AtomicU64,
    /// Marks sent and not yet echoed (a gauge).
    pub marks_pending: AtomicU64,
    /// Assistant audio sent to Twilio and not yet confirmed played by a mark, ms (a gauge).
    pub unconfirmed_ms: AtomicU64,
    /// Assistant audio waiting in the Twilio leg's queue, ms (a gauge).
    pub twilio_queued_ms: AtomicU64,
    /// Events waiting in the AI leg's write queue (a gauge).
    pub openai_queued: AtomicU64,
    /// Silence inserted for caller audio lost before it reached us, ms.
    pub silence_filled_ms: AtomicU64,
    pub dropped_pre_start: AtomicU64,
    pub dropped_upstream_not_ready: AtomicU64,
    pub dropped_interrupted: AtomicU64,
    /// Assistant audio dropped because Twilio did not take it fast enough.
    pub dropped_twilio_backpressure: AtomicU64,
    /// Caller audio dropped because OpenAI did not take it fast enough.
    pub dropped_openai_backpressure: AtomicU64,
}

impl CallCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
