//! Test support shared by callbridge's end-to-end tests: strict fakes of both peers of the
//! service, and small helpers.
//!
//! - [`fake_twilio::FakeTwilio`]: a caller as Twilio Media Streams behave (protocols.md A1–A4).
//! - [`fake_openai::FakeOpenAi`]: an OpenAI Realtime server, GA protocol (protocols.md B1–B6).
//!
//! Both record every protocol violation of the service; a test ends with
//! `assert_no_violations()` on each. Each test binary uses a subset of this module.
#![allow(dead_code, unused_imports)]

pub mod fake_openai;
pub mod fake_twilio;

pub use fake_openai::{FakeOpenAi, FakeSession};
pub use fake_twilio::{FakeTwilio, MarkMode};

use std::time::{Duration, Instant};

// spawn_app lives here: added by the service author (in `app.rs`, wired in below).
pub mod app;
pub use app::*;

/// At most `max` bytes of `text`, cut at a character boundary, with the full length noted
/// (audio frames would flood a violation list).
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Polls `f` every 10 ms until it returns true; panics naming `what` after `timeout_ms`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, timeout_ms: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout_ms} ms waiting for: {what}");
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` distinct 20 ms µ-law frames (160 bytes each) of a 500 Hz tone. The first two bytes of
/// frame `i` carry `i` (big-endian), so no two frames of a call are equal and the order of
/// the frames can be checked after a round trip.
pub fn tone_frames(n: usize) -> Vec<Vec<u8>> {
    assert!(n <= 1 << 16, "tone_frames: at most 65536 distinct frames");
    (0..n)
        .map(|i| {
            let mut frame: Vec<u8> = (0..160)
                .map(|j| {
                    let t = (i * 160 + j) as f64 / 8000.0;
                    let sample = (8000.0 * (2.0 * std::f64::consts::PI * 500.0 * t).sin()) as i16;
                    mulaw_encode(sample)
                })
                .collect();
            frame[0] = (i >> 8) as u8;
            frame[1] = i as u8;
            frame
        })
        .collect()
}

/// G.711 µ-law encoder (protocols.md §C, bias 0x84), for test audio only.
pub fn mulaw_encode(x: i16) -> u8 {
    let sign: u8 = if x < 0 { 0x80 } else { 0 };
    let m = i32::from(x).unsigned_abs().min(32635) + 0x84;
    let exponent = (31 - m.leading_zeros()).saturating_sub(7).min(7);
    let mantissa = (m >> (exponent + 3)) & 0x0F;
    !(sign | ((exponent as u8) << 4) | mantissa as u8)
}
