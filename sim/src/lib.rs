//! callbridge-sim: test callbridge without a phone.
//!
//! - [`call`]: one simulated Twilio call that plays a WAV file and records the reply;
//! - [`load`]: many concurrent simulated calls, each frame tagged and matched on its way back;
//! - `fake-openai` (in `main.rs`): the echo mode of [`callbridge_fakes::openai`], a stand-in
//!   OpenAI Realtime GA server that echoes the caller's audio, or with `--api live` of
//!   [`callbridge_fakes::live`], a stand-in GPT-Live server that echoes it at real-time pace.
//!
//! The pure parts ([`audio`], [`stats`], [`procstat`]) have no I/O. Twilio's wire shapes,
//! playback model, request signing and G.711 come from `callbridge-fakes`, never from the
//! bridge's own crates: the simulator is a witness, not a copy.

pub mod audio;
pub mod call;
pub mod load;
pub mod procstat;
pub mod stats;
pub mod ws;
