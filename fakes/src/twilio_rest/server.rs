//! The listening side: the accept loop, one task per keep-alive connection (requests read and
//! answered in order, each handed to `dispatch`), and the state and knobs a test reaches
//! through [`FakeTwilioRest`].

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
    task::{AbortHandle, JoinHandle},
};

use super::{
    calls::{Call, CallStatus},
    dispatch,
    errors::RestError,
    http::{self, Parsed, Response},
    outbound,
    rules::Notice,
    Account, CallEvent, RecordedRequest, SentWebhook, DEFAULT_TIMEOUT,
};
use crate::lock;

/// Knobs a test turns while the fake runs.
#[derive(Default)]
pub(crate) struct Controls {
    /// Answered instead of the next requests, one each (after authentication).
    pub(crate) fail_next: VecDeque<RestError>,
    /// This many next requests get 429/20429.
    pub(crate) fail_429: u32,
    /// More requests in flight than this get 429/20429 (Twilio's concurrency limit).
    pub(crate) rate_limit: Option<usize>,
    /// `Retry-After` on 429 answers (UNCONFIRMED that Twilio sends it; off by default).
    pub(crate) retry_after: Option<u32>,
    /// Every answer waits this long; the request takes effect at once.
    pub(crate) delay: Duration,
    /// New connections, and new requests on open ones, are reset unanswered.
    pub(crate) refuse: bool,
    /// Webhooks go to this `host:port` instead of the URL's own authority (signed over the URL
    /// as given).
    pub(crate) webhook_host: Option<String>,
}

/// What the fake knows and has seen.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) calls: HashMap<String, Call>,
    /// SIDs of created calls, in creation order.
    pub(crate) created: Vec<String>,
    /// The account's numbers and verified caller IDs (`From` of a create, `callerId`).
    pub(crate) numbers: Vec<String>,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) events: Vec<CallEvent>,
    pub(crate) violations: Vec<String>,
    pub(crate) notices: Vec<Notice>,
    pub(crate) webhooks: Vec<SentWebhook>,
}

/// What every connection of one server shares.
pub(crate) struct Shared {
    pub(crate) account: Account,
    pub(crate) state: Mutex<State>,
    pub(crate) controls: Mutex<Controls>,
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
    pub(crate) fn bump(&self) {
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
        let (answer, delay) =
            dispatch::handle(&shared, &request, in_flight.0.load(Ordering::SeqCst));
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
