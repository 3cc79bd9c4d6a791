//! The AI leg's supervision policy, decided in the `CallActor`: which failures restart the leg,
//! after how long, and when the budget is spent.
//!
//! A leg failure is typed ([`LegFailure`]) and falls in one of three classes ([`FailureClass`]):
//! - **retry** (connect refused or timed out, HTTP 429 and 5xx on the handshake, an abnormal
//!   close, a stall): a new leg after a backoff that doubles per consecutive failure from
//!   `openai.restart_backoff_ms` up to `openai.restart_backoff_max_ms`, with jitter (a random
//!   50–100% of it, so that calls cut by one outage do not reconnect in step), within the budget
//!   (`openai.max_restarts` consecutive failures);
//! - **restart now** (`session_expired`, close 1001: the session reached its time cap): a new leg
//!   at once, with the conversation replayed; it still counts against the budget;
//! - **permanent** (HTTP 401/403 and other 4xx on the handshake, `invalid_api_key`,
//!   `insufficient_quota`, a rejected `session.update`): never retried; the call ends (Twilio
//!   then plays the fallback TwiML) and the process-wide [`Breaker`] counts it.
//!
//! A leg that stayed up for [`RestartPolicy::stable_after`] has proven the upstream healthy again
//! and starts a fresh budget, while shorter-lived legs count against it, so an upstream that
//! accepts and then fails every session cannot keep a call in a restart loop.

use std::time::{Duration, Instant};

/// Why an AI leg ended. Messages never carry secrets (the leg scrubs them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegFailure {
    /// The connection could not be opened (refused, DNS, TLS, timeout).
    #[error("connect to OpenAI failed: {0}")]
    Connect(String),
    /// The server answered the upgrade with an HTTP status instead of 101.
    #[error("connect to OpenAI failed: HTTP {status} instead of 101 (401: check OPENAI_API_KEY)")]
    HandshakeStatus { status: u16 },
    /// No `session.updated` arrived within `openai.connect_timeout_ms`.
    #[error("no session.updated within {ms} ms")]
    NotConfigured { ms: u64 },
    /// The server rejected our `session.update`.
    #[error("OpenAI rejected session.update: {0}")]
    SessionRejected(String),
    /// An `error` event after which the session cannot be used.
    #[error("OpenAI error {code}: {message}")]
    Fatal { code: String, message: String },
    /// The server closed the socket (with this close code, if it sent one).
    #[error("OpenAI closed the socket: {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// A websocket protocol error, on read or write.
    #[error("websocket protocol error with OpenAI: {0}")]
    Protocol(String),
    /// The socket accepted nothing for `call.stall_timeout_ms` while events waited.
    #[error("OpenAI socket stalled: nothing accepted for {ms} ms")]
    Stalled { ms: u64 },
    /// GPT-Live ended the session on its own (`session.closed` with this reason).
    #[error("OpenAI ended the session: {reason}")]
    SessionEnded { reason: String },
}

/// What a failure means for the next leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Transient: try again after a backoff.
    Retry,
    /// The session reached its end (time cap): open the next one at once.
    RestartNow,
    /// A new leg would fail the same way (key, quota, configuration): do not retry.
    Permanent,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Retry => "retry",
            FailureClass::RestartNow => "restart_now",
            FailureClass::Permanent => "permanent",
        }
    }
}

