//! The Twilio REST client for call control (`reference/twilio-rest.md`): hang a call up
//! (`Status=completed`), give a live call new TwiML (`Twiml=`, which ends its
//! `<Connect><Stream>`), and place an outbound call. Nothing else of Twilio's API.
//!
//! Every request is a form-encoded `POST` to `{api_base}/2010-04-01/Accounts/{AccountSid}/Calls…
//! .json` with HTTP Basic (the Account SID and auth token, or an API key and its secret; the
//! path names the account either way). `api_base` is a setting, so tests point it at
//! `callbridge_fakes::twilio_rest::FakeTwilioRest`.
//!
//! What is retried, and why (section G):
//! - `429`/20429 on any request: Twilio did not process it. At most
//!   [`RetryPolicy::max_retries`] times, after `Retry-After` when Twilio sends one, else after an
//!   exponential backoff with jitter.
//! - `5xx` and network errors (a refused or reset connection, such as a keep-alive connection
//!   the API closed just as it was reused) on a hang-up only, with the same bound and backoff:
//!   `Status=completed` is idempotent. A redirect is not retried on those (the new TwiML may
//!   already be running, and sending it again restarts it, redialling a transfer), nor is a
//!   create (a second call could be placed).
//! - Never a timeout: a request that timed out may have been applied, and another attempt costs
//!   another full deadline; the caller decides (resending a hang-up is harmless; before
//!   resending a transfer, check the call).
//!
//! Each attempt has its own deadline ([`RestConfig::timeout`]), from connecting to the end of
//! the answer's body.
//!
//! Secrets: [`RestAuth`] holds them as `SecretString`; the `Authorization` header is marked
//! sensitive; every error text is scrubbed of the secret and of the header value before it is
//! logged or returned, so neither `Display` nor `Debug` of a [`RestError`] can carry them.
//!
//! Runtime: awc, on the actix runtime of the calling thread. [`TwilioRest`] itself is `Send +
//! Sync` (an `Arc` of its settings), so one value can be cloned into every worker; the awc
//! client it uses is per thread, as awc's is `!Send`.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use awc::http::{header, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::protocol::twiml::MAX_REST_TWIML_CHARS;

/// The versioned path every Calls resource lives under, after the base URL.
const ACCOUNTS_PATH: &str = "/2010-04-01/Accounts/";

/// An answer's body may take this much: a call resource is about 2 KB, an error a few hundred
/// bytes. A larger body is not Twilio's.
const MAX_BODY: usize = 64 * 1024;

/// An error message quoted from an answer that is not Twilio's JSON is cut to this many
/// characters.
const MAX_QUOTED: usize = 200;

/// A call SID longer than this is refused before any request (Twilio's are 34 characters).
const MAX_CALL_SID: usize = 64;

/// Twilio's code for a call that does not exist (any more): after a hang-up it is normal.
pub const CODE_NOT_FOUND: u32 = 20404;
/// Twilio's code for a redirect of a call that is not in progress.
pub const CODE_NOT_IN_PROGRESS: u32 = 21220;
/// Twilio's code for refused credentials: a configuration error.
pub const CODE_AUTHENTICATE: u32 = 20003;
/// Twilio's code for too many concurrent requests: not processed, safe to retry.
pub const CODE_TOO_MANY_REQUESTS: u32 = 20429;

/// The `StatusCallbackEvent` that reports how an outbound call ended, whatever the ending: a
/// call nobody answered never requests its `Url`, and its `busy`, `no-answer`, `failed` or
/// `canceled` reaches the bridge only as this event's `CallStatus` (section F). Twilio's
/// default when no event is named.
pub const EVENT_COMPLETED: &str = "completed";

/// The events Twilio accepts in `StatusCallbackEvent`.
pub const STATUS_CALLBACK_EVENTS: &[&str] = &["initiated", "ringing", "answered", "completed"];

/// Twilio's cap on a create's `Timeout` (ring time), in seconds.
const MAX_RING_TIMEOUT_S: u32 = 600;

/// The credentials of REST requests (section A). The auth token also keys webhook signatures,
/// which is not this module's business: with both configured, give this the API key.
#[derive(Clone)]
pub enum RestAuth {
    /// An API key (`SK…`) and its secret: revocable, and bound to a region.
    ApiKey { sid: String, secret: SecretString },
    /// The account's auth token, with the Account SID as the user.
    AuthToken(SecretString),
}

