//! GPT-Live transcripts come as timed fragments with no turn boundaries (`gpt-live.md` §5):
//! this groups them into turns. A turn closes when the other speaker's fragment arrives, after
//! a quiet gap, or at the end of the session. Fragments are joined as they are (they carry their
//! own spaces). A back-channel ("mhm") in the middle of the assistant's turn is kept: it closes
//! the assistant's turn so far and becomes a caller line of its own, in the order it was said.

use std::time::{Duration, Instant};

use crate::messages::Role;

/// Text of one open turn is bounded: a speaker that never pauses still yields lines.
pub const MAX_TURN_CHARS: usize = 4_000;

#[derive(Debug)]
pub struct Turns {
    gap: Duration,
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    role: Role,
    text: String,
    last: Instant,
}

impl Turns {
    pub fn new(gap: Duration) -> Self {
        Turns { gap, open: None }
    }

    /// A fragment of `role`; returns the turn it closed, if any.
    pub fn fragment(&mut self, role: Role, delta: &str, now: Instant) -> Option<(Role, String)> {
        let closed = match &self.open {
            Some(open) if open.role != role || now.duration_since(open.last) >= self.gap => {
                self.flush()
            }
            _ => None,
        };
        let open = self.open.get_or_insert_with(|| Open {
            role,
            text: String::new(),
            last: now,
        });
        open.text.push_str(delta);
        open.last = now;
        if open.text.len() >= MAX_TURN_CHARS {
            // Whichever was closed first goes out first; a huge turn goes out whole next time.
            return closed.or_else(|| self.flush());
        }
        closed
    }

    /// The open turn, if it has been quiet for the gap.
    pub fn tick(&mut self, now: Instant) -> Option<(Role, String)> {
        match &self.open {
            Some(open) if now.duration_since(open.last) >= self.gap => self.flush(),
            _ => None,
        }
    }

    /// The open turn so far (trimmed), if it has any text.
    pub fn open_text(&self) -> Option<(Role, &str)> {
        let open = self.open.as_ref()?;
        let text = open.text.trim();
        (!text.is_empty()).then_some((open.role, text))
    }

    /// Who is speaking now (the open turn's speaker), if anyone.
    pub fn speaking(&self) -> Option<Role> {
        self.open.as_ref().map(|open| open.role)
    }

    /// The open turn, whatever its age (the session ended).
    pub fn flush(&mut self) -> Option<(Role, String)> {
        let open = self.open.take()?;
        let text = open.text.trim();
        (!text.is_empty()).then(|| (open.role, text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_open_turn_so_far_is_readable() {
        let t0 = Instant::now();
        let mut turns = Turns::new(Duration::from_millis(800));
        assert_eq!(turns.open_text(), None);
        turns.fragment(Role::Assistant, " Morning", at(t0, 0));
        assert_eq!(turns.open_text(), Some((Role::Assistant, "Morning")));
        turns.fragment(Role::Assistant, " or afternoon?", at(t0, 100));
        assert_eq!(
            turns.open_text(),
            Some((Role::Assistant, "Morning or afternoon?"))
        );
        turns.fragment(Role::Caller, " ", at(t0, 200));
        assert_eq!(turns.open_text(), None, "blank so far");
    }

    #[test]
    fn fragments_become_turns_on_a_speaker_change_a_gap_and_the_end() {
        let t0 = Instant::now();
        let mut turns = Turns::new(Duration::from_millis(800));
        assert_eq!(
            turns.fragment(Role::Caller, "I'd like to move", at(t0, 0)),
            None
        );
        assert_eq!(
            turns.fragment(Role::Caller, " my appointment to Friday.", at(t0, 200)),
            None
        );
        assert_eq!(
            turns.fragment(Role::Assistant, "Sure.", at(t0, 900)),
            Some((
                Role::Caller,
                "I'd like to move my appointment to Friday.".into()
            ))
        );
        assert_eq!(
            turns.fragment(Role::Assistant, " Morning", at(t0, 1_100)),
            None
        );
        assert_eq!(turns.tick(at(t0, 1_500)), None, "not quiet long enough");
        assert_eq!(
            turns.tick(at(t0, 1_900)),
            Some((Role::Assistant, "Sure. Morning".into()))
        );
        assert_eq!(
            turns.fragment(Role::Assistant, "Or afternoon?", at(t0, 5_000)),
            None
        );
        assert_eq!(
            turns.flush(),
            Some((Role::Assistant, "Or afternoon?".into()))
        );
        assert_eq!(turns.flush(), None);
    }

    #[test]
    fn a_back_channel_is_its_own_line_in_order() {
        let t0 = Instant::now();
        let mut turns = Turns::new(Duration::from_millis(800));
        turns.fragment(Role::Assistant, "Your appointment is on", at(t0, 0));
        let first = turns.fragment(Role::Caller, "mhm", at(t0, 300));
        assert_eq!(
            first,
            Some((Role::Assistant, "Your appointment is on".into()))
        );
        let second = turns.fragment(Role::Assistant, " Friday at three.", at(t0, 500));
        assert_eq!(second, Some((Role::Caller, "mhm".into())));
        assert_eq!(
            turns.flush(),
            Some((Role::Assistant, "Friday at three.".into()))
        );
    }

    #[test]
    fn a_gap_within_one_speaker_splits_turns_and_blank_turns_vanish() {
        let t0 = Instant::now();
        let mut turns = Turns::new(Duration::from_millis(800));
        turns.fragment(Role::Caller, "Hello?", at(t0, 0));
        assert_eq!(
            turns.fragment(Role::Caller, "Anyone there?", at(t0, 2_000)),
            Some((Role::Caller, "Hello?".into()))
        );
        turns.flush();
        turns.fragment(Role::Caller, "  ", at(t0, 3_000));
        assert_eq!(turns.flush(), None);
    }

    #[test]
    fn a_turn_that_never_pauses_is_bounded() {
        let t0 = Instant::now();
        let mut turns = Turns::new(Duration::from_millis(800));
        let mut lines = 0;
        for i in 0..2_000u64 {
            if turns
                .fragment(Role::Assistant, "word ", at(t0, i))
                .is_some()
            {
                lines += 1;
            }
        }
        assert!(lines >= 2, "{lines}");
    }
}
