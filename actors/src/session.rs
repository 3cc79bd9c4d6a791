//! The call's logic as a state machine with no runtime: [`CallSession::on_event`] takes one
//! [`Event`] and pushes the [`Action`]s the `CallActor` must perform, in order.
//!
//! Everything about timing and ordering that the bridges in the field get wrong lives here, where a
//! unit test can drive it event by event:
//! - assistant audio that arrives before Twilio's `start` is held (bounded) and sent after it;
//! - caller audio that arrives while the AI leg is not configured is held (bounded), because audio
//!   appended before `session.updated` would be read as 24 kHz PCM;
//! - every assistant chunk sent to Twilio is followed by a uniquely named mark, so the echoes tell
//!   how much of an item the caller has actually heard;
//! - barge-in: `clear` to Twilio, `conversation.item.truncate` at the audio confirmed played by
//!   marks (never more than was sent), the interrupted response's late deltas dropped, and
//!   `response.cancel` only while a response is in flight;
//! - marks Twilio echoes because of a `clear` are told apart by a generation in their name.

use std::collections::VecDeque;
use std::sync::Arc;

/// μ-law at 8 kHz: one byte per sample, eight per millisecond.
pub const BYTES_PER_MS: u64 = 8;

/// Marks awaiting their echo, at most. Twilio echoes each one as its audio plays, so the queue
/// holds only what is buffered at Twilio; a peer that never echoes must not grow it forever. When
/// full, the oldest is forgotten (its audio long played) and counted.
pub const MAX_PENDING_MARKS: usize = 4096;

/// Limits and choices fixed for the life of a call.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Bytes of assistant audio held before Twilio's `start`.
    pub pre_start_buffer_bytes: u64,
    /// Bytes of caller audio held while the AI leg is not ready.
    pub upstream_buffer_bytes: u64,
    /// Instructions for the assistant's first words, if it speaks first.
    pub greeting: Option<String>,
    /// Quiet time after a DTMF digit before asking the model to answer (0: never ask).
    pub dtmf_response_delay_ms: u64,
    /// Whether to follow each chunk with a mark; only needed where barge-in can truncate.
    pub track_playback: bool,
    /// With `track_playback`: mark once this many bytes went unmarked (0: every chunk).
    pub mark_interval_bytes: u64,
    /// After a barge-in, how long to let the server cancel the response itself before we do.
    pub cancel_grace_ms: u64,
    /// Longest gap in the caller's audio filled with silence, ms (0: no filling).
    pub fill_gaps_max_ms: u64,
}

/// Something that happened to the call.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Twilio sent `start`: outbound messages may flow.
    TwilioStarted,
    /// A chunk of caller audio (checked base64), with Twilio's timestamp when known.
    CallerAudio {
        payload: String,
        bytes: usize,
        timestamp_ms: Option<u64>,
    },
    /// Twilio echoed a mark.
    MarkEchoed {
        name: String,
    },
    /// The caller pressed a key.
    Dtmf {
        digit: String,
    },
    /// The AI leg is configured (`session.updated`, or the echo leg is up).
    UpstreamReady,
    /// The AI leg is gone; a new one may follow.
    UpstreamLost,
    /// A chunk of assistant audio (checked base64).
    AssistantAudio {
        response_id: Arc<str>,
        item_id: Arc<str>,
        payload: String,
        bytes: usize,
    },
    /// The caller started speaking (server VAD).
    SpeechStarted,
    ResponseCreated {
        response_id: String,
    },
    ResponseDone {
        response_id: String,
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

/// What the actor must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send assistant audio to Twilio, followed by a mark when playback is tracked.
    TwilioMedia {
        payload: String,
        mark: Option<String>,
    },
    /// A mark alone, after audio already sent (the tail of a response).
    TwilioMark { name: String },
    /// Tell Twilio to drop the caller's buffered audio.
    TwilioClear,
    /// Append caller audio to the AI's input buffer.
    UpstreamAudio { payload: String, bytes: usize },
    /// Add a user text item to the conversation.
    UpstreamUserText { text: String },
    /// Ask for a response, optionally with instructions for it alone.
    UpstreamCreateResponse { instructions: Option<String> },
    /// Cancel the response in flight.
    UpstreamCancel { response_id: String },
    /// Cut an assistant item at what the caller heard.
    UpstreamTruncate { item_id: String, audio_end_ms: u64 },
    /// Send `DtmfQuiet { generation }` after `delay_ms`.
    ScheduleDtmfQuiet { generation: u64, delay_ms: u64 },
    /// Send `CancelCheck { response_id }` after `delay_ms`.
    ScheduleCancelCheck { response_id: String, delay_ms: u64 },
    /// A barge-in happened (for the log and the counters' readers).
    BargedIn {
        cleared: bool,
        truncated_ms: Option<u64>,
        /// A response was in flight (it is cancelled, by the server or by us).
        interrupted_response: bool,
    },
}

