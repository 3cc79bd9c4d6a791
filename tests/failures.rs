//! End-to-end: how calls end and how they survive bad input and a failing OpenAI connection.

mod support;

use std::time::Duration;

use actix_web::rt::time::sleep;
use support::{
    openai_settings, spawn_app, test_settings, tone_frames, FakeOpenAi, FakeTwilio, MarkMode,
};

/// The caller hangs up (Twilio `stop`, then close): the OpenAI socket is closed and the call
/// leaves the registry.
#[actix_web::test]
async fn hang_up_with_stop_closes_openai_and_empties_the_registry() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ1", "CA1", &[]).await;
    session.recv_event("session.update").await;
    app.wait_call_count(1).await;

    caller.hang_up().await;
    assert!(session.wait_closed().await, "OpenAI socket closed");
    app.wait_call_count(0).await;
    let (status, _) = app.get_json("/calls/CA1").await;
    assert_eq!(status, 404);
    fake.assert_no_violations();
}

/// The Twilio socket closes without `stop` (network loss): same clean end.
#[actix_web::test]
async fn socket_closed_without_stop_closes_openai_and_empties_the_registry() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ2", "CA2", &[]).await;
    session.recv_event("session.update").await;
    app.wait_call_count(1).await;

    caller.close().await;
    assert!(session.wait_closed().await, "OpenAI socket closed");
    app.wait_call_count(0).await;
    fake.assert_no_violations();
}

/// A socket that connects and never sends `start` still gets its OpenAI leg closed on hang-up.
#[actix_web::test]
async fn hang_up_before_start_closes_openai() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.send_connected().await;
    let session = fake.next_session().await;
    caller.close().await;
    assert!(session.wait_closed().await, "OpenAI socket closed");
    app.wait_call_count(0).await;
}

