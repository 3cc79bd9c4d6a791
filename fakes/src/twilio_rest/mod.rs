//! THE fake Twilio REST API, Calls resource (`reference/twilio-rest.md`, section I): what the
//! service's hang-up, transfer and outbound calls talk to in the end-to-end tests and the
//! simulator. Point `twilio.api_base` at [`FakeTwilioRest::base_url`].
//!
//! It answers like Twilio and is stricter than Twilio about what it is sent:
//! - HTTP/1.1 on `127.0.0.1:0` with keep-alive (awc reuses connections), `Content-Length`
//!   bodies, a small hand-written parser (module `http`: no TLS, no `hyper`).
//! - HTTP Basic with the Account SID and auth token, or an API key and its secret; the path
//!   must name the account. Refused: 401 with 20003.
//! - `POST …/Calls/{CallSid}.json` (update), `POST …/Calls.json` (create), `GET
//!   …/Calls/{CallSid}.json` (fetch), `GET …/Calls.json` (list). Without `.json` the answer is
//!   XML, as Twilio's is.
//! - Form bodies only, PascalCase names, `+` as `%2B`; `Status`/`Twiml`/`Url` one at a time;
//!   `Twiml` read by [`crate::twiml`] (4000 characters, absolute URLs, caller IDs); E.164
//!   numbers, `sip:` and `client:` targets; `From` one of the account's numbers.
//! - Calls have state: a test registers live calls ([`FakeTwilioRest::add_live_call`]),
//!   `Status=completed` ends one, a `Twiml` update replaces its document, an ended call answers
//!   20404 or 21220 as Twilio's does.
//!
//! Every check has the outcome Twilio has (an error answer, a call-log notice, or nothing);
//! independently, whatever a correct client would not have sent is a *violation*, and a test
//! ends with [`FakeTwilioRest::assert_no_violations`]. What happens to a call is published as
//! [`CallEvent`]s, so the harness can send the media stream's `stop` as Twilio would
//! ([`FakeTwilioRest::on_stream_end`], [`FakeTwilioRest::subscribe`]). Created calls are played
//! by the test: [`FakeTwilioRest::answer_created_call`] requests the call's `Url` as Twilio does
//! (signed), [`FakeTwilioRest::complete_created_call`] posts the signed status callback.
//!
//! Runtime: tokio. One task per connection; state behind a `Mutex` that is never held across
//! an `.await`; waits use a `watch` counter bumped on every change, so they never poll.

mod calls;
mod dispatch;
mod errors;
pub(crate) mod http;
mod outbound;
mod rules;
mod server;

use std::time::{Duration, Instant};

pub use calls::{is_call_sid, Call, CallStatus, Direction};
pub use errors::{RestError, INVALID_PARAMETER};
pub use rules::{is_absolute_http_url, is_e164, Notice, MAX_TWIML_CHARS};
pub use server::FakeTwilioRest;

use crate::twiml::Twiml;

/// How long the waits of this module wait before they panic.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The auth token of [`Account::test`].
pub const TEST_AUTH_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// The API key of [`Account::test_with_api_key`].
pub const TEST_API_KEY_SID: &str = "SK00000000000000000000000000000000";
pub const TEST_API_KEY_SECRET: &str = "fake-api-key-secret";

/// The account the fake serves: its SID and auth token, and optionally an API key.
#[derive(Clone)]
pub struct Account {
    pub account_sid: String,
    /// Authenticates REST requests with the Account SID, and signs every webhook.
    pub auth_token: String,
    /// (API key SID `SK…`, secret): the other accepted Basic pair.
    pub api_key: Option<(String, String)>,
}

impl Account {
    pub fn new(account_sid: &str, auth_token: &str) -> Account {
        Account {
            account_sid: account_sid.to_owned(),
            auth_token: auth_token.to_owned(),
            api_key: None,
        }
    }

    /// This account with an API key as well.
    pub fn with_api_key(mut self, sid: &str, secret: &str) -> Account {
        self.api_key = Some((sid.to_owned(), secret.to_owned()));
        self
    }

    /// The account of the simulated calls ([`crate::twilio::ACCOUNT_SID`]) with
    /// [`TEST_AUTH_TOKEN`].
    pub fn test() -> Account {
        Account::new(crate::twilio::ACCOUNT_SID, TEST_AUTH_TOKEN)
    }