impl RestAuth {
    /// The Basic user: the key's SID, or the account's.
    fn user<'a>(&'a self, account_sid: &'a str) -> &'a str {
        match self {
            RestAuth::ApiKey { sid, .. } => sid,
            RestAuth::AuthToken(_) => account_sid,
        }
    }

    fn secret(&self) -> &SecretString {
        match self {
            RestAuth::ApiKey { secret, .. } => secret,
            RestAuth::AuthToken(token) => token,
        }
    }
}

/// Never prints a secret: the key's SID is not one, its secret and the auth token are.
impl fmt::Debug for RestAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestAuth::ApiKey { sid, .. } => f
                .debug_struct("ApiKey")
                .field("sid", sid)
                .field("secret", &"[redacted]")
                .finish(),
            RestAuth::AuthToken(_) => f.debug_tuple("AuthToken").field(&"[redacted]").finish(),
        }
    }
}

/// Where and as whom the client talks to Twilio.
#[derive(Clone, Debug)]
pub struct RestConfig {
    /// `https://api.twilio.com` (or a regional host, or a fake's `http://127.0.0.1:PORT`),
    /// without the versioned path; a trailing `/` is ignored.
    pub api_base: String,
    /// `AC…`: named in every path, whichever credentials are used.
    pub account_sid: String,
    pub auth: RestAuth,
    /// The deadline of each attempt, from connecting to the end of the answer (about 10 s).
    pub timeout: Duration,
}

/// How often, and after how long, a request Twilio answered with `429` is sent again (see the
/// module doc for what else a hang-up retries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// The wait before the first retry when Twilio gives no `Retry-After`; it doubles with each
    /// retry, up to `max_backoff`. The wait actually taken is between half of it and all of it
    /// (jitter, so that calls throttled together do not retry together).
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this ends the retries: the `429` goes back to the caller
    /// rather than holding it for longer.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// Three retries, 0.5 s then 1 s then 2 s (at most 4 s), `Retry-After` honoured up to 10 s:
    /// a throttled hang-up is done within about 14 s at worst.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(4),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

/// What an update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Twilio applied it (200).
    Done,
    /// The call had already ended (20404, or 21220 for a redirect): the caller hung up first.
    /// For a hang-up that is success; for a redirect, the call is gone and ends locally.
    AlreadyEnded,
}

/// An outbound call to place (section F).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateCall {
    /// E.164 (`+14155550142`), `sip:…` or `client:…`.
    pub to: String,
    /// A number of the account or a verified caller ID (else 21210); a phone number when `to`
    /// is one.
    pub from: String,
    /// Absolute URL Twilio requests (signed, `POST`) when the callee answers.
    pub url: String,
    /// Absolute URL of the status callback (`POST`); the only news of a call nobody answers.
    pub status_callback: Option<String>,
    /// Events of [`STATUS_CALLBACK_EVENTS`] to post to `status_callback`; empty means Twilio's
    /// default, `completed` ([`EVENT_COMPLETED`]), which already reports busy, no-answer, failed
    /// and canceled. Ignored (with a warning) without a `status_callback`.
    pub status_callback_events: Vec<String>,
    /// Ring time in seconds (Twilio's default 60); clamped to 1..=600.
    pub timeout_s: Option<u32>,
}

/// A call Twilio accepted (201).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedCall {
    /// `CA…`, the call's SID from now on.
    pub sid: String,
    /// `queued` as a rule.
    pub status: String,
}

/// Why a request failed. No variant's text ever holds the auth token or API key secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestError {
    /// Twilio answered with an error status: its code (`20003`, `21210`, …) and message, from
    /// the JSON body; `code` is `None` when the body was not Twilio's (a proxy's page).
    #[error("Twilio answered {status}{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Twilio {
        status: u16,
        code: Option<u32>,
        message: String,
    },
    /// No answer: connecting failed, or the connection broke. Unless connecting failed, the
    /// request may have been applied.
    #[error("cannot reach the Twilio API: {0}")]
    Network(String),
    /// No whole answer within [`RestConfig::timeout`]. The request may have been applied.
    #[error("the Twilio API did not answer in time")]
    Timeout,
    /// The TwiML has this many characters, over Twilio's 4000 (32018); nothing was sent.
    #[error("TwiML of {0} characters is over Twilio's limit of 4000 (32018)")]
    TwimlTooLong(usize),
    /// Not a call SID (letters and digits, at most 64); nothing was sent.
    #[error("{0:?} is not a call SID")]
    InvalidCallSid(String),
    /// A success status with a body that is not a call resource.
    #[error("unexpected answer from the Twilio API: {0}")]
    BadResponse(String),
}

