//! Assistant audio on its way to the caller, decided in the Twilio leg.
//!
//! - Before Twilio's `start` there is no stream SID to address audio to: it is held, bounded by
//!   `call.pre_start_buffer_ms`, keeping the oldest (the start of the greeting).
//! - After `start`, audio goes out as fast as the socket takes it while the **playback budget**
//!   allows: audio sent but not yet confirmed played by a mark echo stays under
//!   `call.playback_budget_ms`. OpenAI sends faster than real time; Twilio buffers what it gets,
//!   and a stalled or slow Twilio would otherwise take everything. Audio over the budget waits
//!   in a queue bounded by `call.twilio_queue_ms`; when that is full the oldest is dropped and
//!   counted (`dropped_frames.twilio_backpressure`). Without marks (echo mode) there is no
//!   budget: the socket's own back-pressure bounds the queue.
//! - Every chunk sent is counted against its item; once `mark_interval_bytes` went unmarked a
//!   mark follows it, named `cb.<generation>.<seq>`. Twilio echoes marks in order as the audio
//!   before them plays, so echoes tell how much of an item the caller heard.
//! - Barge-in ([`Playback::clear`]): everything queued is dropped, `clear` goes to Twilio if
//!   anything was sent, the generation is bumped (marks Twilio echoes because of the `clear`
//!   carry the old one and are ignored), and the truncate point is what marks confirmed, never
//!   more than was sent. Later chunks of the interrupted response are dropped.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::BYTES_PER_MS;
use crate::messages::ClearOutcome;

/// Marks awaiting their echo, at most. Twilio echoes each one as its audio plays, so the queue
/// holds only what is buffered at Twilio; a peer that never echoes must not grow it forever. When
/// full, the oldest is forgotten (its audio long played) and counted.
pub const MAX_PENDING_MARKS: usize = 4096;

#[derive(Debug, Clone)]
pub struct PlaybackConfig {
    /// Bytes of assistant audio held before Twilio's `start`.
    pub pre_start_bytes: u64,
    /// Follow chunks with marks (only needed where barge-in can truncate).
    pub track_marks: bool,
    /// With `track_marks`: mark once this many bytes went unmarked (0: every chunk).
    pub mark_interval_bytes: u64,
    /// With `track_marks`: audio sent and not yet confirmed by a mark, at most, bytes.
    pub budget_bytes: u64,
    /// Audio waiting behind the budget or the socket, at most, bytes (oldest dropped).
    pub queue_bytes: u64,
}

/// A chunk of assistant audio.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub response_id: Arc<str>,
    pub item_id: Arc<str>,
    /// Base64 μ-law, checked.
    pub payload: Bytes,
    pub bytes: u32,
}

/// The next message to write to Twilio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    /// `media`, then `mark` with this name when one is due.
    Media {
        payload: Bytes,
        mark: Option<String>,
    },
    /// A mark alone (the tail of a response).
    Mark(String),
}

/// Counts since the last [`Playback::take_counts`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PlaybackCounts {
    pub frames_out: u64,
    pub marks_played: u64,
    /// Marks echoed because of a `clear`, or not ours: ignored.
    pub marks_ignored: u64,
    pub marks_forgotten: u64,
    pub dropped_pre_start: u64,
    pub dropped_interrupted: u64,
    pub dropped_backpressure: u64,
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
    /// `sent_total` when the mark was sent.
    total: u64,
    /// When it was sent (for the playback lag).
    sent_at: std::time::Instant,
}

#[derive(Debug)]
pub struct Playback {
    cfg: PlaybackConfig,
    started: bool,
    queue: VecDeque<Chunk>,
    queued_bytes: u64,
    playing: Option<Playing>,
    /// Marks sent and not yet echoed, oldest first (Twilio echoes in order).
    marks: VecDeque<PendingMark>,
    /// Bumped by every `clear`: marks named with an older generation were flushed, not played.
    generation: u64,
    seq: u64,
    /// Audio sent since the last mark, bytes.
    unmarked_bytes: u64,
    /// All audio sent, and the part of it confirmed played (or flushed by a `clear`), bytes.
    sent_total: u64,
    confirmed_total: u64,
    /// A response ended: mark its tail once the queue is empty.
    tail_wanted: bool,
    /// The response cut off by the last barge-in; its late chunks are dropped.
    interrupted: Option<Arc<str>>,
    counts: PlaybackCounts,
}

