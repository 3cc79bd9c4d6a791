//! Every message that crosses actors, named as the design names them. Each says
//! "sender → receiver: meaning". Actor-private messages (timer ticks) stay in the actor's file.
//!
//! Audio messages (`AudioIn`, `AudioOut`) go with `do_send` every 20 ms and never wait for a
//! reply; the mailboxes they land in are bounded by the peers' pace and every buffer behind them
//! is bounded in `session.rs`.

use std::sync::Arc;

use actix::prelude::*;
use serde::Serialize;

use crate::registry::CallSnapshot;

/// TwilioStreamActor → CallActor → upstream leg: a chunk of caller audio, base64 μ-law, checked.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AudioIn {
    pub payload: String,
    /// Bytes of audio in `payload`.
    pub bytes: usize,
    /// Twilio's `media.timestamp` (ms since the stream started), when known.
    pub timestamp_ms: Option<u64>,
}

/// Upstream leg → CallActor → TwilioStreamActor: a chunk of assistant audio, base64 μ-law.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AudioOut {
    pub payload: String,
    /// Bytes of audio in `payload`.
    pub bytes: usize,
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
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Caller => "caller",
            Role::Assistant => "assistant",
            Role::Dtmf => "dtmf",
        }
    }
}

/// Upstream leg → CallActor: a line of the conversation as text.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Transcript {
    pub role: Role,
    pub text: String,
}

/// Why a call or a leg stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Twilio sent `stop`: the call ended.
    TwilioStop,
    /// The Twilio socket closed without `stop`.
    TwilioClosed(String),
    /// The AI leg failed more often than the restart budget allows.
    UpstreamFailed(String),
    /// The service is shutting down.
    Shutdown,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::TwilioStop => write!(f, "caller hung up (Twilio stop)"),
            StopReason::TwilioClosed(why) => write!(f, "Twilio socket closed without stop: {why}"),
            StopReason::UpstreamFailed(why) => write!(f, "AI leg failed: {why}"),
            StopReason::Shutdown => write!(f, "service shutting down"),
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

/// TwilioStreamActor → CallActor: Twilio echoed a mark.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MarkEchoed {
    pub name: String,
}

/// TwilioStreamActor → CallActor: a frame was rejected (already logged); count it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MalformedFrame;

/// CallActor → TwilioStreamActor: play this assistant audio to the caller, then send `mark`
/// (Twilio echoes it once the audio has played). An empty `payload` sends the mark alone.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PlayAudio {
    pub payload: String,
    pub mark: Option<String>,
}

/// CallActor → TwilioStreamActor: drop the caller's buffered audio (barge-in).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ClearAudio;

/// CallActor → TwilioStreamActor: the call SID is known; use it in log lines.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CallIdentified {
    pub label: Arc<str>,
}

/// CallActor → upstream leg: a control event for the AI session.
#[derive(Message, Debug, Clone, PartialEq)]
#[rtype(result = "()")]
pub enum UpstreamCommand {
    /// Add a user text message to the conversation.
    UserText(String),
    /// Add an assistant text message (context replayed after a restart).
    AssistantText(String),
    /// Ask the model to respond, optionally with instructions for this response.
    CreateResponse { instructions: Option<String> },
    /// Cancel the response in flight.
    Cancel { response_id: String },
    /// Cut an assistant item at what the caller heard.
    Truncate { item_id: String, audio_end_ms: u64 },
}

/// Upstream leg → CallActor: what happened in the AI session (other than audio and transcripts).
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
    /// The leg is gone (connect failure, close, protocol error); it has stopped itself.
    Closed {
        leg: u32,
        reason: String,
    },
}

/// CallRegistry → CallActor: describe yourself for `/calls`.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "CallSnapshot")]
pub struct GetSnapshot {
    /// Include the transcript (for `/calls/{sid}`).
    pub with_transcript: bool,
}