impl RestError {
    /// Twilio's error code, to log and to hand to an operator; `None` for failures that are not
    /// Twilio's answer.
    pub fn code(&self) -> Option<u32> {
        match self {
            RestError::Twilio { code, .. } => *code,
            _ => None,
        }
    }

    /// The HTTP status Twilio answered, if it answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            RestError::Twilio { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// `429`/20429: not processed.
    fn is_throttled(&self) -> bool {
        matches!(self, RestError::Twilio { status: 429, .. })
            || self.code() == Some(CODE_TOO_MANY_REQUESTS)
    }

    /// A `5xx`, or no answer at all.
    fn is_server_or_network_error(&self) -> bool {
        matches!(
            self,
            RestError::Twilio {
                status: 500..=599,
                ..
            } | RestError::Network(_)
        )
    }

    /// A call that has ended, as an update sees it.
    fn call_has_ended(&self) -> bool {
        matches!(self.code(), Some(CODE_NOT_FOUND | CODE_NOT_IN_PROGRESS))
    }
}

/// The three requests, for retry decisions and log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    HangUp,
    Redirect,
    Create,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::HangUp => "hang-up",
            Op::Redirect => "redirect",
            Op::Create => "create",
        }
    }
}

/// The client. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct TwilioRest {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    /// `{api_base}/2010-04-01/Accounts/{AccountSid}/Calls`.
    calls_url: String,
    /// `Basic …`, built once.
    authorization: SecretString,
    /// What must never appear in an error's text: the secret, and the header's base64.
    scrub: Vec<SecretString>,
    timeout: Duration,
    retry: RetryPolicy,
}

impl fmt::Debug for TwilioRest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwilioRest")
            .field("calls_url", &self.inner.calls_url)
            .field("timeout", &self.inner.timeout)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

impl TwilioRest {
    /// A client with [`RetryPolicy::default`].
    pub fn new(cfg: RestConfig) -> Self {
        let user = cfg.auth.user(&cfg.account_sid);
        let secret = cfg.auth.secret().expose_secret();
        let authorization = basic_auth(user, secret);
        let encoded = authorization.trim_start_matches("Basic ").to_owned();
        let calls_url = format!(
            "{}{ACCOUNTS_PATH}{}/Calls",
            cfg.api_base.trim_end_matches('/'),
            path_segment(&cfg.account_sid)
        );
        TwilioRest {
            inner: Arc::new(Inner {
                calls_url,
                authorization: authorization.into(),
                scrub: vec![secret.to_owned().into(), encoded.into()],
                timeout: cfg.timeout,
                retry: RetryPolicy::default(),
            }),
        }
    }

    /// This client with another retry policy (tests use short waits).
    pub fn with_retry(self, retry: RetryPolicy) -> Self {
        TwilioRest {
            inner: Arc::new(Inner {
                retry,
                ..Inner::clone(&self.inner)
            }),
        }
    }

    /// Ends the call, answered or not (`Status=completed`). A call that already ended (20404,
    /// or 21220) is `Ok(UpdateOutcome::AlreadyEnded)`: the caller hung up first, which is
    /// normal (section D). Retried on `429`, on `5xx` and on network errors.
    pub async fn hang_up(&self, call_sid: &str) -> Result<UpdateOutcome, RestError> {
        self.update(Op::HangUp, call_sid, &[("Status", "completed")])
            .await
    }

    /// Replaces the live call's TwiML with `twiml` (`Twiml=`): Twilio ends its
    /// `<Connect><Stream>` (the bridge sees `stop`, then the close) and runs `twiml`. Build it
    /// with [`crate::protocol::twiml`]; any URL in it must be absolute (15004). Over 4000
    /// characters is [`RestError::TwimlTooLong`] without a request. A call that ended (20404)
    /// or is not in progress (21220) is `Ok(UpdateOutcome::AlreadyEnded)`. Retried on `429`
    /// only.
    pub async fn redirect(&self, call_sid: &str, twiml: &str) -> Result<UpdateOutcome, RestError> {
        let chars = twiml.chars().count();
        if chars > MAX_REST_TWIML_CHARS {
            log::warn!(
                "[{call_sid}] twilio: redirect not sent: TwiML of {chars} characters is over \
                 {MAX_REST_TWIML_CHARS}"
            );
            return Err(RestError::TwimlTooLong(chars));
        }
        self.update(Op::Redirect, call_sid, &[("Twiml", twiml)])
            .await
    }

