//! The AI leg's supervision policy, decided in the `CallActor`: which failures restart the leg,
//! after how long, and when the budget is spent.
//!
//! A leg failure is typed ([`LegFailure`]), so the policy can match on causes. Today every cause
//! restarts within the budget (`openai.max_restarts` consecutive failures); a leg that stayed up
//! for [`RestartPolicy::stable_after`] has proven the upstream healthy again and starts a fresh
//! budget, while shorter-lived legs count against it, so an upstream that accepts and then
//! fails every session cannot keep a call in a restart loop. Delays double per consecutive
//! failure from `openai.restart_backoff_ms` up to `openai.restart_backoff_max_ms`.

use std::time::Duration;

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
    /// The server closed the socket.
    #[error("OpenAI closed the socket: {0}")]
    Closed(String),
    /// A websocket protocol error, on read or write.
    #[error("websocket protocol error with OpenAI: {0}")]
    Protocol(String),
    /// The socket accepted nothing for `call.stall_timeout_ms` while events waited.
    #[error("OpenAI socket stalled: nothing accepted for {ms} ms")]
    Stalled { ms: u64 },
}

impl LegFailure {
    /// Whether a new leg can be expected to do better. Every cause restarts today; a typed
    /// failure is what lets a later policy stop retrying, e.g., a revoked key.
    pub fn is_retryable(&self) -> bool {
        true
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
    /// End the call: the budget is spent (or the failure cannot be retried).
    GiveUp { failures: u32 },
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

    /// A leg was lost; `ready_for` is how long it had been configured (None: never was).
    pub fn on_leg_lost(&mut self, failure: &LegFailure, ready_for: Option<Duration>) -> Decision {
        if ready_for.is_some_and(|d| d >= self.policy.stable_after) {
            self.consecutive_failures = 0;
        }
        if !failure.is_retryable() || self.consecutive_failures >= self.policy.max_restarts {
            return Decision::GiveUp {
                failures: self.consecutive_failures,
            };
        }
        self.consecutive_failures += 1;
        self.total += 1;
        Decision::Restart {
            attempt: self.consecutive_failures,
            delay_ms: self.delay_ms(self.consecutive_failures),
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
        LegFailure::Closed("1006".into())
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
            r.on_leg_lost(&closed(), None),
            Decision::Restart {
                attempt: 1,
                delay_ms: 100
            }
        );
        assert_eq!(
            r.on_leg_lost(&LegFailure::Connect("refused".into()), None),
            Decision::Restart {
                attempt: 2,
                delay_ms: 200
            }
        );
        assert_eq!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(1))),
            Decision::GiveUp { failures: 2 }
        );
        assert_eq!(r.total, 2);
    }

    #[test]
    fn a_stable_leg_starts_a_fresh_budget() {
        let mut r = restarts(1);
        assert!(matches!(
            r.on_leg_lost(&closed(), None),
            Decision::Restart { attempt: 1, .. }
        ));
        // The new leg stayed up for a minute: its loss is a first failure again.
        assert!(matches!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(60))),
            Decision::Restart { attempt: 1, .. }
        ));
        // A short-lived leg does not reset it.
        assert_eq!(
            r.on_leg_lost(&closed(), Some(Duration::from_secs(5))),
            Decision::GiveUp { failures: 1 }
        );
    }

    #[test]
    fn a_zero_budget_never_restarts() {
        let mut r = restarts(0);
        assert_eq!(
            r.on_leg_lost(&LegFailure::Stalled { ms: 5_000 }, None),
            Decision::GiveUp { failures: 0 }
        );
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
}
