//! `CallActor`: one per call. It makes every decision of the call and moves no audio.
//!
//! - **Routing.** Each AI leg is created with the Twilio leg's `Recipient<AudioOut>`; when it is
//!   ready (`session.updated`), the call hands the Twilio leg that leg's `Recipient<AudioIn>`.
//!   Audio then goes leg to leg without passing through this mailbox. When the leg is lost, the call takes
//!   the route back first, so caller audio stops at the source (the Twilio leg holds it,
//!   bounded) instead of piling up at a dead leg.
//! - **Supervision.** The Twilio leg is started with the call and ends it. The AI leg
//!   (`OpenAiRealtimeActor`, or `EchoUpstream`) is the supervised part: opened as soon as the
//!   media stream connects (before `start`, to save the connect time on the first turn), and on
//!   failure restarted as [`Restarts`] decides (typed failure, backoff, budget), with
//!   `session.update` sent again (the leg does) and the transcript replayed as context.
//! - **Turns.** Barge-in, DTMF, the greeting and the response in flight are decided by
//!   [`Turns`]; this actor feeds it events and performs its actions. The Twilio leg answers a
//!   barge-in's clear with what the caller heard, which becomes the truncate.
//! - **Inspection.** `/calls` snapshots read the call's shared counters, which the legs keep.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use secrecy::SecretString;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{CallConfig, OpenAiApi, OpenAiConfig, UpstreamKind};
use crate::echo::EchoUpstream;
use crate::engine::Engine;
use crate::events::CallEvent;
use crate::messages::UsageReport;
use crate::messages::{
    AudioIn, AudioOut, CallControl, CallCounters, CallIdentified, ClearAudio, ContextLine,
    ControlRefused, Dtmf, GetSnapshot, MarkTail, Role, RouteCallerAudio, Stop, StopReason,
    StreamStarted, Transcript, UpstreamCommand, UpstreamEvent,
};
use crate::openai_live::OpenAiLiveActor;
use crate::openai_realtime::{mailbox_capacity, LegPort, OpenAiRealtimeActor};
use crate::registry::{
    CallEnded, CallSnapshot, DroppedFrames, Queued, Register, TranscriptEntry, Unregister,
};
use crate::report::SubmitReport;
use crate::session::restart::{Admission, Decision, LegFailure, RestartPolicy, Restarts};
use crate::session::turns::{Action, Event, Turns, TurnsConfig};
use crate::session::usage::{CallUsage, UsageMeter};
use crate::twilio_stream::TwilioPort;

/// A leg that stayed up this long has proven the upstream healthy again: its failure starts a
/// fresh restart budget.
const STABLE_LEG: Duration = Duration::from_secs(30);

/// After a barge-in, time for the server to cancel the interrupted response itself (it does so
/// right after `speech_started` when `interrupt_response` is on) before we send `response.cancel`.
const CANCEL_GRACE_MS: u64 = 250;

/// Items cut by a barge-in remembered for their transcript line.
const CUT_ITEMS_KEPT: usize = 8;

/// The transcript entries replayed into a new session after a restart (the most recent ones).
const REPLAY_ENTRIES: usize = 50;

/// A session whose end is announced (GPT-Live's `expires_at`) is rolled over this long before.
const ROLLOVER_MARGIN: Duration = Duration::from_secs(300);

/// A rollover waits for this long without a turn event (speech, response) before it swaps the
/// session: the server creates a response a moment after the caller stops speaking, and that
/// response must not be created in a session that is about to close.
const ROLLOVER_QUIET: Duration = Duration::from_millis(500);

/// While a rollover waits for a pause, how often it looks again.
const ROLLOVER_POLL: Duration = Duration::from_millis(100);

/// After the successor session of a rollover failed to open, the wait before the next try (the
/// current session still has `3600 - openai.max_session_s` seconds).
const ROLLOVER_RETRY: Duration = Duration::from_secs(5);

/// The AI leg as the call sees it: recipients, so OpenAI, echo and test legs are interchangeable.
#[derive(Clone)]
pub struct UpstreamLeg {
    pub audio: Recipient<AudioIn>,
    pub control: Recipient<UpstreamCommand>,
    pub stop: Recipient<Stop>,
    pub ident: Recipient<CallIdentified>,
}

impl UpstreamLeg {
    pub fn of<A>(addr: Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<AudioIn>
            + Handler<UpstreamCommand>
            + Handler<Stop>
            + Handler<CallIdentified>,
    {
        Self {
            audio: addr.clone().recipient(),
            control: addr.clone().recipient(),
            stop: addr.clone().recipient(),
            ident: addr.recipient(),
        }
    }
}

/// What a new AI leg needs; a [`LegFactory`] turns it into a started leg.
pub struct LegRequest {
    pub port: LegPort,
    /// Where the leg sends assistant audio: the Twilio leg.
    pub twilio_audio: Recipient<AudioOut>,
    pub leg_no: u32,
    pub label: Arc<str>,
    pub counters: Arc<CallCounters>,
    /// The conversation so far, for a session that continues the call (empty for the first).
    pub history: Vec<ContextLine>,
    /// Twilio's `start` (with a valid stream token) has arrived. Until it has, a leg may
    /// connect but must not start a billed session (GPT-Live bills per second of session); it
    /// learns of the start from [`CallIdentified`].
    pub stream_started: bool,
}

/// Starts AI legs. The engine's opens OpenAI or echo legs; a test's starts stand-ins.
pub type LegFactory = Box<dyn Fn(LegRequest) -> UpstreamLeg>;

/// The factory for the engine's upstream.
fn engine_legs(engine: &Engine) -> LegFactory {
    let kind = engine.upstream();
    let openai: Arc<OpenAiConfig> = engine.openai_config_arc();
    let call: CallConfig = engine.call_config().clone();
    let key: Option<SecretString> = engine.api_key();
    Box::new(move |req: LegRequest| match kind {
        UpstreamKind::OpenAi => {
            // invariant: the engine refuses to build in OpenAI mode without a key.
            let key = key.clone().expect("OpenAI mode has a key");
            match openai.api {
                OpenAiApi::Realtime => UpstreamLeg::of(
                    OpenAiRealtimeActor::new(req, openai.clone(), &call, key)
                        .start_leg(mailbox_capacity(&call)),
                ),
                OpenAiApi::Live => UpstreamLeg::of(
                    OpenAiLiveActor::new(req, openai.clone(), &call, key)
                        .start_leg(mailbox_capacity(&call)),
                ),
            }
        }
        UpstreamKind::Echo => {
            let echo = EchoUpstream::new(req.port, req.leg_no, req.twilio_audio, req.counters);
            UpstreamLeg::of(echo.start_leg(mailbox_capacity(&call)))
        }
    })
}

/// How often a hang-up or transfer that waits for its words to play looks again.
const CLOSING_POLL: Duration = Duration::from_millis(50);

/// After Twilio took a hang-up or transfer, its `stop` is expected within this long; then the
/// call is ended here.
const STOP_AFTER_REST: Duration = Duration::from_secs(10);

/// A hang-up or transfer under way.
struct Closing {
    /// The TwiML of a transfer; `None`: a hang-up.
    transfer: Option<String>,
    /// Go through Twilio at the latest then (`call.goodbye_timeout_ms` after the request).
    deadline: Instant,
    /// Words to play first were asked for.
    words: bool,
    /// The REST request is out.
    sent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegState {
    Connecting,
    Ready,
    Restarting,
}

pub struct CallActor {
    engine: Engine,
    /// Unique per media stream in this process (tells registrations of a reused SID apart).
    instance: u64,
    twilio: TwilioPort,
    counters: Arc<CallCounters>,
    legs: LegFactory,
    /// `[CA…]` once `start` names the call; `[conn-N]` before.
    label: Arc<str>,
    turns: Turns,
    restarts: Restarts,
    /// Reused for every event, so no action vector is allocated per event.
    actions: Vec<Action>,

