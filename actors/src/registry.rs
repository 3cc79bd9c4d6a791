//! `CallRegistry`: the one actor that knows every live call, for `/calls` and `/health`.
//!
//! Calls register when Twilio's `start` names them and unregister when they end. The registry
//! holds only a `Recipient<GetSnapshot>` per call and asks for snapshots when `/calls` is read;
//! calls never send it per-frame traffic, so it costs nothing on the audio path.

use std::{collections::HashMap, time::Duration};

use actix::prelude::*;
use futures_util::future::join_all;
use serde::Serialize;

use crate::messages::{CallControl, ControlRefused, GetSnapshot};

/// How long after the last call ends the registry hands freed memory back to the OS.
const RELEASE_MEMORY_AFTER: Duration = Duration::from_secs(1);

/// Returns freed heap pages to the OS. glibc keeps what calls freed in its per-thread arenas;
/// after a burst of a thousand calls that is tens of MB that stays resident (and looks like a
/// leak to an operator) until the next burst reuses it. Run when no call is live, so the cost
/// (a walk over the arenas) is paid when nothing is waiting.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// One line of a call's transcript as `/calls/{sid}` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TranscriptEntry {
    pub role: crate::messages::Role,
    pub text: String,
    /// RFC 3339.
    pub at: String,
    /// The assistant item (internal: a barge-in finds its entry by it).
    #[serde(skip)]
    pub item_id: Option<String>,
    /// The caller spoke over this assistant line: it was cut short.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Of an interrupted line, how much the caller heard (marks confirmed), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heard_ms: Option<u64>,
}

/// A live call as `/calls` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallSnapshot {
    pub call_sid: String,
    pub stream_sid: String,
    /// `active`, `reconnecting` (AI leg restarting) or `ending`.
    pub state: &'static str,
    /// RFC 3339, when the media stream connected.
    pub started_at: String,
    pub duration_ms: u64,
    pub from: String,
    pub to: String,
    /// `openai` or `echo`.
    pub upstream: &'static str,
    /// With OpenAI: `realtime` or `live`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<&'static str>,
    /// `connecting`, `ready` or `restarting`.
    pub upstream_state: &'static str,
    pub frames_in: u64,
    pub frames_out: u64,
    pub barge_ins: u64,
    pub upstream_restarts: u32,
    /// Sessions replaced before OpenAI's 60-minute cap (`openai.max_session_s`).
    pub rollovers: u64,
    /// `inbound`, or `outbound` (placed with `POST /calls`).
    pub direction: &'static str,
    /// An outbound call's `params`.
    pub params: std::collections::BTreeMap<String, String>,
    /// What the AI sessions used and cost so far (absent with the echo upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::session::usage::CallUsage>,
    pub upstream_errors: u64,
    pub malformed_frames: u64,
    /// Marks sent to Twilio and not yet echoed: audio still queued for the caller.
    pub marks_pending: usize,
    pub dropped_frames: DroppedFrames,
    pub queued: Queued,
    /// Caller audio lost on the way from Twilio (a jump in `media.timestamp`), replaced with
    /// silence so the model's voice detection keeps its clock, ms.
    pub silence_filled_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<Vec<TranscriptEntry>>,
}

/// Audio chunks dropped on purpose, by reason (every bounded queue counts what it dropped).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct DroppedFrames {
    /// Assistant audio over `call.pre_start_buffer_ms` before Twilio's `start`.
    pub pre_start: u64,
    /// Caller audio over `call.upstream_buffer_ms` while the AI leg was not ready.
    pub upstream_not_ready: u64,
    /// Late audio of a response the caller interrupted (and audio queued when it was cleared).
    pub interrupted: u64,
    /// Assistant audio dropped because Twilio did not take it: the playback queue
    /// (`call.twilio_queue_ms`) was full, or the Twilio leg's mailbox was.
    pub twilio_backpressure: u64,
    /// Caller audio dropped because OpenAI did not take it: the leg's write queue
    /// (`call.openai_queue_ms`) was full, or its mailbox was.
    pub openai_backpressure: u64,
}

/// Audio waiting inside the bridge right now (gauges).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Queued {
    /// Assistant audio in the Twilio leg's queue, ms.
    pub twilio_ms: u64,
    /// Assistant audio sent to Twilio and not yet confirmed played by a mark, ms.
    pub twilio_unconfirmed_ms: u64,
    /// Events in the OpenAI leg's write queue.
    pub openai_events: u64,
}