impl Playback {
    pub fn new(cfg: PlaybackConfig) -> Self {
        Self {
            cfg,
            started: false,
            queue: VecDeque::new(),
            queued_bytes: 0,
            playing: None,
            marks: VecDeque::new(),
            generation: 0,
            seq: 0,
            unmarked_bytes: 0,
            sent_total: 0,
            confirmed_total: 0,
            tail_wanted: false,
            interrupted: None,
            counts: PlaybackCounts::default(),
        }
    }

    /// Twilio's `start`: audio can be addressed from now on.
    pub fn start(&mut self) {
        self.started = true;
    }

    /// A chunk from the AI leg.
    pub fn push(&mut self, chunk: Chunk) {
        if self.interrupted.as_ref() == Some(&chunk.response_id) {
            self.counts.dropped_interrupted += 1;
            return;
        }
        let bytes = u64::from(chunk.bytes);
        if !self.started {
            // Keep the oldest audio (the start of the greeting); drop what does not fit.
            if self.queued_bytes + bytes > self.cfg.pre_start_bytes {
                self.counts.dropped_pre_start += 1;
                return;
            }
        }
        self.queued_bytes += bytes;
        self.queue.push_back(chunk);
        if self.started {
            while self.queued_bytes > self.cfg.queue_bytes {
                let Some(dropped) = self.queue.pop_front() else {
                    break;
                };
                self.queued_bytes -= u64::from(dropped.bytes);
                self.counts.dropped_backpressure += 1;
            }
        }
    }

    /// The next message Twilio may have now, if any (the budget and `start` allow).
    pub fn next_wire(&mut self) -> Option<Wire> {
        if !self.started {
            return None;
        }
        if self.queue.is_empty() {
            if std::mem::take(&mut self.tail_wanted) {
                return self.tail_mark().map(Wire::Mark);
            }
            return None;
        }
        if self.cfg.track_marks
            && self.cfg.budget_bytes > 0
            && self.sent_total - self.confirmed_total >= self.cfg.budget_bytes
        {
            return None;
        }
        // invariant: the queue is not empty (checked above).
        let chunk = self.queue.pop_front().expect("queue not empty");
        self.queued_bytes -= u64::from(chunk.bytes);
        Some(self.send(chunk))
    }

    fn send(&mut self, chunk: Chunk) -> Wire {
        let bytes = u64::from(chunk.bytes);
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
        self.sent_total += bytes;
        self.counts.frames_out += 1;
        let mark = if self.cfg.track_marks {
            self.unmarked_bytes += bytes;
            (self.unmarked_bytes >= self.cfg.mark_interval_bytes)
                .then(|| self.new_mark(item_bytes, chunk.item_id))
        } else {
            self.confirmed_total = self.sent_total;
            None
        };
        Wire::Media {
            payload: chunk.payload,
            mark,
        }
    }

    /// Names a mark for the audio sent so far and queues it for its echo.
    fn new_mark(&mut self, item_bytes: u64, item_id: Arc<str>) -> String {
        self.unmarked_bytes = 0;
        self.seq += 1;
        if self.marks.len() >= MAX_PENDING_MARKS {
            self.marks.pop_front();
            self.counts.marks_forgotten += 1;
        }
        self.marks.push_back(PendingMark {
            seq: self.seq,
            item_bytes,
            item_id,
            total: self.sent_total,
            sent_at: std::time::Instant::now(),
        });
        mark_name(self.generation, self.seq)
    }

    /// A response ended: its unmarked tail gets a mark once everything queued has gone out.
    pub fn mark_tail(&mut self) {
        if self.cfg.track_marks {
            self.tail_wanted = true;
        }
    }

    fn tail_mark(&mut self) -> Option<String> {
        if self.unmarked_bytes == 0 {
            return None;
        }
        let playing = self.playing.as_ref()?;
        let (item_bytes, item_id) = (playing.sent, playing.item_id.clone());
        Some(self.new_mark(item_bytes, item_id))
    }