    /// [`Account::test`] with the API key [`TEST_API_KEY_SID`] / [`TEST_API_KEY_SECRET`].
    pub fn test_with_api_key() -> Account {
        Account::test().with_api_key(TEST_API_KEY_SID, TEST_API_KEY_SECRET)
    }

    /// Whether (user, password) is one of the account's two Basic pairs.
    fn accepts(&self, user: &str, password: &str) -> bool {
        (user == self.account_sid && password == self.auth_token)
            || self
                .api_key
                .as_ref()
                .is_some_and(|(sid, secret)| user == sid && password == secret)
    }
}

/// Secrets stay out of test output.
impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("api_key", &self.api_key.as_ref().map(|(sid, _)| sid))
            .finish()
    }
}

/// One request the fake received, refused ones included.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// When the whole request had arrived.
    pub at: Instant,
    pub method: String,
    /// The request target as sent (query string included).
    pub path: String,
    /// The `{CallSid}` of the path, if it names one.
    pub call_sid: Option<String>,
    /// The form parameters, decoded, in order (empty unless the body was form-encoded).
    pub form: Vec<(String, String)>,
    /// The Basic user (Account SID or API key SID), if the header could be read. Never the
    /// password.
    pub auth_user: Option<String>,
    pub content_type: Option<String>,
    /// The body as sent (lossy UTF-8).
    pub raw_body: String,
    /// The HTTP status the fake answered.
    pub status: u16,
    /// The Twilio error code of the answer, if it was an error.
    pub error_code: Option<u32>,
}

impl RecordedRequest {
    /// The first value of the form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What happened to a call, in order. The `stop` of the call's media stream follows each event
/// for which [`CallEvent::ends_stream`] is true.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEvent {
    /// `POST …/Calls.json` created a call (`queued`).
    Created {
        sid: String,
        from: String,
        to: String,
    },
    /// `Status=completed` hung up an answered call.
    Completed { sid: String },
    /// `Status=canceled` (or `completed`) stopped a call that was still queued or ringing.
    Canceled { sid: String },
    /// A `Twiml` update replaced the call's document: the stream gets `stop` and is closed,
    /// then this TwiML runs.
    Redirected { sid: String, twiml: Twiml },
    /// A `Url` update: Twilio fetches the new TwiML from `url`.
    RedirectedToUrl {
        sid: String,
        url: String,
        method: String,
    },
    /// The test answered a created call ([`FakeTwilioRest::answer_created_call`]).
    Answered { sid: String },
    /// The test ended a call from the far side ([`FakeTwilioRest::caller_hangs_up`],
    /// [`FakeTwilioRest::complete_created_call`]).
    Ended { sid: String, status: CallStatus },
}

impl CallEvent {
    pub fn sid(&self) -> &str {
        match self {
            CallEvent::Created { sid, .. }
            | CallEvent::Completed { sid }
            | CallEvent::Canceled { sid }
            | CallEvent::Redirected { sid, .. }
            | CallEvent::RedirectedToUrl { sid, .. }
            | CallEvent::Answered { sid }
            | CallEvent::Ended { sid, .. } => sid,
        }
    }

    /// Whether Twilio ends the call's media stream (`stop`, then close) on this event.
    pub fn ends_stream(&self) -> bool {
        !matches!(self, CallEvent::Created { .. } | CallEvent::Answered { .. })
    }
}

/// Which webhook the fake sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookKind {
    /// A created call's `StatusCallback`.
    StatusCallback,
    /// A created call's `Url`, requested when it is answered.
    Voice,
}

/// One webhook the fake sent to the service.
#[derive(Clone, Debug)]
pub struct SentWebhook {
    pub call_sid: String,
    pub kind: WebhookKind,
    /// `POST` (form body) or `GET` (parameters in the query).
    pub method: String,
    /// The URL as the service gave it, and as signed (for a GET, with the parameters' query).
    pub url: String,
    /// Where it was sent (the same URL, or its path on the webhook host).
    pub delivered_to: String,
    pub params: Vec<(String, String)>,
    /// The `X-Twilio-Signature` sent.
    pub signature: String,
    /// The service's HTTP status, or why there was none.
    pub result: Result<u16, String>,
}