/// CallActor → CallRegistry: this call is live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub call_sid: String,
    /// Tells this registration from a later one with the same SID.
    pub instance: u64,
    pub snapshot: Recipient<GetSnapshot>,
    /// Where the operator API's commands go (none in tests that only list calls).
    pub control: Option<Recipient<CallControl>>,
}

/// CallActor → CallRegistry: this call has ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub call_sid: String,
    pub instance: u64,
}

/// CallActor → CallRegistry: a call ended (registered or not), for the counts by reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CallEnded {
    /// [`crate::messages::StopReason::code`].
    pub reason: &'static str,
}

/// HTTP shell → CallRegistry: how many calls ended, by reason, since start-up.
#[derive(Message)]
#[rtype(result = "std::collections::BTreeMap<&'static str, u64>")]
pub struct EndedCalls;

/// HTTP shell → CallRegistry: snapshots of every live call, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<CallSnapshot>")]
pub struct ListCalls;

/// HTTP shell → CallRegistry: one call with its transcript, if live.
#[derive(Message)]
#[rtype(result = "Option<CallSnapshot>")]
pub struct GetCall {
    pub call_sid: String,
}

/// HTTP shell → CallRegistry: how many calls are live.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CallCount;

/// A live call: its instance, how to ask for its snapshot, where its commands go.
type Entry = (u64, Recipient<GetSnapshot>, Option<Recipient<CallControl>>);

#[derive(Default)]
pub struct CallRegistry {
    calls: HashMap<String, Entry>,
    ended: std::collections::BTreeMap<&'static str, u64>,
}

impl Actor for CallRegistry {
    type Context = Context<Self>;
}

/// Registers a call; a second call with a live SID replaces the first (logged).
impl Handler<Register> for CallRegistry {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) {
        if self
            .calls
            .insert(
                msg.call_sid.clone(),
                (msg.instance, msg.snapshot, msg.control),
            )
            .is_some()
        {
            log::warn!(
                "[{}] a second media stream registered for a live call SID; /calls shows the newest",
                msg.call_sid
            );
        }
    }
}

/// Removes a call, unless a newer registration of the same SID replaced it.
impl Handler<Unregister> for CallRegistry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, ctx: &mut Context<Self>) {
        if self
            .calls
            .get(&msg.call_sid)
            .is_some_and(|(instance, _, _)| *instance == msg.instance)
        {
            self.calls.remove(&msg.call_sid);
            if self.calls.is_empty() {
                // A moment later, so that the last call's actors and sockets are gone too.
                ctx.run_later(RELEASE_MEMORY_AFTER, |act, _| {
                    if act.calls.is_empty() {
                        release_free_memory();
                    }
                });
            }
        }
    }
}

/// Asks every call for its snapshot; a call that ended meanwhile is left out.
impl Handler<ListCalls> for CallRegistry {
    type Result = ResponseFuture<Vec<CallSnapshot>>;

    fn handle(&mut self, _: ListCalls, _: &mut Context<Self>) -> Self::Result {
        let asks: Vec<_> = self
            .calls
            .values()
            .map(|(_, r, _)| {
                r.send(GetSnapshot {
                    with_transcript: false,
                })
            })
            .collect();
        Box::pin(async move {
            let mut calls: Vec<CallSnapshot> = join_all(asks).await.into_iter().flatten().collect();
            calls.sort_by(|a, b| {
                a.started_at
                    .cmp(&b.started_at)
                    .then(a.call_sid.cmp(&b.call_sid))
            });
            calls
        })
    }
}

/// Asks one call for its snapshot with transcript.
/// The operator API → a live call: `None` for an unknown call.
#[derive(Message)]
#[rtype(result = "Option<Result<(), ControlRefused>>")]
pub struct ControlCall {
    pub call_sid: String,
    pub command: CallControl,
}

impl Handler<ControlCall> for CallRegistry {
    type Result = ResponseFuture<Option<Result<(), ControlRefused>>>;