    /// Places a call (`POST …/Calls.json`, 201). Retried on `429` only, which Twilio did not
    /// process: after a timeout or a `5xx` a second attempt could place a second call.
    pub async fn create_call(&self, call: &CreateCall) -> Result<CreatedCall, RestError> {
        let body = form_body_owned(&create_form(call));
        let url = format!("{}.json", self.inner.calls_url);
        let who = format!("to {}", call.to);
        match self.send_with_retries(Op::Create, &who, &url, body).await {
            Ok(body) => {
                let created = parse_created(&body).map_err(|e| self.scrubbed(e))?;
                log::info!(
                    "[{}] twilio: created call to {} from {} ({})",
                    created.sid,
                    call.to,
                    call.from,
                    created.status
                );
                Ok(created)
            }
            Err(e) => {
                log_failure(&who, Op::Create, &e);
                Err(e)
            }
        }
    }

    /// `POST …/Calls/{call_sid}.json` with `pairs`.
    async fn update(
        &self,
        op: Op,
        call_sid: &str,
        pairs: &[(&str, &str)],
    ) -> Result<UpdateOutcome, RestError> {
        if !is_call_sid_like(call_sid) {
            return Err(RestError::InvalidCallSid(
                call_sid.chars().take(MAX_CALL_SID).collect(),
            ));
        }
        let url = format!("{}/{call_sid}.json", self.inner.calls_url);
        match self
            .send_with_retries(op, call_sid, &url, form_body(pairs))
            .await
        {
            Ok(_) => {
                log::debug!("[{call_sid}] twilio: {} done", op.name());
                Ok(UpdateOutcome::Done)
            }
            Err(e) if e.call_has_ended() => {
                log::debug!(
                    "[{call_sid}] twilio: {}: the call had already ended ({e})",
                    op.name()
                );
                Ok(UpdateOutcome::AlreadyEnded)
            }
            Err(e) => {
                log_failure(call_sid, op, &e);
                Err(e)
            }
        }
    }

    /// Sends until an answer that is not retried; the body of a success.
    async fn send_with_retries(
        &self,
        op: Op,
        who: &str,
        url: &str,
        body: String,
    ) -> Result<bytes::Bytes, RestError> {
        let mut retries = 0;
        loop {
            let (result, retry_after) = self.attempt(url, body.clone()).await;
            let result = result.map_err(|e| self.scrubbed(e));
            let Err(error) = &result else {
                return result;
            };
            let Some(wait) =
                retry_wait(op, error, retry_after, retries, &self.inner.retry, jitter())
            else {
                return result;
            };
            retries += 1;
            log::warn!(
                "[{who}] twilio: {} failed: {error}; retry {retries}/{} in {} ms",
                op.name(),
                self.inner.retry.max_retries,
                wait.as_millis()
            );
            actix_rt::time::sleep(wait).await;
        }
    }

    /// One request and its whole answer, within the deadline: the body of a 2xx, or the error,
    /// with the `Retry-After` of the answer if it had one.
    async fn attempt(
        &self,
        url: &str,
        body: String,
    ) -> (Result<bytes::Bytes, RestError>, Option<Duration>) {
        let timeout = self.inner.timeout;
        let exchange = async {
            // invariant: "Basic " and base64 are visible ASCII, always a valid header value.
            let mut authorization =
                header::HeaderValue::from_str(self.inner.authorization.expose_secret())
                    .expect("a Basic credential is a valid header value");
            // Kept out of awc's and actix-http's debug output.
            authorization.set_sensitive(true);
            let request = client()
                .post(url)
                // awc's own deadline (5 s by default) would cut a longer configured one.
                .timeout(timeout)
                .insert_header((header::AUTHORIZATION, authorization))
                .insert_header((header::ACCEPT, "application/json"))
                .insert_header((header::USER_AGENT, USER_AGENT))
                .insert_header((
                    header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded; charset=utf-8",
                ));
            let mut response = request.send_body(body).await.map_err(send_error)?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response.body().limit(MAX_BODY).await;
            Ok((status, body, retry_after))
        };
        match actix_rt::time::timeout(timeout, exchange).await {
            Err(_) => (Err(RestError::Timeout), None),
            Ok(Err(e)) => (Err(e), None),
            Ok(Ok((status, body, retry_after))) => {
                (answer(status, body.map_err(payload_error)), retry_after)
            }
        }
    }

