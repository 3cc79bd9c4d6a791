//! Settings: `settings.toml` (or `--config PATH`), then `CALLBRIDGE__SECTION__KEY` environment
//! overrides, then secrets from the environment only (`OPENAI_API_KEY`, `TWILIO_AUTH_TOKEN`,
//! `CALLBRIDGE_ADMIN_TOKEN`). Every key has a built-in default, so the service starts with no file
//! and no keys. A bad value stops start-up with a message that names the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use callbridge_actors::{CallConfig, ConfigError, OpenAiConfig, UpstreamKind};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// The file read when `--config` is not given (missing is fine: defaults apply).
pub const DEFAULT_FILE: &str = "settings.toml";
/// Prefix of environment overrides: `CALLBRIDGE__SERVER__PORT=8080`.
pub const ENV_PREFIX: &str = "CALLBRIDGE";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    /// Which assistant answers: `auto`, `openai` or `echo`.
    pub upstream: UpstreamMode,
    pub openai: OpenAiConfig,
    pub call: CallConfig,
    pub twilio: TwilioSettings,
    pub fallback: FallbackSettings,
    pub log: LogSettings,
    /// What the models cost, for the usage of each call.
    pub prices: callbridge_actors::session::usage::Prices,
    /// Where each call's end-of-call report goes.
    pub report: callbridge_actors::report::ReportConfig,
    /// Tools the model can call (`[[tools]]`).
    pub tools: Vec<callbridge_actors::tools::ToolConfig>,
    /// The live event stream (`/events`, `/calls/{sid}/events`).
    pub events: EventsSettings,
    /// From the environment only, never from a file.
    #[serde(skip)]
    pub secrets: Secrets,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Public base URL Twilio reaches (`https://bridge.example.com`); empty: from the request.
    pub public_url: String,
    /// HTTP worker threads; 0 = one per CPU core.
    pub workers: usize,
    /// On SIGTERM/SIGINT, seconds live calls get to finish before their sockets are closed (the
    /// old name `shutdown_timeout_s` is still read).
    #[serde(alias = "shutdown_timeout_s")]
    pub drain_timeout_s: u64,
    /// Live calls at most (0: no limit). Past it, `/voice` answers the fallback alone and new
    /// media streams are refused with 503.
    pub max_calls: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            public_url: String::new(),
            workers: 0,
            drain_timeout_s: 30,
            max_calls: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// OpenAI when `OPENAI_API_KEY` is set, otherwise the echo assistant (with a warning).
    #[default]
    Auto,
    /// OpenAI; start-up fails without a key.
    #[serde(rename = "openai")]
    OpenAi,
    /// The built-in echo assistant (telephony test, no OpenAI account).
    Echo,
}

impl UpstreamMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Auto => "auto",
            UpstreamMode::OpenAi => "openai",
            UpstreamMode::Echo => "echo",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwilioSettings {
    /// Check `X-Twilio-Signature` on `/voice` and `/media-stream` when `TWILIO_AUTH_TOKEN` is set
    /// (unset: yes). In OpenAI mode without a token, start-up refuses unless this is set to
    /// `false` explicitly.
    pub validate_signatures: Option<bool>,
    /// Twilio's REST API (hang-ups, transfers); tests point it at a fake.
    pub api_base: String,
    /// One REST request's timeout, ms.
    pub api_timeout_ms: u64,
}

impl Default for TwilioSettings {
    fn default() -> Self {
        TwilioSettings {
            validate_signatures: None,
            api_base: "https://api.twilio.com".into(),
            api_timeout_ms: 10_000,
        }
    }
}

