//! End-to-end faults of the data plane: peers that stop reading, and a stream that never
//! starts. Each ends with the service still serving other calls.

mod support;

use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use support::{openai_settings, spawn_app, FakeOpenAi, FakeTwilio};
use tokio_tungstenite::tungstenite::Message;

/// Resident memory of this process (the service runs in it), KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A media stream that connects but never sends `start` is closed after
/// `call.start_timeout_ms`, and the OpenAI session opened for it is closed too (it is paid for).
#[actix_web::test]
async fn a_stream_that_never_starts_is_closed_with_its_openai_session() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.start_timeout_ms = 300;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    assert!(caller.send_connected().await);
    let session = fake.next_session().await;
    assert!(session.wait_closed().await, "the OpenAI session is closed");
    assert!(caller.wait_closed().await, "the media stream is closed");
    app.wait_ended("no_start", Duration::from_secs(2)).await;
    fake.assert_no_violations();
}

/// The Twilio side stops reading its socket while OpenAI pushes 50 MB of audio: the call's
/// queues stay within their bounds (what does not fit is dropped and counted), the call ends
/// with `twilio_stalled` after `call.stall_timeout_ms` (5 s), and another call on the same service goes on working.
#[actix_web::test]
async fn a_twilio_reader_that_stops_reading_ends_the_call_with_bounded_memory() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.twilio_queue_ms = 2_000;
    let app = spawn_app(settings).await;

    // A healthy call alongside, to prove the service keeps serving.
    let healthy = FakeTwilio::connect(&app.ws_url()).await;
    let mut healthy_session = fake.next_session().await;
    healthy.start_call("MZ_ok", "CA_ok", &[]).await;
    healthy_session.recv_event("session.update").await;

    // The stalled caller: a websocket of our own that sends Twilio's first messages and then
    // never reads again, so its receive buffer fills and the service's writes back up.
    let (ws, _) = tokio_tungstenite::connect_async(app.ws_url())
        .await
        .expect("upgrade");
    let (mut tx, rx) = ws.split();
    let start = json!({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ_stall",
        "start": {
            "accountSid": "AC00000000000000000000000000000001", "streamSid": "MZ_stall",
            "callSid": "CA_stall", "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    });
    let connected = json!({"event": "connected", "protocol": "Call", "version": "1.0.0"});
    tx.send(Message::text(connected.to_string())).await.unwrap();
    tx.send(Message::text(start.to_string())).await.unwrap();
    let mut session = fake.next_session().await;
    session.recv_event("session.update").await;
    app.wait_call("CA_stall", "active", |c| c["state"] == "active")
        .await;

    // 50 MB of assistant audio, as fast as the service reads it (600 ms per delta).
    let rss_before = rss_kib();
    let mut rss_peak = rss_before;
    session.start_response("resp_flood", "item_flood");
    let flood = session.flood_audio("resp_flood", "item_flood", 50_000_000, 4_800);
    let mut max_queued_ms = 0u64;
    let mut dropped = 0u64;
    while !flood.is_finished() && !session.is_closed() {
        sleep(Duration::from_millis(50)).await;
        rss_peak = rss_peak.max(rss_kib());
        let (status, call) = app.get_json("/calls/CA_stall").await;
        if status == 200 {
            max_queued_ms = max_queued_ms.max(call["queued"]["twilio_ms"].as_u64().unwrap());
            dropped = dropped.max(
                call["dropped_frames"]["twilio_backpressure"]
                    .as_u64()
                    .unwrap(),
            );
            assert!(call["dropped_frames"]["openai_backpressure"].is_u64());
        }
    }
    flood.stop();
    let sent = flood.bytes_written();
    eprintln!(
        "stalled Twilio reader: OpenAI pushed {} MB of audio; test-process RSS {} → peak {} KiB (+{} KiB, the fake's buffers included); Twilio queue peaked at {max_queued_ms} ms",
        sent / 1_000_000,
        rss_before,
        rss_peak,
        rss_peak.saturating_sub(rss_before)
    );
    assert!(max_queued_ms <= 2_000, "queue within call.twilio_queue_ms");
    assert!(dropped > 0, "what did not fit was dropped and counted");
    assert!(
        rss_peak.saturating_sub(rss_before) < 4 * 1024,
        "memory grew by {} KiB while OpenAI pushed {} MB",
        rss_peak.saturating_sub(rss_before),
        sent / 1_000_000
    );
    app.wait_ended("twilio_stalled", Duration::from_secs(10))
        .await;
    assert!(
        session.wait_closed().await,
        "the stalled call's OpenAI leg is closed"
    );

    // The other call is unharmed: assistant audio still reaches it.
    healthy_session.start_response("resp_ok", "item_ok");
    healthy_session.audio_delta_bytes("resp_ok", "item_ok", &[7u8; 800]);
    assert_eq!(healthy.recv_audio_bytes(800).await, vec![7u8; 800]);
    drop(rx);
    healthy.assert_no_violations();
}

/// OpenAI stops reading its socket while the caller keeps talking: appends back up in the
/// leg's bounded outbox (the oldest dropped and counted), the stalled leg is failed after
/// `call.stall_timeout_ms` and restarted, and caller audio reaches the new session.
#[actix_web::test]
async fn an_openai_reader_that_stops_reading_fails_the_leg_and_the_call_goes_on() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.stall_timeout_ms = 1_000;
    settings.call.openai_queue_ms = 400;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ_os", "CA_os", &[]).await;
    session.recv_event("session.update").await;
    app.wait_call("CA_os", "active", |c| c["state"] == "active")
        .await;

    session.pause_reading();
    // Caller audio faster than real time, until the kernel's buffers towards the fake are full
    // and the leg's outbox overflows.
    let frame = [0x7Eu8; 160];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dropped = 0;
    while dropped == 0 {
        assert!(Instant::now() < deadline, "the outbox never overflowed");
        for _ in 0..200 {
            caller.send_media(&frame).await;
        }
        sleep(Duration::from_millis(1)).await;
        let (_, call) = app.get_json("/calls/CA_os").await;
        dropped = call["dropped_frames"]["openai_backpressure"]
            .as_u64()
            .unwrap_or(0);
        let queued = call["queued"]["openai_events"].as_u64().unwrap_or(0);
        assert!(
            queued <= 20 + 5,
            "outbox within call.openai_queue_ms: {queued}"
        );
    }
    // The stalled leg is failed and a new one opened; caller audio reaches it.
    let next = fake.next_session_timeout(Duration::from_secs(5)).await;
    let call = app
        .wait_call("CA_os", "restart counted", |c| {
            c["upstream_restarts"] == 1 && c["state"] == "active"
        })
        .await;
    assert!(
        call["dropped_frames"]["openai_backpressure"]
            .as_u64()
            .unwrap()
            > 0
    );
    let marker = [0x11u8; 160];
    caller.send_media(&marker).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !next.appended_audio().windows(160).any(|w| w == marker) {
        assert!(
            Instant::now() < deadline,
            "caller audio never reached the new session"
        );
        sleep(Duration::from_millis(10)).await;
    }
    session.resume_reading();
    caller.assert_no_violations();
}

/// Everything the Twilio leg held while the AI session was being configured (up to
/// `call.upstream_buffer_ms`, 2 s by default) is handed to the session at once when it is ready:
/// the AI leg's bounded mailbox is sized for it, so none of it is dropped.
#[actix_web::test]
async fn caller_audio_held_until_the_session_is_ready_fits_the_legs_mailbox() {
    let fake = FakeOpenAi::start().await;
    fake.set_session_updated_delay(1_000);
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ_hold", "CA_hold", &[]).await;
    // 2 s of caller audio (100 frames) while the session is not configured yet.
    let frames = support::tone_frames(100);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    session.recv_event("session.update").await;
    let appended = session.wait_appended_bytes(100 * 160).await;
    assert_eq!(appended, frames.concat(), "all of it, in order");
    let call = app.call("CA_hold").await;
    assert_eq!(call["dropped_frames"]["openai_backpressure"], 0);
    assert_eq!(call["dropped_frames"]["upstream_not_ready"], 0);
    fake.assert_no_violations();
}