    leg: Option<UpstreamLeg>,
    /// Number of the current (or next) leg; reports from older legs are ignored.
    leg_no: u32,
    /// Leg numbers handed out so far (each leg gets its own, the successor of a rollover too).
    legs_opened: u32,
    /// The successor session of a rollover while it opens, and whether it is configured.
    standby: Option<(u32, UpstreamLeg)>,
    standby_ready: bool,
    /// A leg that handed over to its successor, until it has closed behind the audio routed to it.
    retiring: Option<UpstreamLeg>,
    /// The current session is `openai.max_session_s` old: replace it at the next pause.
    rollover_due: bool,
    rollovers: u64,
    /// The last turn event (speech started or stopped, response created or done, a digit).
    turn_changed: Instant,
    /// What the AI sessions used (none with the echo upstream).
    usage: Option<UsageMeter>,
    /// When a leg's session expires (GPT-Live says so at its start): (leg, from then).
    expires: Option<(u32, Duration)>,
    /// The caller's side is gone (registry, live-call count); the call may still wait for the
    /// last session's final usage.
    left: bool,
    /// The end of the call: its reason, once `end_call` ran; the last leg whose final usage
    /// the end-of-call line waits for.
    end_reason: Option<StopReason>,
    awaiting_usage_of: Option<u32>,
    /// The current leg reported `Ready` at least once.
    leg_was_ready: bool,
    /// A hang-up or transfer under way (through Twilio's REST API).
    closing: Option<Closing>,
    /// Twilio took a hang-up or transfer: its `stop` ends the call with this reason.
    ended_by_us: Option<StopReason>,
    /// `inbound`, or `outbound` for a call placed with `POST /calls`.
    direction: &'static str,
    /// An outbound call's `params` (`<Parameter>`s of its TwiML).
    params: Vec<(String, String)>,
    /// Tool call ids seen (a call is never run twice), the latest kept.
    tool_calls_seen: Vec<String>,
    /// Tool calls waiting for their HTTP answer.
    tool_calls_running: Vec<String>,
    leg_state: LegState,
    ready_since: Option<Instant>,
    upstream_errors: u64,
    /// This call probes OpenAI for the breaker; its outcome is still to be reported.
    probe: bool,
    /// A completed response was reported to the breaker (once per call is enough).
    breaker_cleared: bool,

    call_sid: String,
    stream_sid: String,
    from: String,
    to: String,
    started_at: OffsetDateTime,
    started: Instant,
    transcript: VecDeque<TranscriptEntry>,
    /// The last items a barge-in cut, with what was heard of each (their transcript may come
    /// after the cut).
    cut_items: VecDeque<(String, u64)>,
    /// Transcript entries the last ready session had seen; a restart replays these. Digits pressed
    /// during the outage reach the new session through the turns' held text instead.
    replay_upto: usize,
    registered: bool,
    ending: bool,

    /// This call in the metrics' live set (folded into the totals at its end).
    ticket: Option<crate::metrics::CallTicket>,
    /// The state last published as a live event.
    published_state: &'static str,
    /// `ended` was published (a call's event stream closes with it).
    ended_published: bool,
    /// When the model heard the caller start speaking (for the barge-in latency).
    speech_at: Option<Instant>,
    /// Usage already counted in the metrics: seconds and cost.
    metered: (f64, f64),
}

impl CallActor {
    pub fn new(
        engine: Engine,
        instance: u64,
        twilio: TwilioPort,
        counters: Arc<CallCounters>,
    ) -> Self {
        let legs = engine_legs(&engine);
        Self::with_legs(engine, instance, twilio, counters, legs)
    }

    /// A call whose AI legs come from `legs` (tests stand in for OpenAI with it).
    pub fn with_legs(
        engine: Engine,
        instance: u64,
        twilio: TwilioPort,
        counters: Arc<CallCounters>,
        legs: LegFactory,
    ) -> Self {
        let call_cfg = engine.call_config();
        let openai = engine.openai_config();
        let turns = Turns::new(TurnsConfig {
            greeting: Some(openai.greeting.clone()).filter(|g| !g.is_empty()),
            dtmf_response_delay_ms: call_cfg.dtmf_response_delay_ms,
            cancel_grace_ms: CANCEL_GRACE_MS,
        });
        let restarts = Restarts::new(RestartPolicy {
            max_restarts: openai.max_restarts,
            backoff_ms: openai.restart_backoff_ms,
            backoff_max_ms: openai.restart_backoff_max_ms,
            stable_after: STABLE_LEG,
        });
        Self {
            instance,
            twilio,
            counters,
            legs,
            label: Arc::from(format!("[conn-{instance}]")),
            turns,
            restarts,
            actions: Vec::with_capacity(8),
            leg: None,
            leg_no: 0,
            legs_opened: 1,
            standby: None,
            standby_ready: false,
            retiring: None,
            rollover_due: false,
            rollovers: 0,
            turn_changed: Instant::now(),
            usage: (engine.upstream() == UpstreamKind::OpenAi).then(|| {
                let model = match openai.api {
                    OpenAiApi::Realtime => openai.model.clone(),
                    OpenAiApi::Live => openai.live_model.clone(),
                };
                UsageMeter::new(openai.api, model)
            }),
            expires: None,
            left: false,
            end_reason: None,
            awaiting_usage_of: None,
            leg_was_ready: false,
            closing: None,
            ended_by_us: None,
            direction: "inbound",
            params: Vec::new(),
            tool_calls_seen: Vec::new(),
            tool_calls_running: Vec::new(),
            leg_state: LegState::Connecting,
            ready_since: None,
            upstream_errors: 0,
            probe: false,
            breaker_cleared: false,
            call_sid: String::new(),
            stream_sid: String::new(),
            from: String::new(),
            to: String::new(),
            started_at: OffsetDateTime::now_utc(),
            started: Instant::now(),
            transcript: VecDeque::new(),
            cut_items: VecDeque::new(),
            replay_upto: 0,
            registered: false,
            ending: false,
            ticket: None,
            published_state: "",
            ended_published: false,
            speech_at: None,
            metered: (0.0, 0.0),
            engine,
        }
    }

    /// `connecting`, `active`, `reconnecting` or `ending`, as `/calls` and the events say.
    fn state_name(&self) -> &'static str {
        match (self.ending, self.leg_state) {
            (true, _) => "ending",
            (false, LegState::Ready) => "active",
            (false, LegState::Connecting) => "connecting",
            (false, LegState::Restarting) => "reconnecting",
        }
    }

    /// `realtime`, `live` or `echo` (the metrics' `api` label).
    fn api_label(&self) -> &'static str {
        match self.engine.upstream() {
            UpstreamKind::Echo => "echo",
            UpstreamKind::OpenAi => self.engine.openai_config().api.as_str(),
        }
    }

    /// A live event of this call (once it has a SID; never per audio frame).
    fn publish(&self, event: CallEvent) {
        if self.registered {
            self.engine.events().publish(&self.call_sid, event);
        }
    }

    /// Publishes the call's state when it changed.
    fn sync_state(&mut self) {
        let state = self.state_name();
        if self.registered && state != self.published_state {
            self.published_state = state;
            self.publish(CallEvent::State { state });
        }
    }

