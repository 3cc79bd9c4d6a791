//! `EchoUpstream`: a built-in assistant that plays the caller's own audio back.
//!
//! A telephony echo test that needs no OpenAI account: if the caller hears themselves, audio
//! flows both ways through Twilio and the bridge. It takes the OpenAI leg's place and speaks the
//! same messages, so the `CallActor` treats both alike: it is routed caller audio when ready and
//! sends each chunk straight to the Twilio leg it was created with.

use std::sync::Arc;

use actix::prelude::*;

use crate::messages::{
    AudioIn, AudioOut, CallCounters, CallIdentified, Stop, UpstreamCommand, UpstreamEvent,
};
use crate::openai_realtime::LegPort;

pub struct EchoUpstream {
    call: LegPort,
    leg: u32,
    counters: Arc<CallCounters>,
    twilio: Recipient<AudioOut>,
    /// Every echoed chunk belongs to one endless "response".
    ids: Arc<str>,
}

impl EchoUpstream {
    pub fn new(
        call: LegPort,
        leg: u32,
        twilio: Recipient<AudioOut>,
        counters: Arc<CallCounters>,
    ) -> Self {
        Self {
            call,
            leg,
            counters,
            twilio,
            ids: Arc::from("echo"),
        }
    }

    /// Starts the leg with a bounded mailbox, as an OpenAI leg
    /// ([`crate::openai_realtime::mailbox_capacity`]).
    pub fn start_leg(self, capacity: usize) -> Addr<Self> {
        let mut ctx = Context::new();
        ctx.set_mailbox_capacity(capacity);
        ctx.run(self)
    }
}

impl Actor for EchoUpstream {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.call
            .events
            .do_send(UpstreamEvent::Connected { leg: self.leg });
        self.call
            .events
            .do_send(UpstreamEvent::Ready { leg: self.leg });
    }
}

/// Plays the caller's chunk straight back.
impl Handler<AudioIn> for EchoUpstream {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        let audio = AudioOut {
            payload: msg.payload,
            bytes: msg.bytes,
            response_id: self.ids.clone(),
            item_id: self.ids.clone(),
        };
        if let Err(SendError::Full(_)) = self.twilio.try_send(audio) {
            CallCounters::add(&self.counters.dropped_twilio_backpressure, 1);
        }
    }
}

/// An echo has no conversation: control events are accepted and ignored.
impl Handler<UpstreamCommand> for EchoUpstream {
    type Result = ();

    fn handle(&mut self, _: UpstreamCommand, _: &mut Context<Self>) {}
}

impl Handler<Stop> for EchoUpstream {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<CallIdentified> for EchoUpstream {
    type Result = ();

    fn handle(&mut self, _: CallIdentified, _: &mut Context<Self>) {}
}
