//! The call engine's settings: the `[openai]` and `[call]` sections of `settings.toml`.
//!
//! The shell (`callbridge`) loads them with the `config` crate and hands them to the engine;
//! they are defined here so the engine never imports the shell. Every field has a built-in
//! default so `cargo run` works on a fresh machine, and `validate` names the key and the
//! problem so a bad file stops start-up with a message an operator can act on.

use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

/// A setting that cannot be used, named by its full key (`openai.url`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting `{key}` {problem}")]
pub struct ConfigError {
    /// Full dotted key, as written in `settings.toml`.
    pub key: &'static str,
    /// What is wrong with it, in words an operator can act on.
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: &'static str, problem: impl Into<String>) -> Self {
        Self {
            key,
            problem: problem.into(),
        }
    }
}

/// The `[openai]` section: how the OpenAI Realtime leg connects and configures its session.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Realtime websocket endpoint; `?model=` is appended.
    pub url: String,
    /// Model name, sent in the URL (GA sessions cannot change it later).
    pub model: String,
    /// Output voice (`audio.output.voice`).
    pub voice: String,
    /// System instructions for the agent.
    pub instructions: String,
    /// When not empty, the assistant speaks first with these instructions.
    pub greeting: String,
    /// Input transcription model; empty turns caller transcripts off.
    pub transcription_model: String,
    /// ISO-639-1 language hint for transcription; empty lets the model detect it.
    pub transcription_language: String,
    /// `near_field`, `far_field`, or empty for none.
    pub noise_reduction: String,
    /// Server VAD activation threshold, 0.0 to 1.0 (higher = fewer false barge-ins).
    pub vad_threshold: f64,
    /// Audio kept before detected speech, ms.
    pub vad_prefix_padding_ms: u32,
    /// Silence that ends a caller turn, ms.
    pub vad_silence_duration_ms: u32,
    /// Limit for connecting and reaching `session.updated`, ms.
    pub connect_timeout_ms: u64,
    /// Consecutive failed restarts of the OpenAI leg before the call is ended.
    pub max_restarts: u32,
    /// First restart delay, ms; doubles per consecutive failure.
    pub restart_backoff_ms: u64,
    /// Ceiling for the restart delay, ms.
    pub restart_backoff_max_ms: u64,
    /// Largest websocket frame accepted from OpenAI, bytes.
    pub max_frame_bytes: usize,
    /// After a restart, replay the call's transcript into the new session as context.
    pub replay_transcript_on_restart: bool,
    /// Consecutive permanent failures (key, quota, configuration), across calls, that open the
    /// breaker: new calls then get the fallback at once, without an OpenAI attempt (0: never).
    pub breaker_failures: u32,
    /// How long the breaker stays open before one call probes OpenAI again, s.
    pub breaker_cooldown_s: u64,
    /// A session this old is replaced by a new one at the next pause between turns (OpenAI
    /// ends sessions at 60 minutes), s.
    pub max_session_s: u64,
    /// Which speech-to-speech API: Realtime or GPT-Live.
    pub api: OpenAiApi,
    /// GPT-Live's endpoint (no query: the model goes in `session.start`).
    pub live_url: String,
    /// GPT-Live's model.
    pub live_model: String,
    /// GPT-Live transcript fragments of one speaker end a turn after this long without more, ms.
    pub live_turn_gap_ms: u64,
    /// After `session.close`, how long to wait for `session.closed` before closing the socket, ms.
    pub live_close_timeout_ms: u64,
    /// The Responses model GPT-Live delegates tool use to (`delegation.responses.model`), when
    /// tools are declared (`[[tools]]` or `call.builtin_tools`).
    pub live_delegation_model: String,
    /// That model's instructions (empty: none).
    pub live_delegation_instructions: String,
    /// The `[[tools]]` of the settings (filled in by the shell).
    #[serde(skip)]
    pub tools: Vec<crate::tools::ToolConfig>,
    /// `call.builtin_tools` (filled in by the shell).
    #[serde(skip)]
    pub builtin_tools: Vec<String>,
}

/// The OpenAI speech-to-speech API the AI legs speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OpenAiApi {
    /// The Realtime API (`/v1/realtime`), billed per token.
    #[default]
    Realtime,
    /// GPT-Live (`/v1/live/sessions`), billed per second of session.
    Live,
}

