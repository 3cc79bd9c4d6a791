//! Turn-taking, decided in the `CallActor`: the response in flight, barge-in, keypad digits and
//! the greeting. [`Turns::on_event`] takes one [`Event`] and pushes the [`Action`]s to perform.
//!
//! - The greeting is asked for once per call, when the first AI session is ready (never again
//!   after a restart).
//! - Barge-in: on `speech_started` the Twilio leg is asked to clear (it knows what was sent and
//!   heard); its answer becomes a `conversation.item.truncate` at what the caller heard. A
//!   response still in flight has its late audio dropped, and is cancelled only if the server
//!   has not cancelled it itself within a grace period (with `interrupt_response` it does, and a
//!   second cancel would fail with `response_cancel_not_active`).
//! - DTMF: each digit goes to the AI leg (held while it is away); once no digit
//!   came for `dtmf_response_delay_ms` a response is asked for, after the one in flight if any.

use std::sync::Arc;

use crate::messages::ClearOutcome;

/// Keypad digits held while the AI leg is away, at most (the oldest go first): a caller
/// mashing keys through an outage must not grow the call's memory.
pub const MAX_HELD_DIGITS: usize = 32;

#[derive(Debug, Clone)]
pub struct TurnsConfig {
    /// Instructions for the assistant's first words, if it speaks first.
    pub greeting: Option<String>,
    /// Quiet time after a DTMF digit before asking the model to answer (0: never ask).
    pub dtmf_response_delay_ms: u64,
    /// After a barge-in, how long to let the server cancel the response itself before we do.
    pub cancel_grace_ms: u64,
}

/// Something that happened to the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An AI session is configured and routed.
    UpstreamReady,
    /// The AI session is gone; a new one may follow.
    UpstreamLost,
    /// The caller started speaking (server VAD).
    SpeechStarted,
    /// The caller stopped speaking (server VAD).
    SpeechStopped,
    /// The caller is or is not speaking, by transcript (no barge-in: the model handles it).
    CallerSpeaking(bool),
    /// The assistant must speak with these instructions next (after the response in flight).
    Speak {
        instructions: String,
    },
    /// A response is owed (a tool's output is in): now, or after the response in flight.
    Respond,
    /// The Twilio leg's answer to the clear of a barge-in.
    Cleared {
        outcome: ClearOutcome,
        /// A response was in flight when the caller spoke.
        interrupted_response: bool,
    },
    ResponseCreated {
        response_id: String,
    },
    ResponseDone {
        response_id: String,
    },
    Dtmf {
        digit: String,
    },
    /// The DTMF quiet timer of this generation fired.
    DtmfQuiet {
        generation: u64,
    },
    /// The grace period after a barge-in ended: cancel this response if it is still in flight.
    CancelCheck {
        response_id: String,
    },
}

/// What the `CallActor` must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask the Twilio leg to clear; feed its answer back as [`Event::Cleared`].
    Clear {
        in_flight: Option<Arc<str>>,
    },
    /// Ask the Twilio leg to mark the tail of the audio sent.
    MarkTail,
    /// A keypad digit for the model (each API words it its own way).
    Digit {
        digit: String,
    },
    CreateResponse {
        instructions: Option<String>,
    },
    Cancel {
        response_id: String,
    },
    Truncate {
        item_id: String,
        audio_end_ms: u64,
    },
    /// Send `DtmfQuiet { generation }` after `delay_ms`.
    ScheduleDtmfQuiet {
        generation: u64,
        delay_ms: u64,
    },
    /// Send `CancelCheck { response_id }` after `delay_ms`.
    ScheduleCancelCheck {
        response_id: String,
        delay_ms: u64,
    },
    /// A barge-in happened (for the log).
    BargedIn {
        cleared: bool,
        truncated_ms: Option<u64>,
        interrupted_response: bool,
    },
}