/// Counters shown at `/calls` and logged at the end of the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub barge_ins: u64,
    pub marks_played: u64,
    /// Marks echoed because of a `clear`, or not ours: ignored.
    pub marks_ignored: u64,
    /// Pending marks forgotten because the queue was full (their echo never came).
    pub marks_forgotten: u64,
    /// Assistant chunks dropped because the pre-start buffer was full.
    pub dropped_pre_start: u64,
    /// Caller chunks dropped because the upstream buffer was full.
    pub dropped_upstream: u64,
    /// Late chunks of an interrupted response, dropped on purpose.
    pub dropped_interrupted: u64,
    /// Silence inserted for caller audio lost before it reached us, ms.
    pub silence_filled_ms: u64,
}

/// The assistant item being played to the caller.
#[derive(Debug, Clone)]
struct Playing {
    response_id: Arc<str>,
    item_id: Arc<str>,
    /// Bytes of this item sent to Twilio.
    sent: u64,
    /// Bytes of this item confirmed played by a mark echo.
    played: u64,
}

#[derive(Debug, Clone)]
struct PendingMark {
    seq: u64,
    /// The item's `sent` total when the mark was sent.
    item_bytes: u64,
    item_id: Arc<str>,
}

#[derive(Debug, Clone)]
struct HeldChunk {
    response_id: Arc<str>,
    item_id: Arc<str>,
    payload: String,
    bytes: usize,
}

/// One call's bookkeeping.
#[derive(Debug)]
pub struct CallSession {
    cfg: SessionConfig,
    twilio_started: bool,
    upstream_ready: bool,
    /// The greeting is spoken once per call, not again after an upstream restart.
    greeted: bool,
    held_out: VecDeque<HeldChunk>,
    held_out_bytes: u64,
    held_in: VecDeque<(String, usize)>,
    held_in_bytes: u64,
    /// User text waiting for the AI leg (DTMF pressed while it reconnects).
    held_text: Vec<String>,
    /// Twilio timestamp the next caller frame should carry if none was lost.
    next_caller_ts: Option<u64>,
    playing: Option<Playing>,
    /// Marks sent and not yet echoed, oldest first (Twilio echoes in order).
    marks: VecDeque<PendingMark>,
    /// Bumped by every `clear`: marks named with an older generation were flushed, not played.
    mark_generation: u64,
    mark_seq: u64,
    /// Assistant audio sent to Twilio since the last mark, bytes.
    unmarked_bytes: u64,
    in_flight: Option<String>,
    /// The response cut off by the last barge-in; its late deltas are dropped.
    interrupted: Option<Arc<str>>,
    dtmf_generation: u64,
    /// A response was asked for while another was in flight; ask at its `response.done`.
    response_wanted: bool,
    pub stats: CallStats,
}

impl CallSession {
    pub fn new(cfg: SessionConfig) -> Self {
        Self {
            cfg,
            twilio_started: false,
            upstream_ready: false,
            greeted: false,
            held_out: VecDeque::new(),
            held_out_bytes: 0,
            held_in: VecDeque::new(),
            held_in_bytes: 0,
            held_text: Vec::new(),
            next_caller_ts: None,
            playing: None,
            marks: VecDeque::new(),
            mark_generation: 0,
            mark_seq: 0,
            unmarked_bytes: 0,
            in_flight: None,
            interrupted: None,
            dtmf_generation: 0,
            response_wanted: false,
            stats: CallStats::default(),
        }
    }

    /// Marks sent to Twilio and not yet echoed: audio still queued for the caller.
    pub fn marks_pending(&self) -> usize {
        self.marks.len()
    }

