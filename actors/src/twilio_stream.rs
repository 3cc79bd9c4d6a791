//! `TwilioStreamActor`: the Twilio Media Streams websocket of one call.
//!
//! It reads Twilio's frames and writes `media` / `mark` / `clear` back. It holds no call logic
//! beyond what its own facts decide, in two pure modules: [`Inbound`] (caller audio held while no
//! AI session is routed, silence for lost audio) and [`Playback`] (pre-start hold, playback
//! budget, marks, `clear`, the truncate point). Caller audio goes straight to the AI leg the
//! `CallActor` routed it to ([`RouteCallerAudio`]); assistant audio arrives straight from the AI
//! leg ([`AudioOut`]). `start`, digits and the end go to the `CallActor`. A frame it cannot use
//! (not JSON, binary, unknown event, missing field, media before `start`) is logged with the call
//! SID, counted, and skipped: the call goes on.
//!
//! Writing, and why this leg uses `actix-ws` rather than `actix-web-actors`: with
//! actix-web-actors the actor's context is the response body, so when Twilio stops reading, the
//! actor is not polled at all: its mailbox, timers and idle check freeze while `do_send` keeps
//! queueing audio without bound. With actix-ws the actor hands each message to a channel of 32
//! that actix-http drains into the socket (behind a 32 KiB write buffer), and pulls the next one
//! from the [`Playback`] only when the channel took the last. The actor stays live while the
//! socket is back-pressured: audio beyond the budget waits in the bounded queue (oldest dropped,
//! counted), and the watchdog sees how long a write has been waiting, and how long Twilio has
//! left pending marks unechoed (a Twilio that reads nothing echoes nothing, and the playback
//! budget stops our writes long before its socket is full).
//!
//! This is the only file that knows the websocket library of the Twilio leg.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message, ProtocolError};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::FutureExt as _;
use secrecy::{ExposeSecret as _, SecretString};

use crate::config::CallConfig;
use crate::messages::{
    AudioIn, AudioOut, CallCounters, CallIdentified, ClearAudio, ClearOutcome, Dtmf, MarkTail,
    RouteCallerAudio, Stop, StopReason, StreamStarted,
};
use crate::protocol::signature;
use crate::protocol::twilio::{self, Outbound, TwilioEvent};
use crate::session::inbound::{Inbound, InboundConfig};
use crate::session::playback::{Chunk, Playback, PlaybackConfig, Wire};
use crate::session::BYTES_PER_MS;

/// Twilio sends a media frame every 20 ms for the whole call; this long without any frame means
/// the connection is dead even if TCP has not noticed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the idle and stall checks run.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Audio messages the leg's mailbox holds. OpenAI sends a response's audio in bursts faster than
/// real time; the mailbox only has to absorb what arrives between two polls of this actor (the
/// playback queue behind it is the real buffer). `try_send` into a full mailbox drops and counts.
pub const MAILBOX_CAPACITY: usize = 1024;

/// What the Twilio leg tells its call. Recipients, so a test can stand in for the call.
#[derive(Clone)]
pub struct CallPort {
    pub started: Recipient<StreamStarted>,
    pub dtmf: Recipient<Dtmf>,
    pub stop: Recipient<Stop>,
}

/// How the call reaches its Twilio leg. Recipients, so a test can stand in for the leg.
#[derive(Clone)]
pub struct TwilioPort {
    pub audio: Recipient<AudioOut>,
    pub route: Recipient<RouteCallerAudio>,
    pub clear: Recipient<ClearAudio>,
    pub mark_tail: Recipient<MarkTail>,
    pub ident: Recipient<CallIdentified>,
    pub stop: Recipient<Stop>,
}

