//! `Reporter`: one per process. When `report.url` is set, every call's end-of-call report is
//! POSTed there once, as JSON, signed (`X-Callbridge-Signature: sha256=<hex HMAC-SHA256 of the
//! body>`, keyed by `CALLBRIDGE_TOOLS_SECRET` when set) with the call's SID in
//! `X-Callbridge-Call-Sid`.
//!
//! A report that fails (an error, a timeout, a non-2xx answer) is tried again after 1 s, then
//! 2, 4, … until `report.max_attempts`. Reports wait in a bounded queue (`report.queue_max`);
//! past it the oldest waiting report is dropped, counted and logged. A drain tries what is still
//! queued at once ([`FlushReports`]) and waits for it within the drain's time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Reports sent at the same time, at most.
const IN_FLIGHT: usize = 4;
/// How often waiting retries are looked at.
const TICK: Duration = Duration::from_millis(200);

/// The `[report]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    /// Where to POST each call's report; empty: no reports.
    pub url: String,
    /// Tries per report (the first included).
    pub max_attempts: u32,
    /// Reports waiting to be sent, at most.
    pub queue_max: usize,
    /// One request's timeout, ms.
    pub timeout_ms: u64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            url: String::new(),
            max_attempts: 5,
            queue_max: 1_000,
            timeout_ms: 5_000,
        }
    }
}

impl ReportConfig {
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::ConfigError;
        let url = self.url.trim();
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ConfigError::new(
                "report.url",
                format!("must be an http:// or https:// URL, got {url:?}"),
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(ConfigError::new(
                "report.max_attempts",
                format!("must be between 1 and 20, got {}", self.max_attempts),
            ));
        }
        if !(1..=100_000).contains(&self.queue_max) {
            return Err(ConfigError::new(
                "report.queue_max",
                format!("must be between 1 and 100000, got {}", self.queue_max),
            ));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError::new(
                "report.timeout_ms",
                format!("must be between 100 and 60000, got {}", self.timeout_ms),
            ));
        }
        Ok(())
    }
}

/// `sha256=<hex>` of `body`, keyed by `secret`: the signature of reports (and tool calls).
pub fn signature(secret: &str, body: &[u8]) -> String {
    // invariant: HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// A call's report, to send.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitReport {
    pub call_sid: String,
    pub report: serde_json::Value,
}

/// Try every queued report now (a drain).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushReports;

/// The counts, for `/health`.
#[derive(Message)]
#[rtype(result = "ReportStats")]
pub struct GetReportStats;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, MessageResponse)]
pub struct ReportStats {
    /// Waiting (including those being sent).
    pub queued: usize,
    pub sent: u64,
    /// Given up on after `report.max_attempts`.
    pub failed: u64,
    /// Dropped from a full queue.
    pub dropped: u64,
}

struct Pending {
    id: u64,
    call_sid: String,
    body: Bytes,
    attempts: u32,
    not_before: Instant,
    sending: bool,
}

pub struct Reporter {
    cfg: ReportConfig,
    secret: Option<SecretString>,
    queue: VecDeque<Pending>,
    in_flight: usize,
    stats: ReportStats,
    next_id: u64,
}

impl Reporter {
    pub fn new(cfg: ReportConfig, secret: Option<SecretString>) -> Self {
        Reporter {
            cfg,
            secret,
            queue: VecDeque::new(),
            in_flight: 0,
            stats: ReportStats::default(),
            next_id: 0,
        }
    }