    fn handle(&mut self, msg: ControlCall, _: &mut Context<Self>) -> Self::Result {
        let ask = self
            .calls
            .get(&msg.call_sid)
            .and_then(|(_, _, control)| control.as_ref())
            .map(|control| control.send(msg.command));
        Box::pin(async move {
            match ask {
                Some(ask) => Some(ask.await.unwrap_or(Err(ControlRefused::Ending))),
                None => None,
            }
        })
    }
}

impl Handler<GetCall> for CallRegistry {
    type Result = ResponseFuture<Option<CallSnapshot>>;

    fn handle(&mut self, msg: GetCall, _: &mut Context<Self>) -> Self::Result {
        let ask = self.calls.get(&msg.call_sid).map(|(_, r, _)| {
            r.send(GetSnapshot {
                with_transcript: true,
            })
        });
        Box::pin(async move {
            match ask {
                Some(ask) => ask.await.ok(),
                None => None,
            }
        })
    }
}

/// Counts an ended call by its reason.
impl Handler<CallEnded> for CallRegistry {
    type Result = ();

    fn handle(&mut self, msg: CallEnded, _: &mut Context<Self>) {
        *self.ended.entry(msg.reason).or_default() += 1;
    }
}

/// The counts of ended calls by reason.
impl Handler<EndedCalls> for CallRegistry {
    type Result = MessageResult<EndedCalls>;

    fn handle(&mut self, _: EndedCalls, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.ended.clone())
    }
}

impl Handler<CallCount> for CallRegistry {
    type Result = usize;

    fn handle(&mut self, _: CallCount, _: &mut Context<Self>) -> usize {
        self.calls.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in call that answers snapshots with its SID.
    struct FakeCall(&'static str);

    impl Actor for FakeCall {
        type Context = Context<Self>;
    }

    impl Handler<GetSnapshot> for FakeCall {
        type Result = MessageResult<GetSnapshot>;
        fn handle(&mut self, msg: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
            MessageResult(CallSnapshot {
                call_sid: self.0.into(),
                stream_sid: "MZ".into(),
                state: "active",
                started_at: format!("2026-01-01T00:00:0{}Z", self.0.len()),
                duration_ms: 0,
                from: String::new(),
                to: String::new(),
                upstream: "echo",
                api: None,
                upstream_state: "ready",
                frames_in: 0,
                frames_out: 0,
                barge_ins: 0,
                upstream_restarts: 0,
                rollovers: 0,
                usage: None,
                direction: "inbound",
                params: Default::default(),
                upstream_errors: 0,
                malformed_frames: 0,
                marks_pending: 0,
                dropped_frames: DroppedFrames::default(),
                queued: Queued::default(),
                silence_filled_ms: 0,
                transcript: msg.with_transcript.then(Vec::new),
            })
        }
    }

    #[actix::test]
    async fn registers_lists_and_forgets_calls() {
        let registry = CallRegistry::default().start();
        let a = FakeCall("CA1").start();
        let b = FakeCall("CA22").start();
        registry
            .send(Register {
                call_sid: "CA1".into(),
                instance: 1,
                snapshot: a.recipient(),
                control: None,
            })
            .await
            .unwrap();
        registry
            .send(Register {
                call_sid: "CA22".into(),
                instance: 2,
                snapshot: b.recipient(),
                control: None,
            })
            .await
            .unwrap();
        let calls = registry.send(ListCalls).await.unwrap();
        let sids: Vec<_> = calls.iter().map(|c| c.call_sid.as_str()).collect();
        assert_eq!(sids, vec!["CA1", "CA22"]);
        assert!(calls.iter().all(|c| c.transcript.is_none()));

        let one = registry
            .send(GetCall {
                call_sid: "CA22".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.transcript, Some(vec![]));

        // A stale unregister (older instance) must not remove a newer registration.
        registry
            .send(Unregister {
                call_sid: "CA22".into(),
                instance: 99,
            })
            .await
            .unwrap();
        assert_eq!(registry.send(CallCount).await.unwrap(), 2);
        registry
            .send(Unregister {
                call_sid: "CA1".into(),
                instance: 1,
            })
            .await
            .unwrap();
        assert_eq!(registry.send(CallCount).await.unwrap(), 1);
        assert!(registry
            .send(GetCall {
                call_sid: "CA1".into()
            })
            .await
            .unwrap()
            .is_none());
    }
}
