//! What every AI leg (Realtime, GPT-Live) needs of its websocket, whatever the API: the awc
//! client (one per worker thread, Nagle off, HTTP/1.1), the bounded outbox and the future that
//! writes it, the mailbox size, and scrubbing the key out of what reaches a log.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_codec::Framed;
use awc::error::WsProtocolError;
use awc::ws::{self, CloseCode};
use awc::BoxedSocket;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;

use crate::config::CallConfig;
use crate::messages::{CallCounters, Transcript, UpstreamEvent};
use crate::session::restart::LegFailure;

/// Caller frames an AI leg's mailbox holds beyond the audio held while it was connecting;
/// `try_send` into a full one drops and counts. Caller audio comes at 50 frames a second, so
/// this is only reached if the leg is not polled.
const MAILBOX_HEADROOM: usize = 64;

/// The mailbox capacity of an AI leg: when a leg becomes ready, the Twilio leg hands it all the
/// caller audio it held (`call.upstream_buffer_ms`, 20 ms a frame) at once, so that must fit.
pub fn mailbox_capacity(call_config: &CallConfig) -> usize {
    (call_config.upstream_buffer_ms / 20) as usize + MAILBOX_HEADROOM
}

pub(crate) type WsSink = SplitSink<Framed<BoxedSocket, ws::Codec>, ws::Message>;

/// How an AI leg reaches its call. Recipients, so a test can stand in for the call.
#[derive(Clone)]
pub struct LegPort {
    pub events: Recipient<UpstreamEvent>,
    pub transcripts: Recipient<Transcript>,
}

/// The events waiting for the socket, bounded in appends.
pub(crate) struct Outbox {
    queue: VecDeque<(ws::Message, bool)>,
    /// Appends in `queue`.
    audio: usize,
    max_audio: usize,
    /// Messages fed since the last flush.
    unflushed: bool,
    close: bool,
    waker: Option<Waker>,
    /// A write has been waiting for the socket since then.
    blocked_since: Option<Instant>,
    counters: Arc<CallCounters>,
}

pub(crate) enum Next {
    Send(ws::Message),
    Flush,
    Close,
}

impl Outbox {
    pub(crate) fn new(max_audio: usize, counters: Arc<CallCounters>) -> Self {
        Self {
            queue: VecDeque::new(),
            audio: 0,
            max_audio,
            unflushed: false,
            close: false,
            waker: None,
            blocked_since: None,
            counters,
        }
    }

