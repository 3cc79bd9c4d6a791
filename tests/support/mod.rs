//! Test support shared by callbridge's end-to-end tests: strict fakes of both peers of the
//! service, and small helpers.
//!
//! - [`FakeOpenAi`] / [`FakeSession`]: the OpenAI Realtime server, GA protocol (protocols.md
//!   B1–B6), from the `callbridge-fakes` crate (`fakes/`), which the simulator shares. Besides
//!   scripting the model, a test can stop reading a session's socket
//!   (`FakeSession::pause_reading`), flood it with audio (`FakeSession::flood_audio`) and read
//!   its byte counters (`bytes_written` / `bytes_read`).
//! - [`fake_twilio::FakeTwilio`]: a caller as Twilio Media Streams behave (protocols.md A1–A4),
//!   judging with `callbridge_fakes::twilio` and playing through `callbridge_fakes::playback`;
//!   it can stop reading too (`FakeTwilio::pause_reading`).
//! - [`app`]: the real service on port 0 (the only module here that uses `callbridge`).
//!
//! The fakes never judge the service with its own code (base64, HMAC, G.711 are their own).
//! Both record every protocol violation of the service; a test ends with
//! `assert_no_violations()` on each. Each test binary uses a subset of this module.
#![allow(dead_code, unused_imports)]

pub mod fake_twilio;

pub use callbridge_fakes::openai::{
    self as fake_openai, FakeOpenAi, FakeSession, Flood, Handshake,
};
pub use callbridge_fakes::webhook::Signing;
pub use callbridge_fakes::{clip, g711::encode as mulaw_encode, twilio::compute_signature};
pub use fake_twilio::{FakeTwilio, MarkMode};

// spawn_app lives here: added by the service author (in `app.rs`, wired in below).
pub mod app;
pub use app::*;

use std::time::{Duration, Instant};

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