impl OpenAiApi {
    pub fn as_str(self) -> &'static str {
        match self {
            OpenAiApi::Realtime => "realtime",
            OpenAiApi::Live => "live",
        }
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            url: "wss://api.openai.com/v1/realtime".into(),
            model: "gpt-realtime".into(),
            voice: "marin".into(),
            instructions: "You are a friendly, concise phone assistant. Keep answers short: \
                           the caller is listening on a phone."
                .into(),
            greeting: String::new(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
            transcription_language: String::new(),
            noise_reduction: "near_field".into(),
            vad_threshold: 0.5,
            vad_prefix_padding_ms: 300,
            vad_silence_duration_ms: 500,
            connect_timeout_ms: 5_000,
            max_restarts: 3,
            restart_backoff_ms: 250,
            restart_backoff_max_ms: 4_000,
            max_frame_bytes: 1 << 20,
            replay_transcript_on_restart: true,
            breaker_failures: 5,
            breaker_cooldown_s: 30,
            max_session_s: 3_300,
            api: OpenAiApi::Realtime,
            live_url: "wss://api.openai.com/v1/live/sessions".into(),
            live_model: "gpt-live-1.1".into(),
            live_turn_gap_ms: 800,
            live_close_timeout_ms: 10_000,
            live_delegation_model: "gpt-5.5".into(),
            live_delegation_instructions: String::new(),
            tools: Vec::new(),
            builtin_tools: Vec::new(),
        }
    }
}

