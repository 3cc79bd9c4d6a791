//! Actor tests (layer 2): the real `CallActor` and AI legs with stand-in recipients for the
//! other side, on one actix runtime. Each stand-in records what it receives, in order.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;

use callbridge_actors::call::{CallActor, LegRequest, UpstreamLeg};
use callbridge_actors::echo::EchoUpstream;
use callbridge_actors::messages::{
    AudioIn, AudioOut, CallCounters, CallIdentified, ClearAudio, ClearOutcome, GetSnapshot,
    MarkTail, RouteCallerAudio, Stop, StopReason, UpstreamCommand, UpstreamEvent,
};
use callbridge_actors::openai_realtime::LegPort;
use callbridge_actors::session::restart::LegFailure;
use callbridge_actors::twilio_stream::TwilioPort;
use callbridge_actors::{CallConfig, CallRegistry, Engine, OpenAiConfig, UpstreamKind};

/// What a stand-in saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Twilio leg: a route; `Some(n)` = to AI leg number `n`.
    Route(Option<u32>),
    Clear(Option<String>),
    MarkTail,
    Audio(String),
    Stop(StopReason),
    /// AI leg `n`: a caller frame.
    LegAudio(u32, String),
    /// AI leg `n`: a control command.
    Command(u32, UpstreamCommand),
    LegStop(u32),
}

type Log = Rc<RefCell<Vec<Seen>>>;

/// Stands in for the Twilio leg. Answers a clear with `clear_answer`.
struct TwilioStandIn {
    log: Log,
    clear_answer: ClearOutcome,
}

impl Actor for TwilioStandIn {
    type Context = Context<Self>;
}

impl Handler<AudioOut> for TwilioStandIn {
    type Result = ();
    fn handle(&mut self, msg: AudioOut, _: &mut Context<Self>) {
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        self.log.borrow_mut().push(Seen::Audio(text));
    }
}

impl Handler<RouteCallerAudio> for TwilioStandIn {
    type Result = ();
    fn handle(&mut self, msg: RouteCallerAudio, _: &mut Context<Self>) {
        // Which leg the route goes to: send it a probe frame and let the leg record it.
        let leg = msg.to.map(|to| {
            let _ = to.try_send(AudioIn {
                payload: Bytes::from_static(b"probe"),
                bytes: 5,
            });
            u32::MAX
        });
        self.log.borrow_mut().push(Seen::Route(leg));
    }
}

impl Handler<ClearAudio> for TwilioStandIn {
    type Result = ClearOutcome;
    fn handle(&mut self, msg: ClearAudio, _: &mut Context<Self>) -> ClearOutcome {
        self.log
            .borrow_mut()
            .push(Seen::Clear(msg.interrupted.map(|r| r.to_string())));
        self.clear_answer.clone()
    }
}

impl Handler<MarkTail> for TwilioStandIn {
    type Result = ();
    fn handle(&mut self, _: MarkTail, _: &mut Context<Self>) {
        self.log.borrow_mut().push(Seen::MarkTail);
    }
}

impl Handler<CallIdentified> for TwilioStandIn {
    type Result = ();
    fn handle(&mut self, _: CallIdentified, _: &mut Context<Self>) {}
}

impl Handler<Stop> for TwilioStandIn {
    type Result = ();
    fn handle(&mut self, msg: Stop, _: &mut Context<Self>) {
        self.log.borrow_mut().push(Seen::Stop(msg.reason));
    }
}

/// Stands in for an AI leg; the test drives its session through the port it was created with.
struct LegStandIn {
    leg: u32,
    log: Log,
}

impl Actor for LegStandIn {
    type Context = Context<Self>;
}

impl Handler<AudioIn> for LegStandIn {
    type Result = ();
    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        self.log.borrow_mut().push(Seen::LegAudio(self.leg, text));
    }
}

impl Handler<UpstreamCommand> for LegStandIn {
    type Result = ();
    fn handle(&mut self, msg: UpstreamCommand, _: &mut Context<Self>) {
        self.log.borrow_mut().push(Seen::Command(self.leg, msg));
    }
}

impl Handler<Stop> for LegStandIn {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        self.log.borrow_mut().push(Seen::LegStop(self.leg));
        ctx.stop();
    }
}

impl Handler<CallIdentified> for LegStandIn {
    type Result = ();
    fn handle(&mut self, _: CallIdentified, _: &mut Context<Self>) {}
}

/// A call with stand-ins on both sides. `ports` gets each leg's port to the call, by number.
struct Rig {
    call: Addr<CallActor>,
    log: Log,
    ports: Rc<RefCell<Vec<LegPort>>>,
}

fn engine() -> Engine {
    let registry = CallRegistry::default().start();
    let openai = OpenAiConfig {
        restart_backoff_ms: 10,
        restart_backoff_max_ms: 10,
        max_restarts: 2,
        ..Default::default()
    };
    let call = CallConfig {
        dtmf_response_delay_ms: 50,
        ..Default::default()
    };
    Engine::new(
        registry,
        openai,
        call,
        UpstreamKind::Echo,
        None,
        None,
        Default::default(),
        Default::default(),
    )
    .expect("valid settings")
}

