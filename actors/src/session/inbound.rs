//! Caller audio on its way to the AI leg, decided in the Twilio leg.
//!
//! - While no configured AI session is routed (connecting, restarting), audio is held, bounded
//!   by `call.upstream_buffer_ms`; the oldest is dropped first (after a reconnect the caller's
//!   latest words matter most) and counted. Held audio is copied out of the frame it arrived in,
//!   so a held slice does not pin the socket's read buffer.
//! - Lost inbound packets show as a jump in Twilio's media clock. Server VAD measures time by the
//!   audio it receives, so a hole would shift its clock and can stall turn detection: what was
//!   lost is replaced with μ-law silence, in 20 ms frames, up to `call.fill_gaps_max_ms` a gap.
//!   Timestamps are peer input: the arithmetic saturates, a timestamp that goes backwards fills
//!   nothing and does not move the clock back (alternating timestamps cannot make it fill the
//!   same gap twice), and the audio forwarded (frames and silence) never runs more than
//!   [`JITTER_ALLOWANCE_MS`] ahead of the time that really passed since the first frame arrived
//!   (a peer cannot make it send silence, which OpenAI bills, faster than real time; bunched
//!   arrivals after network jitter still get their gap filled).

use std::collections::VecDeque;

use bytes::Bytes;

use super::BYTES_PER_MS;

const SILENCE_FRAME_MS: u64 = 20;

/// How far the audio forwarded may run ahead of real time: network jitter delivers frames in
/// bunches, so a fill may come a little early; this bounds what a lying peer can gain, once.
pub const JITTER_ALLOWANCE_MS: u64 = 1_000;
const SILENCE_FRAME_BYTES: u32 = (SILENCE_FRAME_MS * BYTES_PER_MS) as u32;

#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Bytes of caller audio held while no AI session is routed.
    pub hold_bytes: u64,
    /// Longest gap filled with silence, ms (0: no filling).
    pub fill_gaps_max_ms: u64,
}

/// Counts since the last [`Inbound::take_counts`], for the call's shared counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InboundCounts {
    pub dropped_not_ready: u64,
    pub silence_filled_ms: u64,
}

#[derive(Debug)]
pub struct Inbound {
    cfg: InboundConfig,
    routed: bool,
    held: VecDeque<(Bytes, u32)>,
    held_bytes: u64,
    /// Twilio timestamp the next frame should carry if none was lost.
    next_ts: Option<u64>,
    /// When the first frame arrived, ms on the caller's monotonic clock.
    first_arrival_ms: Option<u64>,
    /// Audio forwarded or held since then (frames and silence), ms.
    audio_ms: u64,
    counts: InboundCounts,
}

impl Inbound {
    pub fn new(cfg: InboundConfig) -> Self {
        Self {
            cfg,
            routed: false,
            held: VecDeque::new(),
            held_bytes: 0,
            next_ts: None,
            first_arrival_ms: None,
            audio_ms: 0,
            counts: InboundCounts::default(),
        }
    }

    /// One caller frame, with Twilio's timestamp and when it arrived (ms on a monotonic clock).
    /// Frames to forward now (silence first, then this one) are pushed to `out`; while not
    /// routed they are held instead.
    pub fn on_media(
        &mut self,
        payload: Bytes,
        bytes: u32,
        timestamp_ms: Option<u64>,
        arrived_ms: u64,
        out: &mut Vec<(Bytes, u32)>,
    ) {
        let first = *self.first_arrival_ms.get_or_insert(arrived_ms);
        let frame_ms = u64::from(bytes) / BYTES_PER_MS;
        // Silence that fits before this frame without running ahead of real time.
        let allowed_ms = (arrived_ms.saturating_sub(first) + JITTER_ALLOWANCE_MS)
            .saturating_sub(self.audio_ms + frame_ms);
        if let Some(ts) = timestamp_ms {
            self.fill_gap_before(ts, bytes, allowed_ms, out);
        }
        self.audio_ms += frame_ms;
        self.forward(payload, bytes, out);
    }