    /// Feeds one event to the turns and performs what they ask for.
    fn apply(&mut self, event: Event, ctx: &mut Context<Self>) {
        let mut actions = std::mem::take(&mut self.actions);
        self.turns.on_event(event, &mut actions);
        for action in actions.drain(..) {
            self.perform(action, ctx);
        }
        self.actions = actions;
    }

    fn perform(&mut self, action: Action, ctx: &mut Context<Self>) {
        match action {
            Action::Clear { in_flight } => {
                let interrupted_response = in_flight.is_some();
                // The Twilio leg knows what was sent and heard; ask, then truncate by its answer.
                self.twilio
                    .clear
                    .send(ClearAudio {
                        interrupted: in_flight,
                    })
                    .into_actor(self)
                    .map(move |outcome, act, ctx| {
                        if let Ok(outcome) = outcome {
                            act.apply(
                                Event::Cleared {
                                    outcome,
                                    interrupted_response,
                                },
                                ctx,
                            );
                        }
                    })
                    .spawn(ctx);
            }
            Action::MarkTail => self.twilio.mark_tail.do_send(MarkTail),
            Action::Digit { digit } => self.control(UpstreamCommand::Digit(digit)),
            Action::CreateResponse { instructions } => {
                self.control(UpstreamCommand::CreateResponse { instructions })
            }
            Action::Cancel { response_id } => self.control(UpstreamCommand::Cancel { response_id }),
            Action::Truncate {
                item_id,
                audio_end_ms,
            } => {
                self.mark_cut(&item_id, audio_end_ms);
                self.control(UpstreamCommand::Truncate {
                    item_id,
                    audio_end_ms,
                })
            }
            Action::ScheduleDtmfQuiet {
                generation,
                delay_ms,
            } => {
                ctx.run_later(Duration::from_millis(delay_ms), move |act, ctx| {
                    act.apply(Event::DtmfQuiet { generation }, ctx)
                });
            }
            Action::ScheduleCancelCheck {
                response_id,
                delay_ms,
            } => {
                ctx.run_later(Duration::from_millis(delay_ms), move |act, ctx| {
                    act.apply(Event::CancelCheck { response_id }, ctx)
                });
            }
            Action::BargedIn {
                cleared,
                truncated_ms,
                interrupted_response,
            } => {
                if let Some(heard) = self.speech_at.take() {
                    self.engine.metrics().barge_in(heard.elapsed());
                }
                self.publish(CallEvent::BargeIn {
                    heard_ms: truncated_ms.unwrap_or(0),
                });
                let truncated = match truncated_ms {
                    Some(ms) => format!("assistant item cut at {ms} ms"),
                    None => "nothing to truncate".into(),
                };
                log::info!(
                    "{} barge-in #{}: caller spoke over the assistant; {}{}, {}",
                    self.label,
                    self.turns.barge_ins,
                    if cleared {
                        "Twilio buffer cleared"
                    } else {
                        "nothing sent yet"
                    },
                    if interrupted_response {
                        ", response interrupted"
                    } else {
                        ""
                    },
                    truncated
                );
            }
        }
    }

    fn control(&self, command: UpstreamCommand) {
        match &self.leg {
            Some(leg) => leg.control.do_send(command),
            None => log::debug!("{} no AI leg for {command:?}", self.label),
        }
    }

    /// Opens a new AI leg (the first, or a restart).
    fn start_leg(&mut self, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        // A restarted session gets the conversation the lost one had seen.
        let history = if self.leg_no > 0 && self.engine.openai_config().replay_transcript_on_restart
        {
            self.context(self.replay_upto)
        } else {
            Vec::new()
        };
        let leg = self.open_leg(self.leg_no, history, ctx);
        self.leg = Some(leg);
    }

    fn open_leg(
        &mut self,
        leg_no: u32,
        history: Vec<ContextLine>,
        ctx: &mut Context<Self>,
    ) -> UpstreamLeg {
        let call = ctx.address();
        (self.legs)(LegRequest {
            port: LegPort {
                events: call.clone().recipient(),
                transcripts: call.recipient(),
            },
            twilio_audio: self.twilio.audio.clone(),
            leg_no,
            label: self.label.clone(),
            counters: self.counters.clone(),
            history,
            stream_started: !self.call_sid.is_empty(),
        })
    }

    /// A number no leg of this call has had.
    fn next_leg_no(&mut self) -> u32 {
        let n = self.legs_opened;
        self.legs_opened += 1;
        n
    }

    /// From the moment `leg_no` is ready: after `openai.max_session_s`, roll it over.
    fn schedule_rollover(&mut self, leg_no: u32, ctx: &mut Context<Self>) {
        let mut due = Duration::from_secs(self.engine.openai_config().max_session_s);
        if let Some((leg, expires_in)) = self.expires {
            if leg == leg_no {
                // Leave the successor time to find a pause before the session ends.
                let planned = expires_in
                    .saturating_sub(ROLLOVER_MARGIN)
                    .max(expires_in / 2);
                due = due.min(planned);
            }
        }
        ctx.run_later(due, move |act, ctx| {
            if act.leg_no == leg_no && !act.ending {
                act.rollover_due = true;
                act.try_rollover(ctx);
            }
        });
    }

    /// A pause between turns, with nothing left to play: a session can be swapped here.
    fn between_turns(&self) -> bool {
        self.turns.between_turns()
            && self.turn_changed.elapsed() >= ROLLOVER_QUIET
            && CallCounters::get(&self.counters.unconfirmed_ms) == 0
            && CallCounters::get(&self.counters.twilio_queued_ms) == 0
    }

    /// Opens the successor session once the current one is due and the call is between turns.
    fn try_rollover(&mut self, ctx: &mut Context<Self>) {
        if !self.rollover_due
            || self.ending
            || self.standby.is_some()
            || self.leg_state != LegState::Ready
        {
            return;
        }
        if !self.between_turns() {
            ctx.run_later(ROLLOVER_POLL, |act, ctx| act.try_rollover(ctx));
            return;
        }
        let leg_no = self.next_leg_no();
        log::info!(
            "{} the AI session is {} s old: opening its successor at a pause (rollover {})",
            self.label,
            self.ready_since.map_or(0, |t| t.elapsed().as_secs()),
            self.rollovers + 1
        );
        let leg = self.open_leg(leg_no, self.context(self.transcript.len()), ctx);
        self.standby = Some((leg_no, leg));
        self.standby_ready = false;
    }

    /// The successor is configured (and has the conversation): switch at a pause.
    fn on_standby_ready(&mut self, ctx: &mut Context<Self>) {
        self.standby_ready = true;
        self.try_switch(ctx);
    }

    fn try_switch(&mut self, ctx: &mut Context<Self>) {
        if self.ending || !self.standby_ready || self.standby.is_none() {
            return;
        }
        if !self.between_turns() {
            ctx.run_later(ROLLOVER_POLL, |act, ctx| act.try_switch(ctx));
            return;
        }
        let Some((leg_no, new)) = self.standby.take() else {
            return;
        };
        self.standby_ready = false;
        self.rollover_due = false;
        self.rollovers += 1;
        self.publish(CallEvent::Rollover {
            reason: "session_limit".into(),
        });
        let old = self.leg.replace(new.clone());
        self.leg_no = leg_no;
        self.ready_since = Some(Instant::now());
        // What the old session still had queued at Twilio is not the new one's (a GPT-Live
        // session streams continuously; with Realtime nothing is queued at a pause).
        self.twilio.clear.do_send(ClearAudio { interrupted: None });
        // Caller audio moves to the new session; once the Twilio leg has switched, every frame
        // routed to the old one is in its mailbox, ahead of the stop: it sends them, then closes.
        self.retiring = old;
        self.twilio
            .route
            .send(RouteCallerAudio {
                to: Some(new.audio.clone()),
                hold: false,
            })
            .into_actor(self)
            .map(|_, act, _| act.retire_old_leg())
            .spawn(ctx);
        log::info!(
            "{} rolled over to a new AI session (rollover {}): caller audio goes to it from now on",
            self.label,
            self.rollovers
        );
        self.schedule_rollover(leg_no, ctx);
    }