fn rig(clear_answer: ClearOutcome) -> Rig {
    let log: Log = Rc::default();
    let twilio = TwilioStandIn {
        log: log.clone(),
        clear_answer,
    }
    .start();
    let ports: Rc<RefCell<Vec<LegPort>>> = Rc::default();
    let (leg_log, leg_ports) = (log.clone(), ports.clone());
    let legs = Box::new(move |req: LegRequest| {
        leg_ports.borrow_mut().push(req.port.clone());
        let leg = LegStandIn {
            leg: req.leg_no,
            log: leg_log.clone(),
        }
        .start();
        UpstreamLeg::of(leg)
    });
    let counters = Arc::new(CallCounters::default());
    let call = CallActor::with_legs(engine(), 1, TwilioPort::of(&twilio), counters, legs).start();
    Rig { call, log, ports }
}

/// Lets every actor run what is in its mailbox.
async fn settle() {
    for _ in 0..5 {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_until(log: &Log, what: &str, f: impl Fn(&[Seen]) -> bool) {
    for _ in 0..200 {
        if f(&log.borrow()) {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}; saw {:?}", log.borrow());
}

impl Rig {
    fn port(&self, leg: usize) -> LegPort {
        self.ports.borrow()[leg].clone()
    }

    fn event(&self, leg: usize, event: UpstreamEvent) {
        self.port(leg).events.do_send(event);
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.borrow().clone()
    }
}

/// A ready leg gets the caller's audio route; a lost leg has it taken back before anything
/// else, and the restarted leg gets it again: audio never goes to a dead leg.
#[actix_rt::test]
async fn the_route_is_handed_out_when_ready_and_taken_back_when_the_leg_is_lost() {
    let rig = rig(ClearOutcome::default());
    settle().await;
    assert_eq!(rig.ports.borrow().len(), 1, "leg 0 opened at once");
    assert!(
        rig.seen().is_empty(),
        "no route before the session is ready"
    );

    rig.event(0, UpstreamEvent::Ready { leg: 0 });
    wait_until(&rig.log, "route to leg 0", |s| {
        s.contains(&Seen::LegAudio(0, "probe".into()))
    })
    .await;
    assert_eq!(rig.seen()[0], Seen::Route(Some(u32::MAX)));

    rig.event(
        0,
        UpstreamEvent::Closed {
            leg: 0,
            failure: LegFailure::Closed {
                code: Some(1006),
                reason: "abnormal".into(),
            },
        },
    );
    wait_until(&rig.log, "route taken back", |s| {
        s.contains(&Seen::Route(None))
    })
    .await;
    // Restarted after the backoff with a new leg number; its Ready routes audio to it.
    for _ in 0..100 {
        if rig.ports.borrow().len() == 2 {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.ports.borrow().len(), 2, "leg 1 opened");
    // A late report from the old leg is ignored.
    rig.event(0, UpstreamEvent::Ready { leg: 0 });
    settle().await;
    assert_eq!(
        rig.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Route(Some(_))))
            .count(),
        1
    );
    rig.event(1, UpstreamEvent::Ready { leg: 1 });
    wait_until(&rig.log, "route to leg 1", |s| {
        s.contains(&Seen::LegAudio(1, "probe".into()))
    })
    .await;
    let snapshot = rig
        .call
        .send(GetSnapshot {
            with_transcript: false,
        })
        .await
        .unwrap();
    assert_eq!(snapshot.upstream_restarts, 1);
    assert_eq!(snapshot.state, "active");
}

/// Barge-in: the Twilio leg is asked to clear first; the truncate that follows carries what it
/// answered was heard; the response in flight is cancelled only after the grace period.
#[actix_rt::test]
async fn barge_in_clears_first_then_truncates_at_what_the_twilio_leg_heard() {
    let rig = rig(ClearOutcome {
        cleared: true,
        truncate: Some((Arc::from("item_1"), 120)),
        interrupted_audio: true,
    });
    settle().await;
    rig.event(0, UpstreamEvent::Ready { leg: 0 });
    rig.event(
        0,
        UpstreamEvent::ResponseCreated {
            response_id: "resp_1".into(),
        },
    );
    rig.event(0, UpstreamEvent::SpeechStarted);
    wait_until(&rig.log, "the cancel after the grace period", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Command(0, UpstreamCommand::Cancel { .. })))
    })
    .await;
    let seen = rig.seen();
    let clear = seen
        .iter()
        .position(|s| *s == Seen::Clear(Some("resp_1".into())))
        .expect("clear with the response in flight");
    let truncate = seen
        .iter()
        .position(|s| {
            *s == Seen::Command(
                0,
                UpstreamCommand::Truncate {
                    item_id: "item_1".into(),
                    audio_end_ms: 120,
                },
            )
        })
        .expect("truncate at what was heard");
    let cancel = seen
        .iter()
        .position(|s| {
            *s == Seen::Command(
                0,
                UpstreamCommand::Cancel {
                    response_id: "resp_1".into(),
                },
            )
        })
        .expect("cancel");
    assert!(clear < truncate && truncate < cancel, "{seen:?}");
    let snapshot = rig
        .call
        .send(GetSnapshot {
            with_transcript: false,
        })
        .await
        .unwrap();
    assert_eq!(snapshot.barge_ins, 1);
}