    /// Applies one event; the actions to perform are appended to `out` (which the actor reuses, so
    /// the audio path allocates no vector per frame).
    pub fn on_event(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::CallerAudio {
                payload,
                bytes,
                timestamp_ms,
            } => {
                if let Some(ts) = timestamp_ms {
                    self.fill_gap_before(ts, bytes, out);
                }
                self.on_caller_audio(payload, bytes, out)
            }
            Event::AssistantAudio {
                response_id,
                item_id,
                payload,
                bytes,
            } => self.on_assistant_audio(response_id, item_id, payload, bytes, out),
            Event::MarkEchoed { name } => self.on_mark(&name),
            Event::TwilioStarted => {
                self.twilio_started = true;
                while let Some(chunk) = self.held_out.pop_front() {
                    self.send_to_twilio(chunk, out);
                }
                self.held_out_bytes = 0;
            }
            Event::UpstreamReady => {
                self.upstream_ready = true;
                for (payload, bytes) in self.held_in.drain(..) {
                    self.stats.frames_in += 1;
                    self.stats.bytes_in += bytes as u64;
                    out.push(Action::UpstreamAudio { payload, bytes });
                }
                self.held_in_bytes = 0;
                for text in self.held_text.drain(..) {
                    out.push(Action::UpstreamUserText { text });
                }
                let mut asked = false;
                if !self.greeted {
                    self.greeted = true;
                    if let Some(greeting) = &self.cfg.greeting {
                        out.push(Action::UpstreamCreateResponse {
                            instructions: Some(greeting.clone()),
                        });
                        asked = true;
                    }
                }
                // Digits pressed while the leg was away still get their answer; after the
                // greeting if there is one (one response at a time), else now.
                if self.response_wanted && !asked {
                    self.response_wanted = false;
                    out.push(Action::UpstreamCreateResponse { instructions: None });
                }
            }
            Event::UpstreamLost => {
                self.upstream_ready = false;
                // The new session knows nothing of the old one's responses and items: nothing of
                // them can be cancelled or truncated. Audio already queued at Twilio still plays,
                // so the marks stay, and a barge-in can still clear it.
                self.in_flight = None;
                self.playing = None;
                self.interrupted = None;
            }
            Event::SpeechStarted => self.on_speech_started(out),
            Event::ResponseCreated { response_id } => self.in_flight = Some(response_id),
            Event::ResponseDone { response_id } => {
                if self.in_flight.as_deref() == Some(response_id.as_str()) {
                    self.in_flight = None;
                }
                self.mark_tail(out);
                if self.response_wanted && self.in_flight.is_none() && self.upstream_ready {
                    self.response_wanted = false;
                    out.push(Action::UpstreamCreateResponse { instructions: None });
                }
            }
            Event::Dtmf { digit } => {
                let text = format!("The caller pressed the key {digit} on the phone keypad.");
                if self.upstream_ready {
                    out.push(Action::UpstreamUserText { text });
                } else {
                    self.held_text.push(text);
                }
                if self.cfg.dtmf_response_delay_ms > 0 {
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
                    out.push(Action::UpstreamCancel { response_id });
                }
            }
            Event::DtmfQuiet { generation } => {
                if generation != self.dtmf_generation {
                    return; // another digit came since: its own timer will fire
                }
                if self.in_flight.is_none() && self.upstream_ready {
                    out.push(Action::UpstreamCreateResponse { instructions: None });
                } else {
                    self.response_wanted = true;
                }
            }
        }
    }

    /// Lost inbound packets show as a jump in Twilio's media clock. Server VAD measures time by
    /// the audio it receives, so a hole would shift its clock and can stall turn detection:
    /// replace what was lost with μ-law silence, in 20 ms frames, up to `fill_gaps_max_ms`.
    fn fill_gap_before(&mut self, ts: u64, bytes: usize, out: &mut Vec<Action>) {
        let expected = self
            .next_caller_ts
            .replace(ts + bytes as u64 / BYTES_PER_MS);
        let Some(expected) = expected else { return };
        if ts <= expected || self.cfg.fill_gaps_max_ms == 0 {
            return;
        }
        let gap_ms = (ts - expected).min(self.cfg.fill_gaps_max_ms);
        let frames = gap_ms / SILENCE_FRAME_MS;
        for _ in 0..frames {
            self.on_caller_audio(silence_frame().to_string(), SILENCE_FRAME_BYTES, out);
        }
        self.stats.silence_filled_ms += frames * SILENCE_FRAME_MS;
    }

    fn on_caller_audio(&mut self, payload: String, bytes: usize, out: &mut Vec<Action>) {
        if self.upstream_ready {
            self.stats.frames_in += 1;
            self.stats.bytes_in += bytes as u64;
            out.push(Action::UpstreamAudio { payload, bytes });
            return;
        }
        // Hold the newest audio: after a reconnect the caller's latest words matter most.
        self.held_in_bytes += bytes as u64;
        self.held_in.push_back((payload, bytes));
        while self.held_in_bytes > self.cfg.upstream_buffer_bytes {
            match self.held_in.pop_front() {
                Some((_, dropped)) => {
                    self.held_in_bytes -= dropped as u64;
                    self.stats.dropped_upstream += 1;
                }
                None => break,
            }
        }
    }

    fn on_assistant_audio(
        &mut self,
        response_id: Arc<str>,
        item_id: Arc<str>,
        payload: String,
        bytes: usize,
        out: &mut Vec<Action>,
    ) {
        if self.interrupted.as_ref() == Some(&response_id) {
            self.stats.dropped_interrupted += 1;
            return;
        }
        let chunk = HeldChunk {
            response_id,
            item_id,
            payload,
            bytes,
        };
        if self.twilio_started {
            self.send_to_twilio(chunk, out);
            return;
        }
        // Before `start` there is no stream SID to address audio to. Keep the oldest audio (the
        // start of the greeting); what does not fit is dropped and counted.
        if self.held_out_bytes + bytes as u64 > self.cfg.pre_start_buffer_bytes {
            self.stats.dropped_pre_start += 1;
            return;
        }
        self.held_out_bytes += bytes as u64;
        self.held_out.push_back(chunk);
    }

    fn send_to_twilio(&mut self, chunk: HeldChunk, out: &mut Vec<Action>) {
        let bytes = chunk.bytes as u64;
        let same_item = self
            .playing
            .as_ref()
            .is_some_and(|p| p.item_id == chunk.item_id);
        if !same_item {
            self.playing = Some(Playing {
                response_id: chunk.response_id,
                item_id: chunk.item_id.clone(),
                sent: 0,
                played: 0,
            });
        }
        // invariant: `playing` was set just above when it was not this item.
        let playing = self.playing.as_mut().expect("playing item set");
        playing.sent += bytes;
        let item_bytes = playing.sent;
        self.stats.frames_out += 1;
        self.stats.bytes_out += bytes;
        let mark = if self.cfg.track_playback {
            self.unmarked_bytes += bytes;
            (self.unmarked_bytes >= self.cfg.mark_interval_bytes)
                .then(|| self.new_mark(item_bytes, chunk.item_id))
        } else {
            None
        };
        out.push(Action::TwilioMedia {
            payload: chunk.payload,
            mark,
        });
    }

    /// Names a mark for the audio sent so far and queues it for its echo.
    fn new_mark(&mut self, item_bytes: u64, item_id: Arc<str>) -> String {
        self.unmarked_bytes = 0;
        self.mark_seq += 1;
        if self.marks.len() >= MAX_PENDING_MARKS {
            self.marks.pop_front();
            self.stats.marks_forgotten += 1;
        }
        self.marks.push_back(PendingMark {
            seq: self.mark_seq,
            item_bytes,
            item_id,
        });
        mark_name(self.mark_generation, self.mark_seq)
    }

    /// Marks the tail of the audio sent (less than `mark_interval_bytes` of it), so that the
    /// end of a response is confirmed when it has played.
    fn mark_tail(&mut self, out: &mut Vec<Action>) {
        if self.unmarked_bytes == 0 || !self.twilio_started {
            return;
        }
        let Some(playing) = &self.playing else {
            return;
        };
        let (item_bytes, item_id) = (playing.sent, playing.item_id.clone());
        let name = self.new_mark(item_bytes, item_id);
        out.push(Action::TwilioMark { name });
    }

    fn on_mark(&mut self, name: &str) {
        let Some((generation, seq)) = parse_mark_name(name) else {
            self.stats.marks_ignored += 1;
            return;
        };
        if generation != self.mark_generation {
            // Flushed by a `clear`: Twilio echoes pending marks without playing their audio.
            self.stats.marks_ignored += 1;
            return;
        }
        // Twilio echoes marks in the order sent; an echo also confirms every earlier mark.
        while let Some(front) = self.marks.front() {
            if front.seq > seq {
                break;
            }
            // invariant: front() just returned Some.
            let mark = self.marks.pop_front().expect("front exists");
            self.stats.marks_played += 1;
            if let Some(playing) = self.playing.as_mut() {
                if playing.item_id == mark.item_id {
                    playing.played = playing.played.max(mark.item_bytes.min(playing.sent));
                }
            }
        }
    }

    fn on_speech_started(&mut self, out: &mut Vec<Action>) {
        let audio_queued =
            !self.marks.is_empty() || self.unmarked_bytes > 0 || !self.held_out.is_empty();
        let mut cleared = false;
        let mut truncated_ms = None;
        if audio_queued {
            if self.twilio_started {
                out.push(Action::TwilioClear);
                cleared = true;
            }
            self.mark_generation += 1;
            self.marks.clear();
            self.unmarked_bytes = 0;
            self.held_out.clear();
            self.held_out_bytes = 0;
            if let Some(playing) = self.playing.take() {
                // What the caller heard: bytes confirmed by marks, never more than was sent.
                let heard = playing.played.min(playing.sent);
                let ms = heard / BYTES_PER_MS;
                out.push(Action::UpstreamTruncate {
                    item_id: playing.item_id.to_string(),
                    audio_end_ms: ms,
                });
                truncated_ms = Some(ms);
                self.interrupted = Some(playing.response_id);
            }
        }
        let mut interrupted_response = false;
        if let Some(response_id) = self.in_flight.clone() {
            // The late deltas of the interrupted response must not reach the caller.
            self.interrupted = Some(Arc::from(response_id.as_str()));
            interrupted_response = true;
            // With `interrupt_response` the server cancels the response itself right after
            // `speech_started`; a `response.cancel` of ours would then fail with
            // `response_cancel_not_active`. Cancel only if it is still in flight after a grace
            // period (its late deltas are dropped meanwhile either way).
            out.push(Action::ScheduleCancelCheck {
                response_id,
                delay_ms: self.cfg.cancel_grace_ms,
            });
        }
        if cleared || interrupted_response || truncated_ms.is_some() {
            self.stats.barge_ins += 1;
            out.push(Action::BargedIn {
                cleared,
                truncated_ms,
                interrupted_response,
            });
        }
    }
}

