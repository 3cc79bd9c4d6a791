//! `EchoUpstream`: a built-in assistant that plays the caller's own audio back.
//!
//! A telephony echo test that needs no OpenAI account: if the caller hears themselves, audio
//! flows both ways through Twilio and the bridge. It takes the OpenAI leg's place and speaks the
//! same messages, so the `CallActor` treats both alike.

use std::sync::Arc;

use actix::prelude::*;

use crate::call::CallActor;
use crate::messages::{AudioIn, AudioOut, CallIdentified, Stop, UpstreamCommand, UpstreamEvent};

pub struct EchoUpstream {
    call: Addr<CallActor>,
    leg: u32,
    /// Every echoed chunk belongs to one endless "response".
    ids: Arc<str>,
}

impl EchoUpstream {
    pub fn new(call: Addr<CallActor>, leg: u32) -> Self {
        Self {
            call,
            leg,
            ids: Arc::from("echo"),
        }
    }
}

impl Actor for EchoUpstream {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.call
            .do_send(UpstreamEvent::Connected { leg: self.leg });
        self.call.do_send(UpstreamEvent::Ready { leg: self.leg });
    }
}

/// Plays the caller's chunk straight back.
impl Handler<AudioIn> for EchoUpstream {
    type Result = ();

    fn handle(&mut self, msg: AudioIn, _: &mut Context<Self>) {
        self.call.do_send(AudioOut {
            payload: msg.payload,
            bytes: msg.bytes,
            response_id: self.ids.clone(),
            item_id: self.ids.clone(),
        });
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