/// A response's end asks the Twilio leg to mark its tail; the server's own cancel within the
/// grace period means no `response.cancel` from us.
#[actix_rt::test]
async fn response_done_marks_the_tail_and_a_server_cancel_is_not_repeated() {
    let rig = rig(ClearOutcome::default());
    settle().await;
    rig.event(0, UpstreamEvent::Ready { leg: 0 });
    rig.event(
        0,
        UpstreamEvent::ResponseCreated {
            response_id: "resp_1".into(),
        },
    );
    rig.event(0, UpstreamEvent::SpeechStarted);
    rig.event(
        0,
        UpstreamEvent::ResponseDone {
            response_id: "resp_1".into(),
            status: "cancelled".into(),
        },
    );
    wait_until(&rig.log, "mark tail", |s| s.contains(&Seen::MarkTail)).await;
    // Past the grace period (250 ms): still no cancel.
    actix_rt::time::sleep(Duration::from_millis(400)).await;
    rig.event(
        0,
        UpstreamEvent::ResponseCreated {
            response_id: "marker".into(),
        },
    );
    rig.event(0, UpstreamEvent::SpeechStarted);
    wait_until(&rig.log, "a later clear", |s| {
        s.contains(&Seen::Clear(Some("marker".into())))
    })
    .await;
    assert!(!rig
        .seen()
        .iter()
        .any(|s| matches!(s, Seen::Command(_, UpstreamCommand::Cancel { .. }))));
}

/// When the restart budget is spent the call ends: the Twilio leg is told to close.
#[actix_rt::test]
async fn a_spent_restart_budget_ends_the_call_and_closes_the_twilio_leg() {
    let rig = rig(ClearOutcome::default());
    for leg in 0..3u32 {
        for _ in 0..100 {
            if rig.ports.borrow().len() > leg as usize {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        rig.event(
            leg as usize,
            UpstreamEvent::Closed {
                leg,
                failure: LegFailure::Connect("refused".into()),
            },
        );
    }
    wait_until(&rig.log, "the Twilio leg stopped", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Stop(StopReason::UpstreamFailed(_))))
    })
    .await;
    assert_eq!(rig.ports.borrow().len(), 3, "1 + max_restarts legs");
}

/// An AI leg sends assistant audio with `try_send`: when the Twilio leg's mailbox is full the
/// chunk is dropped and counted, never queued without bound.
#[actix_rt::test]
async fn assistant_audio_into_a_full_twilio_mailbox_is_dropped_and_counted() {
    let log: Log = Rc::default();
    let mut ctx = Context::new();
    ctx.set_mailbox_capacity(4);
    let twilio = ctx.run(TwilioStandIn {
        log: log.clone(),
        clear_answer: ClearOutcome::default(),
    });
    let events: Rc<RefCell<Vec<UpstreamEvent>>> = Rc::default();
    struct Events(Rc<RefCell<Vec<UpstreamEvent>>>);
    impl Actor for Events {
        type Context = Context<Self>;
    }
    impl Handler<UpstreamEvent> for Events {
        type Result = ();
        fn handle(&mut self, msg: UpstreamEvent, _: &mut Context<Self>) {
            self.0.borrow_mut().push(msg);
        }
    }
    impl Handler<callbridge_actors::messages::Transcript> for Events {
        type Result = ();
        fn handle(&mut self, _: callbridge_actors::messages::Transcript, _: &mut Context<Self>) {}
    }
    let sink = Events(events.clone()).start();
    let counters = Arc::new(CallCounters::default());
    let echo = EchoUpstream::new(
        LegPort {
            events: sink.clone().recipient(),
            transcripts: sink.recipient(),
        },
        0,
        twilio.recipient(),
        counters.clone(),
    )
    .start();
    // Twenty frames reach the echo before either actor runs: the echo handles them in one go
    // and the stand-in's mailbox of 4 fills.
    for i in 0..20 {
        echo.do_send(AudioIn {
            payload: Bytes::from(format!("f{i}")),
            bytes: 2,
        });
    }
    settle().await;
    let delivered = log
        .borrow()
        .iter()
        .filter(|s| matches!(s, Seen::Audio(_)))
        .count() as u64;
    let dropped = CallCounters::get(&counters.dropped_twilio_backpressure);
    assert!(dropped > 0, "a full mailbox drops");
    assert!(delivered >= 4, "what fit was delivered");
    assert_eq!(delivered + dropped, 20, "every frame delivered or counted");
    assert!(events
        .borrow()
        .iter()
        .any(|e| matches!(e, UpstreamEvent::Ready { leg: 0 })));
}
