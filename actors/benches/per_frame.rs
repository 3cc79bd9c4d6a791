//! The per-frame hot path: what the bridge does for every 20 ms of audio, in each direction.
//!
//! Each call moves 50 frames a second each way, so these costs times 100 are one call's share of
//! a core. Inputs are what the peers really send: a 20 ms frame is 160 bytes of μ-law, 216 chars
//! of base64, wrapped in the exact JSON Twilio and the Realtime API put around it.
//!
//! Run: `cargo bench -p callbridge-actors --bench per_frame` (add
//! `-- --warm-up-time 1 --measurement-time 3` for a quick look).

use std::hint::black_box;
use std::sync::Arc;

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use bytes::Bytes;
use callbridge_actors::protocol::{g711, openai, twilio};
use callbridge_actors::session::inbound::{Inbound, InboundConfig};
use callbridge_actors::session::playback::{Chunk, Playback, PlaybackConfig, Wire};

/// μ-law bytes in one 20 ms frame at 8 kHz.
const FRAME_BYTES: usize = 160;

/// One 20 ms frame of a 440 Hz tone as base64 μ-law: 216 chars, like a real payload (silence
/// would be one repeated byte, which is no harder to parse but looks nothing like speech).
fn frame_b64() -> String {
    let samples: Vec<i16> = (0..FRAME_BYTES)
        .map(|i| {
            let t = i as f64 / 8000.0;
            (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
        })
        .collect();
    let mut mulaw = Vec::with_capacity(FRAME_BYTES);
    g711::encode_into(&samples, &mut mulaw);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&mulaw);
    assert_eq!(b64.len(), 216, "a 20 ms frame is 216 chars of base64");
    b64
}

const STREAM_SID: &str = "MZ18ad3ab5a668481ce02b83e7395059f0";

/// Twilio → bridge: one caller frame, field for field as Twilio sends it.
fn bench_twilio_parse_media(c: &mut Criterion, payload: &str) {
    let text = format!(
        r#"{{"event":"media","sequenceNumber":"4","media":{{"track":"inbound","chunk":"2","timestamp":"20","payload":"{payload}"}},"streamSid":"{STREAM_SID}"}}"#
    );
    assert!(matches!(
        twilio::parse(&text),
        Ok(twilio::TwilioEvent::Media {
            audio_bytes: FRAME_BYTES,
            ..
        })
    ));
    let mut group = c.benchmark_group("twilio");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_media", |b| {
        b.iter(|| twilio::parse(black_box(&text)))
    });
    group.finish();
}

/// Bridge → OpenAI: the caller frame as `input_audio_buffer.append`.
fn bench_openai_audio_append(c: &mut Criterion, payload: &str) {
    let mut group = c.benchmark_group("openai");
    group.throughput(Throughput::Elements(1));
    group.bench_function("audio_append", |b| {
        b.iter(|| openai::audio_append(black_box(payload)))
    });
    group.finish();
}

/// OpenAI → bridge: one assistant audio delta, with every field the GA server sends.
fn bench_openai_parse_delta(c: &mut Criterion, payload: &str) {
    let text = format!(
        r#"{{"type":"response.output_audio.delta","event_id":"event_CFXhVbGwRaGXjpFjEFqcy","response_id":"resp_CFXhVZiVq3GeXmbfMUdS1","item_id":"item_CFXhVXhBrqdEMmgo2DtYa","output_index":0,"content_index":0,"delta":"{payload}"}}"#
    );
    assert!(matches!(
        openai::parse_server_event(&text),
        Ok(openai::ServerEvent::AudioDelta { .. })
    ));
    let mut group = c.benchmark_group("openai");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_audio_delta", |b| {
        b.iter(|| openai::parse_server_event(black_box(&text)))
    });
    group.finish();
}

/// Bridge → Twilio: the assistant frame as `media`, and the `mark` that follows every chunk.
fn bench_twilio_outbound(c: &mut Criterion, payload: &str) {
    let out = twilio::Outbound::new(STREAM_SID);
    let mut group = c.benchmark_group("twilio");
    group.throughput(Throughput::Elements(1));
    group.bench_function("outbound_media", |b| {
        b.iter(|| black_box(&out).media(black_box(payload)))
    });
    group.bench_function("outbound_mark", |b| {
        b.iter(|| black_box(&out).mark(black_box("cb.0.1234")))
    });
    group.bench_function("outbound_media_and_mark", |b| {
        b.iter(|| {
            let out = black_box(&out);
            (
                out.media(black_box(payload)),
                out.mark(black_box("cb.0.1234")),
            )
        })
    });
    group.finish();
}

/// One frame each way through the pure decision modules: inbound (caller → AI) and playback
/// (AI → Twilio, with its mark echoed in the same iteration so the pending-mark queue stays
/// short, as on a live call). Payloads are `Bytes` clones, as in the service (no copy).
fn bench_session(c: &mut Criterion, payload: &str) {
    let payload = Bytes::copy_from_slice(payload.as_bytes());
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1));

    group.bench_function("caller_audio", |b| {
        let mut inbound = Inbound::new(InboundConfig {
            hold_bytes: 16_000,
            fill_gaps_max_ms: 1_000,
        });
        let mut out = Vec::with_capacity(4);
        inbound.set_routed(true, &mut out);
        // Timestamps advance 20 ms per frame, so no gap is ever filled: the steady state.
        let mut ts = 0u64;
        b.iter(|| {
            out.clear();
            ts += 20;
            inbound.on_media(payload.clone(), FRAME_BYTES as u32, Some(ts), ts, &mut out);
            debug_assert_eq!(out.len(), 1);
            black_box(&out);
        })
    });

    group.bench_function("assistant_audio_and_mark_echo", |b| {
        let mut playback = Playback::new(PlaybackConfig {
            pre_start_bytes: 40_000,
            track_marks: true,
            mark_interval_bytes: 0,
            budget_bytes: 240_000,
            queue_bytes: 120_000,
        });
        playback.start();
        let response_id: Arc<str> = Arc::from("resp_CFXhVZiVq3GeXmbfMUdS1");
        let item_id: Arc<str> = Arc::from("item_CFXhVXhBrqdEMmgo2DtYa");
        b.iter(|| {
            playback.push(Chunk {
                response_id: response_id.clone(),
                item_id: item_id.clone(),
                payload: payload.clone(),
                bytes: FRAME_BYTES as u32,
            });
            let name = match playback.next_wire() {
                Some(Wire::Media {
                    mark: Some(name), ..
                }) => name,
                other => panic!("expected media with a mark, got {other:?}"),
            };
            playback.on_mark(black_box(&name));
        });
        assert_eq!(playback.marks_pending(), 0);
    });

    group.finish();
}

fn per_frame(c: &mut Criterion) {
    let payload = frame_b64();
    bench_twilio_parse_media(c, &payload);
    bench_openai_audio_append(c, &payload);
    bench_openai_parse_delta(c, &payload);
    bench_twilio_outbound(c, &payload);
    bench_session(c, &payload);
}

criterion_group!(benches, per_frame);
criterion_main!(benches);
