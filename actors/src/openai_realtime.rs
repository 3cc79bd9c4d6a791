//! `OpenAiRealtimeActor`: one connection ("leg") to the OpenAI Realtime API for one call.
//!
//! Lifecycle: connect (awc, HTTP/1.1, `Authorization: Bearer`) → send `session.update` → wait for
//! `session.updated` → report `Ready`. From then on caller audio goes out as
//! `input_audio_buffer.append` and server events come back as typed messages for the `CallActor`.
//! The leg never restarts itself: on any failure (connect error, close, protocol error, no
//! `session.updated` in time, a rejected `session.update`) it reports `Closed` once and stops, and
//! the `CallActor` decides whether a new leg follows. That keeps the retry budget in one place.

use std::sync::Arc;
use std::time::Duration;

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use actix_codec::Framed;
use actix_http::ws::Item;
use awc::error::WsProtocolError;
use awc::ws::{self, CloseCode, Frame};
use awc::BoxedSocket;
use bytes::BytesMut;
use futures_util::stream::{SplitSink, StreamExt};
use secrecy::{ExposeSecret, SecretString};

use crate::call::CallActor;
use crate::config::OpenAiConfig;
use crate::messages::{
    AudioIn, AudioOut, CallIdentified, Role, Stop, Transcript, UpstreamCommand, UpstreamEvent,
};
use crate::protocol::{base64_audio_len, openai as proto, openai::ServerEvent};

/// After asking the server to close, how long to wait for its close before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Error codes after which this session cannot be used (the server closes it, or every later
/// event would fail the same way).
const FATAL_CODES: &[&str] = &[
    "invalid_api_key",
    "session_expired",
    "beta_api_shape_disabled",
    "insufficient_quota",
];

type WsSink = SinkWrite<ws::Message, SplitSink<Framed<BoxedSocket, ws::Codec>, ws::Message>>;

pub struct OpenAiRealtimeActor {
    call: Addr<CallActor>,
    /// Which leg of the call this is (0 first, then one per restart); stale reports are ignored.
    leg: u32,
    config: Arc<OpenAiConfig>,
    api_key: SecretString,
    label: Arc<str>,
    sink: Option<WsSink>,
    /// `session.updated` received.
    ready: bool,
    /// `Closed` was reported, or the call asked us to stop: report nothing more.
    done: bool,
    /// A text message arriving in fragments (rare, but legal websocket).
    fragments: Option<BytesMut>,
    /// Ids of the item being streamed, shared by every chunk of it (no allocation per delta).
    current_ids: Option<(Arc<str>, Arc<str>)>,
}

impl OpenAiRealtimeActor {
    pub fn new(
        call: Addr<CallActor>,
        leg: u32,
        config: Arc<OpenAiConfig>,
        api_key: SecretString,
        label: Arc<str>,
    ) -> Self {
        Self {
            call,
            leg,
            config,
            api_key,
            label,
            sink: None,
            ready: false,
            done: false,
            fragments: None,
            current_ids: None,
        }
    }

    fn send(&mut self, text: String) {
        if let Some(sink) = self.sink.as_mut() {
            if sink.write(ws::Message::Text(text.into())).is_err() {
                log::debug!("{} OpenAI socket closed while sending", self.label);
            }
        }
    }

