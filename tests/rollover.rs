//! End-to-end: rolling an OpenAI session over before its 60-minute cap (`openai.max_session_s`,
//! a second here). The successor is opened at a pause between turns, configured and given the
//! conversation, then the caller's audio moves to it and the old session closes, with every
//! caller frame appended to exactly one of the two sessions, in order.

mod support;

use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use support::{openai_settings, spawn_app, tone_frames, FakeOpenAi, FakeTwilio};

fn rollover_settings(fake: &FakeOpenAi, max_session_s: u64) -> callbridge::Settings {
    let mut settings = openai_settings(fake);
    settings.openai.max_session_s = max_session_s;
    settings
}

/// Every frame sent reaches exactly one session: what the old one got, then what the new one
/// got, is what the caller said.
#[actix_web::test]
async fn a_session_is_rolled_over_at_a_pause_with_no_frame_lost_or_doubled() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(rollover_settings(&fake, 2)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZroll", "CAroll", &[]).await;
    first.recv_event("session.update").await;

    // Some conversation for the successor to learn.
    first.start_response("r1", "i1");
    first.audio_delta_bytes("r1", "i1", &[0x55; 320]);
    first.finish_response("r1", "i1", "Hello, this is the front desk.");
    caller.recv_audio_bytes(320).await;

    // 3 s of caller audio at real-time pace: the rollover happens in the middle of it.
    let frames = tone_frames(150);
    let started = Instant::now();
    for (i, frame) in frames.iter().enumerate() {
        assert!(caller.send_media(frame).await, "frame {i} sent");
        let due = started + Duration::from_millis(20 * (i as u64 + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait).await;
        }
    }
    assert_eq!(
        fake.session_count(),
        2,
        "one rollover in 3 s (sessions of 2 s)"
    );
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;
    assert!(first.wait_closed().await, "the old session is closed");
    assert_eq!(first.service_close_code(), Some(1000));

    let sent: Vec<u8> = frames.concat();
    let old = first.appended_audio();
    assert!(
        !old.is_empty() && old.len() < sent.len(),
        "the switch fell inside the audio: {} of {} bytes went to the old session",
        old.len(),
        sent.len()
    );
    let new = second.wait_appended_bytes(sent.len() - old.len()).await;
    sleep(Duration::from_millis(100)).await;
    let new_all = second.appended_audio();
    assert_eq!(new_all.len(), new.len(), "more audio than was sent");
    let mut joined = old.clone();
    joined.extend_from_slice(&new_all);
    assert!(
        joined == sent,
        "caller audio lost, doubled or reordered across the switch ({} + {} bytes for {})",
        old.len(),
        new_all.len(),
        sent.len()
    );

    // The successor was told the conversation before it heard the caller.
    let types = second.received_types();
    let first_append = types
        .iter()
        .position(|t| t == "input_audio_buffer.append")
        .expect("audio reached the new session");
    let items = second.events_of_type("conversation.item.create");
    assert!(
        items
            .iter()
            .any(|e| e.to_string().contains("Hello, this is the front desk.")),
        "the context was not replayed: {items:?}"
    );
    let last_item = types
        .iter()
        .rposition(|t| t == "conversation.item.create")
        .unwrap();
    assert!(last_item < first_append, "context after audio: {types:?}");
    assert!(
        second.response_creates().is_empty(),
        "no greeting or response on a continued session"
    );

    let call = app
        .wait_call("CAroll", "one rollover", |c| c["rollovers"] == 1)
        .await;
    assert_eq!(call["upstream_restarts"], 0, "{call}");
    assert_eq!(call["state"], "active", "{call}");
    caller.hang_up().await;
    assert!(second.wait_closed().await);
    fake.assert_no_violations();
    caller.assert_no_violations();
}

/// A rollover never cuts a response off: while one is in flight (or the caller speaks), the
/// successor is not opened; it is once the turn is over.
#[actix_web::test]
async fn a_rollover_waits_for_the_turn_to_end() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(rollover_settings(&fake, 1)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZwait", "CAwait", &[]).await;
    first.recv_event("session.update").await;

    first.speech_started("u1", 0);
    first.start_response("r1", "i1");
    first.audio_delta_bytes("r1", "i1", &[0x55; 160]);
    sleep(Duration::from_millis(1_800)).await;
    assert_eq!(
        fake.session_count(),
        1,
        "rolled over while the caller spoke"
    );
    first.speech_stopped("u1", 900);
    sleep(Duration::from_millis(800)).await;
    assert_eq!(
        fake.session_count(),
        1,
        "rolled over with a response in flight"
    );
    first.finish_response("r1", "i1", "Sure.");
    let mut second = fake.next_session_timeout(Duration::from_secs(3)).await;
    second.recv_event("session.update").await;
    assert!(first.wait_closed().await);
    app.wait_call("CAwait", "one rollover", |c| c["rollovers"] == 1)
        .await;
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// The successor fails to open (refused): the current session goes on untouched, no restart
/// is counted, and the call is still active.
#[actix_web::test]
async fn a_failed_successor_leaves_the_current_session_alone() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(rollover_settings(&fake, 1)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZfail", "CAfail", &[]).await;
    first.recv_event("session.update").await;
    fake.set_refuse_status(Some(503));
    let connections = fake.connection_count();
    let deadline = Instant::now() + Duration::from_secs(4);
    while fake.connection_count() == connections {
        assert!(Instant::now() < deadline, "no successor was attempted");
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_millis(200)).await;
    assert!(!first.is_closed(), "the current session was closed");
    caller.send_media(&[0x12; 160]).await;
    first.wait_appended_bytes(160).await;
    let call = app.call("CAfail").await;
    assert_eq!(call["state"], "active", "{call}");
    assert_eq!(call["upstream_restarts"], 0, "{call}");
    assert_eq!(call["rollovers"], 0, "{call}");
    caller.hang_up().await;
}