/// Malformed Twilio input (non-JSON, binary, unknown event, missing fields, bad base64, media
/// before start) is counted and skipped; the call goes on and audio still flows.
#[actix_web::test]
async fn malformed_twilio_input_is_counted_and_the_call_goes_on() {
    let app = spawn_app(test_settings()).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.send_connected().await;
    caller.send_media(&[0xFF; 160]).await; // media before start
    caller.send_start("MZ3", "CA3", &[]).await;
    caller.send_text_raw("this is not json").await;
    caller.send_binary(&[1, 2, 3]).await;
    caller
        .send_text_raw(r#"{"event":"hello","sequenceNumber":"3","streamSid":"MZ3"}"#)
        .await;
    caller
        .send_text_raw(r#"{"event":"media","sequenceNumber":"4","streamSid":"MZ3","media":{"track":"inbound","chunk":"1","timestamp":"0"}}"#)
        .await;
    caller
        .send_text_raw(r#"{"event":"media","sequenceNumber":"5","streamSid":"MZ3","media":{"track":"inbound","chunk":"2","timestamp":"20","payload":"not base64!"}}"#)
        .await;
    caller
        .send_text_raw(r#"{"event":"dtmf","sequenceNumber":"6","streamSid":"MZ3","dtmf":{"track":"inbound_track"}}"#)
        .await;

    let frames = tone_frames(10);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    let expected = frames.concat();
    assert_eq!(caller.recv_audio_bytes(expected.len()).await, expected);
    let call = app
        .wait_call("CA3", "malformed frames counted", |c| {
            c["malformed_frames"] == 7
        })
        .await;
    assert_eq!(call["state"], "active");
    assert_eq!(call["frames_in"], 10);
    assert!(!caller.is_closed());
    caller.assert_no_violations();
}

/// The OpenAI socket drops mid-call: the leg restarts, `session.update` is sent again, the
/// transcript is replayed as context, audio flows again both ways, and the restart is counted.
/// The caller never notices.
#[actix_web::test]
async fn openai_drop_mid_call_restarts_the_leg_and_audio_flows_again() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZ4", "CA4", &[]).await;
    first.recv_event("session.update").await;

    let frames = tone_frames(20);
    for frame in &frames[..10] {
        caller.send_media(frame).await;
    }
    first.wait_appended_bytes(1600).await;
    first.caller_transcript("item_u1", "My account number is 42");
    app.wait_call("CA4", "transcript recorded", |c| {
        c["transcript"].as_array().is_some_and(|t| t.len() == 1)
    })
    .await;

    first.drop_connection();
    let mut second = fake.next_session().await;
    let update = second.recv_event("session.update").await;
    assert_eq!(update["session"]["type"], "realtime");
    let replay = second.recv_event("conversation.item.create").await;
    assert_eq!(replay["item"]["role"], "user");
    assert_eq!(
        replay["item"]["content"][0]["text"],
        "My account number is 42"
    );

    for frame in &frames[10..] {
        caller.send_media(frame).await;
    }
    assert_eq!(
        second.wait_appended_bytes(1600).await,
        frames[10..].concat()
    );
    second.start_response("resp_2", "item_2");
    second.audio_delta_bytes("resp_2", "item_2", &[9; 320]);
    assert_eq!(caller.recv_audio_bytes(320).await, vec![9; 320]);

    let call = app
        .wait_call("CA4", "restart counted", |c| c["upstream_restarts"] == 1)
        .await;
    assert_eq!(call["state"], "active");
    assert_eq!(call["upstream_state"], "ready");
    assert!(!caller.is_closed());
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Caller audio and keypad digits sent while the OpenAI leg restarts are held and delivered to
/// the new session; the context replayed into it has every earlier line exactly once.
#[actix_web::test]
async fn caller_audio_during_a_restart_reaches_the_new_session() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.openai.restart_backoff_ms = 300;
    settings.openai.restart_backoff_max_ms = 300;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZ5", "CA5", &[]).await;
    first.recv_event("session.update").await;
    first.caller_transcript("item_u1", "I am calling about my bill");
    app.wait_call("CA5", "transcript recorded", |c| {
        c["transcript"].as_array().is_some_and(|t| t.len() == 1)
    })
    .await;
    first.drop_connection();
    app.wait_call("CA5", "restarting", |c| c["state"] == "reconnecting")
        .await;

    let frames = tone_frames(5);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    caller.send_dtmf("7").await;
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;
    assert_eq!(second.wait_appended_bytes(800).await, frames.concat());
    second.recv_event("response.create").await; // the digit gets its answer
    let texts: Vec<String> = second
        .events_of_type("conversation.item.create")
        .iter()
        .map(|e| {
            e["item"]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        texts.iter().filter(|t| t.contains("my bill")).count(),
        1,
        "{texts:?}"
    );
    assert_eq!(
        texts.iter().filter(|t| t.contains("key 7")).count(),
        1,
        "{texts:?}"
    );
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// When OpenAI cannot be reached again, the call ends cleanly once the restart budget is spent:
/// the Twilio socket is closed and the call leaves the registry.
#[actix_web::test]
async fn restart_budget_spent_ends_the_call() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.openai.max_restarts = 2;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZ6", "CA6", &[]).await;
    first.recv_event("session.update").await;
    app.wait_call_count(1).await;

    fake.set_refuse_connections(true);
    first.drop_connection();
    assert!(
        caller.wait_closed().await,
        "the service closed the Twilio socket"
    );
    app.wait_call_count(0).await;
    assert_eq!(fake.session_count(), 1, "no session after the first");
    fake.assert_no_violations();
}

/// A recoverable OpenAI `error` event is logged and counted; the call goes on.
#[actix_web::test]
async fn recoverable_openai_errors_do_not_end_the_call() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ7", "CA7", &[]).await;
    session.recv_event("session.update").await;

    session.error_event(
        "input_audio_buffer_commit_empty",
        "Error committing input audio buffer: buffer too small.",
    );
    let frames = tone_frames(3);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    assert_eq!(session.wait_appended_bytes(480).await, frames.concat());
    let call = app
        .wait_call("CA7", "error counted", |c| c["upstream_errors"] == 1)
        .await;
    assert_eq!(call["upstream_restarts"], 0);
    assert_eq!(call["state"], "active");
    sleep(Duration::from_millis(50)).await;
    assert!(!caller.is_closed());
    fake.assert_no_violations();
}

/// The 60-minute cap (`session_expired`, close 1001) is a failure of the leg like any other:
/// a new session is opened and the call goes on.
#[actix_web::test]
async fn session_expiry_opens_a_new_session() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut first = fake.next_session().await;
    caller.start_call("MZ8", "CA8", &[]).await;
    first.recv_event("session.update").await;
    first.session_expired();
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;
    app.wait_call("CA8", "restart counted", |c| {
        c["upstream_restarts"] == 1 && c["state"] == "active"
    })
    .await;
    fake.assert_no_violations();
}

/// A revoked key (`invalid_api_key`) is a permanent failure: no restart, the media stream is
/// closed at once (Twilio then plays the fallback TwiML), and the end reason says so.
#[actix_web::test]
async fn a_revoked_key_is_not_retried_and_the_stream_is_closed_for_the_fallback() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ_key", "CA_key", &[]).await;
    session.recv_event("session.update").await;
    session.error_event("invalid_api_key", "Incorrect API key provided: sk-***abc.");
    session.close(3000, "invalid_api_key");
    assert!(
        caller.wait_closed().await,
        "the stream is closed for the fallback"
    );
    app.wait_ended("upstream_refused", Duration::from_secs(2))
        .await;
    assert_eq!(app.ended("upstream_refused").await, 1);
    // Well past the restart backoff of the test settings: still one connection.
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.connection_count(),
        1,
        "a permanent failure is not retried"
    );
    let (_, health) = app.get_json("/health").await;
    assert_eq!(
        health["status"], "healthy",
        "one failure does not open the breaker"
    );
}