    /// Reports the leg as gone (once) and stops.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: String) {
        if !self.done {
            self.done = true;
            self.call.do_send(UpstreamEvent::Closed {
                leg: self.leg,
                reason: redact(&reason, self.api_key.expose_secret()),
            });
        }
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let event = match proto::parse_server_event(text) {
            Ok(event) => event,
            Err(e) => {
                log::warn!("{} unreadable event from OpenAI: {e}", self.label);
                self.call.do_send(UpstreamEvent::Error {
                    code: "unreadable_event".into(),
                    message: e.to_string(),
                });
                return;
            }
        };
        match event {
            ServerEvent::AudioDelta {
                response_id,
                item_id,
                delta,
            } => {
                let Some(bytes) = base64_audio_len(&delta) else {
                    self.call.do_send(UpstreamEvent::Error {
                        code: "bad_audio_delta".into(),
                        message: format!("audio delta is not base64 ({} chars)", delta.len()),
                    });
                    return;
                };
                let ids = match &self.current_ids {
                    Some((r, i)) if **r == *response_id && **i == *item_id => {
                        (r.clone(), i.clone())
                    }
                    _ => {
                        let ids: (Arc<str>, Arc<str>) =
                            (Arc::from(response_id.as_ref()), Arc::from(item_id.as_ref()));
                        self.current_ids = Some(ids.clone());
                        ids
                    }
                };
                self.call.do_send(AudioOut {
                    payload: delta.into_owned(),
                    bytes,
                    response_id: ids.0,
                    item_id: ids.1,
                });
            }
            ServerEvent::SpeechStarted => self.call.do_send(UpstreamEvent::SpeechStarted),
            ServerEvent::ResponseCreated { response_id } => self
                .call
                .do_send(UpstreamEvent::ResponseCreated { response_id }),
            ServerEvent::ResponseDone {
                response_id,
                status,
            } => self.call.do_send(UpstreamEvent::ResponseDone {
                response_id,
                status,
            }),
            ServerEvent::AssistantTranscript { transcript } if !transcript.trim().is_empty() => {
                self.call.do_send(Transcript {
                    role: Role::Assistant,
                    text: transcript,
                })
            }
            ServerEvent::CallerTranscript { transcript } if !transcript.trim().is_empty() => {
                self.call.do_send(Transcript {
                    role: Role::Caller,
                    text: transcript,
                })
            }
            ServerEvent::AssistantTranscript { .. } | ServerEvent::CallerTranscript { .. } => {}
            ServerEvent::CallerTranscriptFailed { message } => {
                log::warn!("{} caller transcription failed: {message}", self.label)
            }
            ServerEvent::SessionCreated => {
                log::debug!("{} OpenAI session created", self.label)
            }
            ServerEvent::SessionUpdated => {
                if !self.ready {
                    self.ready = true;
                    self.call.do_send(UpstreamEvent::Ready { leg: self.leg });
                }
            }
            ServerEvent::Error {
                code,
                message,
                event_id,
            } => {
                let code = code.unwrap_or_else(|| "unknown".into());
                let message = redact(&message, self.api_key.expose_secret());
                if event_id.as_deref() == Some(proto::SESSION_UPDATE_EVENT_ID) {
                    // Without our configuration the model would read μ-law as 24 kHz PCM.
                    self.fail(
                        ctx,
                        format!("OpenAI rejected session.update: {code}: {message}"),
                    );
                } else if FATAL_CODES.contains(&code.as_str()) {
                    self.fail(ctx, format!("OpenAI error {code}: {message}"));
                } else {
                    self.call.do_send(UpstreamEvent::Error { code, message });
                }
            }
            ServerEvent::Other { kind } => log::trace!("{} OpenAI event {kind}", self.label),
        }
    }
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
fn client_for(timeout: Duration) -> awc::Client {
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

impl Actor for OpenAiRealtimeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let request = client_for(timeout)
            .ws(self.config.connect_url())
            .max_frame_size(self.config.max_frame_bytes)
            .bearer_auth(self.api_key.expose_secret());
        async move { request.connect().await }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok((_response, framed)) => {
                    if act.done {
                        return; // stopped while connecting
                    }
                    let (sink, stream) = framed.split();
                    ctx.add_stream(stream);
                    act.sink = Some(SinkWrite::new(sink, ctx));
                    act.call.do_send(UpstreamEvent::Connected { leg: act.leg });
                    // Events on one socket are ordered: the update is in force before any audio.
                    let update = proto::session_update(&act.config);
                    act.send(update);
                }
                Err(awc::error::WsClientError::InvalidResponseStatus(status)) => act.fail(
                    ctx,
                    format!("connect to OpenAI failed: HTTP {status} instead of 101 (401: check OPENAI_API_KEY)"),
                ),
                Err(e) => act.fail(ctx, format!("connect to OpenAI failed: {e}")),
            })
            .spawn(ctx);
        ctx.run_later(timeout, |act, ctx| {
            if !act.ready && !act.done {
                let reason = format!(
                    "no session.updated within {} ms",
                    act.config.connect_timeout_ms
                );
                act.fail(ctx, reason);
            }
        });
    }
}

