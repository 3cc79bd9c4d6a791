//! The listening side: the accept loop, one task per keep-alive connection, the dispatch of a
//! request to update/create/fetch with every check in Twilio's order, and the state and knobs a
//! test reaches through [`FakeTwilioRest`].

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
    task::{AbortHandle, JoinHandle},
};

use super::{
    calls::{self, Call, CallStatus},
    errors::RestError,
    http::{self, Parsed, Request, Response},
    outbound,
    rules::{self, CallerIds, Findings, Form, Notice, UpdateAction},
    Account, CallEvent, RecordedRequest, SentWebhook, DEFAULT_TIMEOUT,
};
use crate::lock;

/// The versioned prefix every Calls path starts with.
const API_PREFIX: &str = "/2010-04-01/Accounts/";

/// Knobs a test turns while the fake runs.
#[derive(Default)]
struct Controls {
    /// Answered instead of the next requests, one each (after authentication).
    fail_next: VecDeque<RestError>,
    /// This many next requests get 429/20429.
    fail_429: u32,
    /// More requests in flight than this get 429/20429 (Twilio's concurrency limit).
    rate_limit: Option<usize>,
    /// `Retry-After` on 429 answers (UNCONFIRMED that Twilio sends it; off by default).
    retry_after: Option<u32>,
    /// Every answer waits this long; the request takes effect at once.
    delay: Duration,
    /// New connections, and new requests on open ones, are reset unanswered.
    refuse: bool,
    /// Webhooks go to this `host:port` instead of the URL's own authority (signed over the URL
    /// as given).
    webhook_host: Option<String>,
}

/// What the fake knows and has seen.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) calls: HashMap<String, Call>,
    /// SIDs of created calls, in creation order.
    created: Vec<String>,
    /// The account's numbers and verified caller IDs (`From` of a create, `callerId`).
    pub(crate) numbers: Vec<String>,
    requests: Vec<RecordedRequest>,
    events: Vec<CallEvent>,
    violations: Vec<String>,
    notices: Vec<Notice>,
    webhooks: Vec<SentWebhook>,
}

/// What every connection of one server shares.
pub(crate) struct Shared {
    pub(crate) account: Account,
    pub(crate) state: Mutex<State>,
    controls: Mutex<Controls>,
    /// Requests read and not yet answered, for the concurrency limit.
    in_flight: AtomicUsize,
    /// Bumped on every recorded request, event, violation or webhook: the waits watch it.
    changed: watch::Sender<u64>,
    /// Live copy of the events, for a harness that reacts as they happen.
    events: broadcast::Sender<CallEvent>,
    /// Open connection tasks, aborted on drop and by `drop_connections`.
    connections: Mutex<Vec<AbortHandle>>,
    connection_count: AtomicUsize,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records `event` (the caller holds the state lock) and publishes it.
    pub(crate) fn emit(&self, st: &mut State, event: CallEvent) {
        st.events.push(event.clone());
        // No subscriber is not an error: the log keeps every event.
        let _ = self.events.send(event);
        self.bump();
    }

    pub(crate) fn violate(&self, st: &mut State, message: String) {
        st.violations.push(message);
        self.bump();
    }

    pub(crate) fn notice(&self, st: &mut State, call_sid: &str, code: u32, message: String) {
        st.notices.push(Notice {
            call_sid: call_sid.to_owned(),
            code,
            message,
        });
        self.bump();
    }

    pub(crate) fn record_webhook(&self, webhook: SentWebhook) {
        lock(&self.state).webhooks.push(webhook);
        self.bump();
    }

    pub(crate) fn webhook_host(&self) -> Option<String> {
        lock(&self.controls).webhook_host.clone()
    }

    /// Waits until `check` finds something in the state, up to `timeout` (forever when `None`).
    async fn wait_for<T>(
        &self,
        timeout: Option<Duration>,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        // Subscribe before looking, so a change between the look and the wait is not lost.
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(found) = check(&lock(&self.state)) {
                return Some(found);
            }
            let changed = changes.changed();
            let woke = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, changed).await.ok()?,
                None => changed.await,
            };
            // The sender lives in `self`: the channel cannot close while we borrow it.
            debug_assert!(woke.is_ok());
        }
    }
}