#[derive(Debug)]
pub struct Turns {
    cfg: TurnsConfig,
    upstream_ready: bool,
    /// The greeting is spoken once per call, not again after an upstream restart.
    greeted: bool,
    /// Keypad digits waiting for the AI leg (pressed while it reconnects).
    held_digits: Vec<String>,
    in_flight: Option<String>,
    /// Server VAD heard the caller start and not yet stop.
    caller_speaking: bool,
    /// A response was asked for and its `response.created` has not come yet.
    response_asked: bool,
    /// A DTMF quiet timer is running (a response for the digits will be asked for).
    dtmf_pending: bool,
    dtmf_generation: u64,
    /// A response was asked for while another was in flight; ask at its `response.done`.
    response_wanted: bool,
    /// The instructions of the wanted response (an operator's words), if any.
    wanted_instructions: Option<String>,
    pub barge_ins: u64,
}

impl Turns {
    pub fn new(cfg: TurnsConfig) -> Self {
        Self {
            cfg,
            upstream_ready: false,
            greeted: false,
            held_digits: Vec::new(),
            in_flight: None,
            caller_speaking: false,
            response_asked: false,
            dtmf_pending: false,
            dtmf_generation: 0,
            response_wanted: false,
            wanted_instructions: None,
            barge_ins: 0,
        }
    }

    pub fn on_event(&mut self, event: Event, out: &mut Vec<Action>) {
        let before = out.len();
        self.decide(event, out);
        if out[before..]
            .iter()
            .any(|a| matches!(a, Action::CreateResponse { .. }))
        {
            self.response_asked = true;
        }
    }