    /// Starts as many sends as allowed of the reports that are due.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while self.in_flight < IN_FLIGHT {
            let Some(pending) = self
                .queue
                .iter_mut()
                .find(|p| !p.sending && p.not_before <= now)
            else {
                return;
            };
            pending.sending = true;
            pending.attempts += 1;
            self.in_flight += 1;
            let id = pending.id;
            let call_sid = pending.call_sid.clone();
            let body = pending.body.clone();
            let mut request =
                crate::ai_socket::client_for(Duration::from_millis(self.cfg.timeout_ms))
                    .post(self.cfg.url.as_str())
                    .insert_header(("Content-Type", "application/json"))
                    .insert_header(("X-Callbridge-Call-Sid", call_sid.clone()));
            if let Some(secret) = &self.secret {
                request = request.insert_header((
                    "X-Callbridge-Signature",
                    signature(secret.expose_secret(), &body),
                ));
            }
            async move {
                match request.send_body(body).await {
                    Ok(response) if response.status().is_success() => Ok(()),
                    Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
                    Err(e) => Err(e.to_string()),
                }
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.in_flight -= 1;
                act.done(id, result);
                act.pump(ctx);
            })
            .spawn(ctx);
        }
    }

    fn done(&mut self, id: u64, result: Result<(), String>) {
        let Some(at) = self.queue.iter().position(|p| p.id == id) else {
            return;
        };
        let call_sid = self.queue[at].call_sid.clone();
        match result {
            Ok(()) => {
                self.queue.remove(at);
                self.stats.sent += 1;
                log::debug!("[{call_sid}] end-of-call report sent");
            }
            Err(why) => {
                let pending = &mut self.queue[at];
                pending.sending = false;
                if pending.attempts >= self.cfg.max_attempts {
                    log::error!(
                        "[{call_sid}] end-of-call report failed ({why}) after {} attempts: given up",
                        pending.attempts
                    );
                    self.queue.remove(at);
                    self.stats.failed += 1;
                } else {
                    // 1 s, then 2, 4, … (the first retry within 2 s).
                    let wait = Duration::from_secs(1 << (pending.attempts - 1).min(6));
                    log::warn!(
                        "[{call_sid}] end-of-call report failed ({why}), attempt {} of {}: again in {} s",
                        pending.attempts,
                        self.cfg.max_attempts,
                        wait.as_secs()
                    );
                    pending.not_before = Instant::now() + wait;
                }
            }
        }
    }
}

impl Actor for Reporter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, ctx| act.pump(ctx));
    }
}

impl Handler<SubmitReport> for Reporter {
    type Result = ();

    fn handle(&mut self, msg: SubmitReport, ctx: &mut Context<Self>) {
        if self.queue.len() >= self.cfg.queue_max {
            // The oldest waiting report goes (it has failed the longest).
            if let Some(at) = self.queue.iter().position(|p| !p.sending) {
                let dropped = self
                    .queue
                    .remove(at)
                    .map(|p| p.call_sid)
                    .unwrap_or_default();
                self.stats.dropped += 1;
                log::warn!(
                    "[{dropped}] end-of-call report dropped: {} reports queued (report.queue_max)",
                    self.cfg.queue_max
                );
            } else {
                self.stats.dropped += 1;
                log::warn!(
                    "[{}] end-of-call report dropped: the queue is full",
                    msg.call_sid
                );
                return;
            }
        }
        self.next_id += 1;
        let body = Bytes::from(serde_json::to_vec(&msg.report).unwrap_or_default());
        self.queue.push_back(Pending {
            id: self.next_id,
            call_sid: msg.call_sid,
            body,
            attempts: 0,
            not_before: Instant::now(),
            sending: false,
        });
        self.pump(ctx);
    }
}

impl Handler<FlushReports> for Reporter {
    type Result = ();

    fn handle(&mut self, _: FlushReports, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for pending in self.queue.iter_mut() {
            pending.not_before = now;
        }
        self.pump(ctx);
    }
}

impl Handler<GetReportStats> for Reporter {
    type Result = ReportStats;

    fn handle(&mut self, _: GetReportStats, _: &mut Context<Self>) -> ReportStats {
        ReportStats {
            queued: self.queue.len(),
            ..self.stats.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2.
    #[test]
    fn signs_with_hmac_sha256() {
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = ReportConfig {
            url: "ftp://x".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "report.url");
        let bad = ReportConfig {
            max_attempts: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "report.max_attempts");
        assert!(ReportConfig::default().validate().is_ok());
    }
}
