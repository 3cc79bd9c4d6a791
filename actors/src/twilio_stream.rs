//! `TwilioStreamActor`: the Twilio Media Streams websocket of one call.
//!
//! It reads Twilio's frames, turns them into typed messages for its `CallActor`, and writes the
//! `media` / `mark` / `clear` messages the call sends back. It holds no call logic. A frame it
//! cannot use (not JSON, binary, unknown event, missing field, media before `start`) is logged
//! with the call SID, counted, and skipped: the call goes on.
//!
//! This is the only file that uses `actix-web-actors` (deprecated upstream in favour of
//! `actix-ws`): moving is a change to this file alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{HttpRequest, HttpResponse};
use actix_web_actors::ws;

use crate::call::CallActor;
use crate::messages::{
    AudioIn, CallIdentified, ClearAudio, Dtmf, MalformedFrame, MarkEchoed, PlayAudio, Stop,
    StopReason, StreamStarted,
};
use crate::protocol::twilio::{self, Outbound, TwilioEvent};

/// Twilio sends a media frame every 20 ms for the whole call; this long without any frame means
/// the connection is dead even if TCP has not noticed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the idle check runs.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Upgrades `req` to the Media Streams websocket and starts the call that owns it: `make_call`
/// builds the `CallActor` given its stream's address. Returns the 101 response, or the handshake
/// error as an HTTP error (no actor is started then).
pub fn accept(
    req: &HttpRequest,
    payload: actix_web::web::Payload,
    max_frame_bytes: usize,
    make_call: impl FnOnce(Addr<TwilioStreamActor>) -> CallActor,
) -> Result<HttpResponse, actix_web::Error> {
    // The call and the stream each need the other's address: create the call's context first so
    // its address exists, start the stream with it, then run the call in that context.
    let call_ctx: Context<CallActor> = Context::new();
    let stream = TwilioStreamActor::new(call_ctx.address());
    let (stream_addr, response) = ws::WsResponseBuilder::new(stream, req, payload)
        .frame_size(max_frame_bytes)
        .start_with_addr()?;
    call_ctx.run(make_call(stream_addr));
    Ok(response)
}

/// The websocket of one call's Twilio leg.
pub struct TwilioStreamActor {
    call: Addr<CallActor>,
    /// `[CA…]` once `start` names the call; a connection number before.
    label: Arc<str>,
    /// Set by `start`; nothing is sent to Twilio before it.
    out: Option<Outbound>,
    last_frame: Instant,
    malformed: u64,
    /// Twilio said `stop`: a close that follows is the normal end, not a failure.
    stopped_by_twilio: bool,
    /// The call asked us to close: do not report the close back to it.
    closed_by_call: bool,
}

impl TwilioStreamActor {
    pub fn new(call: Addr<CallActor>) -> Self {
        Self {
            call,
            label: Arc::from("[pending]"),
            out: None,
            last_frame: Instant::now(),
            malformed: 0,
            stopped_by_twilio: false,
            closed_by_call: false,
        }
    }

    fn malformed(&mut self, what: impl std::fmt::Display) {
        self.malformed += 1;
        // The first few are worth a warning each; a peer that sends garbage at 50 frames/s must
        // not flood the log, so later ones go to debug with a running count.
        if self.malformed <= 5 || self.malformed % 100 == 0 {
            log::warn!(
                "{} malformed frame from Twilio ({} so far): {what}",
                self.label,
                self.malformed
            );
        } else {
            log::debug!("{} malformed frame from Twilio: {what}", self.label);
        }
        self.call.do_send(MalformedFrame);
    }