impl OpenAiConfig {
    /// Checks every value an operator can get wrong; the first problem wins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("wss://") || self.url.starts_with("ws://")) {
            return Err(ConfigError::new(
                "openai.url",
                format!("must start with wss:// or ws://, got {:?}", self.url),
            ));
        }
        if self.url.contains('?') {
            return Err(ConfigError::new(
                "openai.url",
                "must not carry a query string: the model is set with openai.model",
            ));
        }
        if self.model.trim().is_empty() {
            return Err(ConfigError::new("openai.model", "must not be empty"));
        }
        if self.voice.trim().is_empty() {
            return Err(ConfigError::new("openai.voice", "must not be empty"));
        }
        if !matches!(
            self.noise_reduction.as_str(),
            "" | "near_field" | "far_field"
        ) {
            return Err(ConfigError::new(
                "openai.noise_reduction",
                format!(
                    "must be \"near_field\", \"far_field\" or \"\", got {:?}",
                    self.noise_reduction
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.vad_threshold) {
            return Err(ConfigError::new(
                "openai.vad_threshold",
                format!("must be between 0.0 and 1.0, got {}", self.vad_threshold),
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                "openai.connect_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.restart_backoff_max_ms < self.restart_backoff_ms {
            return Err(ConfigError::new(
                "openai.restart_backoff_max_ms",
                "must be at least openai.restart_backoff_ms",
            ));
        }
        if self.breaker_failures > 0 && !(1..=3_600).contains(&self.breaker_cooldown_s) {
            return Err(ConfigError::new(
                "openai.breaker_cooldown_s",
                format!(
                    "must be between 1 and 3600 while openai.breaker_failures is set, got {}",
                    self.breaker_cooldown_s
                ),
            ));
        }
        if !(self.live_url.starts_with("wss://") || self.live_url.starts_with("ws://")) {
            return Err(ConfigError::new(
                "openai.live_url",
                format!("must start with wss:// or ws://, got {:?}", self.live_url),
            ));
        }
        if self.live_url.contains('?') {
            return Err(ConfigError::new(
                "openai.live_url",
                "must not carry a query string: GPT-Live takes the model in session.start",
            ));
        }
        if self.live_model.trim().is_empty() {
            return Err(ConfigError::new("openai.live_model", "must not be empty"));
        }
        if self.live_delegation_model.trim().is_empty() {
            return Err(ConfigError::new(
                "openai.live_delegation_model",
                "must not be empty",
            ));
        }
        if !(100..=10_000).contains(&self.live_turn_gap_ms) {
            return Err(ConfigError::new(
                "openai.live_turn_gap_ms",
                format!(
                    "must be between 100 and 10000, got {}",
                    self.live_turn_gap_ms
                ),
            ));
        }
        if !(100..=60_000).contains(&self.live_close_timeout_ms) {
            return Err(ConfigError::new(
                "openai.live_close_timeout_ms",
                format!(
                    "must be between 100 and 60000, got {}",
                    self.live_close_timeout_ms
                ),
            ));
        }
        if !(1..=3_540).contains(&self.max_session_s) {
            return Err(ConfigError::new(
                "openai.max_session_s",
                format!(
                    "must be between 1 and 3540 (OpenAI ends a session at 3600 s; the next one \
                     needs time to open at a pause), got {}",
                    self.max_session_s
                ),
            ));
        }
        if self.max_frame_bytes < 64 * 1024 {
            return Err(ConfigError::new(
                "openai.max_frame_bytes",
                "must be at least 65536: audio deltas and session events are larger than that",
            ));
        }
        Ok(())
    }

    /// The websocket URL with the model as its query.
    pub fn connect_url(&self) -> String {
        format!("{}?model={}", self.url, self.model)
    }
}

/// The `[call]` section: per-call buffers and bookkeeping.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CallConfig {
    /// Assistant audio held while Twilio has not sent `start` yet, ms of audio.
    pub pre_start_buffer_ms: u64,
    /// Caller audio held while the AI leg is connecting or restarting, ms of audio.
    pub upstream_buffer_ms: u64,
    /// Quiet time after the last DTMF digit before the model is asked to answer, ms (0: never).
    pub dtmf_response_delay_ms: u64,
    /// Log frame counts every this many frames (0: never).
    pub frame_log_interval: u64,
    /// Transcript entries kept per call (oldest dropped first).
    pub transcript_max_entries: usize,
    /// Largest websocket frame accepted from Twilio, bytes.
    pub max_frame_bytes: usize,
    /// Fill gaps in the caller's audio (lost packets, seen as jumps in Twilio's
    /// `media.timestamp`) with silence, up to this many ms per gap (0: never).
    pub fill_gaps_max_ms: u64,
    /// In OpenAI mode, follow the assistant's audio with a mark once at least this many ms of
    /// it went unmarked (and at the end of each response). 0: a mark after every chunk. Marks
    /// measure what the caller heard (for truncation on barge-in) to this precision; each one
    /// costs a message both ways.
    pub mark_interval_ms: u64,
    /// Mask phone numbers in logs (`+1415***5309`); `/calls` shows them in full.
    pub redact_numbers_in_logs: bool,
    /// Write transcripts to the log (they are personal data).
    pub log_transcripts: bool,
    /// A socket (Twilio's or OpenAI's) that accepts nothing for this long while we have
    /// something to write is stalled: a stalled Twilio ends the call (`twilio_stalled`), a
    /// stalled OpenAI leg is restarted, ms.
    pub stall_timeout_ms: u64,
    /// In OpenAI mode, assistant audio sent to Twilio and not yet confirmed played by a mark, at
    /// most, ms. More waits in the Twilio leg's queue until marks confirm playback.
    pub playback_budget_ms: u64,
    /// Assistant audio waiting in the Twilio leg's queue (behind the playback budget or a slow
    /// socket), at most, ms. When full, the oldest is dropped and counted.
    pub twilio_queue_ms: u64,
    /// Caller audio waiting in the OpenAI leg's write queue (a slow socket), at most, ms. When
    /// full, the oldest appends are dropped and counted; control events are never dropped.
    pub openai_queue_ms: u64,
    /// A media stream that sends no `start` within this long is closed (with its AI leg), ms.
    pub start_timeout_ms: u64,
    /// A WAV file of 8 kHz mono μ-law played (looped) to the caller while the AI leg restarts;
    /// empty: silence.
    pub hold_audio: String,
    /// A hang-up or transfer with words to say first waits at most this long (from the request)
    /// for them to play before it goes through Twilio, ms.
    pub goodbye_timeout_ms: u64,
    /// Transfer targets allowed: a target must start with one of these (`+1415`, `sip:desk@`).
    /// Empty: transfers are disabled.
    pub transfer_allow: Vec<String>,
    /// The caller ID a transfer dials with; empty: the number the caller dialled.
    pub transfer_caller_id: String,
    /// Built-in tools the model may call: `end_call`, `transfer_call`.
    pub builtin_tools: Vec<String>,
    /// A tool's answer goes to the model up to this many bytes; more is an error output.
    pub tool_output_max_bytes: usize,
    /// A tool that has not answered after this long gets one short spoken filler, ms (0: none).
    pub tool_filler_after_ms: u64,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            pre_start_buffer_ms: 5_000,
            upstream_buffer_ms: 2_000,
            dtmf_response_delay_ms: 800,
            frame_log_interval: 50,
            transcript_max_entries: 500,
            max_frame_bytes: 64 * 1024,
            fill_gaps_max_ms: 1_000,
            mark_interval_ms: 100,
            redact_numbers_in_logs: true,
            log_transcripts: true,
            stall_timeout_ms: 5_000,
            playback_budget_ms: 30_000,
            twilio_queue_ms: 15_000,
            openai_queue_ms: 2_000,
            start_timeout_ms: 5_000,
            hold_audio: String::new(),
            goodbye_timeout_ms: 8_000,
            transfer_allow: Vec::new(),
            transfer_caller_id: String::new(),
            builtin_tools: Vec::new(),
            tool_output_max_bytes: 16_384,
            tool_filler_after_ms: 0,
        }
    }
}