impl TwilioPort {
    /// The port of a Twilio leg: the real one, or any actor that stands in for it.
    pub fn of<A>(addr: &Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<AudioOut>
            + Handler<RouteCallerAudio>
            + Handler<ClearAudio>
            + Handler<MarkTail>
            + Handler<CallIdentified>
            + Handler<Stop>,
    {
        Self {
            audio: addr.clone().recipient(),
            route: addr.clone().recipient(),
            clear: addr.clone().recipient(),
            mark_tail: addr.clone().recipient(),
            ident: addr.clone().recipient(),
            stop: addr.clone().recipient(),
        }
    }
}

/// Hold audio queued ahead of what has played, at most (Twilio plays it in real time).
const HOLD_AHEAD_MS: u64 = 500;

/// `call.hold_audio`, played (looped) while the AI leg restarts.
#[derive(Default)]
struct Hold {
    /// The clip in 20 ms payloads; `None`: no hold audio configured.
    clip: Option<Arc<[Bytes]>>,
    /// Asked for (a restart began); it plays once the stream has started.
    wanted: bool,
    /// Playing since, and how many ms of it were queued.
    playing: Option<(Instant, u64)>,
    /// The clip's next frame.
    next: usize,
    /// The id under which hold audio goes through the playback queue.
    id: Option<Arc<str>>,
}

/// How a Twilio leg is set up beyond the call settings.
#[derive(Default)]
pub struct StreamOptions {
    /// Marks (and the playback budget they measure) are only needed where a barge-in can
    /// truncate: with OpenAI, not with the echo.
    pub track_marks: bool,
    /// The Twilio auth token when signatures are checked: `start` must carry the stream token.
    pub stream_key: Option<Arc<SecretString>>,
    /// `call.hold_audio` in 20 ms payloads: played while the AI leg restarts.
    pub hold_audio: Option<Arc<[Bytes]>>,
    /// Where the time to first audio and the playback lag go.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Upgrades `req` to the Media Streams websocket and starts the leg and the call that owns it:
/// `make_call` builds the call given how to reach its leg and the call's shared counters.
/// Returns the 101 response, or the handshake error as an HTTP error (no actor is started).
pub fn accept<A>(
    req: &HttpRequest,
    payload: actix_web::web::Payload,
    cfg: &CallConfig,
    options: StreamOptions,
    make_call: impl FnOnce(TwilioPort, Arc<CallCounters>) -> A,
) -> Result<HttpResponse, actix_web::Error>
where
    A: Actor<Context = Context<A>> + Handler<StreamStarted> + Handler<Dtmf> + Handler<Stop>,
{
    let (response, session, stream) = actix_ws::handle(req, payload)?;
    let stream = stream.max_frame_size(cfg.max_frame_bytes);
    let counters = Arc::new(CallCounters::default());
    // The call and the leg each need the other's address: create both contexts first.
    let call_ctx: Context<A> = Context::new();
    let mut leg_ctx: Context<TwilioStreamActor> = Context::new();
    leg_ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    let call = call_ctx.address();
    let port = CallPort {
        started: call.clone().recipient(),
        dtmf: call.clone().recipient(),
        stop: call.recipient(),
    };
    let mut leg = TwilioStreamActor::new(port, session, counters.clone(), cfg, options.track_marks);
    leg.stream_key = options.stream_key;
    leg.hold.clip = options.hold_audio;
    leg.writer.metrics = options.metrics;
    leg_ctx.add_stream(stream);
    let leg_port = TwilioPort::of(&leg_ctx.address());
    leg_ctx.run(leg);
    call_ctx.run(make_call(leg_port, counters));
    Ok(response)
}

/// A message for the socket, in the order it is written. Kept in this form (not yet encoded)
/// so that a write the socket refused at once can be encoded again for a later try.
enum Outgoing {
    Media(Bytes),
    Mark(String),
    Clear,
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// An encoded message, for actix-ws.
enum Encoded {
    Text(ByteString),
    Pong(Bytes),
}

/// What goes to the socket and in which order: playback, and the urgent messages before it.
struct Writer {
    playback: Playback,
    /// Set by `start`; nothing is sent to Twilio before it.
    outbound: Option<Outbound>,
    /// `clear`, pongs and the close go before any further audio.
    urgent: std::collections::VecDeque<Outgoing>,
    /// The mark that follows the media just written.
    mark_after: Option<String>,
    /// Marks are pending and none has been echoed since then. Twilio echoes a mark as the audio
    /// before it plays; the oldest pending mark covers at most `call.mark_interval_ms` of audio
    /// beyond the last echo, so a long wait means Twilio is not reading what we send even if the
    /// socket still takes data (the playback budget stops writing before the socket fills).
    echo_awaited_since: Option<Instant>,
    /// The socket is gone (a write failed), closing, or stalled: write nothing more.
    done: bool,
    counters: Arc<CallCounters>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Twilio's `start`, until the first assistant audio goes out (the time to first audio).
    first_audio_from: Option<Instant>,
}

impl Writer {
    /// The next message the socket may have now, if any.
    fn next_message(&mut self) -> Option<Outgoing> {
        if let Some(message) = self.urgent.pop_front() {
            return Some(message);
        }
        self.outbound.as_ref()?;
        if let Some(name) = self.mark_after.take() {
            return Some(Outgoing::Mark(name));
        }
        let wire = self.playback.next_wire()?;
        if self.echo_awaited_since.is_none() && self.playback.marks_pending() > 0 {
            self.echo_awaited_since = Some(Instant::now());
        }
        self.publish();
        Some(match wire {
            Wire::Media { payload, mark } => {
                self.mark_after = mark;
                Outgoing::Media(payload)
            }
            Wire::Mark(name) => Outgoing::Mark(name),
        })
    }