impl WriteHandler<WsProtocolError> for OpenAiRealtimeActor {
    fn error(&mut self, err: WsProtocolError, ctx: &mut Self::Context) -> Running {
        self.fail(ctx, format!("write to OpenAI failed: {err}"));
        Running::Stop
    }
}

impl StreamHandler<Result<Frame, WsProtocolError>> for OpenAiRealtimeActor {
    fn handle(&mut self, frame: Result<Frame, WsProtocolError>, ctx: &mut Context<Self>) {
        match frame {
            Ok(Frame::Text(bytes)) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                Err(_) => log::warn!("{} non-UTF-8 text frame from OpenAI", self.label),
            },
            Ok(Frame::Continuation(item)) => match item {
                Item::FirstText(b) => self.fragments = Some(BytesMut::from(&b[..])),
                Item::FirstBinary(_) => self.fragments = None,
                Item::Continue(b) => {
                    if let Some(buf) = self.fragments.as_mut() {
                        if buf.len() + b.len() > self.config.max_frame_bytes {
                            log::warn!("{} fragmented event over the size limit", self.label);
                            self.fragments = None;
                        } else {
                            buf.extend_from_slice(&b);
                        }
                    }
                }
                Item::Last(b) => {
                    if let Some(mut buf) = self.fragments.take() {
                        buf.extend_from_slice(&b);
                        match std::str::from_utf8(&buf) {
                            Ok(text) => self.on_text(text, ctx),
                            Err(_) => log::warn!("{} non-UTF-8 text from OpenAI", self.label),
                        }
                    }
                }
            },
            Ok(Frame::Binary(b)) => {
                log::warn!(
                    "{} unexpected binary frame from OpenAI ({} bytes)",
                    self.label,
                    b.len()
                )
            }
            Ok(Frame::Ping(p)) => {
                // awc does not answer pings by itself.
                if let Some(sink) = self.sink.as_mut() {
                    let _ = sink.write(ws::Message::Pong(p));
                }
            }
            Ok(Frame::Pong(_)) => {}
            Ok(Frame::Close(reason)) => {
                let reason = match reason {
                    Some(r) => format!(
                        "OpenAI closed the socket: {:?} {}",
                        r.code,
                        r.description.unwrap_or_default()
                    ),
                    None => "OpenAI closed the socket".to_string(),
                };
                self.fail(ctx, reason);
            }
            Err(e) => self.fail(ctx, format!("websocket protocol error from OpenAI: {e}")),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.fail(ctx, "OpenAI socket ended".into());
    }
}

/// Appends caller audio to the model's input buffer.
impl Handler<AudioIn> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        let event = proto::audio_append(&msg.payload);
        self.send(event);
    }
}

/// Sends one control event to the session.
impl Handler<UpstreamCommand> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamCommand, _: &mut Context<Self>) {
        let event = match &msg {
            UpstreamCommand::UserText(text) => proto::user_text_item(text),
            UpstreamCommand::AssistantText(text) => proto::assistant_text_item(text),
            UpstreamCommand::CreateResponse { instructions } => {
                proto::response_create(instructions.as_deref())
            }
            UpstreamCommand::Cancel { response_id } => proto::response_cancel(response_id),
            UpstreamCommand::Truncate {
                item_id,
                audio_end_ms,
            } => proto::item_truncate(item_id, *audio_end_ms),
        };
        self.send(event);
    }
}

/// Uses the call SID in log lines from now on.
impl Handler<CallIdentified> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, msg: CallIdentified, _: &mut Context<Self>) {
        self.label = msg.label;
    }
}

/// The call is over (or replaced this leg): close the socket cleanly and stop.
impl Handler<Stop> for OpenAiRealtimeActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        self.done = true;
        match self.sink.as_mut() {
            Some(sink) => {
                let _ = sink.write(ws::Message::Close(Some(CloseCode::Normal.into())));
                sink.close();
                // The server answers with its close and the stream ends; do not wait forever.
                ctx.run_later(CLOSE_GRACE, |_, ctx| ctx.stop());
            }
            None => ctx.stop(),
        }
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

#[cfg(test)]
mod tests {
    use super::redact;

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
}