    /// `error` with every secret taken out of its text.
    fn scrubbed(&self, error: RestError) -> RestError {
        let clean = |text: String| {
            self.inner.scrub.iter().fold(text, |text, secret| {
                let secret = secret.expose_secret();
                if secret.is_empty() {
                    text
                } else {
                    text.replace(secret, "[redacted]")
                }
            })
        };
        match error {
            RestError::Twilio {
                status,
                code,
                message,
            } => RestError::Twilio {
                status,
                code,
                message: clean(message),
            },
            RestError::Network(s) => RestError::Network(clean(s)),
            RestError::BadResponse(s) => RestError::BadResponse(clean(s)),
            other => other,
        }
    }
}

/// `User-Agent` of every request.
const USER_AGENT: &str = concat!("callbridge/", env!("CARGO_PKG_VERSION"));

/// Logs a failure with Twilio's code and message: refused credentials at error level (a
/// configuration error: nothing will work until it is fixed), the rest as warnings.
fn log_failure(who: &str, op: Op, error: &RestError) {
    if error.code() == Some(CODE_AUTHENTICATE) {
        log::error!(
            "[{who}] twilio: {} refused: {error}; check twilio.account_sid and the REST \
             credentials (API key region?)",
            op.name()
        );
    } else {
        log::warn!("[{who}] twilio: {} failed: {error}", op.name());
    }
}

/// The success body, or the error an answer stands for.
fn answer(
    status: StatusCode,
    body: Result<bytes::Bytes, RestError>,
) -> Result<bytes::Bytes, RestError> {
    if status.is_success() {
        return body;
    }
    let body = body.unwrap_or_default();
    Err(twilio_error(status.as_u16(), &body))
}

/// Twilio's error body: `{"code","message","more_info","status"}`, or an RFC 9457 problem
/// (`code`, `detail`, `title`) from newer services. Anything else keeps the status, without a
/// code, and quotes the start of the body.
fn twilio_error(status: u16, body: &[u8]) -> RestError {
    #[derive(Deserialize)]
    struct ErrorBody {
        code: Option<u32>,
        message: Option<String>,
        detail: Option<String>,
        title: Option<String>,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => RestError::Twilio {
            status,
            code: e.code,
            message: e
                .message
                .or(e.detail)
                .or(e.title)
                .unwrap_or_else(|| "(no message)".into()),
        },
        Err(_) => RestError::Twilio {
            status,
            code: None,
            message: quote(body),
        },
    }
}

/// The start of `body` as text, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut quoted: String = text.chars().take(MAX_QUOTED).collect();
    if text.chars().count() > MAX_QUOTED {
        quoted.push('…');
    }
    quoted
}

/// The `sid` and `status` of a created call's resource; other fields are ignored.
fn parse_created(body: &[u8]) -> Result<CreatedCall, RestError> {
    #[derive(Deserialize)]
    struct Resource {
        sid: Option<String>,
        status: Option<String>,
    }
    let resource: Resource = serde_json::from_slice(body).map_err(|e| {
        RestError::BadResponse(format!("not a call resource ({e}): {}", quote(body)))
    })?;
    match resource.sid {
        Some(sid) if !sid.is_empty() => Ok(CreatedCall {
            sid,
            status: resource.status.unwrap_or_default(),
        }),
        _ => Err(RestError::BadResponse(format!(
            "a created call without a sid: {}",
            quote(body)
        ))),
    }
}

/// The form of a create, in the order of the reference's example (section F).
fn create_form(call: &CreateCall) -> Vec<(&'static str, String)> {
    let mut form = vec![
        ("To", call.to.clone()),
        ("From", call.from.clone()),
        ("Url", call.url.clone()),
        // Twilio's default, said out loud: the bridge's voice webhook answers POST.
        ("Method", "POST".to_owned()),
    ];
    match &call.status_callback {
        Some(callback) => {
            form.push(("StatusCallback", callback.clone()));
            form.push(("StatusCallbackMethod", "POST".to_owned()));
            for event in &call.status_callback_events {
                form.push(("StatusCallbackEvent", event.clone()));
            }
        }
        // Twilio would ignore them; the fake calls it a violation.
        None if !call.status_callback_events.is_empty() => log::warn!(
            "[to {}] twilio: create: StatusCallbackEvent without StatusCallback left out",
            call.to
        ),
        None => {}
    }
    if let Some(timeout) = call.timeout_s {
        // Twilio caps the ring time at 600 s and refuses 0.
        form.push(("Timeout", timeout.clamp(1, MAX_RING_TIMEOUT_S).to_string()));
    }
    form
}