    fn encode(&self, message: &Outgoing) -> Option<Encoded> {
        let outbound = self.outbound.as_ref();
        Some(match message {
            // invariant: payloads are checked base64 (ASCII) before they get here.
            Outgoing::Media(payload) => Encoded::Text(
                outbound?
                    .media(std::str::from_utf8(payload).unwrap_or_default())
                    .into(),
            ),
            Outgoing::Mark(name) => Encoded::Text(outbound?.mark(name).into()),
            Outgoing::Clear => Encoded::Text(outbound?.clear().into()),
            Outgoing::Pong(data) => Encoded::Pong(data.clone()),
            Outgoing::Close(_) => return None,
        })
    }

    /// Folds the playback's counts into the call's counters and refreshes the gauges.
    fn publish(&mut self) {
        let c = &self.counters;
        let counts = self.playback.take_counts();
        if counts.frames_out > 0 {
            if let (Some(since), Some(metrics)) = (self.first_audio_from.take(), &self.metrics) {
                metrics.first_audio(since.elapsed());
            }
        }
        CallCounters::add(&c.frames_out, counts.frames_out);
        CallCounters::add(&c.dropped_pre_start, counts.dropped_pre_start);
        CallCounters::add(&c.dropped_interrupted, counts.dropped_interrupted);
        CallCounters::add(&c.dropped_twilio_backpressure, counts.dropped_backpressure);
        CallCounters::set(&c.marks_pending, self.playback.marks_pending() as u64);
        CallCounters::set(&c.unconfirmed_ms, self.playback.unconfirmed_ms());
        CallCounters::set(&c.twilio_queued_ms, self.playback.queued_ms());
    }
}

/// Sends one encoded message, waiting for room in actix-ws's channel.
async fn send(mut session: actix_ws::Session, message: Encoded) -> Result<(), actix_ws::Closed> {
    match message {
        Encoded::Text(text) => session.text(text).await,
        Encoded::Pong(data) => session.pong(&data).await,
    }
}

/// The websocket of one call's Twilio leg.
pub struct TwilioStreamActor {
    call: CallPort,
    /// `[CA…]` once `start` names the call; `[pending]` before.
    label: Arc<str>,
    counters: Arc<CallCounters>,
    writer: Writer,
    /// The socket's writing half: a handle on actix-ws's channel of 32 messages, which
    /// actix-http drains into the socket as fast as the socket takes data.
    session: actix_ws::Session,
    /// A write the channel had no room for waits in a future of its own since then; nothing
    /// else is written meanwhile (order), and the watchdog times it.
    writing: Option<(Instant, SpawnHandle)>,
    inbound: Inbound,
    /// The configured AI session caller audio goes to.
    ai: Option<Recipient<AudioIn>>,
    /// Reused for every frame (silence fill + the frame), so the audio path allocates no vector.
    forward: Vec<(Bytes, u32)>,
    started: bool,
    /// When the stream connected: the clock of frame arrivals.
    opened: Instant,
    /// Log the frame counts every this many caller frames (0: never).
    frame_log_interval: u64,
    last_frame: Instant,
    stall_timeout: Duration,
    start_timeout: Duration,
    malformed: u64,
    /// Twilio said `stop`, or the call asked us to close: a close that follows is expected.
    ending: bool,
    /// The call knows we are gone (it told us, or we told it).
    call_told: bool,
    /// The Twilio auth token when signatures are checked: `start` must then carry the stream
    /// token of its `callSid` (see [`signature::stream_token`]).
    stream_key: Option<Arc<SecretString>>,
    hold: Hold,
}

impl TwilioStreamActor {
    pub fn new(
        call: CallPort,
        session: actix_ws::Session,
        counters: Arc<CallCounters>,
        cfg: &CallConfig,
        track_marks: bool,
    ) -> Self {
        let playback = Playback::new(PlaybackConfig {
            pre_start_bytes: cfg.pre_start_buffer_ms * BYTES_PER_MS,
            track_marks,
            mark_interval_bytes: cfg.mark_interval_ms * BYTES_PER_MS,
            budget_bytes: cfg.playback_budget_ms * BYTES_PER_MS,
            queue_bytes: cfg.twilio_queue_ms * BYTES_PER_MS,
        });
        Self {
            call,
            label: Arc::from("[pending]"),
            writer: Writer {
                playback,
                outbound: None,
                urgent: Default::default(),
                mark_after: None,
                echo_awaited_since: None,
                done: false,
                counters: counters.clone(),
                metrics: None,
                first_audio_from: None,
            },
            counters,
            session,
            writing: None,
            inbound: Inbound::new(InboundConfig {
                hold_bytes: cfg.upstream_buffer_ms * BYTES_PER_MS,
                fill_gaps_max_ms: cfg.fill_gaps_max_ms,
            }),
            ai: None,
            forward: Vec::with_capacity(8),
            started: false,
            opened: Instant::now(),
            frame_log_interval: cfg.frame_log_interval,
            last_frame: Instant::now(),
            stall_timeout: Duration::from_millis(cfg.stall_timeout_ms),
            start_timeout: Duration::from_millis(cfg.start_timeout_ms),
            malformed: 0,
            ending: false,
            call_told: false,
            stream_key: None,
            hold: Hold::default(),
        }
    }