    /// Closes the socket after what is queued, or (`drop_queued`) at once.
    pub(crate) fn close(&mut self, drop_queued: bool) {
        if drop_queued {
            self.queue.clear();
            self.audio = 0;
        }
        self.close = true;
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Drops the caller audio still queued (control events stay).
    pub(crate) fn drop_audio(&mut self) {
        self.queue.retain(|(_, audio)| !audio);
        self.audio = 0;
    }

    /// A write has been waiting for the socket since then.
    pub(crate) fn blocked_since(&self) -> Option<Instant> {
        self.blocked_since
    }

    pub(crate) fn push(&mut self, message: ws::Message, is_audio: bool) {
        if is_audio {
            if self.audio >= self.max_audio {
                // The oldest append goes: the caller's latest words matter most.
                if let Some(at) = self.queue.iter().position(|(_, audio)| *audio) {
                    self.queue.remove(at);
                    self.audio -= 1;
                    CallCounters::add(&self.counters.dropped_openai_backpressure, 1);
                }
            }
            self.audio += 1;
        }
        self.queue.push_back((message, is_audio));
        CallCounters::set(&self.counters.openai_queued, self.queue.len() as u64);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Next> {
        if let Some((message, is_audio)) = self.queue.pop_front() {
            if is_audio {
                self.audio -= 1;
            }
            self.unflushed = true;
            CallCounters::set(&self.counters.openai_queued, self.queue.len() as u64);
            return Poll::Ready(Next::Send(message));
        }
        if std::mem::take(&mut self.unflushed) {
            return Poll::Ready(Next::Flush);
        }
        if self.close {
            return Poll::Ready(Next::Close);
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Feeds the socket from the outbox until it is closed or fails.
pub(crate) async fn write_loop(
    outbox: Rc<RefCell<Outbox>>,
    mut sink: WsSink,
) -> Result<(), WsProtocolError> {
    loop {
        let next = std::future::poll_fn(|cx| outbox.borrow_mut().poll_next(cx)).await;
        match next {
            Next::Send(message) => timed(&outbox, sink.feed(message)).await?,
            Next::Flush => timed(&outbox, sink.flush()).await?,
            Next::Close => {
                let _ = sink
                    .send(ws::Message::Close(Some(CloseCode::Normal.into())))
                    .await;
                let _ = sink.close().await;
                return Ok(());
            }
        }
    }
}

/// Awaits `write`, noting in `blocked_since` when it had to wait for the socket.
async fn timed<F: std::future::Future>(outbox: &Rc<RefCell<Outbox>>, write: F) -> F::Output {
    let mut write = std::pin::pin!(write);
    let mut first = true;
    let output = std::future::poll_fn(|cx| {
        let poll = write.as_mut().poll(cx);
        if poll.is_pending() && first {
            outbox.borrow_mut().blocked_since = Some(Instant::now());
        }
        first = false;
        poll
    })
    .await;
    outbox.borrow_mut().blocked_since = None;
    output
}

/// TCP connections with Nagle's algorithm off: caller audio goes out as a small append every
/// 20 ms, which Nagle would hold back while the previous one is unacknowledged (awc's default
/// connector leaves it on).
fn nodelay_tcp() -> impl actix_service::Service<
    actix_tls::connect::ConnectInfo<awc::http::Uri>,
    Response = actix_tls::connect::Connection<awc::http::Uri, actix_rt::net::TcpStream>,
    Error = actix_tls::connect::ConnectError,
> + Clone {
    use actix_service::ServiceExt as _;
    actix_tls::connect::ConnectorService::default().map(
        |connection: actix_tls::connect::Connection<awc::http::Uri, actix_rt::net::TcpStream>| {
            let _ = connection.io_ref().set_nodelay(true);
            connection
        },
    )
}

thread_local! {
    /// The awc client of this worker thread, with the connect timeout it was built for.
    static CLIENT: std::cell::RefCell<Option<(Duration, awc::Client)>> =
        const { std::cell::RefCell::new(None) };
}

/// One client per worker thread (awc is `!Send`), shared by every leg on it: building one
/// builds a rustls configuration with the whole root store, which per call cost set-up time
/// and memory for nothing. HTTP/1.1 only, as the websocket handshake fails if the server picks
/// h2 by ALPN.
pub(crate) fn client_for(timeout: Duration) -> awc::Client {
    CLIENT.with(|cell| {
        let mut cell = cell.borrow_mut();
        match &*cell {
            Some((t, client)) if *t == timeout => client.clone(),
            _ => {
                // `limit(0)`: the connector's default cap of 100 connections would count
                // every live websocket and hold the 101st call's leg until one ends.
                let client = awc::Client::builder()
                    .connector(awc::Connector::new().connector(nodelay_tcp()).limit(0))
                    .timeout(timeout)
                    .max_http_version(awc::http::Version::HTTP_11)
                    .finish();
                *cell = Some((timeout, client.clone()));
                client
            }
        }
    })
}

/// Scrubs the key out of a failure's text.
pub(crate) fn scrub(failure: LegFailure, key: &str) -> LegFailure {
    match failure {
        LegFailure::Connect(s) => LegFailure::Connect(redact(&s, key)),
        LegFailure::SessionRejected(s) => LegFailure::SessionRejected(redact(&s, key)),
        LegFailure::Fatal { code, message } => LegFailure::Fatal {
            code,
            message: redact(&message, key),
        },
        LegFailure::Closed { code, reason } => LegFailure::Closed {
            code,
            reason: redact(&reason, key),
        },
        LegFailure::Protocol(s) => LegFailure::Protocol(redact(&s, key)),
        other => other,
    }
}

/// Removes the API key from text that goes to logs or `/calls` (OpenAI's own messages may echo
/// part of a key; ours never contain it, but a message is cheap to scrub).
pub fn redact(text: &str, key: &str) -> String {
    let text = if key.len() >= 8 {
        text.replace(key, "[redacted]")
    } else {
        text.to_string()
    };
    // Also any `sk-…` token, whole or partial.
    text.split(' ')
        .map(|word| {
            if word.starts_with("sk-") && word.len() > 6 {
                "sk-[redacted]"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a frame from the AI's socket means for its leg.
pub(crate) enum Incoming {
    /// A whole text event (fragments reassembled).
    Text(bytes::Bytes),
    /// Answer with a pong (awc does not answer pings by itself).
    Ping(bytes::Bytes),
    /// Nothing to do (a fragment, a pong, a binary frame: logged).
    Nothing,
    /// The socket is done for.
    Failed(LegFailure),
}

/// Reads one frame, reassembling fragmented text events in `fragments` (at most `max_bytes`).
pub(crate) fn read_frame(
    frame: Result<awc::ws::Frame, WsProtocolError>,
    fragments: &mut Option<bytes::BytesMut>,
    max_bytes: usize,
    label: &str,
) -> Incoming {
    use actix_http::ws::Item;
    use awc::ws::Frame;
    match frame {
        Ok(Frame::Text(bytes)) => Incoming::Text(bytes),
        Ok(Frame::Continuation(item)) => match item {
            Item::FirstText(b) => {
                *fragments = Some(bytes::BytesMut::from(&b[..]));
                Incoming::Nothing
            }
            Item::FirstBinary(_) => {
                *fragments = None;
                Incoming::Nothing
            }
            Item::Continue(b) => {
                if let Some(buf) = fragments.as_mut() {
                    if buf.len() + b.len() > max_bytes {
                        log::warn!("{label} fragmented event over the size limit");
                        *fragments = None;
                    } else {
                        buf.extend_from_slice(&b);
                    }
                }
                Incoming::Nothing
            }
            Item::Last(b) => match fragments.take() {
                Some(mut buf) => {
                    buf.extend_from_slice(&b);
                    Incoming::Text(buf.freeze())
                }
                None => Incoming::Nothing,
            },
        },
        Ok(Frame::Binary(b)) => {
            log::warn!(
                "{label} unexpected binary frame from OpenAI ({} bytes)",
                b.len()
            );
            Incoming::Nothing
        }
        Ok(Frame::Ping(p)) => Incoming::Ping(p),
        Ok(Frame::Pong(_)) => Incoming::Nothing,
        Ok(Frame::Close(reason)) => Incoming::Failed(match reason {
            Some(r) => LegFailure::Closed {
                code: Some(u16::from(r.code)),
                reason: format!("{:?} {}", r.code, r.description.unwrap_or_default()),
            },
            None => LegFailure::Closed {
                code: None,
                reason: "no close code".into(),
            },
        }),
        Err(e) => Incoming::Failed(LegFailure::Protocol(e.to_string())),
    }
}

/// The failure of a socket whose stream ended without a close frame.
pub(crate) fn socket_ended() -> LegFailure {
    LegFailure::Closed {
        code: None,
        reason: "socket ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_keys_whole_or_partial() {
        let key = "sk-proj-abcdefghijklmnop";
        assert_eq!(
            redact(&format!("bad key {key} given"), key),
            "bad key [redacted] given"
        );
        assert_eq!(
            redact("Incorrect API key provided: sk-proj-***mnop.", key),
            "Incorrect API key provided: sk-[redacted]"
        );
        assert_eq!(redact("nothing secret", key), "nothing secret");
    }

    fn outbox(max_audio: usize) -> Outbox {
        Outbox::new(max_audio, Arc::new(CallCounters::default()))
    }

    fn text(m: &ws::Message) -> String {
        match m {
            ws::Message::Text(t) => t.to_string(),
            _ => String::new(),
        }
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_append_and_never_a_control_event() {
        let mut o = outbox(2);
        o.push(ws::Message::Text("update".into()), false);
        o.push(ws::Message::Text("a1".into()), true);
        o.push(ws::Message::Text("a2".into()), true);
        o.push(ws::Message::Text("truncate".into()), false);
        o.push(ws::Message::Text("a3".into()), true);
        let left: Vec<String> = o.queue.iter().map(|(m, _)| text(m)).collect();
        assert_eq!(left, vec!["update", "a2", "truncate", "a3"]);
        assert_eq!(
            CallCounters::get(&o.counters.dropped_openai_backpressure),
            1
        );
        assert_eq!(CallCounters::get(&o.counters.openai_queued), 4);
    }

    #[test]
    fn the_outbox_flushes_once_per_batch_then_waits() {
        let mut o = outbox(10);
        o.push(ws::Message::Text("a1".into()), true);
        o.push(ws::Message::Text("a2".into()), true);
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let kinds: Vec<&str> = (0..4)
            .map(|_| match o.poll_next(&mut cx) {
                Poll::Ready(Next::Send(_)) => "send",
                Poll::Ready(Next::Flush) => "flush",
                Poll::Ready(Next::Close) => "close",
                Poll::Pending => "pending",
            })
            .collect();
        assert_eq!(kinds, vec!["send", "send", "flush", "pending"]);
        assert_eq!(o.audio, 0);
    }
}
