//! THE fake GPT-Live server (`reference/gpt-live.md`), used by the end-to-end tests and by
//! `callbridge-sim` for the service's second backend (`openai.api = "live"`).
//!
//! Same design as the Realtime fake ([`crate::openai`]), for another protocol: every handshake
//! and every client event is validated, every deviation is recorded as a *violation* (a test
//! ends with [`FakeLive::assert_no_violations`]), and where the real service answers with an
//! `error` event, the fake answers with one of the Live shape (`client_event_id` at the top
//! and inside `error`, §3, §13). Checks the doc leaves open (what the service does with audio
//! before `session.started`, with events after `session.close`, a socket closed without
//! `session.close`) and callbridge's own rules (µ-law 8 kHz passthrough in whole 20 ms frames,
//! no phone number as `safety_identifier`, nothing Decisions- or WebRTC-only) are violations
//! without an `error` event. Base64 is judged with the `base64` crate's strict standard engine
//! (`"AB=="` is refused); token limits with [`estimate_tokens`], the fake's own stand-in for
//! the real tokenizer.
//!
//! What a bridge meets here and not in Realtime (§15): the model goes in `session.start`, not
//! the URL; nothing is configured after start but delegation; assistant audio carries no ids;
//! transcripts are timed fragments with no done event; there is no barge-in event at all (the
//! model stops itself: a test scripts an interruption by sending a caller
//! `session.input_transcript.delta` and no more output audio); a session ends with
//! `session.close` → `session.closed` (reason and final `usage.seconds`), then the bridge
//! closes the socket.
//!
//! Two modes:
//! - **Scripted** ([`FakeLive::start`]): the fake only answers commands (`session.started`,
//!   `session.updated`, `session.closed`, the `*.appended` / mute / fixture acks); the model's
//!   side is scripted through [`FakeLiveSession`] (`audio_delta`, `output_transcript`,
//!   `delegate_to_client`, `function_call`, `usage_updated`, `error`, `session_closed`, …),
//!   which also reads what the service sent (`received`, `recv_event`, `appended_audio`,
//!   `session_start`, `commentary`, …) and can stop reading its socket (`pause_reading`).
//! - **Echo** ([`serve_live`], [`FakeLive::start_echo`]): every `session.input_audio.append`
//!   comes back as a `session.output_audio.delta` carrying the same base64, at real-time pace
//!   as GPT-Live's output does (§4.2: input that arrives in real time comes straight back, a
//!   burst comes back spread out, see [`LiveEchoConfig::pace_output`]), with an output
//!   transcript fragment every `transcript_every_ms` and a usage update every
//!   `usage_every_ms`; with Responses delegation, a function call every
//!   `tool_call_every_ms` (see [`LiveEchoConfig::tool_call`]); `session.close` gets `session.closed` with the usage (after the output
//!   still queued). Nothing is recorded and appends build no JSON tree: the benchmark's floor
//!   for this backend.
//!
//! Runtime: tokio + tokio-tungstenite, a reader and a writer task per connection, state behind
//! `Arc<Mutex<_>>`, scripting methods plain (non-async) and emitting under the state lock, so
//! the wire order is the order of the calls. Timed answers (a delayed `session.started` or
//! `session.closed`, `…fixture.played`, the session's expiry) run on timer tasks that hold the
//! connection weakly.

mod pace;
mod scripting;
mod server;
mod session;
mod validate;

use std::time::Duration;

pub use crate::openai::FakeStats;
pub use pace::PACE_SLACK;
pub use scripting::{AudioStream, FakeLiveSession};
pub use server::{serve_live, FakeLive, Handshake};
pub use session::{AppendKind, TextAppend};
pub use validate::{
    estimate_tokens, MAX_APPEND_TOKENS, MAX_INPUT_MESSAGES, MAX_INPUT_TOKENS,
    MAX_INSTRUCTIONS_TOKENS, MESSAGE_OVERHEAD_TOKENS,
};

/// How long the `async` waits of this module wait unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polling interval of the waits.
const POLL: Duration = Duration::from_millis(5);

/// Request path of the primary WebSocket (§1).
pub const PATH: &str = "/v1/live/sessions";

/// A session lasts this long unless told otherwise (`expires_at`, then `session.closed` with
/// reason `expired`). The real limit is unconfirmed (§3); this is Realtime's 60 minutes.
pub const DEFAULT_SESSION_SECS: u64 = 3_600;