    fn malformed(&mut self, what: impl std::fmt::Display) {
        self.malformed += 1;
        CallCounters::add(&self.counters.malformed_frames, 1);
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
    }

    /// Whether `start` carries the stream token of its own `callSid` (always, when signatures
    /// are not checked). Until it has, no caller audio goes anywhere: media before a valid
    /// `start` is malformed and dropped.
    fn start_is_ours(&self, start: &twilio::StreamStart) -> bool {
        let Some(key) = &self.stream_key else {
            return true;
        };
        let token = start
            .custom_parameters
            .iter()
            .find(|(name, _)| name == signature::STREAM_TOKEN_PARAM)
            .map(|(_, value)| value.as_str());
        let problem = match token {
            None => "its start carries no stream token",
            Some(token)
                if signature::stream_token_valid(key.expose_secret(), &start.call_sid, token) =>
            {
                return true
            }
            Some(_) => "its stream token is not the one issued for this callSid",
        };
        // The SIDs were checked against Twilio's format by the parser: safe in a log line.
        log::warn!(
            "[{}] stream {} refused: {problem} (a replayed upgrade or a stream that did not come \
             from this service's TwiML); closing it before any audio reaches the AI",
            start.call_sid,
            start.stream_sid
        );
        false
    }

    fn on_text(&mut self, text: &ByteString, ctx: &mut Context<Self>) {
        match twilio::parse(text) {
            Ok(TwilioEvent::Media {
                payload,
                audio_bytes,
                timestamp_ms,
            }) => {
                if !self.started {
                    self.malformed("media before start");
                    return;
                }
                log::trace!("{} media in: {payload}", self.label);
                // Zero-copy: the payload is a slice of the frame it came in.
                let payload = match payload {
                    std::borrow::Cow::Borrowed(s) => text.as_bytes().slice_ref(s.as_bytes()),
                    std::borrow::Cow::Owned(s) => Bytes::from(s),
                };
                let mut forward = std::mem::take(&mut self.forward);
                self.inbound.on_media(
                    payload,
                    audio_bytes as u32,
                    timestamp_ms,
                    self.opened.elapsed().as_millis() as u64,
                    &mut forward,
                );
                self.send_to_ai(&mut forward);
                self.forward = forward;
            }
            Ok(TwilioEvent::Mark { name }) => {
                let writer = &mut self.writer;
                if let Some(lag) = writer.playback.on_mark(&name) {
                    if let Some(metrics) = &writer.metrics {
                        metrics.playback_lag(lag);
                    }
                }
                writer.echo_awaited_since =
                    (writer.playback.marks_pending() > 0).then(Instant::now);
                writer.publish();
                self.flush(ctx); // the budget may allow more audio now
            }
            Ok(TwilioEvent::Dtmf { digit }) => {
                let _ = self.call.dtmf.try_send(Dtmf { digit });
            }
            Ok(TwilioEvent::Start(start)) => {
                if self.started {
                    self.malformed("second start on one stream");
                    return;
                }
                if !self.start_is_ours(&start) {
                    self.ending = true;
                    self.call_told = true;
                    self.call.stop.do_send(Stop {
                        reason: StopReason::BadStreamToken,
                    });
                    self.close(Some(CloseCode::Policy.into()), ctx);
                    return;
                }
                if start.encoding != "audio/x-mulaw" {
                    log::warn!(
                        "[{}] unexpected media encoding {:?}; treating it as audio/x-mulaw",
                        start.call_sid,
                        start.encoding
                    );
                }
                self.started = true;
                {
                    let writer = &mut self.writer;
                    writer.outbound = Some(Outbound::new(&start.stream_sid));
                    writer.first_audio_from = Some(Instant::now());
                    writer.playback.start();
                    self.flush(ctx);
                }
                // Control: `do_send`, as the call's decisions must not be lost to a full mailbox.
                self.call.started.do_send(StreamStarted { start });
                if self.hold.wanted {
                    self.start_hold(ctx); // the AI leg was lost before the stream started
                }
            }
            Ok(TwilioEvent::Connected) => log::debug!("{} Twilio connected", self.label),
            Ok(TwilioEvent::Stop) => {
                self.ending = true;
                self.call_told = true;
                self.call.stop.do_send(Stop {
                    reason: StopReason::TwilioStop,
                });
            }
            Ok(TwilioEvent::OtherTrackMedia { track }) => self.malformed(format_args!(
                "media for track {track:?} on a <Connect> stream"
            )),
            Err(e) => self.malformed(e),
        }
    }