    /// Twilio echoed a mark: how long after it was sent (the playback lag), when it was one of
    /// ours still pending.
    pub fn on_mark(&mut self, name: &str) -> Option<std::time::Duration> {
        let Some((generation, seq)) = parse_mark_name(name) else {
            self.counts.marks_ignored += 1;
            return None;
        };
        if generation != self.generation {
            // Flushed by a `clear`: Twilio echoes pending marks without playing their audio.
            self.counts.marks_ignored += 1;
            return None;
        }
        let mut lag = None;
        // Twilio echoes marks in the order sent; an echo also confirms every earlier mark.
        while let Some(front) = self.marks.front() {
            if front.seq > seq {
                break;
            }
            // invariant: front() just returned Some.
            let mark = self.marks.pop_front().expect("front exists");
            if mark.seq == seq {
                lag = Some(mark.sent_at.elapsed());
            }
            self.counts.marks_played += 1;
            self.confirmed_total = self.confirmed_total.max(mark.total);
            if let Some(playing) = self.playing.as_mut() {
                if playing.item_id == mark.item_id {
                    playing.played = playing.played.max(mark.item_bytes.min(playing.sent));
                }
            }
        }
        lag
    }

    /// Barge-in: see the module docs. `in_flight` is the response still being generated, whose
    /// later chunks must not reach the caller.
    pub fn clear(&mut self, in_flight: Option<Arc<str>>) -> ClearOutcome {
        let audio_queued =
            !self.marks.is_empty() || self.unmarked_bytes > 0 || !self.queue.is_empty();
        let mut outcome = ClearOutcome::default();
        if audio_queued {
            outcome.interrupted_audio = true;
            outcome.cleared = self.started && self.sent_total > 0;
            self.generation += 1;
            self.marks.clear();
            self.unmarked_bytes = 0;
            self.tail_wanted = false;
            self.counts.dropped_interrupted += self.queue.len() as u64;
            self.queue.clear();
            self.queued_bytes = 0;
            // Twilio drops everything it holds: nothing sent is waiting any more.
            self.confirmed_total = self.sent_total;
            if let Some(playing) = self.playing.take() {
                // What the caller heard: bytes confirmed by marks, never more than was sent.
                let heard = playing.played.min(playing.sent);
                outcome.truncate = Some((playing.item_id, heard / BYTES_PER_MS));
                self.interrupted = Some(playing.response_id);
            }
        }
        if let Some(response_id) = in_flight {
            self.interrupted = Some(response_id);
        }
        outcome
    }

    /// The AI session is gone: nothing of its items can be truncated in the next one. Audio
    /// already at Twilio still plays, so the marks stay and a barge-in can still clear it.
    pub fn session_lost(&mut self) {
        self.playing = None;
        self.interrupted = None;
    }

    pub fn marks_pending(&self) -> usize {
        self.marks.len()
    }

    /// Audio sent and not yet confirmed played, ms.
    pub fn unconfirmed_ms(&self) -> u64 {
        (self.sent_total - self.confirmed_total) / BYTES_PER_MS
    }

    /// Audio waiting to be sent, ms.
    pub fn queued_ms(&self) -> u64 {
        self.queued_bytes / BYTES_PER_MS
    }

    pub fn take_counts(&mut self) -> PlaybackCounts {
        std::mem::take(&mut self.counts)
    }
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

    fn cfg() -> PlaybackConfig {
        PlaybackConfig {
            pre_start_bytes: 8 * 1000,
            track_marks: true,
            mark_interval_bytes: 0,
            budget_bytes: 0,
            queue_bytes: 8 * 10_000,
        }
    }

    fn chunk(resp: &str, item: &str, bytes: u32) -> Chunk {
        Chunk {
            response_id: Arc::from(resp),
            item_id: Arc::from(item),
            payload: Bytes::from(format!("{resp}-{item}-{bytes}")),
            bytes,
        }
    }

    fn started(cfg: PlaybackConfig) -> Playback {
        let mut p = Playback::new(cfg);
        p.start();
        p
    }

    fn drain(p: &mut Playback) -> Vec<Wire> {
        std::iter::from_fn(|| p.next_wire()).collect()
    }

    fn payloads(wires: &[Wire]) -> Vec<String> {
        wires
            .iter()
            .filter_map(|w| match w {
                Wire::Media { payload, .. } => Some(String::from_utf8_lossy(payload).into()),
                Wire::Mark(_) => None,
            })
            .collect()
    }