    fn on_text(&mut self, text: &str) {
        match twilio::parse(text) {
            Ok(TwilioEvent::Media {
                payload,
                audio_bytes,
                timestamp_ms,
            }) => {
                if self.out.is_none() {
                    self.malformed("media before start");
                    return;
                }
                log::trace!("{} media in: {payload}", self.label);
                self.call.do_send(AudioIn {
                    payload: payload.into_owned(),
                    bytes: audio_bytes,
                    timestamp_ms,
                });
            }
            Ok(TwilioEvent::Mark { name }) => self.call.do_send(MarkEchoed {
                name: name.into_owned(),
            }),
            Ok(TwilioEvent::Dtmf { digit }) => self.call.do_send(Dtmf { digit }),
            Ok(TwilioEvent::Start(start)) => {
                if self.out.is_some() {
                    self.malformed("second start on one stream");
                    return;
                }
                if start.encoding != "audio/x-mulaw" {
                    log::warn!(
                        "[{}] unexpected media encoding {:?}; treating it as audio/x-mulaw",
                        start.call_sid,
                        start.encoding
                    );
                }
                self.out = Some(Outbound::new(&start.stream_sid));
                self.call.do_send(StreamStarted { start });
            }
            Ok(TwilioEvent::Connected) => log::debug!("{} Twilio connected", self.label),
            Ok(TwilioEvent::Stop) => {
                self.stopped_by_twilio = true;
                self.call.do_send(Stop {
                    reason: StopReason::TwilioStop,
                });
            }
            Ok(TwilioEvent::OtherTrackMedia { track }) => self.malformed(format_args!(
                "media for track {track:?} on a <Connect> stream"
            )),
            Err(e) => self.malformed(e),
        }
    }
}

impl Actor for TwilioStreamActor {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(IDLE_CHECK, |act, ctx| {
            if act.last_frame.elapsed() > IDLE_TIMEOUT {
                log::warn!(
                    "{} no frame from Twilio for {}s: closing the stream",
                    act.label,
                    IDLE_TIMEOUT.as_secs()
                );
                ctx.close(Some(ws::CloseCode::Away.into()));
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if !self.closed_by_call {
            // The call ends with its Twilio leg; `stop` already told it if Twilio said so.
            if !self.stopped_by_twilio {
                self.call.do_send(Stop {
                    reason: StopReason::TwilioClosed("socket closed".into()),
                });
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for TwilioStreamActor {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_frame = Instant::now();
        match msg {
            Ok(ws::Message::Text(text)) => self.on_text(&text),
            Ok(ws::Message::Binary(bin)) => {
                self.malformed(format_args!("binary frame of {} bytes", bin.len()))
            }
            Ok(ws::Message::Ping(p)) => ctx.pong(&p),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Continuation(_)) => {
                self.malformed("fragmented frame (continuation)");
            }
            Ok(ws::Message::Close(reason)) => {
                if !self.stopped_by_twilio {
                    log::info!(
                        "{} Twilio closed the socket without stop ({reason:?})",
                        self.label
                    );
                }
                ctx.close(reason);
                ctx.stop();
            }
            Err(e) => {
                // A protocol error (e.g. a frame over the size limit) leaves the stream unusable.
                log::warn!("{} websocket protocol error from Twilio: {e}", self.label);
                self.call.do_send(MalformedFrame);
                ctx.stop();
            }
        }
    }
}

/// Sends assistant audio to the caller, and its mark.
impl Handler<PlayAudio> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: PlayAudio, ctx: &mut Self::Context) {
        // invariant: the call sends audio only after `StreamStarted`; without a stream SID the
        // audio could not be addressed, so it is dropped loudly rather than sent malformed.
        let Some(out) = &self.out else {
            log::error!("{} audio out before start: dropped", self.label);
            return;
        };
        if !msg.payload.is_empty() {
            log::trace!("{} media out: {}", self.label, msg.payload);
            ctx.text(out.media(&msg.payload));
        }
        if let Some(name) = msg.mark {
            ctx.text(out.mark(&name));
        }
    }
}

/// Empties Twilio's buffer of assistant audio (barge-in).
impl Handler<ClearAudio> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, _: ClearAudio, ctx: &mut Self::Context) {
        if let Some(out) = &self.out {
            ctx.text(out.clear());
        }
    }
}

/// Uses the call SID in log lines from now on.
impl Handler<CallIdentified> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: CallIdentified, _: &mut Self::Context) {
        self.label = msg.label;
    }
}

/// The call is over: close the socket (Twilio then continues with the TwiML after `<Connect>`).
impl Handler<Stop> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Self::Context) {
        self.closed_by_call = true;
        let code = match msg.reason {
            StopReason::Shutdown => ws::CloseCode::Away,
            _ => ws::CloseCode::Normal,
        };
        ctx.close(Some(code.into()));
        ctx.stop();
    }
}
