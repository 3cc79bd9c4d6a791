//! Twilio's playback of the service's audio, modelled so that marks come back when Twilio
//! would send them (`reference/protocols.md` A3):
//!
//! - `media` is queued and played in order, in real time (8 µ-law bytes per ms);
//! - a `mark` is echoed when the audio queued before it has finished playing, or at once if
//!   nothing is buffered;
//! - `clear` drops the queued audio and echoes every pending mark.
//!
//! The caller's clock drives it: [`Playback::advance`] plays as many bytes as the time that
//! passed allows (the simulator advances 160 bytes per 20 ms tick; the tests' fake Twilio
//! advances when the test says, or at once). What was played is what the caller heard, and can
//! be recorded. This is the one model of Twilio's buffer: the simulator's `call` and `load` and
//! the tests' fake Twilio all play through it.

use std::collections::VecDeque;

#[derive(Debug)]
enum Queued {
    /// `len` bytes of audio; the bytes themselves only when recording.
    Audio {
        len: usize,
        data: Vec<u8>,
    },
    Mark(String),
}

/// The outbound buffer of one call.
#[derive(Debug, Default)]
pub struct Playback {
    queue: VecDeque<Queued>,
    /// Bytes of the front audio entry already played.
    front_played: usize,
    /// Audio bytes queued and not yet played.
    buffered: usize,
    /// Keep what was played (for `call --out`); the load generator does not need it.
    record: bool,
    recording: Vec<u8>,
}

/// What a call of [`Playback::advance`] or [`Playback::clear`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Played {
    /// µ-law bytes played.
    pub bytes: usize,
    /// Marks to echo now, in order.
    pub marks: Vec<String>,
}

impl Playback {
    /// A playback buffer; with `record`, everything played is kept for [`Playback::recording`].
    pub fn new(record: bool) -> Playback {
        Playback {
            record,
            ..Playback::default()
        }
    }

    /// Queues audio from a `media` message (copied only when recording: the load generator
    /// needs just its length).
    pub fn push_audio(&mut self, audio: &[u8]) {
        if audio.is_empty() {
            return;
        }
        self.buffered += audio.len();
        let data = if self.record {
            audio.to_vec()
        } else {
            Vec::new()
        };
        self.queue.push_back(Queued::Audio {
            len: audio.len(),
            data,
        });
    }

    /// Queues a mark. Returns it at once if nothing is buffered ahead of it.
    pub fn push_mark(&mut self, name: String) -> Option<String> {
        if self.queue.is_empty() {
            Some(name)
        } else {
            self.queue.push_back(Queued::Mark(name));
            None
        }
    }

    /// Plays up to `bytes` bytes of audio; marks reached on the way are returned, as are
    /// marks right after the last audio played.
    pub fn advance(&mut self, mut bytes: usize) -> Played {
        let mut out = Played::default();
        while let Some(front) = self.queue.front() {
            match front {
                Queued::Mark(_) => {
                    if let Some(Queued::Mark(name)) = self.queue.pop_front() {
                        out.marks.push(name);
                    }
                }
                Queued::Audio { len, data } => {
                    if bytes == 0 {
                        break;
                    }
                    let left = len - self.front_played;
                    let take = left.min(bytes);
                    if self.record {
                        self.recording
                            .extend_from_slice(&data[self.front_played..self.front_played + take]);
                    }
                    self.front_played += take;
                    self.buffered -= take;
                    bytes -= take;
                    out.bytes += take;
                    if take == left {
                        self.queue.pop_front();
                        self.front_played = 0;
                    }
                }
            }
        }
        out
    }

    /// `clear`: drops the buffered audio and returns every pending mark. `bytes` in the
    /// result is the audio dropped (never heard).
    pub fn clear(&mut self) -> Played {
        let dropped = self.buffered;
        let marks = self
            .queue
            .drain(..)
            .filter_map(|q| match q {
                Queued::Mark(name) => Some(name),
                Queued::Audio { .. } => None,
            })
            .collect();
        self.buffered = 0;
        self.front_played = 0;
        Played {
            bytes: dropped,
            marks,
        }
    }

    /// Audio bytes waiting to play.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Nothing left to play or echo.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Everything played so far (empty unless recording).
    pub fn recording(&self) -> &[u8] {
        &self.recording
    }

    /// Takes the recording out.
    pub fn take_recording(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.recording)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark with nothing buffered comes back at once; otherwise after its audio plays.
    #[test]
    fn marks_follow_their_audio() {
        let mut p = Playback::new(true);
        assert_eq!(p.push_mark("m0".into()), Some("m0".into()));
        p.push_audio(&[1; 160]);
        assert_eq!(p.push_mark("m1".into()), None);
        p.push_audio(&[2; 160]);
        assert_eq!(p.push_mark("m2".into()), None);
        let a = p.advance(100);
        assert_eq!(
            a,
            Played {
                bytes: 100,
                marks: vec![]
            }
        );
        let b = p.advance(100);
        assert_eq!(b.bytes, 100);
        assert_eq!(b.marks, vec!["m1".to_owned()]);
        let c = p.advance(1000);
        assert_eq!(c.bytes, 120);
        assert_eq!(c.marks, vec!["m2".to_owned()]);
        assert!(p.is_idle());
        let mut want = vec![1u8; 160];
        want.extend([2u8; 160]);
        assert_eq!(p.recording(), &want[..]);
    }

    /// `clear` drops unplayed audio (it is never recorded) and returns the pending marks.
    #[test]
    fn clear_drops_audio_and_returns_marks() {
        let mut p = Playback::new(true);
        p.push_audio(&[1; 160]);
        p.push_mark("a".into());
        p.push_audio(&[2; 160]);
        p.push_mark("b".into());
        p.advance(80);
        let cleared = p.clear();
        assert_eq!(cleared.bytes, 240);
        assert_eq!(cleared.marks, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(p.buffered(), 0);
        assert_eq!(p.recording(), &[1u8; 80][..]);
        assert_eq!(p.push_mark("c".into()), Some("c".into()));
    }
}