/// After `openai.breaker_failures` consecutive permanent failures, new calls are closed at
/// once without an OpenAI attempt and `/health` says `degraded` with the reason (still 200);
/// after the cooldown one call probes, and its first completed response closes the breaker.
#[actix_web::test]
async fn the_breaker_opens_after_repeated_permanent_failures_and_a_probe_closes_it() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.openai.breaker_failures = 2;
    settings.openai.breaker_cooldown_s = 1;
    let app = spawn_app(settings).await;
    for n in 0..2 {
        let caller = FakeTwilio::connect(&app.ws_url()).await;
        let mut session = fake.next_session().await;
        caller
            .start_call(&format!("MZ_b{n}"), &format!("CA_b{n}"), &[])
            .await;
        session.recv_event("session.update").await;
        session.error_event("insufficient_quota", "You exceeded your current quota.");
        assert!(caller.wait_closed().await);
    }
    let (status, health) = app.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reason"]
            .as_str()
            .unwrap()
            .contains("insufficient_quota"),
        "{health}"
    );
    // A new call: closed at once, OpenAI not tried.
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    assert!(caller.wait_closed().await, "closed for the fallback");
    assert_eq!(fake.connection_count(), 2, "OpenAI not tried while open");
    assert_eq!(app.ended("breaker_open").await, 1);

    // After the cooldown, one call probes; its session works, and the breaker closes.
    sleep(Duration::from_millis(1_100)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ_probe", "CA_probe", &[]).await;
    session.recv_event("session.update").await;
    app.wait_call("CA_probe", "active", |c| c["state"] == "active")
        .await;
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["status"], "degraded", "probing: not decided yet");
    session.start_response("resp_1", "item_1");
    session.audio_delta_bytes("resp_1", "item_1", &[9u8; 160]);
    session.finish_response("resp_1", "item_1", "Hello.");
    assert_eq!(caller.recv_audio_bytes(160).await, vec![9u8; 160]);
    for _ in 0..100 {
        if app.get_json("/health").await.1["status"] == "healthy" {
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["status"], "healthy");
    caller.assert_no_violations();
}