/// [`form_body`] of owned pairs.
fn form_body_owned(pairs: &[(&str, String)]) -> String {
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    form_body(&borrowed)
}

/// How long to wait before retrying `op` after `error` (its `retry_after`, if Twilio sent
/// one), having retried `retries` times already; `None`: do not retry. Only a hang-up repeats
/// after a `5xx` or a network error. `jitter` is in
/// `[0, 1)`: the backoff taken is `backoff × (1 − jitter/2)`.
fn retry_wait(
    op: Op,
    error: &RestError,
    retry_after: Option<Duration>,
    retries: u32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Option<Duration> {
    let retryable =
        error.is_throttled() || (op == Op::HangUp && error.is_server_or_network_error());
    if !retryable || retries >= policy.max_retries {
        return None;
    }
    if let Some(wait) = retry_after {
        return (wait <= policy.max_retry_after).then_some(wait);
    }
    let backoff = policy
        .first_backoff
        .saturating_mul(1u32 << retries.min(16))
        .min(policy.max_backoff);
    Some(backoff.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0))
}

/// A number in `[0, 1)` that differs between calls (std's per-instance random hasher keys):
/// enough to spread retries, not for anything secret.
fn jitter() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `Retry-After` in whole seconds; an HTTP date is not read (the backoff applies instead).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn send_error(e: awc::error::SendRequestError) -> RestError {
    use awc::error::{ConnectError, SendRequestError};
    match e {
        SendRequestError::Timeout | SendRequestError::Connect(ConnectError::Timeout) => {
            RestError::Timeout
        }
        other => RestError::Network(other.to_string()),
    }
}

fn payload_error(e: awc::error::PayloadError) -> RestError {
    RestError::Network(format!("reading the answer: {e}"))
}

/// Letters and digits, at most [`MAX_CALL_SID`]: nothing that could change the path.
fn is_call_sid_like(sid: &str) -> bool {
    !sid.is_empty() && sid.len() <= MAX_CALL_SID && sid.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `s` percent-encoded for a path segment (an Account SID is letters and digits already; this
/// only keeps a misconfigured one from changing the path).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

thread_local! {
    /// The awc client of this thread (awc's is `!Send`): one connection pool per worker,
    /// reused across requests and calls.
    static CLIENT: awc::Client = awc::Client::builder()
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
}

/// This thread's client: HTTP/1.1 (as `ai_socket::client_for`), the deadline set per request.
fn client() -> awc::Client {
    CLIENT.with(awc::Client::clone)
}

/// `pairs` as an `application/x-www-form-urlencoded` body (the WHATWG URL standard's
/// serializer, UTF-8): ASCII letters, digits and `*-._` as they are, a space as `+`, every other
/// byte as `%XX` (upper-case hex). So `+` becomes `%2B`, without which Twilio would read
/// `+1415…` as ` 1415…`.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    let mut body = String::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            body.push('&');
        }
        encode_into(&mut body, name);
        body.push('=');
        encode_into(&mut body, value);
    }
    body
}

fn encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0x0F) as usize] as char);
            }
        }
    }
}

