//! Echo mode's output at real-time pace (`gpt-live.md` §4.2: GPT-Live's output audio comes as
//! a continuous real-time stream and does not arrive in bursts ahead of playback).
//!
//! Echoed audio leaves on a virtual playback clock (GCRA, "virtual scheduling"): a delta of
//! `d` audio goes out at `max(now, tat − slack)` and moves the theoretical arrival time `tat`
//! on by `d`. Input at real-time pace therefore comes back at once (jitter up to `slack`
//! included), while a burst of input (e.g. frames a bridge held until `session.started` and
//! then sent together) comes back spread out, one frame's worth per frame time. Every other
//! event keeps its place behind the audio queued before it, so the wire order is the order
//! the session emitted.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// How far ahead of real time echo mode's output may run: two 20 ms frames of jitter pass
/// unpaced.
pub const PACE_SLACK: Duration = Duration::from_millis(40);

/// A queue of outgoing events, each released at its time, in order.
#[derive(Debug)]
pub(crate) struct Paced<T> {
    slack: Duration,
    /// Theoretical arrival time of the next audio: when the audio sent so far has played.
    tat: Option<Instant>,
    /// Release time of the last event queued (releases never go backwards).
    last: Option<Instant>,
    queue: VecDeque<(Instant, T)>,
}

impl<T> Paced<T> {
    pub(crate) fn new(slack: Duration) -> Paced<T> {
        Paced {
            slack,
            tat: None,
            last: None,
            queue: VecDeque::new(),
        }
    }

    /// Queues `duration` of audio emitted at `now`; returns when it goes out.
    pub(crate) fn push_audio(&mut self, now: Instant, duration: Duration, item: T) -> Instant {
        let tat = self.tat.map_or(now, |t| t.max(now));
        let at = tat.checked_sub(self.slack).map_or(now, |t| t.max(now));
        // `at <= tat`: the clock moves on from `tat`.
        self.tat = Some(tat + duration);
        self.push_at(at, item)
    }

    /// Queues any other event emitted at `now`: out at once, unless audio queued before it
    /// is still waiting.
    pub(crate) fn push(&mut self, now: Instant, item: T) -> Instant {
        self.push_at(now, item)
    }

    fn push_at(&mut self, at: Instant, item: T) -> Instant {
        let at = self.last.map_or(at, |last| last.max(at));
        self.last = Some(at);
        self.queue.push_back((at, item));
        at
    }

    /// The next event whose time has come.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            self.queue.pop_front().map(|(_, item)| item)
        } else {
            None
        }
    }

    /// When the next queued event is due, if any is queued.
    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// Forgets everything queued.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Audio that arrives at real-time pace, with jitter up to the slack, goes out at once.
    #[test]
    fn real_time_input_is_not_delayed() {
        let t0 = Instant::now();
        let mut p = Paced::new(PACE_SLACK);
        // Frames due every 20 ms; the second late by 15 ms, the fourth by 39 ms and the
        // fifth, held with it, arriving together with it.
        for (i, at) in [0u64, 35, 40, 99, 99, 100, 120, 140]
            .into_iter()
            .enumerate()
        {
            let now = t0 + ms(at);
            assert_eq!(p.push_audio(now, FRAME, i), now, "frame {i}");
            assert_eq!(p.pop_due(now), Some(i));
        }
        assert_eq!(p.next_at(), None);
    }

    /// A burst comes out one frame per frame time, after the slack's worth at once.
    #[test]
    fn a_burst_is_spread_at_real_time_pace() {
        let t0 = Instant::now();
        let mut p = Paced::new(PACE_SLACK);
        let times: Vec<Instant> = (0..10).map(|i| p.push_audio(t0, FRAME, i)).collect();
        let offsets: Vec<Duration> = times.iter().map(|t| *t - t0).collect();
        assert_eq!(
            offsets,
            [0, 0, 0, 20, 40, 60, 80, 100, 120, 140].map(ms),
            "the output never runs more than the slack ahead of real time"
        );
        assert_eq!(p.pop_due(t0), Some(0));
        assert_eq!(p.pop_due(t0), Some(1));
        assert_eq!(p.pop_due(t0), Some(2));
        assert_eq!(p.pop_due(t0 + ms(19)), None);
        assert_eq!(p.next_at(), Some(t0 + ms(20)));
        assert_eq!(p.pop_due(t0 + ms(20)), Some(3));
        // After a pause longer than what is queued, the clock starts again from now.
        let later = t0 + ms(1_000);
        assert_eq!(p.push_audio(later, FRAME, 10), later);
    }

    /// Other events keep their place behind the audio queued before them.
    #[test]
    fn events_keep_their_order() {
        let t0 = Instant::now();
        let mut p = Paced::new(Duration::ZERO);
        p.push_audio(t0, FRAME, "a");
        p.push_audio(t0, FRAME, "b");
        assert_eq!(p.push(t0, "transcript"), t0 + FRAME);
        assert_eq!(p.pop_due(t0), Some("a"));
        assert_eq!(p.pop_due(t0), None);
        assert_eq!(p.pop_due(t0 + FRAME), Some("b"));
        assert_eq!(p.pop_due(t0 + FRAME), Some("transcript"));
        assert_eq!(p.next_at(), None);
        p.push(t0, "x");
        p.clear();
        assert_eq!(p.next_at(), None);
    }
}