/// The fake Twilio REST API. Dropping it stops accepting and closes every connection.
pub struct FakeTwilioRest {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl FakeTwilioRest {
    /// Starts the fake for `account` on `127.0.0.1:0`.
    pub async fn start(account: Account) -> FakeTwilioRest {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("FakeTwilioRest: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("FakeTwilioRest: a bound listener has an address");
        let shared = Arc::new(Shared {
            account,
            state: Mutex::default(),
            controls: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            changed: watch::Sender::new(0),
            events: broadcast::Sender::new(1024),
            connections: Mutex::default(),
            connection_count: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeTwilioRest {
            shared,
            addr,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`, the service's `twilio.api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn account(&self) -> &Account {
        &self.shared.account
    }

    // -- calls and numbers ---------------------------------------------------------------------

    /// Adds a number of the account (a Twilio number or a verified caller ID): a valid `From`
    /// of a create and `callerId` of a `<Dial>`.
    pub fn add_number(&self, number: &str) {
        let mut st = lock(&self.shared.state);
        if !st.numbers.iter().any(|n| n == number) {
            st.numbers.push(number.to_owned());
        }
    }

    /// Registers an answered inbound call `call_sid` from `from` to `to` (`in-progress`). `to`,
    /// the number that was called, becomes one of the account's numbers.
    pub fn add_live_call(&self, call_sid: &str, from: &str, to: &str) {
        self.add_number(to);
        let mut st = lock(&self.shared.state);
        st.calls
            .insert(call_sid.to_owned(), Call::live(call_sid, from, to));
        self.shared.bump();
    }

    /// The far side hangs up `call_sid` (an answered call becomes `completed`, a queued or
    /// ringing one `canceled`), as when the caller hangs up before the service's request: that
    /// request then gets 20404/21220. A created call's status callback is posted in the
    /// background. Panics on an unknown or ended call.
    pub fn caller_hangs_up(&self, call_sid: &str) {
        let callback = {
            let mut st = lock(&self.shared.state);
            let call = st
                .calls
                .get_mut(call_sid)
                .unwrap_or_else(|| panic!("FakeTwilioRest: no call {call_sid}"));
            assert!(
                !call.status.is_ended(),
                "FakeTwilioRest: {call_sid} has already ended ({})",
                call.status.as_str()
            );
            let status = if call.status == CallStatus::InProgress {
                CallStatus::Completed
            } else {
                CallStatus::Canceled
            };
            call.set_status(status);
            let callback = call.status_callback.is_some();
            self.shared.emit(
                &mut st,
                CallEvent::Ended {
                    sid: call_sid.to_owned(),
                    status,
                },
            );
            callback
        };
        if callback {
            tokio::spawn(outbound::status_callback(
                self.shared.clone(),
                call_sid.to_owned(),
            ));
        }
    }

    /// A snapshot of the call `call_sid`.
    pub fn call(&self, call_sid: &str) -> Option<Call> {
        lock(&self.shared.state).calls.get(call_sid).cloned()
    }

    /// Calls created through the API, in creation order.
    pub fn created_calls(&self) -> Vec<Call> {
        let st = lock(&self.shared.state);
        st.created
            .iter()
            .filter_map(|sid| st.calls.get(sid).cloned())
            .collect()
    }

    // -- what was seen -------------------------------------------------------------------------

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.state).requests.clone()
    }

    /// The `POST`s to `…/Calls/{call_sid}…` (updates, refused ones included).
    pub fn updates_for(&self, call_sid: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.call_sid.as_deref() == Some(call_sid))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` requests have been recorded and returns them all; panics after
    /// [`DEFAULT_TIMEOUT`].
    pub async fn wait_requests(&self, n: usize) -> Vec<RecordedRequest> {
        let found = self
            .shared
            .wait_for(Some(DEFAULT_TIMEOUT), |st| {
                (st.requests.len() >= n).then(|| st.requests.clone())
            })
            .await;
        found.unwrap_or_else(|| {
            panic!(
                "FakeTwilioRest: timed out after {DEFAULT_TIMEOUT:?} waiting for {n} request(s); \
                 got {:?}",
                self.requests()
            )
        })
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<CallEvent> {
        lock(&self.shared.state).events.clone()
    }

    /// The first event (past or future) that `matches`; panics after [`DEFAULT_TIMEOUT`].
    pub async fn wait_event(&self, matches: impl Fn(&CallEvent) -> bool) -> CallEvent {
        let found = self
            .shared
            .wait_for(Some(DEFAULT_TIMEOUT), |st| {
                st.events.iter().find(|e| matches(e)).cloned()
            })
            .await;
        found.unwrap_or_else(|| {
            panic!(
                "FakeTwilioRest: timed out after {DEFAULT_TIMEOUT:?} waiting for an event; \
                 events so far: {:?}",
                self.events()
            )
        })
    }

    /// Resolves with the first event (past or future) that ends `call_sid`'s media stream
    /// (hang-up, redirect, far-side end): the moment Twilio would send `stop` and close. It
    /// owns what it needs, so a harness can spawn it; it waits as long as it takes.
    pub fn on_stream_end(
        &self,
        call_sid: &str,
    ) -> impl Future<Output = CallEvent> + Send + 'static {
        self.on_nth_stream_end(call_sid, 0)
    }

    /// [`Self::on_stream_end`] for the call's stream number `n` (from 0): after a redirect to
    /// a new `<Connect><Stream>`, the next stream of the same call ends with the next event.
    pub fn on_nth_stream_end(
        &self,
        call_sid: &str,
        n: usize,
    ) -> impl Future<Output = CallEvent> + Send + 'static {
        let shared = self.shared.clone();
        let sid = call_sid.to_owned();
        async move {
            let found = shared
                .wait_for(None, |st| {
                    st.events
                        .iter()
                        .filter(|e| e.sid() == sid && e.ends_stream())
                        .nth(n)
                        .cloned()
                })
                .await;
            // invariant: without a deadline, wait_for only returns with a value.
            found.expect("a wait without a deadline returns a value")
        }
    }

    /// Events from now on, as they happen (the log of [`Self::events`] keeps them all).
    pub fn subscribe(&self) -> broadcast::Receiver<CallEvent> {
        self.shared.events.subscribe()
    }

    /// Errors Twilio would have logged on calls (its debugger) while accepting the request:
    /// 15004, 13214, 13223, 11200.
    pub fn call_log(&self) -> Vec<Notice> {
        lock(&self.shared.state).notices.clone()
    }

    /// Webhooks sent to the service (status callbacks, voice requests of created calls).
    pub fn webhooks(&self) -> Vec<SentWebhook> {
        lock(&self.shared.state).webhooks.clone()
    }

    /// TCP connections accepted so far (refused ones included).
    pub fn connection_count(&self) -> usize {
        self.shared.connection_count.load(Ordering::SeqCst)
    }

    /// Everything a correct client would not have done, prefixed with the request.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.state).violations.clone()
    }

    /// Panics listing every violation, if there is any.
    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "FakeTwilioRest recorded {} violation(s):\n  {}",
            v.len(),
            v.join("\n  ")
        );
    }

    // -- knobs ---------------------------------------------------------------------------------

    /// The next request (after authentication) is answered with this error and has no effect.
    /// Calls queue up: two calls fail the next two requests.
    pub fn set_fail_next(&self, status: u16, code: u32, message: &str) {
        lock(&self.shared.controls)
            .fail_next
            .push_back(RestError::new(status, code, message));
    }

    /// The next `n` requests get 429/20429 (not processed; a client may retry).
    pub fn fail_with_429_times(&self, n: u32) {
        lock(&self.shared.controls).fail_429 = n;
    }

    /// Requests beyond `max_in_flight` concurrent ones get 429/20429; `None` lifts the limit.
    pub fn set_rate_limit(&self, max_in_flight: Option<usize>) {
        lock(&self.shared.controls).rate_limit = max_in_flight;
    }

    /// `Retry-After: secs` on every 429 (none by default).
    pub fn set_retry_after(&self, secs: Option<u32>) {
        lock(&self.shared.controls).retry_after = secs;
    }

    /// Every answer is held this long (a slow API); the request takes effect at once, as an
    /// update that timed out on the client may still have been applied.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared.controls).delay = delay;
    }

    /// While set, new connections and new requests on open ones are reset without an answer.
    pub fn set_refuse_connections(&self, refuse: bool) {
        lock(&self.shared.controls).refuse = refuse;
    }

    /// Closes every open connection (a server that drops idle keep-alive connections).
    pub fn drop_connections(&self) {
        for handle in lock(&self.shared.connections).drain(..) {
            handle.abort();
        }
    }

    /// Sends webhooks to `host:port` (e.g. the service under test) instead of the authority of
    /// the URL the service gave, which may name its public host; the signature still covers the
    /// URL as given. `None`: send to the URL itself (it must be `http://`).
    pub fn set_webhook_host(&self, host: Option<&str>) {
        lock(&self.shared.controls).webhook_host = host.map(str::to_owned);
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for FakeTwilioRest {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("fake-twilio-rest: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.connection_count.fetch_add(1, Ordering::SeqCst);
        if lock(&shared.controls).refuse {
            reset(stream);
            continue;
        }
        let task = tokio::spawn(connection(stream, shared.clone()));
        let mut open = lock(&shared.connections);
        open.retain(|h| !h.is_finished());
        open.push(task.abort_handle());
    }
}

/// Drops `stream` with a TCP reset: the client sees "connection reset", not an answer.
fn reset(stream: TcpStream) {
    // A failure leaves an ordinary close, which the client also sees as no answer.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Counts a request in flight until it is answered.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One keep-alive connection: requests read and answered in order until either side closes.
async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    let mut continued = false;
    loop {
        let request = loop {
            match http::parse_request(&buf) {
                Parsed::Complete(request, used) => {
                    buf.drain(..used);
                    continued = false;
                    break request;
                }
                Parsed::Incomplete { expect_continue } => {
                    if expect_continue && !continued {
                        continued = true;
                        if stream
                            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Parsed::Invalid { status, why } => {
                    shared.violate(
                        &mut lock(&shared.state),
                        format!("unreadable HTTP request: {why}"),
                    );
                    let answer = Response {
                        status,
                        content_type: "text/plain; charset=utf-8",
                        headers: Vec::new(),
                        body: why,
                        close: true,
                    };
                    let _ = stream.write_all(&answer.to_bytes()).await;
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if lock(&shared.controls).refuse {
            reset(stream);
            return;
        }
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight(&shared.in_flight);
        let (answer, delay) = handle(&shared, &request, in_flight.0.load(Ordering::SeqCst));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if stream.write_all(&answer.to_bytes()).await.is_err() {
            return;
        }
        drop(in_flight);
        if answer.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The answer's format: `.json`, or XML for a path without the suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Xml,
}

/// A path under `/2010-04-01/Accounts/`.
#[derive(Debug)]
struct Route {
    account_sid: String,
    /// `None` for `…/Calls.json`.
    call_sid: Option<String>,
    format: Format,
}

/// Reads `/2010-04-01/Accounts/{AccountSid}/Calls[/{CallSid}](.json|.xml|)`.
fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix(API_PREFIX)?;
    let mut parts = rest.split('/');
    let account_sid = parts.next()?.to_owned();
    let calls = parts.next()?;
    let call = parts.next();
    if parts.next().is_some() || account_sid.is_empty() {
        return None;
    }
    let split = |segment: &str| -> Option<(String, Format)> {
        match segment.rsplit_once('.') {
            Some((name, "json")) => Some((name.to_owned(), Format::Json)),
            Some((name, "xml")) => Some((name.to_owned(), Format::Xml)),
            Some(_) => None,
            None => Some((segment.to_owned(), Format::Xml)),
        }
    };
    match call {
        None => {
            let (name, format) = split(calls)?;
            (name == "Calls").then_some(Route {
                account_sid,
                call_sid: None,
                format,
            })
        }
        Some(call) => {
            let (sid, format) = split(call)?;
            (calls == "Calls" && !sid.is_empty()).then_some(Route {
                account_sid,
                call_sid: Some(sid),
                format,
            })
        }
    }
}

/// What a request gets: a resource (status, JSON) or an error, in a format.
struct Outcome {
    format: Format,
    result: Result<(u16, Value), RestError>,
    /// Extra headers (`WWW-Authenticate`, `Retry-After`, …).
    headers: Vec<(String, String)>,
}

impl Outcome {
    fn error(format: Format, error: RestError) -> Outcome {
        let mut headers = Vec::new();
        if error.status == 401 {
            headers.push((
                "WWW-Authenticate".into(),
                "Basic realm=\"Twilio API\"".into(),
            ));
        }
        Outcome {
            format,
            result: Err(error),
            headers,
        }
    }

    fn ok(format: Format, status: u16, body: Value) -> Outcome {
        Outcome {
            format,
            result: Ok((status, body)),
            headers: Vec::new(),
        }
    }
}

/// Answers one request: records it, applies it, and says how long to hold the answer.
fn handle(shared: &Arc<Shared>, req: &Request, in_flight: usize) -> (Response, Duration) {
    let mut record = RecordedRequest {
        at: Instant::now(),
        method: req.method.clone(),
        path: req.target.clone(),
        call_sid: None,
        form: Vec::new(),
        auth_user: None,
        content_type: req.header("content-type").map(str::to_owned),
        raw_body: String::from_utf8_lossy(&req.body).into_owned(),
        status: 0,
        error_code: None,
    };
    let mut findings = Findings::default();
    let (outcome, call_for_notices) = process(shared, req, &mut record, in_flight, &mut findings);
    let (status, content_type, body) = match (&outcome.result, outcome.format) {
        (Ok((status, value)), Format::Json) => (
            *status,
            "application/json; charset=utf-8",
            value.to_string(),
        ),
        (Ok((status, value)), Format::Xml) => {
            let root = if record.call_sid.is_some() {
                "Call"
            } else {
                "Calls"
            };
            (
                *status,
                "application/xml; charset=utf-8",
                calls::to_xml(value, root),
            )
        }
        (Err(e), Format::Json) => (e.status, "application/json; charset=utf-8", e.to_json()),
        (Err(e), Format::Xml) => (e.status, "application/xml; charset=utf-8", e.to_xml()),
    };
    record.status = status;
    record.error_code = outcome.result.as_ref().err().map(|e| e.code);
    let mut headers = vec![("Twilio-Request-Id".to_owned(), calls::new_sid("RQ"))];
    headers.extend(outcome.headers);
    let answer = Response {
        status,
        content_type,
        headers,
        body,
        close: !req.keep_alive(),
    };
    {
        let mut st = lock(&shared.state);
        for message in findings.violations {
            st.violations
                .push(format!("{} {}: {message}", req.method, req.target));
        }
        if let Some(sid) = call_for_notices {
            for (code, message) in findings.notices {
                st.notices.push(Notice {
                    call_sid: sid.clone(),
                    code,
                    message,
                });
            }
        }
        st.requests.push(record);
    }
    shared.bump();
    let delay = lock(&shared.controls).delay;
    (answer, delay)
}

/// The checks in Twilio's order, then the effect. Returns the outcome and the call SID the
/// request's call-log notices belong to.
fn process(
    shared: &Arc<Shared>,
    req: &Request,
    record: &mut RecordedRequest,
    in_flight: usize,
    findings: &mut Findings,
) -> (Outcome, Option<String>) {
    let path = req.path();
    // Known before anything is checked, so that refused requests show under their call too.
    record.call_sid = route(path).and_then(|r| r.call_sid);
    if req.version == "HTTP/1.1" && req.header("host").is_none() {
        findings.violation("no Host header (required in HTTP/1.1)");
    }
    // Authentication first: Twilio answers 401 before it looks at the path.
    let Some(header) = req.header("authorization") else {
        findings
            .violation("no Authorization header (HTTP Basic with the Account SID or an API key)");
        return (
            Outcome::error(Format::Json, RestError::authenticate()),
            None,
        );
    };
    let (user, password) = match http::basic_credentials(header) {
        Ok(pair) => pair,
        Err(why) => {
            findings.violation(why);
            return (
                Outcome::error(Format::Json, RestError::authenticate()),
                None,
            );
        }
    };
    record.auth_user = Some(user.clone());
    let account = &shared.account;
    if !account.accepts(&user, &password) {
        // Wrong credentials are a configuration a test may set up on purpose: no violation.
        return (
            Outcome::error(Format::Json, RestError::authenticate()),
            None,
        );
    }
    let Some(route) = route(path) else {
        findings.violation(format!(
            "no such resource: {path} (expected {API_PREFIX}{{AccountSid}}/Calls[/{{CallSid}}].json)"
        ));
        return (
            Outcome::error(Format::Json, RestError::not_found(path)),
            None,
        );
    };
    let format = route.format;
    if route.account_sid != account.account_sid {
        findings.violation(format!(
            "the path names account {} but the credentials are for {}",
            route.account_sid, account.account_sid
        ));
        return (Outcome::error(format, RestError::authenticate()), None);
    }
    if format == Format::Xml {
        findings.violation(format!("{path} does not end in .json: Twilio answers XML"));
    }
    if let Some(outcome) = injected(shared, format, in_flight) {
        return (outcome, None);
    }
    let form = if req.method == "POST" {
        form_of(req, findings)
    } else {
        Vec::new()
    };
    record.form = form.clone();
    let form = Form::new(&form);
    match (req.method.as_str(), route.call_sid) {
        ("GET", Some(sid)) => (fetch(shared, &sid, path, format, findings), Some(sid)),
        ("POST", Some(sid)) => (
            update(shared, &sid, path, format, &form, findings),
            Some(sid),
        ),
        ("POST", None) => create(shared, format, &form, findings),
        ("GET", None) => {
            let st = lock(&shared.state);
            let mut all: Vec<&Call> = st.calls.values().collect();
            all.sort_by(|a, b| a.sid.cmp(&b.sid));
            let list = calls::list_resource(&all, &account.account_sid);
            (Outcome::ok(format, 200, list), None)
        }
        (method, _) => {
            findings.violation(format!("{method} is not a method of {path}"));
            (
                Outcome::error(format, RestError::method_not_allowed(method)),
                None,
            )
        }
    }
}

/// The test's injected failures, if one applies to this request.
fn injected(shared: &Shared, format: Format, in_flight: usize) -> Option<Outcome> {
    let mut controls = lock(&shared.controls);
    if let Some(error) = controls.fail_next.pop_front() {
        return Some(Outcome::error(format, error));
    }
    let limited = controls.rate_limit.is_some_and(|limit| in_flight > limit);
    if controls.fail_429 > 0 || limited {
        if !limited {
            controls.fail_429 -= 1;
        }
        let mut outcome = Outcome::error(format, RestError::too_many_requests());
        outcome
            .headers
            .push(("Twilio-Concurrent-Requests".into(), in_flight.to_string()));
        if let Some(secs) = controls.retry_after {
            outcome
                .headers
                .push(("Retry-After".into(), secs.to_string()));
        }
        return Some(outcome);
    }
    None
}

/// The form parameters of a POST. Twilio reads only form bodies: any other body leaves the
/// request without parameters.
fn form_of(req: &Request, findings: &mut Findings) -> Vec<(String, String)> {
    let content_type = req.header("content-type");
    let is_form = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    if !is_form {
        if !req.body.is_empty() || content_type.is_some() {
            findings.violation(format!(
                "body with Content-Type {content_type:?} is not read (Twilio takes \
                 application/x-www-form-urlencoded): the request has no parameters"
            ));
        }
        return Vec::new();
    }
    let (pairs, problems) = http::decode_form(&req.body);
    for problem in problems {
        findings.violation(format!("form body: {problem}"));
    }
    pairs
}

/// `GET …/Calls/{sid}.json`.
fn fetch(
    shared: &Shared,
    sid: &str,
    path: &str,
    format: Format,
    findings: &mut Findings,
) -> Outcome {
    let st = lock(&shared.state);
    match st.calls.get(sid) {
        Some(call) => Outcome::ok(format, 200, call.resource(&shared.account.account_sid)),
        None => {
            findings.violation(unknown_call(sid));
            Outcome::error(format, RestError::not_found(path))
        }
    }
}

fn unknown_call(sid: &str) -> String {
    format!(
        "no call {sid} (never registered with add_live_call nor created{})",
        if calls::is_call_sid(sid) {
            ""
        } else {
            "; not even a CA + 32 hex SID"
        }
    )
}

/// `POST …/Calls/{sid}.json` (C).
fn update(
    shared: &Arc<Shared>,
    sid: &str,
    path: &str,
    format: Format,
    form: &Form<'_>,
    findings: &mut Findings,
) -> Outcome {
    let mut st = lock(&shared.state);
    let numbers = st.numbers.clone();
    let Some(call) = st.calls.get(sid) else {
        findings.violation(unknown_call(sid));
        return Outcome::error(format, RestError::not_found(path));
    };
    let (from, to, status) = (call.from.clone(), call.to.clone(), call.status);
    let ids = CallerIds {
        from: &from,
        to: &to,
        numbers: &numbers,
    };
    let action = match rules::check_update(form, ids, findings) {
        Ok(action) => action,
        Err(error) => return Outcome::error(format, error),
    };
    let unanswered = matches!(status, CallStatus::Queued | CallStatus::Ringing);
    let mut callback = false;
    let event = match action {
        // The hang-up race (D): the far side hung up first. Normal, not a violation.
        UpdateAction::Complete | UpdateAction::Cancel if status.is_ended() => {
            return Outcome::error(format, RestError::not_found(path))
        }
        UpdateAction::Twiml(..) | UpdateAction::Url { .. } if status != CallStatus::InProgress => {
            return Outcome::error(format, RestError::not_in_progress())
        }
        UpdateAction::Cancel if !unanswered => {
            findings.violation(
                "Status=canceled does nothing to an answered call (hang up with \
                 Status=completed)",
            );
            None
        }
        // A call that was never answered ends `canceled` either way (it is not charged).
        UpdateAction::Complete | UpdateAction::Cancel if unanswered => {
            set_status(&mut st, sid, CallStatus::Canceled, &mut callback);
            Some(CallEvent::Canceled { sid: sid.into() })
        }
        UpdateAction::Complete | UpdateAction::Cancel => {
            set_status(&mut st, sid, CallStatus::Completed, &mut callback);
            Some(CallEvent::Completed { sid: sid.into() })
        }
        UpdateAction::Twiml(xml, twiml) => {
            if let Some(call) = st.calls.get_mut(sid) {
                call.twiml_updates.push(xml);
                call.date_updated = calls::now_rfc2822();
            }
            Some(CallEvent::Redirected {
                sid: sid.into(),
                twiml,
            })
        }
        UpdateAction::Url { url, method } => {
            if let Some(call) = st.calls.get_mut(sid) {
                call.url_updates.push((url.clone(), method.clone()));
                call.date_updated = calls::now_rfc2822();
            }
            Some(CallEvent::RedirectedToUrl {
                sid: sid.into(),
                url,
                method,
            })
        }
        UpdateAction::Nothing => {
            findings.violation("an update with none of Status, Twiml, Url changes nothing");
            None
        }
    };
    let resource = st
        .calls
        .get(sid)
        .map(|c| c.resource(&shared.account.account_sid));
    if let Some(event) = event {
        shared.emit(&mut st, event);
    }
    drop(st);
    if callback {
        tokio::spawn(outbound::status_callback(shared.clone(), sid.to_owned()));
    }
    match resource {
        Some(resource) => Outcome::ok(format, 200, resource),
        None => Outcome::error(format, RestError::not_found(path)),
    }
}

/// Ends `sid` with `status`; `callback` is set when the call has a status callback to post.
fn set_status(st: &mut State, sid: &str, status: CallStatus, callback: &mut bool) {
    if let Some(call) = st.calls.get_mut(sid) {
        call.set_status(status);
        *callback = call.status_callback.is_some();
    }
}

/// `POST …/Calls.json` (F).
fn create(
    shared: &Shared,
    format: Format,
    form: &Form<'_>,
    findings: &mut Findings,
) -> (Outcome, Option<String>) {
    let mut st = lock(&shared.state);
    let numbers = st.numbers.clone();
    let new = match rules::check_create(form, &numbers, findings) {
        Ok(new) => new,
        Err(error) => return (Outcome::error(format, error), None),
    };
    let sid = calls::new_sid("CA");
    let call = Call::created(&sid, new);
    let resource = call.resource(&shared.account.account_sid);
    let event = CallEvent::Created {
        sid: sid.clone(),
        from: call.from.clone(),
        to: call.to.clone(),
    };
    st.calls.insert(sid.clone(), call);
    st.created.push(sid.clone());
    shared.emit(&mut st, event);
    (Outcome::ok(format, 201, resource), Some(sid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = route("/2010-04-01/Accounts/AC1/Calls/CA1.json").unwrap();
        assert_eq!(
            (r.account_sid.as_str(), r.call_sid.as_deref(), r.format),
            ("AC1", Some("CA1"), Format::Json)
        );
        let r = route("/2010-04-01/Accounts/AC1/Calls.json").unwrap();
        assert_eq!((r.call_sid, r.format), (None, Format::Json));
        assert_eq!(
            route("/2010-04-01/Accounts/AC1/Calls/CA1").unwrap().format,
            Format::Xml
        );
        assert_eq!(
            route("/2010-04-01/Accounts/AC1/Calls").unwrap().format,
            Format::Xml
        );
        for bad in [
            "/2010-04-01/Accounts/AC1/Calls/CA1.csv",
            "/2010-04-01/Accounts/AC1/Calls/CA1/Recordings.json",
            "/2010-04-01/Accounts/AC1/Messages.json",
            "/2010-04-01/Accounts//Calls.json",
            "/2010-04-01/Accounts/AC1/Calls/.json",
            "/2010-04-01/Accounts/AC1/Calls/CA1.json/",
            "/v1/Calls.json",
            "/2010-04-01/Accounts/AC1/calls/CA1.json",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
    }
}