    /// Hands caller frames to the AI leg; a full mailbox drops and counts.
    fn send_to_ai(&mut self, frames: &mut Vec<(Bytes, u32)>) {
        let counts = self.inbound.take_counts();
        CallCounters::add(
            &self.counters.dropped_upstream_not_ready,
            counts.dropped_not_ready,
        );
        CallCounters::add(&self.counters.silence_filled_ms, counts.silence_filled_ms);
        for (payload, bytes) in frames.drain(..) {
            let Some(ai) = &self.ai else {
                CallCounters::add(&self.counters.dropped_upstream_not_ready, 1);
                continue;
            };
            match ai.try_send(AudioIn { payload, bytes }) {
                Ok(()) => {
                    let n = self.counters.frames_in.fetch_add(1, Ordering::Relaxed) + 1;
                    if self.frame_log_interval > 0 && n % self.frame_log_interval == 0 {
                        log::info!(
                            "{} frames in={n} out={}",
                            self.label,
                            CallCounters::get(&self.counters.frames_out)
                        );
                    }
                }
                Err(SendError::Full(_)) => {
                    CallCounters::add(&self.counters.dropped_openai_backpressure, 1)
                }
                Err(SendError::Closed(_)) => {
                    CallCounters::add(&self.counters.dropped_upstream_not_ready, 1)
                }
            }
        }
    }