    /// Whether a configured AI session takes audio now. Becoming routed releases what was held,
    /// oldest first, into `out`.
    pub fn set_routed(&mut self, routed: bool, out: &mut Vec<(Bytes, u32)>) {
        self.routed = routed;
        if routed {
            out.extend(self.held.drain(..));
            self.held_bytes = 0;
        }
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// The counts since the last call (the caller adds them to the shared counters).
    pub fn take_counts(&mut self) -> InboundCounts {
        std::mem::take(&mut self.counts)
    }

    fn forward(&mut self, payload: Bytes, bytes: u32, out: &mut Vec<(Bytes, u32)>) {
        if self.routed {
            out.push((payload, bytes));
            return;
        }
        // Copied: a slice would keep the whole read buffer it points into alive.
        self.held_bytes += u64::from(bytes);
        self.held
            .push_back((Bytes::copy_from_slice(&payload), bytes));
        while self.held_bytes > self.cfg.hold_bytes {
            match self.held.pop_front() {
                Some((_, dropped)) => {
                    self.held_bytes -= u64::from(dropped);
                    self.counts.dropped_not_ready += 1;
                }
                None => break,
            }
        }
    }

    fn fill_gap_before(
        &mut self,
        ts: u64,
        bytes: u32,
        allowed_ms: u64,
        out: &mut Vec<(Bytes, u32)>,
    ) {
        let end = ts.saturating_add(u64::from(bytes) / BYTES_PER_MS);
        let Some(expected) = self.next_ts else {
            self.next_ts = Some(end);
            return;
        };
        // The clock only moves forward: a late or backwards timestamp fills nothing.
        self.next_ts = Some(expected.max(end));
        if ts <= expected || self.cfg.fill_gaps_max_ms == 0 {
            return;
        }
        let gap_ms = (ts - expected)
            .min(self.cfg.fill_gaps_max_ms)
            .min(allowed_ms);
        let frames = gap_ms / SILENCE_FRAME_MS;
        for _ in 0..frames {
            self.forward(silence_frame(), SILENCE_FRAME_BYTES, out);
        }
        self.counts.silence_filled_ms += frames * SILENCE_FRAME_MS;
        self.audio_ms += frames * SILENCE_FRAME_MS;
    }
}

/// 20 ms of μ-law silence (`0xFF` × 160), base64, shared (cloning it allocates nothing).
pub fn silence_frame() -> Bytes {
    static FRAME: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    FRAME
        .get_or_init(|| {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .encode([crate::protocol::g711::SILENCE; SILENCE_FRAME_BYTES as usize]),
            )
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound() -> Inbound {
        Inbound::new(InboundConfig {
            hold_bytes: 800,
            fill_gaps_max_ms: 100,
        })
    }

    fn frame(name: &str) -> Bytes {
        Bytes::copy_from_slice(name.as_bytes())
    }

    fn names(out: &[(Bytes, u32)]) -> Vec<String> {
        out.iter()
            .map(|(b, _)| {
                if *b == silence_frame() {
                    "silence".to_string()
                } else {
                    String::from_utf8_lossy(b).into_owned()
                }
            })
            .collect()
    }

    #[test]
    fn caller_audio_waits_for_a_route_and_keeps_the_newest() {
        let mut i = inbound();
        let mut out = Vec::new();
        for n in 0..8 {
            i.on_media(frame(&format!("f{n}")), 160, None, n * 20, &mut out);
        }
        assert!(out.is_empty());
        // 800 bytes fit: the oldest three of eight 160-byte frames were dropped.
        assert_eq!(i.take_counts().dropped_not_ready, 3);
        i.set_routed(true, &mut out);
        assert_eq!(names(&out), vec!["f3", "f4", "f5", "f6", "f7"]);
        assert_eq!(i.held_bytes(), 0);
        out.clear();
        i.on_media(frame("f8"), 160, None, 200, &mut out);
        assert_eq!(names(&out), vec!["f8"]);
        // Route taken back (leg lost): held again.
        i.set_routed(false, &mut out);
        out.clear();
        i.on_media(frame("f9"), 160, None, 220, &mut out);
        assert!(out.is_empty());
        assert_eq!(i.held_bytes(), 160);
    }

    #[test]
    fn lost_caller_audio_is_replaced_with_silence_up_to_the_limit() {
        let mut i = inbound();
        let mut out = Vec::new();
        i.set_routed(true, &mut out);
        i.on_media(frame("t0"), 160, Some(0), 0, &mut out);
        i.on_media(frame("t20"), 160, Some(20), 20, &mut out);
        assert_eq!(names(&out), vec!["t0", "t20"]);
        out.clear();
        // 60 ms lost (frames 40, 60, 80): three silence frames first.
        i.on_media(frame("t100"), 160, Some(100), 100, &mut out);
        assert_eq!(names(&out), vec!["silence", "silence", "silence", "t100"]);
        assert_eq!(i.take_counts().silence_filled_ms, 60);
        out.clear();
        // A 10 s gap is filled only up to fill_gaps_max_ms (100 ms = 5 frames).
        i.on_media(frame("t10120"), 160, Some(10_120), 10_120, &mut out);
        assert_eq!(out.len(), 6);
        assert_eq!(i.take_counts().silence_filled_ms, 100);
    }

    #[test]
    fn backwards_and_huge_timestamps_fill_nothing_twice_and_never_overflow() {
        let mut i = inbound();
        let mut out = Vec::new();
        i.set_routed(true, &mut out);
        // Frames arrive every 20 ms in real time, whatever their timestamps say.
        let mut now = 0;
        let mut send = |i: &mut Inbound, ts: u64, out: &mut Vec<(Bytes, u32)>| {
            now += 20;
            i.on_media(frame("x"), 160, Some(ts), now, out);
        };
        send(&mut i, 1_000, &mut out);
        send(&mut i, 2_000, &mut out);
        assert_eq!(
            i.take_counts().silence_filled_ms,
            100,
            "up to fill_gaps_max_ms"
        );
        // Alternating back and forth: the clock stays at the latest, nothing more is filled.
        for _ in 0..10 {
            send(&mut i, 1_000, &mut out);
            send(&mut i, 2_000, &mut out);
        }
        assert_eq!(i.take_counts().silence_filled_ms, 0);
        send(&mut i, u64::MAX, &mut out);
        send(&mut i, u64::MAX, &mut out);
        assert_eq!(i.take_counts().silence_filled_ms, 100);
    }

    #[test]
    fn a_peer_cannot_make_it_send_silence_faster_than_real_time() {
        let mut i = inbound();
        let mut out = Vec::new();
        i.set_routed(true, &mut out);
        // Each frame claims a 100 ms jump, but frames arrive 20 ms apart: in 5 s of real time
        // the audio forwarded (frames and silence) stays within 5 s plus the jitter allowance,
        // not the 30 s the timestamps claim.
        for n in 0..250u64 {
            i.on_media(frame("x"), 160, Some(n * 120), n * 20, &mut out);
        }
        let forwarded_ms = out.len() as u64 * 20;
        assert!(
            forwarded_ms <= 5_000 + JITTER_ALLOWANCE_MS,
            "{forwarded_ms} ms of audio in 5 s"
        );
        // Bunched arrivals (jitter) still get their gap filled: 60 ms lost, the next frame
        // arrives only 30 ms after the previous one.
        let mut j = inbound();
        let mut out = Vec::new();
        j.set_routed(true, &mut out);
        for n in 0..3u64 {
            j.on_media(frame("x"), 160, Some(n * 20), n * 20, &mut out);
        }
        j.on_media(frame("y"), 160, Some(120), 70, &mut out);
        assert_eq!(j.take_counts().silence_filled_ms, 60);
    }

    #[test]
    fn silence_frame_is_20_ms_of_mulaw_silence() {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(silence_frame())
            .unwrap();
        assert_eq!(decoded, vec![0xFF; 160]);
    }
}