/// How echo mode behaves.
#[derive(Clone, Debug)]
pub struct LiveEchoConfig {
    /// When set, only this key is accepted (else HTTP 401 `invalid_api_key`); otherwise any
    /// bearer key is.
    pub api_key: Option<String>,
    /// An output transcript fragment after every this many ms of echoed audio (0: never).
    pub transcript_every_ms: u64,
    /// A `session.usage.updated` after every this many ms of caller audio (0: never).
    pub usage_every_ms: u64,
    /// Session duration: `expires_at`, then `session.closed` reason `expired`.
    pub session_secs: u64,
    /// Output audio at real-time pace (default): echoed audio never runs more than
    /// [`PACE_SLACK`] ahead of real time, and the events after it wait their turn. Off, every
    /// append is echoed at once (a Realtime-like burst).
    pub pace_output: bool,
    /// Every this many ms of caller audio, the model delegates to its Responses backend, whose
    /// function call `tool_call` (name, arguments JSON) comes to the service (§9.2); the model
    /// then waits for that call's output before it calls again (the audio in between does not
    /// count), and answers the output's `response.create` with `response.completed` and an
    /// output transcript fragment quoting it. Only in sessions started with Responses
    /// delegation (with client delegation the real server sends no function calls). 0 (the
    /// default): never.
    pub tool_call_every_ms: u64,
    pub tool_call: Option<(String, String)>,
}

impl Default for LiveEchoConfig {
    fn default() -> Self {
        LiveEchoConfig {
            api_key: None,
            transcript_every_ms: 1_000,
            usage_every_ms: 10_000,
            session_secs: DEFAULT_SESSION_SECS,
            pace_output: true,
            tool_call_every_ms: 0,
            tool_call: None,
        }
    }
}

/// An error the fake sends as the service would (`error.{type,code,message,param}`): scripted
/// with [`FakeLiveSession::error`], as the answer to every `session.start` with
/// [`FakeLive::set_start_error`], or as an HTTP refusal's body with
/// [`FakeLive::set_refuse_error`]. Codes other than `unknown_parameter` are unconfirmed for
/// Live (§13); the constructors use the codes OpenAI's other APIs use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveError {
    /// `error.type`, e.g. `invalid_request_error`.
    pub kind: String,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl LiveError {
    pub fn new(kind: &str, code: &str, message: &str) -> LiveError {
        LiveError {
            kind: kind.to_owned(),
            code: code.to_owned(),
            message: message.to_owned(),
            param: None,
        }
    }

    /// An `invalid_request_error` with this code.
    pub fn invalid_request(code: &str, message: &str) -> LiveError {
        LiveError::new("invalid_request_error", code, message)
    }

    pub fn with_param(mut self, param: &str) -> LiveError {
        self.param = Some(param.to_owned());
        self
    }

    /// The one code the SDK documents (§13), e.g. for `session.voice`.
    pub fn unknown_parameter(param: &str) -> LiveError {
        LiveError::invalid_request(
            "unknown_parameter",
            &format!("Unknown parameter: '{param}'."),
        )
        .with_param(param)
    }

    pub fn invalid_api_key() -> LiveError {
        LiveError::invalid_request(
            "invalid_api_key",
            "Incorrect API key provided. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
        )
    }

    pub fn insufficient_quota() -> LiveError {
        LiveError::new(
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        )
    }

    pub fn rate_limit_exceeded() -> LiveError {
        LiveError::new(
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached for concurrent Live sessions. Please try again later.",
        )
    }

    pub fn model_not_found(model: &str) -> LiveError {
        LiveError::invalid_request(
            "model_not_found",
            &format!("The model '{model}' does not exist or you do not have access to it."),
        )
        .with_param("session.model")
    }

    pub fn server_error() -> LiveError {
        LiveError::new(
            "server_error",
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
        )
    }

    /// A safety refusal (promptfoo's codes, §13).
    pub fn moderation_blocked() -> LiveError {
        LiveError::invalid_request(
            "moderation_blocked",
            "Your request was rejected as a result of our safety system.",
        )
    }

    /// The `error` object of an `error` event or of an HTTP error body.
    pub(crate) fn to_json(&self, client_event_id: Option<&str>) -> serde_json::Value {
        serde_json::json!({"type": self.kind, "code": self.code, "message": self.message,
            "param": self.param, "client_event_id": client_event_id})
    }
}

use crate::lock;
