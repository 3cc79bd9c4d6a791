//! The callbridge call engine: one small tree of actors per phone call.
//!
//! ```text
//!                     CallRegistry (one per process)
//!    Register / Unregister / CallEnded ▲  ▼ GetSnapshot        ▲ ListCalls / GetCall / EndedCalls
//!                                      │                       │ (HTTP shell: /calls, /health)
//!                     CallActor (one per call): every decision, no audio
//!                     Turns + Restarts (pure); reads the call's CallCounters
//!    StreamStarted, Dtmf, Stop ▲  │ RouteCallerAudio,      UpstreamEvent, ▲  │ UpstreamCommand,
//!                              │  │ ClearAudio, MarkTail,  Transcript     │  │ Stop
//!                              │  ▼ Stop                                  │  ▼
//! Twilio ══ws══ TwilioStreamActor ════ AudioIn (try_send) ════▶ OpenAiRealtimeActor ══ws══ OpenAI
//!               (actix-ws + writer ◀═══ AudioOut (try_send) ═══ or OpenAiLiveActor (GPT-Live)
//!                task; Inbound and                               (one per leg, a new one per
//!                Playback, pure)                                 restart or rollover; bounded
//!                                                                Outbox) — or EchoUpstream
//! ```
//!
//! Two planes (all message types in [`messages`], except the registry's own in [`registry`]):
//! - **audio, leg to leg**, 50 frames a second each way, with `try_send` (a full mailbox drops
//!   and counts): caller audio Twilio `media` → `TwilioStreamActor` → [`messages::AudioIn`] →
//!   AI leg → `input_audio_buffer.append` (GPT-Live: `session.input_audio.append`); assistant
//!   audio `response.output_audio.delta` (GPT-Live: `session.output_audio.delta`) → AI
//!   leg → [`messages::AudioOut`] → `TwilioStreamActor` → Twilio `media` (+ `mark` once
//!   `call.mark_interval_ms` went unmarked). Payloads are `Bytes` slices of the received frames.
//! - **control, through the `CallActor`**: Twilio leg → call: [`messages::StreamStarted`],
//!   [`messages::Dtmf`], [`messages::Stop`]; call → Twilio leg: [`messages::RouteCallerAudio`]
//!   (where caller audio goes: handed out when an AI session is ready, taken back when it is
//!   lost), [`messages::ClearAudio`] (barge-in; answered with what the caller heard),
//!   [`messages::MarkTail`], `Stop`; AI leg → call: [`messages::UpstreamEvent`] (connected,
//!   ready, speech started, response created/done, error, closed with a typed failure),
//!   [`messages::Transcript`]; call → AI leg: [`messages::UpstreamCommand`], `Stop`.
//!
//! Bounds: every queue audio can enter has a bound and a counter in [`messages::CallCounters`],
//! shown at `/calls`: the legs' mailboxes (`try_send`), caller audio held while no session is
//! routed, assistant audio held before `start`, the playback budget and queue, the OpenAI
//! outbox. Each leg's writer tells how long a write has waited for its socket; a stall ends the
//! call (Twilio) or restarts the leg (OpenAI).
//!
//! Supervision: the `CallActor` restarts a failed AI leg as [`session::restart`] decides (typed
//! failure, backoff, budget); the Twilio leg ending ends the call. The registry counts ended
//! calls by reason and hands freed memory back to the OS a second after the last call ends.
//!
//! Modules: actors ([`call`], [`twilio_stream`], [`openai_realtime`], [`openai_live`],
//! [`echo`], [`registry`]), what every AI leg's socket needs ([`ai_socket`]), decisions without
//! a runtime ([`session`]: inbound, playback, turns, restart, usage, fragments), wire formats
//! without I/O ([`protocol`]), settings ([`config`]) and the shell's entry point ([`engine`]).
//! Call control through Twilio's REST API (hang up, redirect to new TwiML, place a call) is
//! [`twilio_rest`], a client with no actor of its own. Tools the model calls are [`tools`],
//! end-of-call reports the `Reporter` actor of [`report`].
//!
//! Observation, beside the registry and never on the audio path: each `CallActor` publishes its
//! live events (state, transcript, barge-in, dtmf, restart, rollover, error, tool call, usage,
//! ended) to the [`events`] hub (`/events`, `/calls/{sid}/events`), and holds a ticket in
//! [`metrics`], whose scrape sums the live calls' `CallCounters` and the totals folded in when
//! calls end; the Twilio leg observes the time to first audio and the playback lag there.
//! This crate never imports the shell.

pub mod ai_socket;
pub mod call;
pub mod config;
pub mod echo;
pub mod engine;
pub mod events;
pub mod messages;
pub mod metrics;
pub mod openai_live;
pub mod openai_realtime;
pub mod protocol;
pub mod registry;
pub mod report;
pub mod session;
pub mod tools;
pub mod twilio_rest;
pub mod twilio_stream;

pub use config::{CallConfig, ConfigError, OpenAiConfig, UpstreamKind};
pub use engine::Engine;
pub use registry::{CallCount, CallRegistry, CallSnapshot, EndedCalls, GetCall, ListCalls};