    fn retire_old_leg(&mut self) {
        if let Some(old) = self.retiring.take() {
            old.stop.do_send(Stop {
                reason: StopReason::Rollover,
            });
        }
    }

    /// The successor of a rollover failed to open: the current session goes on; try again.
    fn on_standby_closed(&mut self, failure: LegFailure, ctx: &mut Context<Self>) {
        self.standby = None;
        self.standby_ready = false;
        log::warn!(
            "{} rollover: the new AI session failed ({failure}); the current one goes on, next \
             try in {} s",
            self.label,
            ROLLOVER_RETRY.as_secs()
        );
        ctx.run_later(ROLLOVER_RETRY, |act, ctx| act.try_rollover(ctx));
    }

    fn drop_standby(&mut self) {
        self.standby_ready = false;
        if let Some((_, leg)) = self.standby.take() {
            leg.stop.do_send(Stop {
                reason: StopReason::Rollover,
            });
        }
    }

    fn on_leg_ready(&mut self, leg_no: u32, ctx: &mut Context<Self>) {
        self.leg_was_ready = true;
        self.leg_state = LegState::Ready;
        self.sync_state();
        self.ready_since = Some(Instant::now());
        let Some(leg) = self.leg.clone() else { return };
        // Caller audio goes leg to leg from now on.
        self.twilio.route.do_send(RouteCallerAudio {
            to: Some(leg.audio.clone()),
            hold: false,
        });
        self.schedule_rollover(leg_no, ctx);
        if leg_no == 0 {
            log::info!(
                "{} session configured ({}), audio can flow",
                self.label,
                self.engine.upstream().as_str()
            );
        } else {
            // What the lost session still had queued at Twilio is not the new one's.
            self.twilio.clear.do_send(ClearAudio { interrupted: None });
            log::info!(
                "{} AI leg restarted (restart {}), session configured, audio flowing again",
                self.label,
                self.restarts.total
            );
        }
        self.apply(Event::UpstreamReady, ctx);
    }

    fn on_leg_closed(&mut self, failure: LegFailure, ctx: &mut Context<Self>) {
        self.leg = None;
        // A rollover in progress is abandoned: the restart opens a session of its own.
        self.rollover_due = false;
        self.drop_standby();
        CallCounters::set(&self.counters.openai_queued, 0);
        self.apply(Event::UpstreamLost, ctx);
        let ready_for = self.ready_since.take().map(|since| since.elapsed());
        if ready_for.is_some() {
            self.replay_upto = self.transcript.len();
        }
        let budget = self.restarts.max_restarts();
        self.engine
            .metrics()
            .upstream_failure(failure.class().as_str());
        let decision = self.restarts.on_leg_lost(&failure, ready_for, jitter());
        // Stop audio at the source first: the Twilio leg holds caller audio until a new leg,
        // and plays the hold audio meanwhile if a new leg is coming.
        self.twilio.route.do_send(RouteCallerAudio {
            to: None,
            hold: matches!(decision, Decision::Restart { .. }),
        });
        self.leg_was_ready = false;
        match decision {
            Decision::Permanent => {
                log::error!(
                    "{} AI leg failed: {failure}; not retried: {}. The caller gets the fallback.",
                    self.label,
                    failure.advice()
                );
                self.engine
                    .breaker()
                    .on_permanent_failure(Instant::now(), failure.to_string());
                self.probe = false;
                self.end_call(StopReason::UpstreamRefused(failure.to_string()), ctx);
            }
            Decision::GiveUp { failures } => {
                log::error!(
                    "{} AI leg lost: {failure}; restart budget spent ({budget} restarts), ending the call",
                    self.label
                );
                self.end_call(
                    StopReason::UpstreamFailed(format!(
                        "{failure} (after {failures} consecutive failed restarts)"
                    )),
                    ctx,
                );
            }
            Decision::Restart { attempt, delay_ms } => {
                self.leg_no = self.next_leg_no();
                self.leg_state = LegState::Restarting;
                let reason = failure.code();
                self.engine.metrics().upstream_restart(reason);
                self.publish(CallEvent::Restart {
                    reason: reason.into(),
                });
                self.sync_state();
                log::warn!(
                    "{} AI leg lost: {failure}; restarting in {delay_ms} ms (attempt {attempt} of {budget}); the caller stays connected",
                    self.label
                );
                ctx.run_later(Duration::from_millis(delay_ms), |act, ctx| {
                    act.start_leg(ctx)
                });
            }
        }
    }

    /// The first `upto` transcript entries (the last [`REPLAY_ENTRIES`] of them), as a new
    /// session should read them: only what the caller heard was said.
    fn context(&self, upto: usize) -> Vec<ContextLine> {
        let known = upto.min(self.transcript.len());
        let skip = known.saturating_sub(REPLAY_ENTRIES);
        self.transcript
            .iter()
            .take(known)
            .skip(skip)
            .map(|entry| ContextLine {
                role: entry.role,
                text: match (entry.role, entry.heard_ms) {
                    (Role::Assistant, Some(ms)) => format!(
                        "{} [interrupted by the caller after about {ms} ms of audio: the rest was not heard]",
                        entry.text
                    ),
                    _ => entry.text.clone(),
                },
            })
            .collect()
    }

    fn record(&mut self, role: Role, text: String, item_id: Option<String>) {
        let max = self.engine.call_config().transcript_max_entries;
        while self.transcript.len() >= max {
            self.transcript.pop_front();
            self.replay_upto = self.replay_upto.saturating_sub(1);
        }
        // A barge-in may have cut this item before its transcript arrived.
        let heard_ms = item_id.as_ref().and_then(|id| {
            self.cut_items
                .iter()
                .find(|(cut, _)| cut == id)
                .map(|(_, ms)| *ms)
        });
        self.publish(CallEvent::Transcript {
            role: role.as_str(),
            text: text.clone(),
            final_: true,
        });
        self.transcript.push_back(TranscriptEntry {
            role,
            text,
            at: now_rfc3339(),
            item_id,
            interrupted: heard_ms.is_some(),
            heard_ms,
        });
    }

    /// A barge-in cut `item_id` after `heard_ms`: its transcript line (now or when it comes)
    /// says so.
    fn mark_cut(&mut self, item_id: &str, heard_ms: u64) {
        if let Some(entry) = self
            .transcript
            .iter_mut()
            .rev()
            .find(|e| e.item_id.as_deref() == Some(item_id))
        {
            entry.interrupted = true;
            entry.heard_ms = Some(heard_ms);
        }
        if self.cut_items.len() >= CUT_ITEMS_KEPT {
            self.cut_items.pop_front();
        }
        self.cut_items.push_back((item_id.to_string(), heard_ms));
    }