/// Handshake statuses are classified: 401 and 403 are permanent (one attempt, then the stream
/// is closed for the fallback); 429 and 500 are retried within `openai.max_restarts`.
#[actix_web::test]
async fn handshake_statuses_are_classified() {
    for (status, permanent) in [
        (401, true),
        (403, true),
        (429, false),
        (500, false),
        (503, false),
    ] {
        let fake = FakeOpenAi::start().await;
        fake.set_refuse_status(Some(status));
        let mut settings = openai_settings(&fake);
        settings.openai.max_restarts = 2;
        let app = spawn_app(settings).await;
        let caller = FakeTwilio::connect(&app.ws_url()).await;
        caller
            .start_call(&format!("MZ_h{status}"), &format!("CA_h{status}"), &[])
            .await;
        assert!(caller.wait_closed().await, "HTTP {status}: stream closed");
        let reason = if permanent {
            "upstream_refused"
        } else {
            "upstream_failed"
        };
        app.wait_ended(reason, Duration::from_secs(2)).await;
        assert_eq!(app.ended(reason).await, 1, "HTTP {status}");
        let attempts = if permanent { 1 } else { 3 };
        assert_eq!(fake.connection_count(), attempts, "HTTP {status}");
    }
}

/// With `call.hold_audio`, the caller hears the clip (looped, paced: never far ahead of real
/// time) while the AI leg restarts; when the new leg is ready it stops, Twilio's buffer of it
/// is cleared, and the new leg's audio follows with no hold audio after it.
#[actix_web::test]
async fn hold_audio_plays_while_the_ai_leg_restarts() {
    // 200 ms of distinct frames: each 20 ms frame is one byte value.
    let clip: Vec<u8> = (0..1_600).map(|i| 0x20 + (i / 160) as u8).collect();
    let dir = std::env::temp_dir().join(format!("callbridge-hold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hold.wav");
    std::fs::write(&path, callbridge_sim::audio::write_wav_mulaw(&clip)).unwrap();

    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.hold_audio = path.to_string_lossy().into_owned();
    settings.openai.restart_backoff_ms = 1_000; // with jitter: 500 to 1000 ms
    settings.openai.restart_backoff_max_ms = 1_000;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.set_mark_mode(MarkMode::Manual); // Twilio still has the hold audio when it stops
    let mut first = fake.next_session().await;
    caller.start_call("MZhold", "CAhold", &[]).await;
    first.recv_event("session.update").await;
    assert!(
        caller.received_audio().is_empty(),
        "hold audio before any restart"
    );

    first.drop_connection();
    let lost = std::time::Instant::now();
    let heard = caller.recv_audio_bytes(clip.len()).await;
    assert!(
        heard[..clip.len()] == clip[..],
        "the hold clip, from its start"
    );
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;
    let restart_ms = lost.elapsed().as_millis() as usize;
    caller.wait_clear().await;
    let at_clear = caller.received_audio();
    let looped: Vec<u8> = clip.iter().copied().cycle().take(at_clear.len()).collect();
    assert!(at_clear == looped, "hold audio is the clip, looped");
    assert!(
        at_clear.len() <= (restart_ms + 500 + 300) * 8,
        "{} ms of hold audio sent in a {restart_ms} ms restart: not paced",
        at_clear.len() / 8
    );

    second.start_response("r1", "i1");
    second.audio_delta_bytes("r1", "i1", &[0x77; 320]);
    caller.recv_audio_bytes(at_clear.len() + 320).await;
    sleep(Duration::from_millis(600)).await;
    let after: Vec<u8> = caller.received_audio()[at_clear.len()..].to_vec();
    assert_eq!(
        after,
        vec![0x77; 320],
        "only the new leg's audio after the hold"
    );
    caller.hang_up().await;
    std::fs::remove_dir_all(&dir).ok();
    fake.assert_no_violations();
    caller.assert_no_violations();
}

/// A hold audio file that is not 8 kHz μ-law stops start-up with a message naming the key.
#[actix_web::test]
async fn a_bad_hold_audio_file_stops_start_up() {
    let dir = std::env::temp_dir().join(format!("callbridge-badhold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hold.wav");
    std::fs::write(
        &path,
        callbridge_sim::audio::write_wav_pcm16(&[0i16; 800], 16_000),
    )
    .unwrap();
    for file in [path.clone(), dir.join("missing.wav")] {
        let mut settings = test_settings();
        settings.call.hold_audio = file.to_string_lossy().into_owned();
        let err = match callbridge::Application::build(settings).await {
            Ok(_) => panic!("started with hold audio {file:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("call.hold_audio"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Garbage from OpenAI (not UTF-8 JSON, JSON of no known shape, a known event missing its
/// fields, an audio delta that is not base64) is logged and counted as an upstream error; the
/// session, the call and the audio go on, and nothing of it reaches the caller.
#[actix_web::test]
async fn garbage_frames_from_openai_are_counted_and_survived() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZjunk", "CAjunk", &[]).await;
    session.recv_event("session.update").await;
    session.send_raw_text("\u{0}\u{1}garbage{");
    session.send_raw_text("[1,2,3]");
    session.send_raw_text(r#"{"type":"response.created"}"#);
    session.send(serde_json::json!({
        "type": "response.output_audio.delta",
        "response_id": "rx", "item_id": "ix", "output_index": 0, "content_index": 0,
        "delta": "not base64!"
    }));
    session.send_raw_text(&"x".repeat(10_000));
    app.wait_call("CAjunk", "five upstream errors", |c| {
        c["upstream_errors"] == 5
    })
    .await;

    session.start_response("r1", "i1");
    session.audio_delta_bytes("r1", "i1", &[0x44; 320]);
    assert_eq!(caller.recv_audio_bytes(320).await, vec![0x44; 320]);
    caller.send_media(&[0x12; 160]).await;
    session.wait_appended_bytes(160).await;
    let call = app.call("CAjunk").await;
    assert_eq!(call["upstream_restarts"], 0, "{call}");
    assert_eq!(call["state"], "active", "{call}");
    assert_eq!(fake.session_count(), 1);
    caller.hang_up().await;
    caller.assert_no_violations();
}

/// A handshake that stalls (the socket opens but `session.updated` never comes within
/// `openai.connect_timeout_ms`) is transient: the leg is retried, and once the server answers
/// again the call goes on.
#[actix_web::test]
async fn a_stalled_session_handshake_is_retried() {
    let fake = FakeOpenAi::start().await;
    fake.set_session_updated_delay(10_000);
    let mut settings = openai_settings(&fake);
    settings.openai.connect_timeout_ms = 300;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let _stalled = fake.next_session().await;
    caller.start_call("MZstall", "CAstall", &[]).await;
    let mut second = fake.next_session_timeout(Duration::from_secs(3)).await;
    // Its session.update is in (and stalled) before the server is fixed for the next one.
    second.recv_event("session.update").await;
    fake.set_session_updated_delay(0);
    let mut third = fake.next_session_timeout(Duration::from_secs(3)).await;
    third.recv_event("session.update").await;
    let call = app
        .wait_call("CAstall", "active after retries", |c| {
            c["state"] == "active"
        })
        .await;
    assert!(call["upstream_restarts"].as_u64().unwrap() >= 2, "{call}");
    caller.send_media(&[0x13; 160]).await;
    third.wait_appended_bytes(160).await;
    caller.hang_up().await;
}

/// A refused `session.update` (here an unknown voice) is a configuration error: never retried,
/// the stream is closed for the fallback, and the log says which setting to check.
#[actix_web::test]
async fn a_rejected_session_update_is_not_retried() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.openai.voice = "no-such-voice".into();
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZrej", "CArej", &[]).await;
    session.recv_event("session.update").await;
    assert!(
        caller.wait_closed().await,
        "the stream is closed for the fallback"
    );
    app.wait_ended("upstream_refused", Duration::from_secs(2))
        .await;
    sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.connection_count(), 1, "retried");
}
