//! THE fake OpenAI Realtime server (GA protocol, `reference/protocols.md` B1–B6), used by the
//! end-to-end tests and by `callbridge-sim`.
//!
//! It is at least as strict as the real service: every handshake and every client event is
//! validated, every deviation is recorded as a *violation* (a test ends with
//! [`FakeOpenAi::assert_no_violations`]), and where the real service answers with an `error`
//! event, the fake answers with one of the same shape (`error.{type,code,message,param,
//! event_id}`). A few checks are callbridge requirements rather than API rules (µ-law both
//! ways, no audio or `response.create` before the session is configured); those are violations
//! without an `error` event, as the real API would accept them and silently misbehave. Base64
//! is judged with the `base64` crate's strict standard engine (`"AB=="` is refused), never with
//! a helper of the product.
//!
//! Two modes:
//! - **Scripted** ([`FakeOpenAi::start`]): the fake never speaks on its own. The test scripts
//!   the model through [`FakeSession`] (`start_response`, `audio_delta`, `speech_started`,
//!   `flood_audio`, …), reads what the service sent (`received`, `recv_event`, …) and can stop
//!   reading a socket (`pause_reading`) to make the service's writes back up.
//! - **Echo** ([`serve`], [`FakeOpenAi::start_echo`]): every `input_audio_buffer.append` comes
//!   straight back as a `response.output_audio.delta` carrying the same base64, inside a
//!   response with the GA event order; a response ends after `turn_ms` of audio; with
//!   `barge_in_every_ms` a scripted caller turn interrupts. Nothing is recorded and appends
//!   build no JSON tree: its CPU per call-second is the benchmark's floor.
//!
//! Runtime: tokio + tokio-tungstenite. Each connection is a reader task and a writer task;
//! state is behind `Arc<Mutex<_>>` (the tasks are `Send`, so this runs on a multi-threaded
//! runtime or inside actix's single-threaded test runtime alike), and scripting methods are
//! plain (non-async) methods that push to the writer's channel while holding the state lock.

mod flood;
mod scripting;
mod server;
mod session;
mod validate;

use std::sync::atomic::AtomicU64;

pub use flood::Flood;
pub use scripting::FakeSession;
pub use server::{serve, FakeOpenAi, Handshake};

use std::time::Duration;

/// How long the `async` waits of this module wait unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Polling interval of the waits.
const POLL: Duration = Duration::from_millis(5);

/// How echo mode behaves.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// A response ends after this many ms of echoed audio (0: it never ends by itself).
    pub turn_ms: u64,
    /// Every this many ms of caller audio, a scripted caller turn interrupts (0: never).
    pub barge_in_every_ms: u64,
    /// When set, only this key is accepted (else: `invalid_api_key`, close 3000); otherwise
    /// any bearer key is.
    pub api_key: Option<String>,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            turn_ms: 5_000,
            barge_in_every_ms: 0,
            api_key: None,
        }
    }
}

/// Counters over every session of a server, for the simulator's periodic summary.
#[derive(Debug, Default)]
pub struct FakeStats {
    pub sessions_opened: AtomicU64,
    pub sessions_open: AtomicU64,
    /// Valid audio appends (`input_audio_buffer.append`; the Live fake counts
    /// `session.input_audio.append`).
    pub appends: AtomicU64,
    /// `error` events sent.
    pub errors_sent: AtomicU64,
    /// Violations recorded (handshakes included).
    pub violations: AtomicU64,
}

use crate::lock;