    fn end_call(&mut self, reason: StopReason, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.ending = true;
        self.sync_state();
        if let Some(ticket) = self.ticket.take() {
            self.engine
                .metrics()
                .call_ended(ticket, reason.code(), self.started.elapsed());
        }
        if reason == StopReason::BadStreamToken {
            self.engine.metrics().rejected_request("bad_stream_token");
        }
        self.engine.registry().do_send(CallEnded {
            reason: reason.code(),
        });
        // The caller's side ends now: `/calls`, `server.max_calls` and the drain let go of it.
        self.leave();
        // A GPT-Live session that ran reports its final billable seconds after `session.close`:
        // the end-of-call line waits for them (bounded), nothing else does.
        let live = self.engine.openai_config().api == OpenAiApi::Live;
        if let Some(leg) = self.leg.take() {
            if live && self.leg_was_ready && self.usage.is_some() {
                self.awaiting_usage_of = Some(self.leg_no);
            }
            leg.stop.do_send(Stop {
                reason: reason.clone(),
            });
        }
        self.drop_standby();
        self.retire_old_leg();
        if !reason.twilio_gone() {
            self.twilio.stop.do_send(Stop {
                reason: reason.clone(),
            });
        }
        self.end_reason = Some(reason);
        if self.awaiting_usage_of.is_some() {
            let wait = Duration::from_millis(self.engine.openai_config().live_close_timeout_ms)
                + Duration::from_secs(2);
            ctx.run_later(wait, |act, ctx| act.finish(ctx));
        } else {
            self.finish(ctx);
        }
    }