    fn marks(wires: &[Wire]) -> Vec<String> {
        wires
            .iter()
            .filter_map(|w| match w {
                Wire::Media { mark, .. } => mark.clone(),
                Wire::Mark(m) => Some(m.clone()),
            })
            .collect()
    }

    #[test]
    fn assistant_audio_before_start_is_held_then_sent_in_order() {
        let mut p = Playback::new(PlaybackConfig {
            pre_start_bytes: 400,
            ..cfg()
        });
        for i in 0..4 {
            p.push(chunk("r1", "i1", 160 + i));
        }
        assert_eq!(p.next_wire(), None, "nothing before start");
        // 160 + 161 fit in 400; the other two did not.
        assert_eq!(p.take_counts().dropped_pre_start, 2);
        p.start();
        let out = drain(&mut p);
        assert_eq!(payloads(&out), vec!["r1-i1-160", "r1-i1-161"]);
        assert_eq!(marks(&out), vec!["cb.0.1", "cb.0.2"]);
    }

    #[test]
    fn marks_are_coalesced_and_the_tail_is_marked_when_the_response_is_done() {
        let mut p = started(PlaybackConfig {
            mark_interval_bytes: 800,
            ..cfg()
        });
        for _ in 0..13 {
            p.push(chunk("r1", "i1", 160));
        }
        let out = drain(&mut p);
        assert_eq!(payloads(&out).len(), 13);
        // 13 × 160 bytes, a mark every 800: after chunks 5 and 10.
        assert_eq!(marks(&out), vec!["cb.0.1", "cb.0.2"]);
        p.mark_tail();
        assert_eq!(drain(&mut p), vec![Wire::Mark("cb.0.3".into())]);
        // Nothing unmarked: a second tail sends nothing.
        p.mark_tail();
        assert!(drain(&mut p).is_empty());
    }

    #[test]
    fn the_budget_holds_audio_until_marks_confirm_it_and_the_queue_drops_the_oldest() {
        let mut p = started(PlaybackConfig {
            budget_bytes: 480,
            queue_bytes: 480,
            ..cfg()
        });
        for i in 0..8 {
            p.push(chunk("r1", &format!("c{i}"), 160));
        }
        // Nothing was taken out between the pushes: the queue (480 bytes) kept the newest three.
        assert_eq!(p.take_counts().dropped_backpressure, 5);
        assert_eq!(p.queued_ms(), 60);
        let out = drain(&mut p);
        assert_eq!(payloads(&out), vec!["r1-c5-160", "r1-c6-160", "r1-c7-160"]);
        for i in 8..12 {
            p.push(chunk("r1", &format!("c{i}"), 160));
        }
        // 480 bytes unconfirmed: the budget is spent, nothing goes out.
        assert_eq!(p.unconfirmed_ms(), 60);
        assert_eq!(p.next_wire(), None);
        assert_eq!(p.take_counts().dropped_backpressure, 1);
        // Twilio played the first chunk: one more may go.
        p.on_mark("cb.0.1");
        assert_eq!(payloads(&drain(&mut p)), vec!["r1-c9-160"]);
        p.on_mark("cb.0.4");
        assert_eq!(payloads(&drain(&mut p)), vec!["r1-c10-160", "r1-c11-160"]);
    }

    #[test]
    fn barge_in_truncates_at_the_marks_echoed_and_drops_late_chunks() {
        let mut p = started(cfg());
        for _ in 0..3 {
            p.push(chunk("r1", "i1", 800)); // 100 ms each
        }
        let out = drain(&mut p);
        let names = marks(&out);
        p.on_mark(&names[0]);
        let outcome = p.clear(Some(Arc::from("r1")));
        assert_eq!(
            outcome,
            ClearOutcome {
                cleared: true,
                truncate: Some((Arc::from("i1"), 100)),
                interrupted_audio: true,
            }
        );
        // Marks Twilio echoes because of the clear are ignored.
        p.on_mark(&names[1]);
        p.on_mark(&names[2]);
        let counts = p.take_counts();
        assert_eq!(counts.marks_ignored, 2);
        assert_eq!(counts.marks_played, 1);
        // Late chunks of the interrupted response are dropped; the next response plays.
        p.push(chunk("r1", "i1", 800));
        assert_eq!(p.next_wire(), None);
        assert_eq!(p.take_counts().dropped_interrupted, 1);
        p.push(chunk("r2", "i2", 800));
        let out = drain(&mut p);
        assert_eq!(payloads(&out), vec!["r2-i2-800"]);
        assert_eq!(marks(&out), vec!["cb.1.4"], "a new generation");
    }

