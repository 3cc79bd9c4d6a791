//! callbridge-sim: test callbridge without a phone.
//!
//! - [`call`]: one simulated Twilio call that plays a WAV file and records the reply;
//! - [`load`]: many concurrent simulated calls, each frame tagged and matched on its way back;
//! - [`fake_openai`]: a stand-in OpenAI Realtime GA server that echoes the caller's audio.
//!
//! The pure parts ([`twilio`], [`playback`], [`audio`], [`stats`], [`procstat`]) have no I/O.

pub mod audio;
pub mod call;
pub mod fake_openai;
pub mod load;
pub mod playback;
pub mod procstat;
pub mod stats;
pub mod twilio;
pub mod ws;