/// What the caller hears when the assistant cannot go on: TwiML after `</Connect>`, which
/// Twilio plays when callbridge closes the media stream (or the stream fails).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackSettings {
    /// A sentence Twilio says (`<Say>`); empty: nothing.
    pub say: String,
    /// A number (`+14155550100`) or SIP URI (`sip:desk@example.com`) to dial (`<Dial>`), to
    /// reach a human; empty: none, the call ends after `say`.
    pub dial: String,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        Self {
            say: "Sorry, our assistant is not available right now. Please try again later.".into(),
            dial: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `error`, `warn`, `info`, `debug` or `trace` (`RUST_LOG` wins when set).
    pub level: String,
    /// `text` (human-readable lines) or `json` (one JSON object per line).
    pub format: crate::logging::LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: crate::logging::LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSettings {
    /// Recent events a late subscriber gets first, per call (and for `/events` in all).
    pub replay_max: usize,
    /// Events queued for one subscriber at most; one that falls further behind is cut off.
    pub subscriber_queue: usize,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            replay_max: 100,
            subscriber_queue: 256,
        }
    }
}

/// Secrets: `Debug` prints `[REDACTED]`, and nothing serializes them.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub openai_api_key: Option<SecretString>,
    pub twilio_auth_token: Option<SecretString>,
    /// When set, `/calls` requires `Authorization: Bearer <token>`.
    pub admin_token: Option<SecretString>,
    /// Keys the signature of end-of-call reports (and tool calls).
    pub tools_secret: Option<SecretString>,
    /// The Twilio account (`AC…`) whose calls callbridge controls through the REST API.
    pub twilio_account_sid: Option<String>,
    /// A Twilio API key (`SK…`) and its secret, for the REST API (else the auth token).
    pub twilio_api_key_sid: Option<String>,
    pub twilio_api_key_secret: Option<SecretString>,
}