    #[test]
    fn clear_drops_what_waits_behind_the_budget() {
        let mut p = started(PlaybackConfig {
            budget_bytes: 160,
            ..cfg()
        });
        for _ in 0..4 {
            p.push(chunk("r1", "i1", 160));
        }
        assert_eq!(drain(&mut p).len(), 1);
        assert_eq!(p.queued_ms(), 60);
        let outcome = p.clear(None);
        assert!(outcome.cleared);
        assert_eq!(outcome.truncate, Some((Arc::from("i1"), 0)));
        assert_eq!(p.queued_ms(), 0);
        assert_eq!(p.unconfirmed_ms(), 0, "Twilio dropped what it held");
        assert_eq!(p.take_counts().dropped_interrupted, 3);
    }

    #[test]
    fn speech_with_nothing_playing_is_not_a_barge_in() {
        let mut p = started(cfg());
        assert_eq!(p.clear(None), ClearOutcome::default());
        // But a response in flight still has its later chunks dropped.
        p.clear(Some(Arc::from("r9")));
        p.push(chunk("r9", "i9", 160));
        assert_eq!(p.next_wire(), None);
    }

    #[test]
    fn a_later_echo_confirms_earlier_marks_and_the_truncate_never_exceeds_sent() {
        let mut p = started(cfg());
        for _ in 0..3 {
            p.push(chunk("r1", "i1", 160));
        }
        let names = marks(&drain(&mut p));
        p.on_mark(&names[2]);
        assert_eq!(p.marks_pending(), 0);
        assert_eq!(p.take_counts().marks_played, 3);
        // Nothing pending, nothing queued, but the item is still the one playing: no audio is
        // queued, so speech is not a barge-in.
        assert_eq!(p.clear(None).truncate, None);
    }

    #[test]
    fn a_new_item_restarts_the_count() {
        let mut p = started(cfg());
        p.push(chunk("r1", "i1", 800));
        p.push(chunk("r1", "i2", 160));
        let names = marks(&drain(&mut p));
        p.on_mark(&names[1]);
        p.push(chunk("r1", "i2", 160));
        drain(&mut p);
        assert_eq!(p.clear(None).truncate, Some((Arc::from("i2"), 20)));
    }

    #[test]
    fn pending_marks_are_bounded_when_echoes_never_come() {
        let mut p = started(cfg());
        for _ in 0..MAX_PENDING_MARKS + 10 {
            p.push(chunk("r1", "i1", 8));
            drain(&mut p);
        }
        assert_eq!(p.marks_pending(), MAX_PENDING_MARKS);
        assert_eq!(p.take_counts().marks_forgotten, 10);
    }

    #[test]
    fn foreign_marks_are_ignored() {
        let mut p = started(cfg());
        p.on_mark("someone-else");
        p.on_mark("cb.x.1");
        assert_eq!(p.take_counts().marks_ignored, 2);
    }

    #[test]
    fn after_the_session_is_lost_nothing_of_it_is_truncated() {
        let mut p = started(cfg());
        p.push(chunk("r1", "i1", 160));
        drain(&mut p);
        p.session_lost();
        let outcome = p.clear(None);
        assert!(outcome.cleared, "audio at Twilio can still be cleared");
        assert_eq!(outcome.truncate, None);
    }

    #[test]
    fn echo_mode_sends_no_marks_and_has_no_budget() {
        let mut p = started(PlaybackConfig {
            track_marks: false,
            budget_bytes: 160,
            ..cfg()
        });
        for _ in 0..5 {
            p.push(chunk("echo", "echo", 160));
        }
        let out = drain(&mut p);
        assert_eq!(payloads(&out).len(), 5);
        assert!(marks(&out).is_empty());
        p.mark_tail();
        assert!(drain(&mut p).is_empty());
    }

    #[test]
    fn mark_names_round_trip() {
        assert_eq!(parse_mark_name(&mark_name(3, 17)), Some((3, 17)));
        assert_eq!(parse_mark_name("cb.1"), None);
    }
}