impl CallConfig {
    /// The hold audio as 20 ms base64 payloads ready for Twilio, or `None` when none is set.
    /// Reads the file: an unreadable file or one in another format stops start-up.
    pub fn load_hold_audio(&self) -> Result<Option<Arc<[Bytes]>>, ConfigError> {
        use base64::Engine as _;
        if self.hold_audio.trim().is_empty() {
            return Ok(None);
        }
        let path = self.hold_audio.trim();
        let file = std::fs::read(path).map_err(|e| {
            ConfigError::new("call.hold_audio", format!("cannot read {path:?}: {e}"))
        })?;
        let samples = crate::protocol::wav::read_mulaw_8k(&file)
            .map_err(|e| ConfigError::new("call.hold_audio", format!("{path:?}: {e}")))?;
        let frame = 20 * crate::session::BYTES_PER_MS as usize;
        let chunks: Vec<Bytes> = samples
            .chunks(frame)
            .map(|chunk| {
                // The last frame is padded with μ-law silence: Twilio plays whole frames best.
                let mut full = chunk.to_vec();
                full.resize(frame, 0xFF);
                Bytes::from(base64::engine::general_purpose::STANDARD.encode(full))
            })
            .collect();
        Ok(Some(chunks.into()))
    }

    /// Whether `target` may be transferred to (`call.transfer_allow`).
    pub fn transfer_allowed(&self, target: &str) -> bool {
        self.transfer_allow
            .iter()
            .any(|prefix| !prefix.is_empty() && target.starts_with(prefix.as_str()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=60_000).contains(&self.goodbye_timeout_ms) {
            return Err(ConfigError::new(
                "call.goodbye_timeout_ms",
                format!(
                    "must be between 100 and 60000, got {}",
                    self.goodbye_timeout_ms
                ),
            ));
        }
        if let Some(bad) = self
            .transfer_allow
            .iter()
            .find(|p| !(p.starts_with('+') || p.starts_with("sip:")) || p.len() < 2)
        {
            return Err(ConfigError::new(
                "call.transfer_allow",
                format!("entries are number prefixes (+1415…) or sip: prefixes, got {bad:?}"),
            ));
        }
        if self.mark_interval_ms > 1_000 {
            return Err(ConfigError::new(
                "call.mark_interval_ms",
                "must be at most 1000 (a barge-in would truncate up to that much audio short)",
            ));
        }
        if self.pre_start_buffer_ms > 60_000 {
            return Err(ConfigError::new(
                "call.pre_start_buffer_ms",
                "must be at most 60000 (one minute of audio per call)",
            ));
        }
        if self.upstream_buffer_ms > 60_000 {
            return Err(ConfigError::new(
                "call.upstream_buffer_ms",
                "must be at most 60000 (one minute of audio per call)",
            ));
        }
        if self.transcript_max_entries == 0 {
            return Err(ConfigError::new(
                "call.transcript_max_entries",
                "must be greater than 0",
            ));
        }
        if !(100..=600_000).contains(&self.stall_timeout_ms) {
            return Err(ConfigError::new(
                "call.stall_timeout_ms",
                format!(
                    "must be between 100 and 600000, got {}",
                    self.stall_timeout_ms
                ),
            ));
        }
        for (key, value) in [
            ("call.playback_budget_ms", self.playback_budget_ms),
            ("call.twilio_queue_ms", self.twilio_queue_ms),
            ("call.openai_queue_ms", self.openai_queue_ms),
        ] {
            if !(100..=600_000).contains(&value) {
                return Err(ConfigError::new(
                    key,
                    format!("must be between 100 and 600000 (ms of audio per call), got {value}"),
                ));
            }
        }
        if !(100..=600_000).contains(&self.start_timeout_ms) {
            return Err(ConfigError::new(
                "call.start_timeout_ms",
                format!(
                    "must be between 100 and 600000, got {}",
                    self.start_timeout_ms
                ),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err(ConfigError::new(
                "call.max_frame_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        Ok(())
    }
}

/// Which assistant answers calls, after `auto` has been resolved at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// The OpenAI Realtime API.
    OpenAi,
    /// A built-in assistant that plays the caller's audio back (telephony echo test).
    Echo,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::OpenAi => "openai",
            UpstreamKind::Echo => "echo",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        OpenAiConfig::default().validate().unwrap();
        CallConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let cfg = OpenAiConfig {
            url: "https://api.openai.com/v1/realtime".into(),
            ..Default::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "openai.url");
        let cfg = OpenAiConfig {
            vad_threshold: 1.5,
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key, "openai.vad_threshold");
        assert!(err.to_string().contains("1.5"), "{err}");
        let cfg = CallConfig {
            stall_timeout_ms: 0,
            ..Default::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "call.stall_timeout_ms");
        let cfg = CallConfig {
            twilio_queue_ms: 10_000_000,
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.key, "call.twilio_queue_ms");
        assert!(err.to_string().contains("10000000"), "{err}");
    }

    #[test]
    fn connect_url_carries_the_model() {
        let cfg = OpenAiConfig::default();
        assert_eq!(
            cfg.connect_url(),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime"
        );
    }
}