const SILENCE_FRAME_MS: u64 = 20;
const SILENCE_FRAME_BYTES: usize = (SILENCE_FRAME_MS * BYTES_PER_MS) as usize;

/// 20 ms of μ-law silence (`0xFF` × 160), base64.
fn silence_frame() -> &'static str {
    static FRAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FRAME.get_or_init(|| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode([crate::protocol::g711::SILENCE; SILENCE_FRAME_BYTES])
    })
}

/// Mark names carry the clear generation and a sequence number: `cb.<generation>.<seq>`.
pub fn mark_name(generation: u64, seq: u64) -> String {
    format!("cb.{generation}.{seq}")
}

fn parse_mark_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("cb.")?;
    let (generation, seq) = rest.split_once('.')?;
    Some((generation.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionConfig {
        SessionConfig {
            pre_start_buffer_bytes: 8 * 1000,
            upstream_buffer_bytes: 8 * 100,
            greeting: Some("Say hello.".into()),
            dtmf_response_delay_ms: 500,
            track_playback: true,
            mark_interval_bytes: 0,
            cancel_grace_ms: 150,
            fill_gaps_max_ms: 100,
        }
    }

    fn run(s: &mut CallSession, e: Event) -> Vec<Action> {
        let mut out = Vec::new();
        s.on_event(e, &mut out);
        out
    }

    fn delta(resp: &str, item: &str, bytes: usize) -> Event {
        Event::AssistantAudio {
            response_id: Arc::from(resp),
            item_id: Arc::from(item),
            payload: format!("{resp}-{item}-{bytes}"),
            bytes,
        }
    }

    fn started_and_ready() -> CallSession {
        let mut s = CallSession::new(SessionConfig {
            greeting: None,
            ..cfg()
        });
        run(&mut s, Event::TwilioStarted);
        run(&mut s, Event::UpstreamReady);
        s
    }

    fn mark_of(actions: &[Action]) -> String {
        actions
            .iter()
            .find_map(|a| match a {
                Action::TwilioMedia { mark, .. } => mark.clone(),
                _ => None,
            })
            .expect("a mark")
    }

    #[test]
    fn caller_audio_waits_for_the_upstream_and_keeps_the_newest() {
        let mut s = CallSession::new(cfg());
        for i in 0..8 {
            assert!(run(
                &mut s,
                Event::CallerAudio {
                    payload: format!("f{i}"),
                    bytes: 160,
                    timestamp_ms: None,
                }
            )
            .is_empty());
        }
        // 800 bytes fit: the oldest three of eight 160-byte frames were dropped.
        assert_eq!(s.stats.dropped_upstream, 3);
        let out = run(&mut s, Event::UpstreamReady);
        let sent: Vec<&str> = out
            .iter()
            .filter_map(|a| match a {
                Action::UpstreamAudio { payload, .. } => Some(payload.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec!["f3", "f4", "f5", "f6", "f7"]);
        assert_eq!(
            out.last(),
            Some(&Action::UpstreamCreateResponse {
                instructions: Some("Say hello.".into())
            })
        );
        assert_eq!(s.stats.frames_in, 5);
    }

    fn caller_frame(ts: u64) -> Event {
        Event::CallerAudio {
            payload: format!("t{ts}"),
            bytes: 160,
            timestamp_ms: Some(ts),
        }
    }

    fn upstream_payloads(out: &[Action]) -> Vec<String> {
        out.iter()
            .filter_map(|a| match a {
                Action::UpstreamAudio { payload, .. } => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn lost_caller_audio_is_replaced_with_silence_up_to_the_limit() {
        let mut s = started_and_ready();
        assert_eq!(upstream_payloads(&run(&mut s, caller_frame(0))), vec!["t0"]);
        assert_eq!(
            upstream_payloads(&run(&mut s, caller_frame(20))),
            vec!["t20"]
        );
        // 40 ms lost (frames 40 and 60): two silence frames first.
        let out = upstream_payloads(&run(&mut s, caller_frame(80)));
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], silence_frame());
        assert_eq!(out[1], silence_frame());
        assert_eq!(out[2], "t80");
        assert_eq!(s.stats.silence_filled_ms, 40);
        // A long gap is filled up to the limit (100 ms here) only.
        let out = upstream_payloads(&run(&mut s, caller_frame(1100)));
        assert_eq!(out.len(), 6);
        assert_eq!(s.stats.silence_filled_ms, 140);
        assert_eq!(s.stats.frames_in, 3 + 2 + 1 + 5);
    }

    #[test]
    fn silence_frame_is_20_ms_of_mulaw_silence() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(silence_frame())
            .unwrap();
        assert_eq!(bytes, vec![0xFF; 160]);
    }

    #[test]
    fn greeting_is_not_repeated_after_a_restart() {
        let mut s = CallSession::new(cfg());
        assert_eq!(run(&mut s, Event::UpstreamReady).len(), 1);
        run(&mut s, Event::UpstreamLost);
        assert!(run(&mut s, Event::UpstreamReady).is_empty());
    }

    #[test]
    fn assistant_audio_before_start_is_held_then_sent_in_order() {
        let mut s = CallSession::new(cfg());
        run(&mut s, Event::UpstreamReady);
        assert!(run(&mut s, delta("r1", "i1", 4000)).is_empty());
        assert!(run(&mut s, delta("r1", "i1", 4000)).is_empty());
        // Past the 8000-byte bound: dropped and counted.
        assert!(run(&mut s, delta("r1", "i1", 100)).is_empty());
        assert_eq!(s.stats.dropped_pre_start, 1);
        let out = run(&mut s, Event::TwilioStarted);
        assert_eq!(
            out,
            vec![
                Action::TwilioMedia {
                    payload: "r1-i1-4000".into(),
                    mark: Some("cb.0.1".into())
                },
                Action::TwilioMedia {
                    payload: "r1-i1-4000".into(),
                    mark: Some("cb.0.2".into())
                },
            ]
        );
        assert_eq!(s.stats.frames_out, 2);
    }

    /// With a mark interval, chunks share a mark until enough audio went unmarked; the tail of
    /// a response gets its own mark when the response is done; a barge-in with only unmarked
    /// audio out still clears it and truncates at what the marks confirmed.
    #[test]
    fn marks_are_coalesced_and_the_tail_is_marked_at_response_done() {
        let mut s = CallSession::new(SessionConfig {
            greeting: None,
            mark_interval_bytes: 800,
            ..cfg()
        });
        run(&mut s, Event::TwilioStarted);
        run(&mut s, Event::UpstreamReady);
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        let marks: Vec<Option<String>> = (0..5)
            .map(|_| {
                run(&mut s, delta("r1", "i1", 480))
                    .into_iter()
                    .find_map(|a| match a {
                        Action::TwilioMedia { mark, .. } => Some(mark),
                        _ => None,
                    })
                    .expect("media")
            })
            .collect();
        // 480, 960 (mark), 480, 960 (mark), 480 unmarked.
        assert_eq!(marks.iter().filter(|m| m.is_some()).count(), 2);
        assert!(marks[1].is_some() && marks[3].is_some());
        let done = run(
            &mut s,
            Event::ResponseDone {
                response_id: "r1".into(),
            },
        );
        assert_eq!(
            done,
            vec![Action::TwilioMark {
                name: "cb.0.3".into()
            }]
        );
        // Nothing unmarked left: a second done adds no mark.
        assert!(run(
            &mut s,
            Event::ResponseDone {
                response_id: "r1".into()
            }
        )
        .is_empty());

        // A new response; its first chunk is unmarked; the earlier marks echoed.
        run(
            &mut s,
            Event::MarkEchoed {
                name: "cb.0.3".into(),
            },
        );
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r2".into(),
            },
        );
        let out = run(&mut s, delta("r2", "i2", 480));
        assert_eq!(
            out,
            vec![Action::TwilioMedia {
                payload: "r2-i2-480".into(),
                mark: None
            }]
        );
        let out = run(&mut s, Event::SpeechStarted);
        assert_eq!(
            out[0],
            Action::TwilioClear,
            "unmarked audio is still queued: {out:?}"
        );
        assert!(out.contains(&Action::UpstreamTruncate {
            item_id: "i2".into(),
            audio_end_ms: 0
        }));
    }

    #[test]
    fn barge_in_truncates_at_the_marks_echoed_and_drops_late_deltas() {
        let mut s = started_and_ready();
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        let m1 = mark_of(&run(&mut s, delta("r1", "i1", 800)));
        let _m2 = mark_of(&run(&mut s, delta("r1", "i1", 800)));
        let _m3 = mark_of(&run(&mut s, delta("r1", "i1", 800)));
        // The caller heard the first chunk only.
        run(&mut s, Event::MarkEchoed { name: m1 });
        let out = run(&mut s, Event::SpeechStarted);
        assert_eq!(
            out,
            vec![
                Action::TwilioClear,
                Action::UpstreamTruncate {
                    item_id: "i1".into(),
                    audio_end_ms: 100
                },
                Action::ScheduleCancelCheck {
                    response_id: "r1".into(),
                    delay_ms: 150
                },
                Action::BargedIn {
                    cleared: true,
                    truncated_ms: Some(100),
                    interrupted_response: true
                },
            ]
        );
        assert_eq!(s.stats.barge_ins, 1);
        // The server did not cancel it within the grace period: we do.
        assert_eq!(
            run(
                &mut s,
                Event::CancelCheck {
                    response_id: "r1".into()
                }
            ),
            vec![Action::UpstreamCancel {
                response_id: "r1".into()
            }]
        );
        // The marks Twilio echoes because of the clear are not playback.
        run(
            &mut s,
            Event::MarkEchoed {
                name: "cb.0.2".into(),
            },
        );
        run(
            &mut s,
            Event::MarkEchoed {
                name: "cb.0.3".into(),
            },
        );
        assert_eq!(s.stats.marks_ignored, 2);
        assert_eq!(s.stats.marks_played, 1);
        // Late deltas of the interrupted response are dropped.
        assert!(run(&mut s, delta("r1", "i1", 800)).is_empty());
        assert_eq!(s.stats.dropped_interrupted, 1);
        // The next response plays, with marks of the new generation.
        run(
            &mut s,
            Event::ResponseDone {
                response_id: "r1".into(),
            },
        );
        let out = run(&mut s, delta("r2", "i2", 800));
        assert_eq!(mark_of(&out), "cb.1.4");
    }

    #[test]
    fn no_cancel_when_no_response_is_in_flight() {
        let mut s = started_and_ready();
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        run(&mut s, delta("r1", "i1", 1600));
        run(
            &mut s,
            Event::ResponseDone {
                response_id: "r1".into(),
            },
        );
        // The response is complete but its audio is still playing at Twilio.
        let out = run(&mut s, Event::SpeechStarted);
        assert_eq!(
            out,
            vec![
                Action::TwilioClear,
                Action::UpstreamTruncate {
                    item_id: "i1".into(),
                    audio_end_ms: 0
                },
                Action::BargedIn {
                    cleared: true,
                    truncated_ms: Some(0),
                    interrupted_response: false
                },
            ]
        );
    }

    #[test]
    fn no_cancel_when_the_server_cancelled_within_the_grace_period() {
        let mut s = started_and_ready();
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        run(&mut s, delta("r1", "i1", 800));
        let out = run(&mut s, Event::SpeechStarted);
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::ScheduleCancelCheck { .. })));
        // `interrupt_response`: the server's own cancel arrives first.
        run(
            &mut s,
            Event::ResponseDone {
                response_id: "r1".into(),
            },
        );
        assert!(run(
            &mut s,
            Event::CancelCheck {
                response_id: "r1".into()
            }
        )
        .is_empty());
    }

    #[test]
    fn speech_with_nothing_playing_is_not_a_barge_in() {
        let mut s = started_and_ready();
        let m = mark_of(&run(&mut s, delta("r1", "i1", 800)));
        run(&mut s, Event::MarkEchoed { name: m });
        assert!(run(&mut s, Event::SpeechStarted).is_empty());
        assert_eq!(s.stats.barge_ins, 0);
    }

    #[test]
    fn a_later_echo_confirms_earlier_marks_and_the_truncate_never_exceeds_sent() {
        let mut s = started_and_ready();
        run(&mut s, delta("r1", "i1", 400));
        let m2 = mark_of(&run(&mut s, delta("r1", "i1", 400)));
        run(&mut s, delta("r1", "i1", 400));
        run(&mut s, Event::MarkEchoed { name: m2 });
        assert_eq!(s.marks_pending(), 1);
        let out = run(&mut s, Event::SpeechStarted);
        assert!(out.contains(&Action::UpstreamTruncate {
            item_id: "i1".into(),
            audio_end_ms: 100
        }));
    }

    #[test]
    fn a_new_item_restarts_the_count() {
        let mut s = started_and_ready();
        let m = mark_of(&run(&mut s, delta("r1", "i1", 1600)));
        run(&mut s, Event::MarkEchoed { name: m });
        run(&mut s, delta("r2", "i2", 800));
        let out = run(&mut s, Event::SpeechStarted);
        assert!(out.contains(&Action::UpstreamTruncate {
            item_id: "i2".into(),
            audio_end_ms: 0
        }));
    }

    #[test]
    fn pending_marks_are_bounded_when_echoes_never_come() {
        let mut s = started_and_ready();
        for _ in 0..MAX_PENDING_MARKS + 10 {
            run(&mut s, delta("r1", "i1", 8));
        }
        assert_eq!(s.marks_pending(), MAX_PENDING_MARKS);
        assert_eq!(s.stats.marks_forgotten, 10);
    }

    #[test]
    fn foreign_marks_are_ignored() {
        let mut s = started_and_ready();
        run(&mut s, delta("r1", "i1", 800));
        run(
            &mut s,
            Event::MarkEchoed {
                name: "someone else's".into(),
            },
        );
        assert_eq!(s.stats.marks_ignored, 1);
        assert_eq!(s.marks_pending(), 1);
    }

    #[test]
    fn dtmf_becomes_text_and_a_response_after_the_quiet_time() {
        let mut s = started_and_ready();
        let out = run(&mut s, Event::Dtmf { digit: "1".into() });
        assert!(matches!(&out[0], Action::UpstreamUserText { text } if text.contains('1')));
        assert_eq!(
            out[1],
            Action::ScheduleDtmfQuiet {
                generation: 1,
                delay_ms: 500
            }
        );
        run(&mut s, Event::Dtmf { digit: "2".into() });
        // The first timer is stale: a second digit came.
        assert!(run(&mut s, Event::DtmfQuiet { generation: 1 }).is_empty());
        assert_eq!(
            run(&mut s, Event::DtmfQuiet { generation: 2 }),
            vec![Action::UpstreamCreateResponse { instructions: None }]
        );
    }

    #[test]
    fn dtmf_response_waits_for_the_response_in_flight() {
        let mut s = started_and_ready();
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        run(&mut s, Event::Dtmf { digit: "#".into() });
        assert!(run(&mut s, Event::DtmfQuiet { generation: 1 }).is_empty());
        assert_eq!(
            run(
                &mut s,
                Event::ResponseDone {
                    response_id: "r1".into()
                }
            ),
            vec![Action::UpstreamCreateResponse { instructions: None }]
        );
    }

    #[test]
    fn dtmf_pressed_while_the_upstream_is_away_is_answered_when_it_is_back() {
        let mut s = started_and_ready();
        run(&mut s, Event::UpstreamLost);
        assert!(run(&mut s, Event::Dtmf { digit: "9".into() })
            .iter()
            .all(|a| !matches!(a, Action::UpstreamUserText { .. })));
        assert!(run(&mut s, Event::DtmfQuiet { generation: 1 }).is_empty());
        let out = run(&mut s, Event::UpstreamReady);
        assert!(matches!(&out[0], Action::UpstreamUserText { text } if text.contains('9')));
        assert_eq!(
            out[1],
            Action::UpstreamCreateResponse { instructions: None }
        );
    }

    #[test]
    fn after_upstream_loss_nothing_of_the_old_session_is_cancelled_or_truncated() {
        let mut s = started_and_ready();
        run(
            &mut s,
            Event::ResponseCreated {
                response_id: "r1".into(),
            },
        );
        run(&mut s, delta("r1", "i1", 800));
        run(&mut s, Event::UpstreamLost);
        run(&mut s, Event::UpstreamReady);
        // The old audio is still queued at Twilio: clear it, but truncate/cancel nothing.
        let out = run(&mut s, Event::SpeechStarted);
        assert_eq!(
            out,
            vec![
                Action::TwilioClear,
                Action::BargedIn {
                    cleared: true,
                    truncated_ms: None,
                    interrupted_response: false
                }
            ]
        );
    }

    #[test]
    fn echo_mode_sends_no_marks() {
        let mut s = CallSession::new(SessionConfig {
            track_playback: false,
            mark_interval_bytes: 0,
            ..cfg()
        });
        run(&mut s, Event::TwilioStarted);
        let out = run(&mut s, delta("echo", "echo", 160));
        assert_eq!(
            out,
            vec![Action::TwilioMedia {
                payload: "echo-echo-160".into(),
                mark: None
            }]
        );
    }

    #[test]
    fn mark_names_round_trip() {
        assert_eq!(parse_mark_name(&mark_name(3, 42)), Some((3, 42)));
        assert_eq!(parse_mark_name("cb.x.1"), None);
        assert_eq!(parse_mark_name("other"), None);
    }
}
