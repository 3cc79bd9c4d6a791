//! callbridge-fakes: independent stand-ins for callbridge's peers, shared by the end-to-end
//! tests (`tests/support`) and the simulator (`callbridge-sim`).
//!
//! - [`live`]: THE fake GPT-Live server (`reference/gpt-live.md`), as strict about the service
//!   as the Realtime one: scripted through [`live::FakeLiveSession`], or in echo mode
//!   ([`live::serve_live`], [`live::FakeLive::start_echo`]) for the simulator.
//! - [`openai`]: THE fake OpenAI Realtime GA server (`reference/protocols.md` B1–B6), strict
//!   about everything the service sends. Scripted by a test through [`openai::FakeSession`],
//!   or in echo mode ([`openai::serve`], [`openai::FakeOpenAi::start_echo`]) as the
//!   simulator's upstream and the benchmark's floor.
//! - [`playback`]: THE model of Twilio's outbound buffer (media played in real time, marks
//!   echoed after their audio or at once, `clear` echoes every pending mark).
//! - [`twilio`]: the Twilio side's wire shapes (what Twilio sends, strict parsing of what the
//!   service sends back) and request signing (A5).
//! - [`twilio_rest`]: THE fake Twilio REST API, Calls resource (`reference/twilio-rest.md`):
//!   hang-up, redirect and create checked strictly, call state, signed status callbacks and
//!   voice requests for created calls, and the events a harness turns into the stream's `stop`.
//! - [`g711`]: µ-law encode/decode (C).
//! - [`receiver`]: a service callbridge POSTs signed JSON to (the end-of-call report).
//! - [`twiml`]: TwiML read strictly, as Twilio reads it (A4).
//! - [`webhook`]: Twilio's voice webhook: the signed POST of an incoming call, and its TwiML.
//!
//! The crate depends on neither `callbridge` nor `callbridge-actors`: a fake that judges the
//! service with the service's own helpers shares its bugs. Base64 is judged with the `base64`
//! crate's strict standard engine, signatures with `hmac` + `sha1` directly, µ-law with the
//! code in [`g711`].

mod checks;
pub mod g711;
pub mod live;
pub mod openai;
pub mod playback;
pub mod receiver;
pub mod twilio;
pub mod twilio_rest;
pub mod twiml;
pub mod webhook;

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

/// Locks, ignoring poisoning: a panicking test must not turn every later check into a
/// `PoisonError` that hides the real failure.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
