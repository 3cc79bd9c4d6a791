//! The callbridge call engine: one small tree of actors per phone call.
//!
//! ```text
//!                         CallRegistry (one per process)
//!                           ▲  Register / Unregister          ▲ ListCalls / GetCall
//!                           │  ▼ GetSnapshot                  │ (HTTP shell: /calls, /health)
//!   Twilio ══ws══ TwilioStreamActor ◀──────▶ CallActor ◀──────▶ OpenAiRealtimeActor ══ws══ OpenAI
//!                  (one per call)      │   (one per call)  │    (one per leg; a new leg per
//!                                      │    CallSession    │     restart) — or EchoUpstream
//!                                      │  (pure state      │
//!                                      │   machine)        │
//! ```
//!
//! Message flow (all types in [`messages`], except the registry's own in [`registry`]):
//! - caller audio: Twilio `media` → `TwilioStreamActor` → [`messages::AudioIn`] → `CallActor`
//!   (held while the AI leg is not configured) → `AudioIn` → leg → `input_audio_buffer.append`;
//! - assistant audio: `response.output_audio.delta` → leg → [`messages::AudioOut`] → `CallActor`
//!   (held before Twilio's `start`; dropped after a barge-in) → [`messages::PlayAudio`] (audio,
//!   plus a mark once `call.mark_interval_ms` of it went unmarked; a mark alone for a response's
//!   tail at `response.done`) → `TwilioStreamActor` → Twilio `media` (+ `mark`);
//! - Twilio → call: [`messages::StreamStarted`], [`messages::Dtmf`], [`messages::MarkEchoed`],
//!   [`messages::MalformedFrame`], [`messages::Stop`] (`stop` or socket closed);
//! - call → Twilio: `PlayAudio`, [`messages::ClearAudio`] (barge-in), `Stop` (close the socket);
//! - leg → call: [`messages::UpstreamEvent`] (connected, ready, speech started, response
//!   created/done, error, closed), [`messages::Transcript`];
//! - call → leg: [`messages::UpstreamCommand`] (user text, truncate, cancel, response.create),
//!   `Stop`.
//!
//! Supervision: the `CallActor` restarts a failed AI leg with backoff within a budget
//! (`openai.max_restarts`); the Twilio leg ending ends the call. The registry also hands freed
//! memory back to the OS a second after the last call ends.
//!
//! Modules: actors ([`call`], [`twilio_stream`], [`openai_realtime`], [`echo`], [`registry`]),
//! call logic without a runtime ([`session`]), wire formats without I/O ([`protocol`]), settings
//! ([`config`]) and the shell's entry point ([`engine`]). This crate never imports the shell.

pub mod call;
pub mod config;
pub mod echo;
pub mod engine;
pub mod messages;
pub mod openai_realtime;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod twilio_stream;

pub use config::{CallConfig, ConfigError, OpenAiConfig, UpstreamKind};
pub use engine::Engine;
pub use registry::{CallCount, CallRegistry, CallSnapshot, EndedCalls, GetCall, ListCalls};
