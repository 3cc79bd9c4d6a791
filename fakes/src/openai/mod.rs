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
//!   build no JSON tree: its CPU per call-second is the benchmark's floor. With
//!   [`EchoConfig::fault_every`] it also injects faults (a [`Fault`] on every Nth connection
//!   attempt, counted in [`FakeStats::faults`]): the soak test's upstream.
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

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Fault injection: every `fault_every`th connection attempt (1-based: attempts N, 2N,
    /// 3N, …) gets one fault; 0 (the default) injects none. Attempts are the upgrade requests
    /// that pass the handshake checks, numbered in arrival order, refused ones included, so
    /// a restart after a fault is an attempt like any other.
    pub fault_every: u64,
    /// The kinds of fault, taken in turn: the k-th faulted attempt (k = 1, 2, …) gets
    /// `faults[(k - 1) % faults.len()]`. Empty: no faults. Default: [`Fault::ALL`].
    pub faults: Vec<Fault>,
    /// A session fault (all but the handshake refusals) fires when the session has echoed
    /// this many appends (default 25: half a second of 20 ms frames); a session that never
    /// gets that far is not faulted, and nothing is counted for it.
    pub fault_after_appends: u64,
    /// Every this many ms of caller audio, the model calls `tool_call` (name, arguments JSON)
    /// in a completed response, then echoes nothing until the service sends a `response.create`
    /// (after the tool's output). 0 (the default): never.
    pub tool_call_every_ms: u64,
    pub tool_call: Option<(String, String)>,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            turn_ms: 5_000,
            barge_in_every_ms: 0,
            api_key: None,
            fault_every: 0,
            faults: Fault::ALL.to_vec(),
            fault_after_appends: 25,
            tool_call_every_ms: 0,
            tool_call: None,
        }
    }
}

impl EchoConfig {
    /// The fault of connection attempt `attempt` (1-based), if it gets one.
    pub fn fault_for(&self, attempt: u64) -> Option<Fault> {
        if self.fault_every == 0 || self.faults.is_empty() || attempt % self.fault_every != 0 {
            return None;
        }
        let k = attempt / self.fault_every - 1;
        Some(self.faults[(k % self.faults.len() as u64) as usize])
    }
}

/// A fault echo mode injects (see [`EchoConfig::fault_every`]). What the real service does
/// now and then, and what callbridge must survive without losing the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The connection is dropped without a close frame (an abnormal closure, 1006, as when a
    /// load balancer or the network cuts it).
    Drop,
    /// A `session_expired` error event, then close 1001: the 60-minute cap, early.
    SessionExpired,
    /// Close 1011 (internal server error).
    Close1011,
    /// A text frame that is not JSON; the session goes on (the service must log it, count it
    /// and carry on, without a restart).
    Garbage,
    /// The upgrade is answered HTTP 503 (overloaded).
    Refuse503,
    /// The upgrade is answered HTTP 429 (rate limited).
    Refuse429,
}

impl Fault {
    /// Every kind, in the order [`EchoConfig::faults`] rotates them by default.
    pub const ALL: [Fault; 6] = [
        Fault::Drop,
        Fault::SessionExpired,
        Fault::Close1011,
        Fault::Garbage,
        Fault::Refuse503,
        Fault::Refuse429,
    ];

    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::SessionExpired => "session_expired",
            Fault::Close1011 => "close_1011",
            Fault::Garbage => "garbage",
            Fault::Refuse503 => "http_503",
            Fault::Refuse429 => "http_429",
        }
    }

    /// Whether the session (or the attempt) is lost, so a client must open a new one.
    pub fn ends_session(self) -> bool {
        self != Fault::Garbage
    }

    /// Whether it is answered at the upgrade (no session is opened).
    pub fn at_handshake(self) -> bool {
        matches!(self, Fault::Refuse503 | Fault::Refuse429)
    }
}

/// Faults injected so far, by kind (counted when they happen, not when they are planned).
#[derive(Debug, Default)]
pub struct FaultStats {
    pub drop: AtomicU64,
    pub session_expired: AtomicU64,
    pub close_1011: AtomicU64,
    pub garbage: AtomicU64,
    pub http_503: AtomicU64,
    pub http_429: AtomicU64,
    /// Appends a session took after its fault had closed it (`session_expired`, 1011): they
    /// are never echoed, so a client loses them. (After a drop nothing more is read; what the
    /// client had in flight then is lost uncounted.)
    pub unechoed_appends: AtomicU64,
}

impl FaultStats {
    pub fn counter(&self, fault: Fault) -> &AtomicU64 {
        match fault {
            Fault::Drop => &self.drop,
            Fault::SessionExpired => &self.session_expired,
            Fault::Close1011 => &self.close_1011,
            Fault::Garbage => &self.garbage,
            Fault::Refuse503 => &self.http_503,
            Fault::Refuse429 => &self.http_429,
        }
    }

    /// How many `fault`s were injected.
    pub fn get(&self, fault: Fault) -> u64 {
        self.counter(fault).load(Ordering::Relaxed)
    }

    pub(crate) fn count(&self, fault: Fault) {
        self.counter(fault).fetch_add(1, Ordering::Relaxed);
    }

    /// All faults injected.
    pub fn total(&self) -> u64 {
        Fault::ALL.iter().map(|&f| self.get(f)).sum()
    }

    /// Faults after which the session was gone (all but garbage).
    pub fn ending_sessions(&self) -> u64 {
        Fault::ALL
            .iter()
            .filter(|f| f.ends_session())
            .map(|&f| self.get(f))
            .sum()
    }

    /// `drop=3 session_expired=2 …`, every kind.
    pub fn summary(&self) -> String {
        Fault::ALL
            .iter()
            .map(|&f| format!("{}={}", f.name(), self.get(f)))
            .collect::<Vec<_>>()
            .join(" ")
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
    /// Echo mode: upgrade requests that passed the handshake checks (the numbering of
    /// [`EchoConfig::fault_every`]).
    pub attempts: AtomicU64,
    /// Echo mode: faults injected, by kind.
    pub faults: FaultStats,
}

use crate::lock;
