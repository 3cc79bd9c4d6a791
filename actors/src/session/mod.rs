//! The call's decisions as pure state machines, with no runtime: each takes one event and
//! answers with what to do. A unit test drives them event by event; the actors perform.
//!
//! Split by where the facts live:
//! - [`inbound`] (in the Twilio leg): caller audio held while no AI session is ready (bounded,
//!   newest kept), and silence for audio lost before it reached us;
//! - [`playback`] (in the Twilio leg): assistant audio held before `start`, the playback budget
//!   and the bounded queue behind it, marks and their generation, `clear`, the truncate point;
//! - [`turns`] (in the `CallActor`): the response in flight, barge-in, DTMF, the greeting;
//! - [`restart`] (in the `CallActor`): which leg failures restart, the backoff, the budget;
//! - [`usage`] (in the `CallActor`): tokens or seconds used, and their price;
//! - [`fragments`] (in the GPT-Live leg): transcript fragments grouped into turns.

pub mod fragments;
pub mod inbound;
pub mod playback;
pub mod restart;
pub mod turns;
pub mod usage;

/// μ-law at 8 kHz: one byte per sample, eight per millisecond.
pub const BYTES_PER_MS: u64 = 8;