    /// The AI leg is restarting: play the hold audio, if there is one, until it is back.
    fn start_hold(&mut self, ctx: &mut Context<Self>) {
        self.hold.wanted = self.hold.clip.is_some();
        if !self.hold.wanted || !self.started || self.hold.playing.is_some() {
            return;
        }
        log::debug!(
            "{} playing hold audio while the AI leg restarts",
            self.label
        );
        self.hold.playing = Some((Instant::now(), 0));
        self.hold.next = 0;
        self.top_up_hold(ctx);
    }

    /// Keeps [`HOLD_AHEAD_MS`] of hold audio queued ahead of real time.
    fn top_up_hold(&mut self, ctx: &mut Context<Self>) {
        let Some((since, queued_ms)) = &mut self.hold.playing else {
            return;
        };
        let Some(clip) = &self.hold.clip else { return };
        let id = self
            .hold
            .id
            .get_or_insert_with(|| Arc::from("hold-audio"))
            .clone();
        let target = since.elapsed().as_millis() as u64 + HOLD_AHEAD_MS;
        while *queued_ms < target {
            let payload = clip[self.hold.next % clip.len()].clone();
            self.hold.next = (self.hold.next + 1) % clip.len();
            *queued_ms += 20;
            self.writer.playback.push(Chunk {
                response_id: id.clone(),
                item_id: id.clone(),
                payload,
                bytes: 20 * BYTES_PER_MS as u32,
            });
        }
        self.writer.publish();
        self.flush(ctx);
    }

    /// The AI leg is back (or speaks): stop the hold audio, and drop what Twilio still has of it.
    fn stop_hold(&mut self, ctx: &mut Context<Self>) {
        self.hold.wanted = false;
        if self.hold.playing.take().is_none() {
            return;
        }
        let writer = &mut self.writer;
        writer.publish();
        let outcome = writer.playback.clear(None);
        // Hold audio is not caller or assistant audio: its drop is not counted as interrupted.
        let _ = writer.playback.take_counts();
        writer.mark_after = None;
        writer.echo_awaited_since = None;
        if outcome.cleared {
            writer.urgent.push_back(Outgoing::Clear);
        }
        writer.playback.session_lost();
        writer.publish();
        log::debug!("{} hold audio stopped", self.label);
        self.flush(ctx);
    }

    /// Closes the socket after what is urgent, and stops reading.
    fn close(&mut self, reason: Option<CloseReason>, ctx: &mut Context<Self>) {
        self.writer.urgent.push_back(Outgoing::Close(reason));
        self.flush(ctx);
        ctx.stop();
    }