    fn decide(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::UpstreamReady => {
                self.upstream_ready = true;
                for digit in self.held_digits.drain(..) {
                    out.push(Action::Digit { digit });
                }
                let mut asked = false;
                if !self.greeted {
                    self.greeted = true;
                    if let Some(greeting) = &self.cfg.greeting {
                        out.push(Action::CreateResponse {
                            instructions: Some(greeting.clone()),
                        });
                        asked = true;
                    }
                }
                // Digits pressed while the leg was away still get their answer; after the
                // greeting if there is one (one response at a time), else now.
                if self.response_wanted && !asked {
                    self.response_wanted = false;
                    out.push(Action::CreateResponse {
                        instructions: self.wanted_instructions.take(),
                    });
                }
            }
            Event::UpstreamLost => {
                // The new session knows nothing of the old one's responses.
                self.upstream_ready = false;
                self.in_flight = None;
                self.caller_speaking = false;
                self.response_asked = false;
            }
            Event::SpeechStopped => self.caller_speaking = false,
            Event::CallerSpeaking(speaking) => self.caller_speaking = speaking,
            Event::Respond => {
                if self.upstream_ready && self.in_flight.is_none() && !self.response_asked {
                    out.push(Action::CreateResponse { instructions: None });
                } else {
                    self.response_wanted = true;
                }
            }
            Event::Speak { instructions } => {
                if self.upstream_ready && self.in_flight.is_none() && !self.response_asked {
                    out.push(Action::CreateResponse {
                        instructions: Some(instructions),
                    });
                } else {
                    // Right after the response in flight (or when the leg is back).
                    self.response_wanted = true;
                    self.wanted_instructions = Some(instructions);
                }
            }
            Event::SpeechStarted => {
                self.caller_speaking = true;
                let in_flight = self.in_flight.clone();
                out.push(Action::Clear {
                    in_flight: in_flight.as_deref().map(Arc::from),
                });
                if let Some(response_id) = in_flight {
                    // Cancel only if it is still in flight after the grace period (its late
                    // audio is dropped by the Twilio leg meanwhile either way).
                    out.push(Action::ScheduleCancelCheck {
                        response_id,
                        delay_ms: self.cfg.cancel_grace_ms,
                    });
                }
            }
            Event::Cleared {
                outcome,
                interrupted_response,
            } => {
                let truncated_ms = outcome.truncate.as_ref().map(|(_, ms)| *ms);
                if let Some((item_id, audio_end_ms)) = outcome.truncate {
                    out.push(Action::Truncate {
                        item_id: item_id.to_string(),
                        audio_end_ms,
                    });
                }
                if outcome.cleared || outcome.interrupted_audio || interrupted_response {
                    self.barge_ins += 1;
                    out.push(Action::BargedIn {
                        cleared: outcome.cleared,
                        truncated_ms,
                        interrupted_response,
                    });
                }
            }
            Event::ResponseCreated { response_id } => {
                self.response_asked = false;
                self.in_flight = Some(response_id)
            }
            Event::ResponseDone { response_id } => {
                if self.in_flight.as_deref() == Some(response_id.as_str()) {
                    self.in_flight = None;
                }
                out.push(Action::MarkTail);
                if self.response_wanted && self.in_flight.is_none() && self.upstream_ready {
                    self.response_wanted = false;
                    out.push(Action::CreateResponse {
                        instructions: self.wanted_instructions.take(),
                    });
                }
            }
            Event::Dtmf { digit } => {
                if self.upstream_ready {
                    out.push(Action::Digit { digit });
                } else {
                    if self.held_digits.len() >= MAX_HELD_DIGITS {
                        self.held_digits.remove(0);
                    }
                    self.held_digits.push(digit);
                }
                if self.cfg.dtmf_response_delay_ms > 0 {
                    self.dtmf_pending = true;
                    self.dtmf_generation += 1;
                    out.push(Action::ScheduleDtmfQuiet {
                        generation: self.dtmf_generation,
                        delay_ms: self.cfg.dtmf_response_delay_ms,
                    });
                }
            }
            Event::CancelCheck { response_id } => {
                // Still in flight after the grace period: the server did not cancel it.
                if self.in_flight.as_deref() == Some(response_id.as_str()) {
                    self.in_flight = None;
                    out.push(Action::Cancel { response_id });
                }
            }
            Event::DtmfQuiet { generation } => {
                if generation != self.dtmf_generation {
                    return; // another digit came since: its own timer will fire
                }
                self.dtmf_pending = false;
                if self.in_flight.is_none() && self.upstream_ready {
                    out.push(Action::CreateResponse { instructions: None });
                } else {
                    self.response_wanted = true;
                }
            }
        }
    }

    /// Between turns: no response in flight or wanted, the caller not speaking, no digits
    /// waiting for their answer. A session can be swapped here without cutting anyone off.
    pub fn between_turns(&self) -> bool {
        self.in_flight.is_none()
            && !self.response_asked
            && !self.caller_speaking
            && !self.response_wanted
            && !self.dtmf_pending
    }

    /// The greeting of this call (an outbound call's own), in place of the configured one. Once
    /// the greeting was asked for, the words come as the next turn instead.
    pub fn set_greeting(&mut self, greeting: String, out: &mut Vec<Action>) {
        if self.greeted {
            self.decide(
                Event::Speak {
                    instructions: greeting,
                },
                out,
            );
        } else {
            self.cfg.greeting = Some(greeting);
        }
    }

    /// A response is in flight, asked for, or owed.
    pub fn response_pending(&self) -> bool {
        self.in_flight.is_some() || self.response_asked || self.response_wanted
    }

    /// Digits waiting for the AI leg to come back.
    pub fn held_len(&self) -> usize {
        self.held_digits.len()
    }

    /// The response being generated, if any.
    pub fn in_flight(&self) -> Option<&str> {
        self.in_flight.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TurnsConfig {
        TurnsConfig {
            greeting: Some("Say hello.".into()),
            dtmf_response_delay_ms: 500,
            cancel_grace_ms: 150,
        }
    }

    fn run(t: &mut Turns, e: Event) -> Vec<Action> {
        let mut out = Vec::new();
        t.on_event(e, &mut out);
        out
    }

    fn ready(greeting: bool) -> Turns {
        let mut t = Turns::new(TurnsConfig {
            greeting: greeting.then(|| "Say hello.".to_string()),
            ..cfg()
        });
        run(&mut t, Event::UpstreamReady);
        t
    }

    fn created(id: &str) -> Event {
        Event::ResponseCreated {
            response_id: id.into(),
        }
    }

    fn done(id: &str) -> Event {
        Event::ResponseDone {
            response_id: id.into(),
        }
    }

    #[test]
    fn greeting_is_asked_for_once_and_not_repeated_after_a_restart() {
        let mut t = Turns::new(cfg());
        assert_eq!(
            run(&mut t, Event::UpstreamReady),
            vec![Action::CreateResponse {
                instructions: Some("Say hello.".into())
            }]
        );
        run(&mut t, Event::UpstreamLost);
        assert!(run(&mut t, Event::UpstreamReady).is_empty());
    }

    #[test]
    fn barge_in_clears_then_truncates_at_what_the_twilio_leg_says_was_heard() {
        let mut t = ready(false);
        run(&mut t, created("r1"));
        let out = run(&mut t, Event::SpeechStarted);
        assert_eq!(
            out,
            vec![
                Action::Clear {
                    in_flight: Some(Arc::from("r1"))
                },
                Action::ScheduleCancelCheck {
                    response_id: "r1".into(),
                    delay_ms: 150
                },
            ]
        );
        let out = run(
            &mut t,
            Event::Cleared {
                outcome: ClearOutcome {
                    cleared: true,
                    truncate: Some((Arc::from("i1"), 100)),
                    interrupted_audio: true,
                },
                interrupted_response: true,
            },
        );
        assert_eq!(
            out,
            vec![
                Action::Truncate {
                    item_id: "i1".into(),
                    audio_end_ms: 100
                },
                Action::BargedIn {
                    cleared: true,
                    truncated_ms: Some(100),
                    interrupted_response: true
                },
            ]
        );
        assert_eq!(t.barge_ins, 1);
        // The server did not cancel within the grace period: we do.
        assert_eq!(
            run(
                &mut t,
                Event::CancelCheck {
                    response_id: "r1".into()
                }
            ),
            vec![Action::Cancel {
                response_id: "r1".into()
            }]
        );
    }

    #[test]
    fn no_cancel_when_no_response_is_in_flight() {
        let mut t = ready(false);
        run(&mut t, created("r1"));
        assert_eq!(run(&mut t, done("r1")), vec![Action::MarkTail]);
        // The response is complete but its audio may still be playing at Twilio.
        assert_eq!(
            run(&mut t, Event::SpeechStarted),
            vec![Action::Clear { in_flight: None }]
        );
    }

    #[test]
    fn no_cancel_when_the_server_cancelled_within_the_grace_period() {
        let mut t = ready(false);
        run(&mut t, created("r1"));
        run(&mut t, Event::SpeechStarted);
        run(&mut t, done("r1"));
        assert!(run(
            &mut t,
            Event::CancelCheck {
                response_id: "r1".into()
            }
        )
        .is_empty());
    }

    #[test]
    fn speech_with_nothing_playing_is_not_a_barge_in() {
        let mut t = ready(false);
        run(&mut t, Event::SpeechStarted);
        let out = run(
            &mut t,
            Event::Cleared {
                outcome: ClearOutcome::default(),
                interrupted_response: false,
            },
        );
        assert!(out.is_empty());
        assert_eq!(t.barge_ins, 0);
    }

    #[test]
    fn dtmf_becomes_text_and_a_response_after_the_quiet_time() {
        let mut t = ready(false);
        let out = run(&mut t, Event::Dtmf { digit: "1".into() });
        assert_eq!(out[0], Action::Digit { digit: "1".into() });
        assert_eq!(
            out[1],
            Action::ScheduleDtmfQuiet {
                generation: 1,
                delay_ms: 500
            }
        );
        run(&mut t, Event::Dtmf { digit: "2".into() });
        // The first timer is stale: a second digit came.
        assert!(run(&mut t, Event::DtmfQuiet { generation: 1 }).is_empty());
        assert_eq!(
            run(&mut t, Event::DtmfQuiet { generation: 2 }),
            vec![Action::CreateResponse { instructions: None }]
        );
    }

    #[test]
    fn dtmf_response_waits_for_the_response_in_flight() {
        let mut t = ready(false);
        run(&mut t, created("r1"));
        run(&mut t, Event::Dtmf { digit: "#".into() });
        assert!(run(&mut t, Event::DtmfQuiet { generation: 1 }).is_empty());
        assert_eq!(
            run(&mut t, done("r1")),
            vec![
                Action::MarkTail,
                Action::CreateResponse { instructions: None }
            ]
        );
    }

    #[test]
    fn dtmf_pressed_while_the_upstream_is_away_is_answered_when_it_is_back() {
        let mut t = ready(false);
        run(&mut t, Event::UpstreamLost);
        assert!(run(&mut t, Event::Dtmf { digit: "9".into() })
            .iter()
            .all(|a| !matches!(a, Action::Digit { .. })));
        assert!(run(&mut t, Event::DtmfQuiet { generation: 1 }).is_empty());
        let out = run(&mut t, Event::UpstreamReady);
        assert_eq!(out[0], Action::Digit { digit: "9".into() });
        assert_eq!(out[1], Action::CreateResponse { instructions: None });
    }

    #[test]
    fn after_upstream_loss_nothing_of_the_old_session_is_cancelled() {
        let mut t = ready(false);
        run(&mut t, created("r1"));
        run(&mut t, Event::UpstreamLost);
        run(&mut t, Event::UpstreamReady);
        assert_eq!(
            run(&mut t, Event::SpeechStarted),
            vec![Action::Clear { in_flight: None }]
        );
    }

    #[test]
    fn between_turns_only_when_nobody_speaks_and_nothing_is_owed() {
        let mut t = ready(false);
        assert!(t.between_turns());
        run(&mut t, Event::SpeechStarted);
        assert!(!t.between_turns(), "the caller is speaking");
        run(&mut t, Event::SpeechStopped);
        assert!(t.between_turns());
        run(&mut t, created("r1"));
        assert!(!t.between_turns(), "a response is in flight");
        run(&mut t, done("r1"));
        assert!(t.between_turns());
        run(&mut t, Event::Dtmf { digit: "5".into() });
        assert!(!t.between_turns(), "a digit waits for its answer");
        run(&mut t, Event::DtmfQuiet { generation: 1 });
        assert!(
            !t.between_turns(),
            "the response for the digit is owed or in flight"
        );
        run(&mut t, created("r2"));
        run(&mut t, done("r2"));
        assert!(t.between_turns());
        run(&mut t, Event::SpeechStarted);
        run(&mut t, Event::UpstreamLost);
        assert!(
            t.between_turns(),
            "a lost session forgets the speech it heard"
        );
    }

    #[test]
    fn words_to_speak_wait_for_the_response_in_flight() {
        let mut t = ready(false);
        assert_eq!(
            run(
                &mut t,
                Event::Speak {
                    instructions: "Say hi.".into()
                }
            ),
            vec![Action::CreateResponse {
                instructions: Some("Say hi.".into())
            }]
        );
        run(&mut t, created("r1"));
        assert!(run(
            &mut t,
            Event::Speak {
                instructions: "Say bye.".into()
            }
        )
        .is_empty());
        assert!(t.response_pending());
        assert_eq!(
            run(&mut t, done("r1")),
            vec![
                Action::MarkTail,
                Action::CreateResponse {
                    instructions: Some("Say bye.".into())
                }
            ]
        );
        run(&mut t, created("r2"));
        run(&mut t, done("r2"));
        assert!(!t.response_pending());
    }
}