    /// Leaves the registry and the live-call count (once).
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        self.engine.call_closed();
        if self.registered {
            self.engine.registry().do_send(Unregister {
                call_sid: self.call_sid.clone(),
                instance: self.instance,
            });
        }
    }

    /// The end-of-call line, with what the call used and cost; then the actor stops.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        let Some(reason) = self.end_reason.take() else {
            return;
        };
        let usage = self.usage_report();
        if let Some(usage) = &usage {
            self.engine.record_usage(usage);
        }
        if let Some(reporter) = self.engine.reporter() {
            if self.registered {
                reporter.do_send(SubmitReport {
                    call_sid: self.call_sid.clone(),
                    report: self.report(&reason, usage.as_ref()),
                });
            }
        }
        if self.registered {
            if let Some(usage) = &usage {
                self.publish(CallEvent::usage(usage));
            }
            let mut totals = self.counters_json();
            totals["duration_ms"] = (self.started.elapsed().as_millis() as u64).into();
            totals["cost_usd"] = serde_json::json!(usage.as_ref().and_then(|u| u.cost_usd));
            self.publish(CallEvent::Ended {
                reason: reason.code().into(),
                totals,
            });
            self.ended_published = true;
        }
        let c = &self.counters;
        let dropped = DroppedFrames::from(c.as_ref());
        log::info!(
            "{} call ended ({}): {reason}; {} ms, frames in={} out={}, barge_ins={}, upstream_restarts={}, rollovers={}, malformed={}, dropped: pre_start={} upstream_not_ready={} interrupted={} twilio_backpressure={} openai_backpressure={}; usage: {}",
            self.label,
            reason.code(),
            self.started.elapsed().as_millis(),
            CallCounters::get(&c.frames_in),
            CallCounters::get(&c.frames_out),
            self.turns.barge_ins,
            self.restarts.total,
            self.rollovers,
            CallCounters::get(&c.malformed_frames),
            dropped.pre_start,
            dropped.upstream_not_ready,
            dropped.interrupted,
            dropped.twilio_backpressure,
            dropped.openai_backpressure,
            usage.as_ref().map_or_else(|| "none (echo)".to_string(), describe_usage),
        );
        ctx.stop();
    }

    /// The call's counters, as the end-of-call report and the `ended` event give them.
    fn counters_json(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "frames_in": CallCounters::get(&c.frames_in),
            "frames_out": CallCounters::get(&c.frames_out),
            "barge_ins": self.turns.barge_ins,
            "upstream_restarts": self.restarts.total,
            "rollovers": self.rollovers,
            "upstream_errors": self.upstream_errors,
            "malformed_frames": CallCounters::get(&c.malformed_frames),
            "dropped_frames": DroppedFrames::from(c.as_ref()),
        })
    }

    /// The end-of-call report (`report.url`).
    fn report(&self, reason: &StopReason, usage: Option<&CallUsage>) -> serde_json::Value {
        serde_json::json!({
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "from": self.from,
            "to": self.to,
            "direction": self.direction,
            "params": self.params.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "started_at": self.started_at.format(&Rfc3339).unwrap_or_default(),
            "ended_at": now_rfc3339(),
            "duration_ms": self.started.elapsed().as_millis() as u64,
            "end_reason": reason.code(),
            "end_detail": reason.to_string(),
            "upstream": self.engine.upstream().as_str(),
            "api": (self.engine.upstream() == UpstreamKind::OpenAi)
                .then(|| self.engine.openai_config().api.as_str()),
            "counters": self.counters_json(),
            "usage": usage,
            "cost_usd": usage.and_then(|u| u.cost_usd),
            "transcript": self.transcript,
        })
    }

    fn usage_report(&self) -> Option<CallUsage> {
        self.usage
            .as_ref()
            .map(|meter| meter.report(self.engine.prices()))
    }

    fn on_usage(&mut self, report: UsageReport, ctx: &mut Context<Self>) {
        let api = self.api_label();
        let metrics = self.engine.metrics().clone();
        let Some(meter) = self.usage.as_mut() else {
            return;
        };
        let mut final_of = None;
        match report {
            UsageReport::Tokens(tokens) => {
                meter.add_tokens(&tokens);
                let model = meter.model().to_owned();
                for (kind, n) in tokens.by_kind() {
                    if n > 0 {
                        metrics.tokens(api, &model, kind, n);
                    }
                }
            }
            UsageReport::Delegated {
                model,
                input_tokens,
                cached_tokens,
                output_tokens,
            } => meter.add_delegated(&model, input_tokens, cached_tokens, output_tokens),
            UsageReport::Seconds { leg, seconds, last } => {
                meter.session_seconds(leg, seconds);
                if last {
                    final_of = Some(leg);
                }
            }
        }
        // Seconds and cost into the metrics as they grow (a GPT-Live session's are cumulative).
        let usage = meter.report(self.engine.prices());
        let seconds = meter.seconds();
        let (seen_seconds, seen_cost) = self.metered;
        if seconds > seen_seconds {
            metrics.model_seconds(api, &usage.model, seconds - seen_seconds);
        }
        let cost = usage.cost_usd.unwrap_or(0.0);
        if cost > seen_cost {
            metrics.cost_usd(api, &usage.model, cost - seen_cost);
        }
        self.metered = (seconds.max(seen_seconds), cost.max(seen_cost));
        if !self.ending {
            self.publish(CallEvent::usage(&usage));
        }
        if final_of.is_some() && self.awaiting_usage_of == final_of {
            self.awaiting_usage_of = None;
            self.finish(ctx);
        }
    }

    /// A hang-up or transfer goes through Twilio once its words played (the response is done
    /// and Twilio confirmed all the audio sent), or at its deadline.
    fn check_closing(&mut self, ctx: &mut Context<Self>) {
        let Some(closing) = &self.closing else { return };
        if closing.sent || self.ending {
            return;
        }
        let played = !closing.words
            || (!self.turns.response_pending()
                && CallCounters::get(&self.counters.unconfirmed_ms) == 0
                && CallCounters::get(&self.counters.twilio_queued_ms) == 0);
        let late = Instant::now() >= closing.deadline;
        if !played && !late {
            ctx.run_later(CLOSING_POLL, |act, ctx| act.check_closing(ctx));
            return;
        }
        if late && !played {
            log::warn!(
                "{} the assistant's last words did not play within call.goodbye_timeout_ms: going on",
                self.label
            );
        }
        let Some(rest) = self.engine.rest().cloned() else {
            return;
        };
        let transfer = closing.transfer.clone();
        if let Some(closing) = self.closing.as_mut() {
            closing.sent = true;
        }
        let call_sid = self.call_sid.clone();
        let reason = if transfer.is_some() {
            StopReason::Transferred
        } else {
            StopReason::HungUp
        };
        async move {
            match &transfer {
                Some(twiml) => rest.redirect(&call_sid, twiml).await,
                None => rest.hang_up(&call_sid).await,
            }
        }
        .into_actor(self)
        .map(move |result, act, ctx| match result {
            Ok(outcome) => {
                log::info!(
                    "{} {} through Twilio ({outcome:?}): waiting for Twilio's stop",
                    act.label,
                    reason.code()
                );
                act.ended_by_us = Some(reason.clone());
                act.closing = None;
                ctx.run_later(STOP_AFTER_REST, move |act, ctx| {
                    if !act.ending {
                        log::warn!(
                            "{} no stop from Twilio after the REST request: ending the call",
                            act.label
                        );
                        act.end_call(reason, ctx);
                    }
                });
            }
            Err(e) => {
                log::error!(
                    "{} {} through Twilio failed: {e}; the call goes on",
                    act.label,
                    reason.code()
                );
                act.closing = None;
            }
        })
        .spawn(ctx);
    }

    /// The model called a tool: run it (once per call id) and give the model its output.
    fn on_tool_call(
        &mut self,
        call_id: String,
        name: String,
        arguments: String,
        ctx: &mut Context<Self>,
    ) {
        if self.ending || self.tool_calls_seen.contains(&call_id) {
            return; // a call is never run twice
        }
        if self.tool_calls_seen.len() >= 256 {
            self.tool_calls_seen.remove(0);
        }
        self.tool_calls_seen.push(call_id.clone());
        let args: Result<serde_json::Value, _> =
            serde_json::from_str(if arguments.trim().is_empty() {
                "{}"
            } else {
                &arguments
            });
        log::info!("{} tool call {name} ({call_id})", self.label);
        let openai = self.engine.openai_config();
        let builtin = openai.builtin_tools.contains(&name);
        let tool = openai.tools.iter().find(|t| t.name == name).cloned();
        let args = match args {
            Ok(args) if args.is_object() => args,
            _ => {
                return self.tool_done(
                    &call_id,
                    &name,
                    crate::tools::ToolOutcome {
                        output: crate::tools::error_output("the arguments are not a JSON object"),
                        outcome: "bad_arguments".into(),
                        ms: 0,
                    },
                    true,
                    ctx,
                );
            }
        };
        if builtin {
            return self.builtin_tool(&call_id, &name, &args, ctx);
        }
        let Some(tool) = tool else {
            return self.tool_done(
                &call_id,
                &name,
                crate::tools::ToolOutcome {
                    output: crate::tools::error_output(&format!("there is no tool named {name:?}")),
                    outcome: "unknown_tool".into(),
                    ms: 0,
                },
                true,
                ctx,
            );
        };
        let call_sid = self.call_sid.clone();
        let secret = self.engine.tools_secret();
        let max = self.engine.call_config().tool_output_max_bytes;
        let filler_after = self.engine.call_config().tool_filler_after_ms;
        if filler_after > 0 {
            let pending = call_id.clone();
            ctx.run_later(Duration::from_millis(filler_after), move |act, ctx| {
                if act.tool_calls_running.contains(&pending) {
                    act.apply(
                        Event::Speak {
                            instructions: "Tell the caller in a few words that you are still checking.".into(),
                        },
                        ctx,
                    );
                }
            });
        }
        self.tool_calls_running.push(call_id.clone());
        let id = call_id.clone();
        async move {
            crate::tools::call_http(&tool, &call_sid, &id, args, secret.as_ref(), max).await
        }
        .into_actor(self)
        .map(move |outcome, act, ctx| {
            act.tool_calls_running.retain(|running| running != &call_id);
            act.tool_done(&call_id, &name, outcome, true, ctx)
        })
        .spawn(ctx);
    }

    /// `end_call` and `transfer_call`: the audio already sent plays to its last mark, then the
    /// call goes through Twilio (as the operator API's hang-up and transfer do).
    fn builtin_tool(
        &mut self,
        call_id: &str,
        name: &str,
        args: &serde_json::Value,
        ctx: &mut Context<Self>,
    ) {
        use crate::tools::{error_output, ToolOutcome, END_CALL};
        let command = if name == END_CALL {
            CallControl::Hangup { goodbye: None }
        } else {
            let to = args["to"].as_str().unwrap_or("").trim().to_owned();
            if !self.engine.call_config().transfer_allowed(&to) {
                return self.tool_done(
                    call_id,
                    name,
                    ToolOutcome {
                        output: error_output("that transfer target is not allowed"),
                        outcome: "refused".into(),
                        ms: 0,
                    },
                    true,
                    ctx,
                );
            }
            CallControl::Transfer { to, announce: None }
        };
        match self.call_control(command, ctx) {
            Ok(()) => self.tool_done(
                call_id,
                name,
                ToolOutcome {
                    output: serde_json::json!({"ok": true}).to_string(),
                    outcome: "ok".into(),
                    ms: 0,
                },
                false, // the model is not asked to speak again
                ctx,
            ),
            Err(refused) => self.tool_done(
                call_id,
                name,
                ToolOutcome {
                    output: error_output(&refused.to_string()),
                    outcome: "refused".into(),
                    ms: 0,
                },
                true,
                ctx,
            ),
        }
    }

    /// A tool call's outcome: into the transcript, to the model, and (`respond`) the model is
    /// asked to go on.
    fn tool_done(
        &mut self,
        call_id: &str,
        name: &str,
        outcome: crate::tools::ToolOutcome,
        respond: bool,
        ctx: &mut Context<Self>,
    ) {
        if self.ending {
            return;
        }
        log::info!(
            "{} tool {name} ({call_id}): {} in {} ms",
            self.label,
            outcome.outcome,
            outcome.ms
        );
        // Names the model made up are not configured tools: one label for them all.
        let openai = self.engine.openai_config();
        let known = openai.tools.iter().any(|t| t.name == name)
            || openai.builtin_tools.iter().any(|b| b == name);
        self.engine.metrics().tool_call(
            if known { name } else { "unknown" },
            &outcome.outcome,
            Duration::from_millis(outcome.ms),
        );
        self.publish(CallEvent::ToolCall {
            name: name.to_owned(),
            outcome: outcome.outcome.clone(),
            ms: outcome.ms,
        });
        self.record(
            Role::Tool,
            format!("{name}: {} ({} ms)", outcome.outcome, outcome.ms),
            None,
        );
        self.control(UpstreamCommand::ToolOutput {
            call_id: call_id.to_owned(),
            output: outcome.output,
            respond,
        });
        // Realtime: the call's turns ask for the response (after the one in flight). GPT-Live:
        // the leg asked its delegated backend to go on; the live model speaks on its own.
        if respond && self.engine.openai_config().api != OpenAiApi::Live {
            self.apply(Event::Respond, ctx);
        }
    }

    fn standby_is(&self, leg_no: u32) -> bool {
        self.standby.as_ref().is_some_and(|(n, _)| *n == leg_no)
    }

    fn snapshot(&self, with_transcript: bool) -> CallSnapshot {
        let c = &self.counters;
        CallSnapshot {
            call_sid: self.call_sid.clone(),
            stream_sid: self.stream_sid.clone(),
            state: self.state_name(),
            started_at: self.started_at.format(&Rfc3339).unwrap_or_default(),
            duration_ms: self.started.elapsed().as_millis() as u64,
            from: self.from.clone(),
            to: self.to.clone(),
            upstream: self.engine.upstream().as_str(),
            api: (self.engine.upstream() == UpstreamKind::OpenAi)
                .then(|| self.engine.openai_config().api.as_str()),
            upstream_state: match self.leg_state {
                LegState::Connecting => "connecting",
                LegState::Ready => "ready",
                LegState::Restarting => "restarting",
            },
            frames_in: CallCounters::get(&c.frames_in),
            frames_out: CallCounters::get(&c.frames_out),
            barge_ins: self.turns.barge_ins,
            upstream_restarts: self.restarts.total,
            rollovers: self.rollovers,
            usage: self.usage_report(),
            direction: self.direction,
            params: self.params.iter().cloned().collect(),
            upstream_errors: self.upstream_errors,
            malformed_frames: CallCounters::get(&c.malformed_frames),
            marks_pending: CallCounters::get(&c.marks_pending) as usize,
            dropped_frames: DroppedFrames::from(c.as_ref()),
            queued: Queued {
                twilio_ms: CallCounters::get(&c.twilio_queued_ms),
                twilio_unconfirmed_ms: CallCounters::get(&c.unconfirmed_ms),
                openai_events: CallCounters::get(&c.openai_queued),
            },
            silence_filled_ms: CallCounters::get(&c.silence_filled_ms),
            transcript: with_transcript.then(|| self.transcript.iter().cloned().collect()),
        }
    }

    fn redact_number<'a>(&self, number: &'a str) -> std::borrow::Cow<'a, str> {
        if self.engine.call_config().redact_numbers_in_logs {
            std::borrow::Cow::Owned(redact_number(number))
        } else {
            std::borrow::Cow::Borrowed(number)
        }
    }
}