/// The `Authorization` value of HTTP Basic: `Basic base64(user ":" password)` (section A).
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of `twilio-rest.md` A.
    #[test]
    fn basic_auth_vector() {
        assert_eq!(
            basic_auth(
                "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "0123456789abcdef0123456789abcdef"
            ),
            "Basic QUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYTowMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZg=="
        );
    }

    /// The transfer body of `twilio-rest.md` C, byte for byte, from the TwiML builder.
    #[test]
    fn transfer_body_vector() {
        let twiml = crate::protocol::twiml::dial("+15005550006", Some("+14155550123"), None);
        assert_eq!(
            form_body(&[("Twiml", &twiml)]),
            "Twiml=%3C%3Fxml+version%3D%221.0%22+encoding%3D%22UTF-8%22%3F%3E%3CResponse%3E%3CDial+callerId%3D%22%2B14155550123%22+answerOnBridge%3D%22true%22%3E%3CNumber%3E%2B15005550006%3C%2FNumber%3E%3C%2FDial%3E%3C%2FResponse%3E"
        );
    }

    /// The create body of `twilio-rest.md` F, byte for byte.
    #[test]
    fn create_body_vector() {
        let call = CreateCall {
            to: "+14155550142".into(),
            from: "+18005550100".into(),
            url: "https://bridge.example.com/voice?cb=abc".into(),
            status_callback: Some("https://bridge.example.com/twilio/call-status".into()),
            status_callback_events: vec!["initiated".into(), "answered".into(), "completed".into()],
            timeout_s: Some(30),
        };
        let body = form_body_owned(&create_form(&call));
        assert_eq!(
            body,
            "To=%2B14155550142&From=%2B18005550100&Url=https%3A%2F%2Fbridge.example.com%2Fvoice%3Fcb%3Dabc&Method=POST&StatusCallback=https%3A%2F%2Fbridge.example.com%2Ftwilio%2Fcall-status&StatusCallbackMethod=POST&StatusCallbackEvent=initiated&StatusCallbackEvent=answered&StatusCallbackEvent=completed&Timeout=30"
        );
    }

    #[test]
    fn form_body_encoding() {
        assert_eq!(form_body(&[]), "");
        assert_eq!(
            form_body(&[("To", "+1 415"), ("S", "a&b=c%d"), ("K", "*-._~/")]),
            "To=%2B1+415&S=a%26b%3Dc%25d&K=*-._%7E%2F"
        );
        // UTF-8, byte by byte.
        assert_eq!(form_body(&[("Say", "Zoë ☎")]), "Say=Zo%C3%AB+%E2%98%8E");
        assert_eq!(form_body(&[("A", "\n\t")]), "A=%0A%09");
    }

    #[test]
    fn create_form_leaves_out_what_does_not_apply() {
        let mut call = CreateCall {
            to: "sip:agent@pbx.example.com".into(),
            from: "+18005550100".into(),
            url: "https://b/voice".into(),
            status_callback: None,
            status_callback_events: vec![EVENT_COMPLETED.into()],
            timeout_s: Some(9000),
        };
        assert_eq!(
            form_body_owned(&create_form(&call)),
            "To=sip%3Aagent%40pbx.example.com&From=%2B18005550100&Url=https%3A%2F%2Fb%2Fvoice&Method=POST&Timeout=600"
        );
        call.timeout_s = Some(0);
        assert!(form_body_owned(&create_form(&call)).ends_with("&Timeout=1"));
        call.timeout_s = None;
        assert!(!form_body_owned(&create_form(&call)).contains("Timeout"));
    }

    fn twilio(status: u16, code: u32) -> RestError {
        RestError::Twilio {
            status,
            code: Some(code),
            message: "m".into(),
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_retries: 3,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
        max_retry_after: Duration::from_secs(5),
    };

    /// 429 is retried everywhere, 5xx and network errors only for a hang-up, nothing else
    /// ever; the bound holds.
    #[test]
    fn what_is_retried() {
        let throttled = twilio(429, 20429);
        for op in [Op::HangUp, Op::Redirect, Op::Create] {
            assert!(retry_wait(op, &throttled, None, 0, &POLICY, 0.0).is_some());
            assert!(retry_wait(op, &throttled, None, 3, &POLICY, 0.0).is_none());
            for e in [
                twilio(400, 21210),
                twilio(401, 20003),
                twilio(404, 20404),
                RestError::Timeout,
                RestError::BadResponse("x".into()),
            ] {
                assert_eq!(
                    retry_wait(op, &e, None, 0, &POLICY, 0.0),
                    None,
                    "{op:?} {e}"
                );
            }
        }
        for e in [
            twilio(500, 20500),
            twilio(503, 20503),
            RestError::Network("reset".into()),
        ] {
            assert!(
                retry_wait(Op::HangUp, &e, None, 0, &POLICY, 0.0).is_some(),
                "{e}"
            );
            assert!(
                retry_wait(Op::HangUp, &e, None, 3, &POLICY, 0.0).is_none(),
                "{e}"
            );
            assert!(
                retry_wait(Op::Redirect, &e, None, 0, &POLICY, 0.0).is_none(),
                "{e}"
            );
            assert!(
                retry_wait(Op::Create, &e, None, 0, &POLICY, 0.0).is_none(),
                "{e}"
            );
        }
    }

    /// Doubling from the first backoff up to the cap, jitter taking off at most half;
    /// `Retry-After` wins when given and is refused beyond the policy's bound.
    #[test]
    fn how_long_to_wait() {
        let e = twilio(429, 20429);
        let ms = |retries, jitter| {
            retry_wait(Op::Create, &e, None, retries, &POLICY, jitter)
                .unwrap()
                .as_millis()
        };
        assert_eq!((ms(0, 0.0), ms(1, 0.0), ms(2, 0.0)), (100, 200, 300));
        assert_eq!(ms(1, 0.999_999), 100);
        let after = |secs| {
            retry_wait(
                Op::Create,
                &e,
                Some(Duration::from_secs(secs)),
                0,
                &POLICY,
                0.5,
            )
        };
        assert_eq!(after(2), Some(Duration::from_secs(2)));
        assert_eq!(after(0), Some(Duration::ZERO));
        assert_eq!(after(6), None);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn retry_after_header() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    /// Twilio's classic body, an RFC 9457 problem, and a proxy's page.
    #[test]
    fn error_bodies() {
        let classic = br#"{"code":20404,"message":"The requested resource /x was not found","more_info":"https://www.twilio.com/docs/errors/20404","status":404}"#;
        assert_eq!(
            twilio_error(404, classic),
            RestError::Twilio {
                status: 404,
                code: Some(20404),
                message: "The requested resource /x was not found".into()
            }
        );
        let problem = br#"{"type":"https://x","title":"Too Many","status":429,"code":20429,"detail":"slow down"}"#;
        assert_eq!(twilio_error(429, problem).code(), Some(20429));
        assert!(twilio_error(429, problem).to_string().contains("slow down"));
        let page = twilio_error(502, b"<html>Bad Gateway</html>");
        assert_eq!(page.code(), None);
        assert_eq!(page.status(), Some(502));
        assert_eq!(
            page.to_string(),
            "Twilio answered 502: <html>Bad Gateway</html>"
        );
        assert_eq!(
            twilio_error(400, br#"{"code":21210,"message":"unverified"}"#).to_string(),
            "Twilio answered 400 (code 21210): unverified"
        );
        let long = twilio_error(500, "x".repeat(1000).as_bytes());
        assert!(long.to_string().chars().count() < 240);
    }

    #[test]
    fn created_resources() {
        let ok = parse_created(br#"{"sid":"CA1","status":"queued","extra":{"a":1}}"#).unwrap();
        assert_eq!((ok.sid.as_str(), ok.status.as_str()), ("CA1", "queued"));
        assert!(matches!(
            parse_created(b"{}"),
            Err(RestError::BadResponse(_))
        ));
        assert!(matches!(
            parse_created(b"<xml/>"),
            Err(RestError::BadResponse(_))
        ));
    }

    #[test]
    fn call_sids_and_paths() {
        assert!(is_call_sid_like("CA0123456789abcdef0123456789abcdef"));
        for bad in [
            "",
            "CA1/../../x",
            "CA1?x=1",
            "CA 1",
            "CA1.json",
            &"A".repeat(65),
        ] {
            assert!(!is_call_sid_like(bad), "{bad}");
        }
        assert_eq!(path_segment("AC1/x?"), "AC1%2Fx%3F");
    }

    /// Secrets stay out of `Debug` and out of every error's text.
    #[test]
    fn secrets_never_show() {
        let secret = "super-secret-token-1234";
        let rest = TwilioRest::new(RestConfig {
            api_base: "http://127.0.0.1:1/".into(),
            account_sid: "AC1".into(),
            auth: RestAuth::AuthToken(secret.to_owned().into()),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            rest.inner.calls_url,
            "http://127.0.0.1:1/2010-04-01/Accounts/AC1/Calls"
        );
        let encoded = basic_auth("AC1", secret)
            .trim_start_matches("Basic ")
            .to_owned();
        let leaky = RestError::Twilio {
            status: 401,
            code: Some(20003),
            message: format!("bad {secret} / {encoded}"),
        };
        let clean = rest.scrubbed(leaky).to_string();
        assert!(
            !clean.contains(secret) && !clean.contains(&encoded),
            "{clean}"
        );
        let key = RestAuth::ApiKey {
            sid: "SK1".into(),
            secret: secret.to_owned().into(),
        };
        for text in [
            format!("{key:?}"),
            format!("{:?}", RestAuth::AuthToken(secret.to_owned().into())),
            format!("{rest:?}"),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn the_client_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<TwilioRest>();
    }
}