impl Secrets {
    /// The REST API's credentials: an API key when one is set, otherwise the account SID and
    /// auth token. `None` without an account SID or any credentials.
    pub fn twilio_rest_auth(&self) -> Option<callbridge_actors::twilio_rest::RestAuth> {
        use callbridge_actors::twilio_rest::RestAuth;
        self.twilio_account_sid.as_ref()?;
        match (&self.twilio_api_key_sid, &self.twilio_api_key_secret) {
            (Some(sid), Some(secret)) => Some(RestAuth::ApiKey {
                sid: sid.clone(),
                secret: secret.clone(),
            }),
            _ => self.twilio_auth_token.clone().map(RestAuth::AuthToken),
        }
    }
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `--config` named a file that is not there.
    #[error("settings file {0} not found")]
    FileNotFound(PathBuf),
    /// The file or an environment override could not be read into the settings.
    #[error("cannot read settings: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Settings {
    /// Reads `path` (or `settings.toml` if present), the environment overrides and the secrets.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(path, std::env::vars().collect())
    }

    /// `load` with the environment given as a map (tests pass their own).
    pub fn load_from(
        path: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let file = match path {
            Some(p) if !p.exists() => return Err(SettingsError::FileNotFound(p.to_path_buf())),
            Some(p) => config::File::from(p).required(true),
            None => config::File::with_name(DEFAULT_FILE).required(false),
        };
        let raw = config::Config::builder()
            .add_source(file.format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env.clone().into_iter().collect())),
            )
            .build()
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
        let secret = |name: &str| {
            env.get(name)
                .cloned()
                .filter(|v| !v.trim().is_empty())
                .map(|v| SecretString::from(v.trim().to_string()))
        };
        settings.secrets = Secrets {
            openai_api_key: secret("OPENAI_API_KEY"),
            twilio_auth_token: secret("TWILIO_AUTH_TOKEN"),
            admin_token: secret("CALLBRIDGE_ADMIN_TOKEN"),
            tools_secret: secret("CALLBRIDGE_TOOLS_SECRET"),
            twilio_account_sid: secret("TWILIO_ACCOUNT_SID").map(|s| s.expose_secret().to_owned()),
            twilio_api_key_sid: secret("TWILIO_API_KEY_SID").map(|s| s.expose_secret().to_owned()),
            twilio_api_key_secret: secret("TWILIO_API_KEY_SECRET"),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values no type can: every section's ranges and formats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.prices
            .check()
            .map_err(|problem| ConfigError::new("prices", problem))?;
        self.report.validate()?;
        if !(1..=10_000).contains(&self.events.replay_max) {
            return Err(ConfigError::new(
                "events.replay_max",
                format!("must be 1 to 10000, got {}", self.events.replay_max),
            ));
        }
        if !(1..=100_000).contains(&self.events.subscriber_queue) {
            return Err(ConfigError::new(
                "events.subscriber_queue",
                format!("must be 1 to 100000, got {}", self.events.subscriber_queue),
            ));
        }
        callbridge_actors::tools::validate(&self.tools, &self.call.builtin_tools)?;
        let api = self.twilio.api_base.trim();
        if !(api.starts_with("https://") || api.starts_with("http://")) {
            return Err(ConfigError::new(
                "twilio.api_base",
                format!("must be an http(s):// URL, got {api:?}"),
            ));
        }
        if let Some(sid) = &self.secrets.twilio_account_sid {
            if !(sid.starts_with("AC") && sid.len() == 34) {
                return Err(ConfigError::new(
                    "TWILIO_ACCOUNT_SID",
                    "must be the account's SID: AC followed by 32 characters",
                ));
            }
        }
        if self.secrets.twilio_api_key_sid.is_some() != self.secrets.twilio_api_key_secret.is_some()
        {
            return Err(ConfigError::new(
                "TWILIO_API_KEY_SID",
                "and TWILIO_API_KEY_SECRET must be set together",
            ));
        }
        if self.server.host.trim().is_empty() {
            return Err(ConfigError::new("server.host", "must not be empty"));
        }
        let public = self.server.public_url.trim();
        if !public.is_empty() {
            let ok_scheme = ["https://", "http://", "wss://", "ws://"]
                .iter()
                .any(|s| public.starts_with(s));
            if !ok_scheme || public.contains('?') || public.len() < 10 {
                return Err(ConfigError::new(
                    "server.public_url",
                    format!(
                        "must be a base URL like https://bridge.example.com (no query), got {public:?}"
                    ),
                ));
            }
        }
        if self.fallback.say.chars().count() > 1_000 {
            return Err(ConfigError::new(
                "fallback.say",
                "must be at most 1000 characters (Twilio refuses TwiML over 4000)",
            ));
        }
        let dial = self.fallback.dial.trim();
        let is_number = dial.len() >= 4
            && dial.len() <= 16
            && dial
                .trim_start_matches('+')
                .chars()
                .all(|c| c.is_ascii_digit());
        let is_sip = dial.starts_with("sip:") && dial.len() > 6;
        if !(dial.is_empty() || is_number || is_sip) {
            return Err(ConfigError::new(
                "fallback.dial",
                format!("must be a phone number like +14155550100 or a sip: URI, got {dial:?}"),
            ));
        }
        if self.server.workers > 256 {
            return Err(ConfigError::new(
                "server.workers",
                "must be at most 256 (0 = one per CPU core)",
            ));
        }
        if !matches!(
            self.log.level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace" | "off"
        ) {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "must be one of error, warn, info, debug, trace, off; got {:?}",
                    self.log.level
                ),
            ));
        }
        self.openai.validate()?;
        self.call.validate()?;
        let upstream = self.resolve_upstream()?;
        if upstream == UpstreamKind::OpenAi
            && self.secrets.twilio_auth_token.is_none()
            && self.twilio.validate_signatures != Some(false)
        {
            return Err(ConfigError::new(
                "twilio.validate_signatures",
                "is on but TWILIO_AUTH_TOKEN is not set: with OpenAI, anyone who finds the URL \
                 could open media streams and spend the OpenAI account's money. Set \
                 TWILIO_AUTH_TOKEN, or set twilio.validate_signatures = false explicitly \
                 (CALLBRIDGE__TWILIO__VALIDATE_SIGNATURES=false) to run without checks",
            ));
        }
        Ok(())
    }

    /// Whether Twilio signatures are checked (a token is set and checks are not turned off).
    pub fn checks_signatures(&self) -> bool {
        self.secrets.twilio_auth_token.is_some() && self.twilio.validate_signatures != Some(false)
    }

    /// The warning to repeat while OpenAI calls are taken without signature checks.
    pub fn unchecked_warning(&self) -> Option<&'static str> {
        (self.resolve_upstream().ok() == Some(UpstreamKind::OpenAi) && !self.checks_signatures())
            .then_some(
                "Twilio signatures are not checked (twilio.validate_signatures = false or no \
                 TWILIO_AUTH_TOKEN): anyone who can reach /media-stream can open OpenAI sessions",
            )
    }

    /// What `upstream` means given the key: `auto` falls back to echo without one.
    pub fn resolve_upstream(&self) -> Result<UpstreamKind, ConfigError> {
        match (self.upstream, self.secrets.openai_api_key.is_some()) {
            (UpstreamMode::Echo, _) => Ok(UpstreamKind::Echo),
            (UpstreamMode::OpenAi, true) | (UpstreamMode::Auto, true) => Ok(UpstreamKind::OpenAi),
            (UpstreamMode::Auto, false) => Ok(UpstreamKind::Echo),
            (UpstreamMode::OpenAi, false) => Err(ConfigError::new(
                "upstream",
                "is \"openai\" but OPENAI_API_KEY is not set (set it, or use \"auto\" or \"echo\")",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> HashMap<String, String> {
        HashMap::new()
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_start_in_echo_mode_without_a_key() {
        let s = Settings::default();
        assert_eq!(s.resolve_upstream().unwrap(), UpstreamKind::Echo);
        s.validate().unwrap();
    }

    #[test]
    fn auto_uses_openai_when_the_key_is_set_and_openai_mode_requires_it() {
        let mut s = Settings::default();
        s.secrets.openai_api_key = Some(SecretString::from("sk-test"));
        assert_eq!(s.resolve_upstream().unwrap(), UpstreamKind::OpenAi);
        s.secrets.openai_api_key = None;
        s.upstream = UpstreamMode::OpenAi;
        let err = s.resolve_upstream().unwrap_err();
        assert_eq!(err.key, "upstream");
        assert!(err.to_string().contains("OPENAI_API_KEY"));
    }

    #[test]
    fn openai_mode_without_a_twilio_token_refuses_to_start_unless_checks_are_off_explicitly() {
        let mut s = Settings::default();
        s.secrets.openai_api_key = Some(SecretString::from("sk-test"));
        let err = s.validate().unwrap_err();
        assert_eq!(err.key, "twilio.validate_signatures");
        assert!(err.to_string().contains("TWILIO_AUTH_TOKEN"), "{err}");
        s.twilio.validate_signatures = Some(true);
        assert!(s.validate().is_err());
        s.twilio.validate_signatures = Some(false);
        s.validate().unwrap();
        assert!(s.unchecked_warning().is_some());
        s.twilio.validate_signatures = None;
        s.secrets.twilio_auth_token = Some(SecretString::from("tok"));
        s.validate().unwrap();
        assert!(s.unchecked_warning().is_none());
        // Echo mode needs no token.
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn the_shipped_settings_file_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings.toml");
        let s = Settings::load_from(Some(&path), no_env()).unwrap();
        let d = Settings::default();
        assert_eq!(s.openai, d.openai);
        assert_eq!(s.call, d.call);
        assert_eq!(s.fallback, d.fallback);
        assert_eq!(s.server.port, d.server.port);
        assert_eq!(s.server.host, d.server.host);
        assert_eq!(s.upstream, d.upstream);
        assert_eq!(s.prices, d.prices);
        assert_eq!(s.log.format, d.log.format);
    }

    #[test]
    fn the_log_format_is_text_json_or_named_as_wrong() {
        use crate::logging::LogFormat;
        assert_eq!(Settings::default().log.format, LogFormat::Text);
        let s = load_toml("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
        let s = Settings::load_from(None, env(&[("CALLBRIDGE__LOG__FORMAT", "json")])).unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
        let err = load_toml("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let err =
            Settings::load_from(None, env(&[("CALLBRIDGE__LOG__FORMAT", "yaml")])).unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
    }

    #[test]
    fn the_api_is_chosen_by_name_and_a_wrong_one_is_named() {
        let s = load_toml("[openai]\napi = \"live\"\n").unwrap();
        assert_eq!(s.openai.api, callbridge_actors::config::OpenAiApi::Live);
        let err = load_toml("[openai]\napi = \"gpt-live\"\n").unwrap_err();
        assert!(err.to_string().contains("openai.api"), "{err}");
        let err = load_toml("[[prices.live]]\nmodel = \"x\"\nper_minute = -1.0\n").unwrap_err();
        assert!(err.to_string().contains("prices"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_print() {
        let vars = env(&[
            ("OPENAI_API_KEY", "sk-supersecret-123"),
            ("TWILIO_AUTH_TOKEN", "twilio-secret-456"),
        ]);
        let s = Settings::load_from(None, vars).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("sk-supersecret-123"), "{printed}");
        assert!(!printed.contains("twilio-secret-456"), "{printed}");
        assert!(s.secrets.twilio_auth_token.is_some());
    }

    fn load_toml(body: &str) -> Result<Settings, SettingsError> {
        let dir = std::env::temp_dir().join(format!(
            "callbridge-settings-{}-{}",
            std::process::id(),
            body.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        std::fs::write(&path, body).unwrap();
        Settings::load_from(Some(&path), no_env())
    }

    #[test]
    fn bad_settings_name_the_key() {
        let err = load_toml("[server]\nport = \"eighty\"\n").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = load_toml("[openai]\nvad_threshold = 3.0\n").unwrap_err();
        assert!(err.to_string().contains("openai.vad_threshold"), "{err}");
        let err = load_toml("upstream = \"gemini\"\n").unwrap_err();
        assert!(err.to_string().contains("gemini"), "{err}");
        let err = load_toml("[openai]\ntemprature = 1\n").unwrap_err();
        assert!(err.to_string().contains("temprature"), "{err}");
        let err = load_toml("[fallback]\ndial = \"call me\"\n").unwrap_err();
        assert!(err.to_string().contains("fallback.dial"), "{err}");
        let err = load_toml("[server]\npublic_url = \"bridge.example.com\"\n").unwrap_err();
        assert!(err.to_string().contains("server.public_url"), "{err}");
    }

    #[test]
    fn environment_overrides_any_key_over_the_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings.toml");
        let vars = env(&[
            ("CALLBRIDGE__SERVER__PORT", "9000"),
            ("CALLBRIDGE__OPENAI__URL", "ws://127.0.0.1:9100/v1/realtime"),
            ("CALLBRIDGE__OPENAI__MAX_RESTARTS", "7"),
            ("CALLBRIDGE__UPSTREAM", "echo"),
            ("CALLBRIDGE__CALL__LOG_TRANSCRIPTS", "false"),
        ]);
        let s = Settings::load_from(Some(&path), vars).unwrap();
        assert_eq!(s.server.port, 9000);
        assert_eq!(s.openai.url, "ws://127.0.0.1:9100/v1/realtime");
        assert_eq!(s.openai.max_restarts, 7);
        assert_eq!(s.upstream, UpstreamMode::Echo);
        assert!(!s.call.log_transcripts);
        // Untouched keys keep the file's values.
        assert_eq!(s.openai.model, "gpt-realtime");

        let err = Settings::load_from(
            Some(&path),
            env(&[("CALLBRIDGE__SERVER__PORT", "not-a-port")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("server.port"), "{err}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err =
            Settings::load_from(Some(Path::new("/nonexistent/cb.toml")), no_env()).unwrap_err();
        assert!(matches!(err, SettingsError::FileNotFound(_)));
    }
}