impl From<&CallCounters> for DroppedFrames {
    fn from(c: &CallCounters) -> Self {
        DroppedFrames {
            pre_start: CallCounters::get(&c.dropped_pre_start),
            upstream_not_ready: CallCounters::get(&c.dropped_upstream_not_ready),
            interrupted: CallCounters::get(&c.dropped_interrupted),
            twilio_backpressure: CallCounters::get(&c.dropped_twilio_backpressure),
            openai_backpressure: CallCounters::get(&c.dropped_openai_backpressure),
        }
    }
}

impl Actor for CallActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::debug!("{} media stream connected", self.label);
        self.engine.call_opened();
        self.ticket = Some(
            self.engine
                .metrics()
                .call_started(self.api_label(), self.counters.clone()),
        );
        if self.engine.upstream() == UpstreamKind::OpenAi {
            let admission = self.engine.breaker().admit(Instant::now());
            match admission {
                Admission::Allow => {}
                Admission::Probe => {
                    log::info!(
                        "{} the breaker's cooldown is over: this call probes OpenAI",
                        self.label
                    );
                    self.probe = true;
                }
                Admission::Refuse { reason } => {
                    log::warn!(
                        "{} OpenAI not tried (breaker open after repeated permanent failures: {reason}); the caller gets the fallback",
                        self.label
                    );
                    self.end_call(StopReason::BreakerOpen(reason), ctx);
                    return;
                }
            }
        }
        self.start_leg(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.leave();
        if self.registered && !self.ended_published {
            // Stopped without its end (the runtime shutting down): its event stream still ends.
            self.ended_published = true;
            self.publish(CallEvent::Ended {
                reason: "shutdown".into(),
                totals: serde_json::json!({}),
            });
        }
        self.engine.call_actor_stopped();
        if self.probe {
            // The probe ended before OpenAI answered either way: let another call probe.
            self.engine.breaker().probe_abandoned();
        }
        // A call stopped without `end_call` (its runtime shutting down) still closes its AI leg.
        if let Some(leg) = self.leg.take() {
            leg.stop.do_send(Stop {
                reason: StopReason::Shutdown,
            });
        }
    }
}

/// Twilio's `start`: the call has a SID, audio can go out.
impl Handler<StreamStarted> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: StreamStarted, ctx: &mut Context<Self>) {
        let start = msg.start;
        let param = |name: &str| {
            start
                .custom_parameters
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        self.from = param("From");
        self.to = param("To");
        if param("callbridgeDirection") == "outbound" {
            self.direction = "outbound";
        }
        self.params = start
            .custom_parameters
            .iter()
            .filter(|(name, _)| {
                !["From", "To", "CallSid"].contains(&name.as_str())
                    && !name.starts_with("callbridge")
            })
            .cloned()
            .collect();
        let greeting = param("callbridgeGreeting");
        if !greeting.trim().is_empty() {
            let mut actions = std::mem::take(&mut self.actions);
            self.turns.set_greeting(greeting, &mut actions);
            for action in actions.drain(..) {
                self.perform(action, ctx);
            }
            self.actions = actions;
        }
        self.call_sid = start.call_sid.clone();
        self.stream_sid = start.stream_sid.clone();
        let earlier =
            std::mem::replace(&mut self.label, Arc::from(format!("[{}]", start.call_sid)));
        log::info!(
            "{} stream started (was {earlier} until now): stream {}, from {}, to {}, upstream {}",
            self.label,
            self.stream_sid,
            self.redact_number(&self.from),
            self.redact_number(&self.to),
            self.engine.upstream().as_str()
        );
        self.twilio.ident.do_send(CallIdentified {
            label: self.label.clone(),
        });
        if let Some(leg) = &self.leg {
            leg.ident.do_send(CallIdentified {
                label: self.label.clone(),
            });
        }
        self.engine.registry().do_send(Register {
            call_sid: self.call_sid.clone(),
            instance: self.instance,
            snapshot: ctx.address().recipient(),
            control: Some(ctx.address().recipient()),
        });
        self.registered = true;
        self.sync_state();
    }
}

/// A keypad digit: into the record and to the model.
impl Handler<Dtmf> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Dtmf, ctx: &mut Context<Self>) {
        log::info!("{} dtmf: {}", self.label, msg.digit);
        self.publish(CallEvent::Dtmf {
            digit: msg.digit.clone(),
        });
        self.record(Role::Dtmf, msg.digit.clone(), None);
        self.turn_changed = Instant::now();
        self.apply(Event::Dtmf { digit: msg.digit }, ctx);
    }
}

/// A transcript line from the AI leg.
impl Handler<Transcript> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Transcript, _: &mut Context<Self>) {
        if msg.partial {
            // A turn still being spoken: the live events show it; the transcript waits for it.
            self.publish(CallEvent::Transcript {
                role: msg.role.as_str(),
                text: msg.text,
                final_: false,
            });
            return;
        }
        if self.engine.call_config().log_transcripts {
            log::info!("{} {}: {}", self.label, msg.role.as_str(), msg.text);
        }
        self.record(msg.role, msg.text, msg.item_id);
    }
}