    /// Writes what the socket may have now. Each message goes into actix-ws's channel at once
    /// when it has room (the usual case: no task, no allocation). When it has none, the socket
    /// is not taking data: the message waits in a future of its own (encoded again for it),
    /// nothing else is written until it is through, and the watchdog times the wait.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        while self.writing.is_none() && !self.writer.done {
            let Some(message) = self.writer.next_message() else {
                return;
            };
            if let Outgoing::Close(reason) = message {
                self.writer.done = true;
                let session = self.session.clone();
                actix_rt::spawn(async move {
                    let _ = session.close(reason).await;
                });
                return;
            }
            let Some(encoded) = self.writer.encode(&message) else {
                continue; // nothing to address it to before `start`
            };
            let now = match encoded {
                Encoded::Text(text) => self.session.text(text).now_or_never(),
                Encoded::Pong(data) => self.session.pong(&data).now_or_never(),
            };
            match now {
                Some(Ok(())) => {}
                Some(Err(_)) => self.writer.done = true, // the socket is gone
                None => {
                    let Some(encoded) = self.writer.encode(&message) else {
                        return;
                    };
                    let write = send(self.session.clone(), encoded).into_actor(self).map(
                        |result, act, ctx| {
                            act.writing = None;
                            match result {
                                Ok(()) => act.flush(ctx),
                                Err(_) => act.writer.done = true,
                            }
                        },
                    );
                    let handle = ctx.spawn(write);
                    self.writing = Some((Instant::now(), handle));
                }
            }
        }
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        self.top_up_hold(ctx);
        let elapsed = |t: Option<Instant>| t.map(|since| since.elapsed()).unwrap_or_default();
        let blocked_for = elapsed(self.writing.map(|(since, _)| since));
        let echo_awaited_for = elapsed(self.writer.echo_awaited_since);
        if blocked_for >= self.stall_timeout || echo_awaited_for >= self.stall_timeout {
            let why = if blocked_for >= self.stall_timeout {
                "the socket accepted nothing"
            } else {
                "no mark was echoed (Twilio is not reading)"
            };
            log::warn!(
                "{} Twilio stalled, {why} for {} ms: ending the call (twilio_stalled)",
                self.label,
                blocked_for.max(echo_awaited_for).as_millis()
            );
            // The socket takes nothing, so no close frame can be written: drop the waiting
            // write (and with it what it held) and let the connection go.
            self.writer.done = true;
            if let Some((_, handle)) = self.writing.take() {
                ctx.cancel_future(handle);
            }
            self.call_told = true;
            self.call.stop.do_send(Stop {
                reason: StopReason::TwilioStalled {
                    ms: self.stall_timeout.as_millis() as u64,
                },
            });
            ctx.stop();
            return;
        }
        if self.last_frame.elapsed() > IDLE_TIMEOUT {
            log::warn!(
                "{} no frame from Twilio for {}s: closing the stream",
                self.label,
                IDLE_TIMEOUT.as_secs()
            );
            self.close(Some(CloseCode::Away.into()), ctx);
        }
    }
}

impl Actor for TwilioStreamActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(CHECK_EVERY, |act, ctx| act.check(ctx));
        ctx.run_later(self.start_timeout, |act, ctx| {
            if !act.started && !act.ending {
                let ms = act.start_timeout.as_millis() as u64;
                log::warn!("{} no start from Twilio within {ms} ms: closing", act.label);
                act.call_told = true;
                act.call.stop.do_send(Stop {
                    reason: StopReason::NoStart { ms },
                });
                act.close(Some(CloseCode::Policy.into()), ctx);
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.writer.done {
            // Stopped without a close (the stream ended, a protocol error): close the socket.
            self.writer.done = true;
            let session = self.session.clone();
            actix_rt::spawn(async move {
                let _ = session.close(Some(CloseCode::Normal.into())).await;
            });
        }
        if !self.call_told {
            // The call ends with its Twilio leg.
            self.call.stop.do_send(Stop {
                reason: StopReason::TwilioClosed("socket closed".into()),
            });
        }
    }
}

impl StreamHandler<Result<Message, ProtocolError>> for TwilioStreamActor {
    fn handle(&mut self, msg: Result<Message, ProtocolError>, ctx: &mut Context<Self>) {
        self.last_frame = Instant::now();
        match msg {
            Ok(Message::Text(text)) => self.on_text(&text, ctx),
            Ok(Message::Binary(bin)) => {
                self.malformed(format_args!("binary frame of {} bytes", bin.len()))
            }
            Ok(Message::Ping(p)) => {
                self.writer.urgent.push_back(Outgoing::Pong(p));
                self.flush(ctx);
            }
            Ok(Message::Pong(_)) | Ok(Message::Nop) => {}
            Ok(Message::Continuation(_)) => {
                self.malformed("fragmented frame (continuation)");
            }
            Ok(Message::Close(reason)) => {
                if !self.ending {
                    log::info!(
                        "{} Twilio closed the socket without stop ({reason:?})",
                        self.label
                    );
                }
                self.close(reason, ctx);
            }
            Err(e) => {
                // A protocol error (e.g. a frame over the size limit) leaves the stream unusable.
                log::warn!("{} websocket protocol error from Twilio: {e}", self.label);
                CallCounters::add(&self.counters.malformed_frames, 1);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Assistant audio from the AI leg: into the playback queue, and out as far as the budget and
/// the socket allow.
impl Handler<AudioOut> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: AudioOut, ctx: &mut Context<Self>) {
        self.stop_hold(ctx); // the new leg speaks
        let writer = &mut self.writer;
        writer.playback.push(Chunk {
            response_id: msg.response_id,
            item_id: msg.item_id,
            payload: msg.payload,
            bytes: msg.bytes,
        });
        writer.publish();
        self.flush(ctx);
    }
}

/// Where caller audio goes from now on.
impl Handler<RouteCallerAudio> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: RouteCallerAudio, ctx: &mut Context<Self>) {
        let routed = msg.to.is_some();
        self.ai = msg.to;
        if routed {
            self.stop_hold(ctx); // the new leg is ready
        } else {
            self.writer.playback.session_lost();
            if msg.hold {
                self.start_hold(ctx);
            }
        }
        let mut forward = std::mem::take(&mut self.forward);
        self.inbound.set_routed(routed, &mut forward);
        self.send_to_ai(&mut forward);
        self.forward = forward;
    }
}

/// Barge-in: drop what is queued, `clear` Twilio's buffer, say what the caller heard.
impl Handler<ClearAudio> for TwilioStreamActor {
    type Result = ClearOutcome;

    fn handle(&mut self, msg: ClearAudio, ctx: &mut Context<Self>) -> ClearOutcome {
        let writer = &mut self.writer;
        let outcome = writer.playback.clear(msg.interrupted);
        writer.mark_after = None;
        writer.echo_awaited_since = None;
        if outcome.cleared {
            writer.urgent.push_back(Outgoing::Clear);
        }
        writer.publish();
        self.flush(ctx);
        outcome
    }
}

/// A response is done: mark its tail.
impl Handler<MarkTail> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, _: MarkTail, ctx: &mut Context<Self>) {
        self.writer.playback.mark_tail();
        self.flush(ctx);
    }
}

/// Uses the call SID in log lines from now on.
impl Handler<CallIdentified> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: CallIdentified, _: &mut Context<Self>) {
        self.label = msg.label;
    }
}

/// The call is over: close the socket (Twilio then continues with the TwiML after `<Connect>`).
impl Handler<Stop> for TwilioStreamActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) {
        self.ending = true;
        self.call_told = true;
        let code = match msg.reason {
            StopReason::Shutdown => CloseCode::Away,
            _ => CloseCode::Normal,
        };
        self.close(Some(code.into()), ctx);
    }
}