impl LegFailure {
    /// A short name of the kind of failure (a metrics label, an event's `reason`).
    pub fn code(&self) -> &'static str {
        match self {
            LegFailure::Connect(_) => "connect",
            LegFailure::HandshakeStatus { .. } => "handshake_status",
            LegFailure::NotConfigured { .. } => "not_configured",
            LegFailure::SessionRejected(_) => "session_rejected",
            LegFailure::Fatal { .. } => "fatal_error",
            LegFailure::Closed { .. } => "closed",
            LegFailure::Protocol(_) => "protocol",
            LegFailure::Stalled { .. } => "stalled",
            LegFailure::SessionEnded { .. } => "session_ended",
        }
    }

    pub fn class(&self) -> FailureClass {
        match self {
            LegFailure::HandshakeStatus { status } => match status {
                429 | 500..=599 => FailureClass::Retry,
                _ => FailureClass::Permanent,
            },
            LegFailure::SessionRejected(_) => FailureClass::Permanent,
            LegFailure::Fatal { code, .. } => match code.as_str() {
                "session_expired" => FailureClass::RestartNow,
                "invalid_api_key" | "insufficient_quota" | "beta_api_shape_disabled" => {
                    FailureClass::Permanent
                }
                _ => FailureClass::Retry,
            },
            LegFailure::Closed {
                code: Some(1001), ..
            } => FailureClass::RestartNow,
            // gpt-live.md §12: `expired` continues at once, a lost connection after a backoff;
            // `content` (a safety filter) and anything else is not reopened blindly.
            LegFailure::SessionEnded { reason } => match reason.as_str() {
                "expired" => FailureClass::RestartNow,
                "connection_lost" => FailureClass::Retry,
                _ => FailureClass::Permanent,
            },
            LegFailure::Connect(_)
            | LegFailure::NotConfigured { .. }
            | LegFailure::Closed { .. }
            | LegFailure::Protocol(_)
            | LegFailure::Stalled { .. } => FailureClass::Retry,
        }
    }

    /// What an operator should do about a permanent failure (empty for the others).
    pub fn advice(&self) -> &'static str {
        match self {
            LegFailure::HandshakeStatus { status: 401 | 403 } => {
                "check OPENAI_API_KEY: it is missing, wrong, revoked or lacks access to the model"
            }
            LegFailure::HandshakeStatus { status } if !matches!(status, 429 | 500..=599) => {
                "check openai.url and openai.model: the API refused the upgrade"
            }
            LegFailure::Fatal { code, .. } if code == "invalid_api_key" => {
                "check OPENAI_API_KEY: it is wrong or revoked"
            }
            LegFailure::Fatal { code, .. } if code == "insufficient_quota" => {
                "the OpenAI account is out of quota: check its plan and billing"
            }
            LegFailure::Fatal { code, .. } if code == "beta_api_shape_disabled" => {
                "the API refused the request shape: check openai.url"
            }
            LegFailure::SessionRejected(_) => {
                "the API refused the session settings: check the [openai] setting it names"
            }
            LegFailure::SessionEnded { reason } if reason == "content" => {
                "a safety filter ended the session: review the call's transcript"
            }
            LegFailure::SessionEnded { .. } => "the API ended the session for good",
            _ => "",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Consecutive failed legs allowed before the call is ended.
    pub max_restarts: u32,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// A leg ready this long resets the budget.
    pub stable_after: Duration,
}

/// What to do after a leg was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open leg number `attempt` of this run of failures after `delay_ms`.
    Restart { attempt: u32, delay_ms: u64 },
    /// End the call: the budget is spent.
    GiveUp { failures: u32 },
    /// End the call at once: retrying cannot help.
    Permanent,
}

/// The supervision state of one call.
#[derive(Debug)]
pub struct Restarts {
    policy: RestartPolicy,
    consecutive_failures: u32,
    /// Restarts over the call's life (for `/calls`).
    pub total: u32,
}

impl Restarts {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            consecutive_failures: 0,
            total: 0,
        }
    }

    /// A leg was lost; `ready_for` is how long it had been configured (None: never was);
    /// `jitter` is a random number in [0, 1) (the caller's, so this stays deterministic).
    pub fn on_leg_lost(
        &mut self,
        failure: &LegFailure,
        ready_for: Option<Duration>,
        jitter: f64,
    ) -> Decision {
        if ready_for.is_some_and(|d| d >= self.policy.stable_after) {
            self.consecutive_failures = 0;
        }
        let class = failure.class();
        if class == FailureClass::Permanent {
            return Decision::Permanent;
        }
        if self.consecutive_failures >= self.policy.max_restarts {
            return Decision::GiveUp {
                failures: self.consecutive_failures,
            };
        }
        self.consecutive_failures += 1;
        self.total += 1;
        let delay_ms = match class {
            FailureClass::RestartNow => 0,
            _ => {
                let full = self.delay_ms(self.consecutive_failures);
                // 50–100% of the backoff.
                full / 2 + (full as f64 / 2.0 * jitter.clamp(0.0, 1.0)) as u64
            }
        };
        Decision::Restart {
            attempt: self.consecutive_failures,
            delay_ms,
        }
    }

    /// Delay before restart attempt `attempt` (1-based): exponential, capped.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(20);
        self.policy
            .backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.policy.backoff_max_ms)
    }

    pub fn max_restarts(&self) -> u32 {
        self.policy.max_restarts
    }
}