/// What happened in the AI session.
impl Handler<UpstreamEvent> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamEvent, ctx: &mut Context<Self>) {
        match msg {
            UpstreamEvent::Connected { leg } if leg == self.leg_no => {
                if self.engine.upstream() == UpstreamKind::OpenAi {
                    log::info!("{} connected to OpenAI (leg {leg})", self.label);
                }
            }
            UpstreamEvent::Ready { leg } if leg == self.leg_no && !self.ending => {
                self.on_leg_ready(leg, ctx)
            }
            UpstreamEvent::Closed { leg, failure } if leg == self.leg_no && !self.ending => {
                self.on_leg_closed(failure, ctx)
            }
            UpstreamEvent::Ready { leg } if self.standby_is(leg) && !self.ending => {
                self.on_standby_ready(ctx)
            }
            UpstreamEvent::Closed { leg, failure } if self.standby_is(leg) && !self.ending => {
                self.on_standby_closed(failure, ctx)
            }
            UpstreamEvent::SpeechStarted => {
                self.turn_changed = Instant::now();
                self.speech_at = Some(self.turn_changed);
                self.apply(Event::SpeechStarted, ctx)
            }
            UpstreamEvent::SpeechStopped => {
                self.turn_changed = Instant::now();
                self.apply(Event::SpeechStopped, ctx)
            }
            UpstreamEvent::CallerSpeaking(speaking) => {
                self.turn_changed = Instant::now();
                self.apply(Event::CallerSpeaking(speaking), ctx)
            }
            UpstreamEvent::Usage(report) => self.on_usage(report, ctx),
            UpstreamEvent::ToolCall {
                call_id,
                name,
                arguments,
            } => self.on_tool_call(call_id, name, arguments, ctx),
            UpstreamEvent::Expires { leg, in_s } => {
                log::debug!("{} AI session of leg {leg} expires in {in_s} s", self.label);
                self.expires = Some((leg, Duration::from_secs(in_s)));
            }
            UpstreamEvent::ResponseCreated { response_id } => {
                self.turn_changed = Instant::now();
                self.apply(Event::ResponseCreated { response_id }, ctx)
            }
            UpstreamEvent::ResponseDone {
                response_id,
                status,
            } => {
                log::debug!("{} response {response_id} {status}", self.label);
                self.turn_changed = Instant::now();
                // A completed response proves key, quota and settings work: the breaker's
                // count of consecutive permanent failures starts again (a configured session
                // does not: a quota error comes with the first response).
                if status == "completed" && !self.breaker_cleared {
                    self.breaker_cleared = true;
                    self.probe = false;
                    self.engine.breaker().on_success();
                }
                self.apply(Event::ResponseDone { response_id }, ctx)
            }
            UpstreamEvent::Error { code, message } => {
                self.upstream_errors += 1;
                log::warn!("{} OpenAI error {code}: {message}", self.label);
                self.engine.metrics().openai_error(&code);
                self.publish(CallEvent::Error { code });
            }
            UpstreamEvent::Connected { .. }
            | UpstreamEvent::Ready { .. }
            | UpstreamEvent::Closed { .. } => {
                log::debug!("{} report from a replaced AI leg ignored", self.label)
            }
        }
    }
}

/// End the call (from the Twilio leg, or the shell on shutdown).
impl Handler<Stop> for CallActor {
    type Result = ();

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) {
        // After a hang-up or transfer, Twilio's stop (or close) is the end we asked for.
        let reason = match (&self.ended_by_us, &msg.reason) {
            (Some(ours), StopReason::TwilioStop | StopReason::TwilioClosed(_)) => ours.clone(),
            _ => msg.reason,
        };
        self.end_call(reason, ctx);
    }
}

/// The operator API: hang up, transfer, say.
impl Handler<CallControl> for CallActor {
    type Result = Result<(), ControlRefused>;

    fn handle(&mut self, msg: CallControl, ctx: &mut Context<Self>) -> Self::Result {
        self.call_control(msg, ctx)
    }
}

impl CallActor {
    /// A hang-up, transfer or words to say (from the operator API, or the model's built-in
    /// tools).
    fn call_control(
        &mut self,
        msg: CallControl,
        ctx: &mut Context<Self>,
    ) -> Result<(), ControlRefused> {
        if self.ending {
            return Err(ControlRefused::Ending);
        }
        if self.call_sid.is_empty() {
            return Err(ControlRefused::NotStarted);
        }
        let (transfer, words) = match msg {
            CallControl::Say { text } => {
                if self.usage.is_none() && self.leg.is_none() {
                    return Err(ControlRefused::NoAssistant);
                }
                log::info!(
                    "{} operator: the assistant says {} characters next",
                    self.label,
                    text.len()
                );
                self.apply(
                    Event::Speak {
                        instructions: say_exactly(&text),
                    },
                    ctx,
                );
                return Ok(());
            }
            CallControl::Hangup { goodbye } => (None, goodbye),
            CallControl::Transfer { to, announce } => {
                let caller_id = Some(self.engine.call_config().transfer_caller_id.clone())
                    .filter(|c| !c.is_empty())
                    .or_else(|| Some(self.to.clone()).filter(|c| !c.is_empty()));
                (
                    Some(crate::protocol::twiml::dial(
                        &to,
                        caller_id.as_deref(),
                        None,
                    )),
                    announce,
                )
            }
        };
        if self.closing.is_some() || self.ended_by_us.is_some() {
            return Err(ControlRefused::Busy);
        }
        if self.engine.rest().is_none() {
            return Err(ControlRefused::NoRest);
        }
        let what = if transfer.is_some() {
            "transfer"
        } else {
            "hang-up"
        };
        let words = words.filter(|w| !w.trim().is_empty());
        log::info!(
            "{} operator: {what}{}",
            self.label,
            if words.is_some() {
                " after the assistant's words"
            } else {
                ""
            }
        );
        let deadline =
            Instant::now() + Duration::from_millis(self.engine.call_config().goodbye_timeout_ms);
        self.closing = Some(Closing {
            transfer,
            deadline,
            words: words.is_some(),
            sent: false,
        });
        if let Some(words) = words {
            self.apply(
                Event::Speak {
                    instructions: words,
                },
                ctx,
            );
        }
        self.check_closing(ctx);
        Ok(())
    }
}

/// Instructions that make the assistant say `text`, word for word.
fn say_exactly(text: &str) -> String {
    format!("Say exactly the following words, and nothing else: \"{text}\"")
}

/// The registry asks for `/calls`.
impl Handler<GetSnapshot> for CallActor {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, msg: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot(msg.with_transcript))
    }
}

/// A random number in [0, 1) for the restart backoff's jitter, from the standard library's
/// per-instance random hasher keys (no generator to seed or share between threads).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The usage in the end-of-call line.
fn describe_usage(usage: &CallUsage) -> String {
    let amount = match (&usage.tokens, usage.seconds) {
        (Some(t), _) => format!(
            "tokens in text={} audio={} (cached text={} audio={}), out text={} audio={}",
            t.input_text,
            t.input_audio,
            t.cached_text,
            t.cached_audio,
            t.output_text,
            t.output_audio
        ),
        (None, Some(seconds)) => format!("{seconds:.1} s of session"),
        (None, None) => "nothing".into(),
    };
    let cost = match usage.cost_usd {
        Some(usd) => format!("${usd:.6}"),
        None => usage
            .price_note
            .clone()
            .unwrap_or_else(|| "cost unknown".into()),
    };
    format!("{} {} {amount}, {cost}", usage.api, usage.model)
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// `+14155550123` → `+1415***0123`: enough to tell calls apart in a log, not enough to dial.
pub fn redact_number(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() <= 6 {
        return "***".into();
    }
    let head: String = chars[..chars.len().min(5)].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    if chars.len() <= 9 {
        return format!("***{tail}");
    }
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_number;

    #[test]
    fn numbers_are_masked_in_the_middle() {
        assert_eq!(redact_number("+14155550123"), "+1415***0123");
        assert_eq!(redact_number("12345"), "***");
        assert_eq!(redact_number("+4412345"), "***2345");
        assert_eq!(redact_number(""), "***");
    }
}