/// The process-wide circuit breaker for permanent failures: after `threshold` consecutive
/// permanent failures across calls (a revoked key fails every call the same way), new calls get
/// the fallback at once, without an OpenAI attempt, for `cooldown`; then one call probes. A
/// completed response closes it (and resets the count); another permanent failure opens it
/// again.
#[derive(Debug)]
pub struct Breaker {
    /// Consecutive permanent failures that open it (0: never opens).
    threshold: u32,
    cooldown: Duration,
    consecutive: u32,
    open_until: Option<Instant>,
    /// A call is probing since the cooldown ended; others are refused until it is decided.
    probing: bool,
    /// The last permanent failure, for `/health` and the log.
    reason: String,
}

/// Whether a new call may try OpenAI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Allowed as the probe after a cooldown: report how it went.
    Probe,
    /// Refused: the breaker is open for this reason.
    Refuse {
        reason: String,
    },
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            consecutive: 0,
            open_until: None,
            probing: false,
            reason: String::new(),
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.open_until {
            None => Admission::Allow,
            Some(until) if now < until || self.probing => Admission::Refuse {
                reason: self.reason.clone(),
            },
            Some(_) => {
                self.probing = true;
                Admission::Probe
            }
        }
    }

    /// A call's leg failed permanently.
    pub fn on_permanent_failure(&mut self, now: Instant, reason: String) {
        self.consecutive += 1;
        self.probing = false;
        self.reason = reason;
        if self.threshold > 0 && self.consecutive >= self.threshold {
            self.open_until = Some(now + self.cooldown);
        }
    }

    /// A call got a completed response: key, quota and settings work.
    pub fn on_success(&mut self) {
        self.consecutive = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// The probing call ended before it could tell (the caller hung up): let another probe.
    pub fn probe_abandoned(&mut self) {
        self.probing = false;
    }

    /// Why new calls are refused, while they are.
    pub fn open_reason(&self, now: Instant) -> Option<String> {
        let open = self.probing || self.open_until.is_some_and(|until| now < until);
        open.then(|| self.reason.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restarts(max: u32) -> Restarts {
        Restarts::new(RestartPolicy {
            max_restarts: max,
            backoff_ms: 100,
            backoff_max_ms: 1_000,
            stable_after: Duration::from_secs(30),
        })
    }

    fn closed() -> LegFailure {
        LegFailure::Closed {
            code: Some(1006),
            reason: "abnormal".into(),
        }
    }

    #[test]
    fn delays_double_and_cap() {
        let r = restarts(3);
        let delays: Vec<u64> = (1..=6).map(|n| r.delay_ms(n)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn the_budget_counts_consecutive_failures_then_gives_up() {
        let mut r = restarts(2);
        assert_eq!(
            r.on_leg_lost(&closed(), None, 1.0),
            Decision::Restart {
                attempt: 1,
                delay_ms: 100
            }
        );
        assert_eq!(
            r.on_leg_lost(&LegFailure::Connect("refused".into()), None, 1.0),
            Decision::Restart {
                attempt: 2,
                delay_ms: 200
            }
        );
        assert_eq!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(1)), 1.0),
            Decision::GiveUp { failures: 2 }
        );
        assert_eq!(r.total, 2);
    }

    #[test]
    fn a_stable_leg_starts_a_fresh_budget() {
        let mut r = restarts(1);
        assert!(matches!(
            r.on_leg_lost(&closed(), None, 1.0),
            Decision::Restart { attempt: 1, .. }
        ));
        // The new leg stayed up for a minute: its loss is a first failure again.
        assert!(matches!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(60)), 1.0),
            Decision::Restart { attempt: 1, .. }
        ));
        // A short-lived leg does not reset it.
        assert_eq!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(5)), 1.0),
            Decision::GiveUp { failures: 1 }
        );
    }

    #[test]
    fn a_zero_budget_never_restarts() {
        let mut r = restarts(0);
        assert_eq!(
            r.on_leg_lost(&LegFailure::Stalled { ms: 5_000 }, None, 1.0),
            Decision::GiveUp { failures: 0 }
        );
    }

    #[test]
    fn failures_fall_in_their_classes() {
        use FailureClass::*;
        let cases = [
            (LegFailure::Connect("refused".into()), Retry),
            (LegFailure::NotConfigured { ms: 5_000 }, Retry),
            (LegFailure::HandshakeStatus { status: 429 }, Retry),
            (LegFailure::HandshakeStatus { status: 503 }, Retry),
            (LegFailure::HandshakeStatus { status: 401 }, Permanent),
            (LegFailure::HandshakeStatus { status: 403 }, Permanent),
            (LegFailure::HandshakeStatus { status: 404 }, Permanent),
            (
                LegFailure::SessionRejected("unknown_parameter".into()),
                Permanent,
            ),
            (fatal("invalid_api_key"), Permanent),
            (fatal("insufficient_quota"), Permanent),
            (fatal("session_expired"), RestartNow),
            (fatal("server_error"), Retry),
            (
                LegFailure::Closed {
                    code: Some(1001),
                    reason: "going away".into(),
                },
                RestartNow,
            ),
            (closed(), Retry),
            (LegFailure::Protocol("bad frame".into()), Retry),
            (LegFailure::Stalled { ms: 5_000 }, Retry),
        ];
        for (failure, class) in cases {
            assert_eq!(failure.class(), class, "{failure}");
            assert_eq!(
                failure.advice().is_empty(),
                class != Permanent,
                "advice for {failure}"
            );
        }
    }

    fn fatal(code: &str) -> LegFailure {
        LegFailure::Fatal {
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn permanent_failures_are_never_retried_and_expiry_restarts_at_once() {
        let mut r = restarts(3);
        assert_eq!(
            r.on_leg_lost(&LegFailure::HandshakeStatus { status: 401 }, None, 0.5),
            Decision::Permanent
        );
        assert_eq!(r.total, 0);
        assert_eq!(
            r.on_leg_lost(
                &fatal("session_expired"),
                Some(Duration::from_secs(3_300)),
                0.5
            ),
            Decision::Restart {
                attempt: 1,
                delay_ms: 0
            }
        );
    }

    #[test]
    fn the_backoff_has_jitter_between_half_and_all_of_it() {
        let mut low = restarts(3);
        let mut high = restarts(3);
        assert_eq!(
            low.on_leg_lost(&closed(), None, 0.0),
            Decision::Restart {
                attempt: 1,
                delay_ms: 50
            }
        );
        assert_eq!(
            high.on_leg_lost(&closed(), None, 0.999),
            Decision::Restart {
                attempt: 1,
                delay_ms: 99
            }
        );
    }

    #[test]
    fn the_breaker_opens_after_consecutive_permanent_failures_then_lets_one_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(30));
        assert_eq!(b.admit(t0), Admission::Allow);
        b.on_permanent_failure(t0, "HTTP 401".into());
        assert_eq!(b.admit(t0), Admission::Allow, "one failure is not enough");
        b.on_permanent_failure(t0, "HTTP 401".into());
        assert_eq!(
            b.admit(t0 + Duration::from_secs(1)),
            Admission::Refuse {
                reason: "HTTP 401".into()
            }
        );
        assert_eq!(b.open_reason(t0), Some("HTTP 401".into()));
        // After the cooldown one call probes; the others wait for its outcome.
        let later = t0 + Duration::from_secs(31);
        assert_eq!(b.admit(later), Admission::Probe);
        assert!(matches!(b.admit(later), Admission::Refuse { .. }));
        // The probe's caller hung up before it could tell: another may probe.
        b.probe_abandoned();
        assert_eq!(b.admit(later), Admission::Probe);
        // It failed again: open for another cooldown.
        b.on_permanent_failure(later, "HTTP 401".into());
        assert!(matches!(
            b.admit(later + Duration::from_secs(29)),
            Admission::Refuse { .. }
        ));
        let much_later = later + Duration::from_secs(31);
        assert_eq!(b.admit(much_later), Admission::Probe);
        b.on_success();
        assert_eq!(b.admit(much_later), Admission::Allow);
        assert_eq!(b.open_reason(much_later), None);
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0, Duration::from_secs(30));
        for _ in 0..10 {
            b.on_permanent_failure(t0, "x".into());
        }
        assert_eq!(b.admit(t0), Admission::Allow);
    }

    #[test]
    fn failures_say_what_happened_without_secrets() {
        assert_eq!(
            LegFailure::HandshakeStatus { status: 401 }.to_string(),
            "connect to OpenAI failed: HTTP 401 instead of 101 (401: check OPENAI_API_KEY)"
        );
        assert_eq!(
            LegFailure::Stalled { ms: 5000 }.to_string(),
            "OpenAI socket stalled: nothing accepted for 5000 ms"
        );
    }

    #[test]
    fn gpt_live_close_reasons_are_classified() {
        let ended = |reason: &str| LegFailure::SessionEnded {
            reason: reason.into(),
        };
        assert_eq!(ended("expired").class(), FailureClass::RestartNow);
        assert_eq!(ended("connection_lost").class(), FailureClass::Retry);
        assert_eq!(ended("content").class(), FailureClass::Permanent);
        assert_eq!(ended("remote_hangup").class(), FailureClass::Permanent);
        assert!(ended("content").advice().contains("safety"));
    }
}
