//! End-to-end: a call through the real service, between a fake Twilio caller and a fake OpenAI
//! Realtime server, both strict about the protocols (`tests/support/`).

mod support;

use std::time::Duration;

use actix_web::rt::time::sleep;
use serde_json::Value;
use support::{
    openai_settings, spawn_app, test_settings, tone_frames, FakeOpenAi, FakeTwilio, MarkMode,
    TEST_OPENAI_KEY,
};

/// Distinct assistant audio: `n` chunks of `len` bytes, each chunk's bytes unlike the caller's.
fn reply_chunks(n: usize, len: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect())
        .collect()
}

fn types(session: &support::FakeSession) -> Vec<String> {
    session.received_types()
}

/// A whole call: caller audio reaches OpenAI unchanged and in order, assistant audio reaches the
/// caller unchanged and in order with the stream's SID, and `/calls` shows the call's counters.
#[actix_web::test]
async fn audio_flows_both_ways_unchanged_and_in_order() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller
        .start_call(
            "MZ100",
            "CA100",
            &[("From", "+14155550100"), ("To", "+14155550199")],
        )
        .await;

    let update = session.recv_event("session.update").await;
    assert_eq!(update["session"]["type"], "realtime");
    assert_eq!(session.model(), "gpt-realtime");
    assert_eq!(session.api_key(), TEST_OPENAI_KEY);

    let frames = tone_frames(60);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    let sent: Vec<u8> = frames.concat();
    assert_eq!(session.wait_appended_bytes(sent.len()).await, sent);
    assert_eq!(session.append_count(), 60, "one append per Twilio frame");

    let reply = reply_chunks(12, 480);
    session.start_response("resp_1", "item_1");
    for chunk in &reply {
        session.audio_delta_bytes("resp_1", "item_1", chunk);
    }
    session.finish_response("resp_1", "item_1", "Hello, how can I help?");
    let expected: Vec<u8> = reply.concat();
    assert_eq!(caller.recv_audio_bytes(expected.len()).await, expected);
    assert_eq!(caller.media_count(), 12, "one Twilio media per delta");
    // One mark per chunk, so barge-in can tell what was heard.
    caller.wait_marks(12).await;

    let call = app
        .wait_call("CA100", "all frames counted and marks echoed", |c| {
            c["frames_in"] == 60 && c["frames_out"] == 12 && c["marks_pending"] == 0
        })
        .await;
    assert_eq!(call["stream_sid"], "MZ100");
    assert_eq!(call["state"], "active");
    assert_eq!(call["upstream"], "openai");
    assert_eq!(call["from"], "+14155550100");
    assert_eq!(call["to"], "+14155550199");
    assert_eq!(call["barge_ins"], 0);
    assert_eq!(call["upstream_restarts"], 0);
    assert!(call["started_at"].as_str().unwrap().contains('T'));
    assert!(call["duration_ms"].as_u64().is_some());

    let (_, list) = app.get_json("/calls").await;
    assert_eq!(list["count"], 1);
    assert_eq!(list["calls"][0]["call_sid"], "CA100");
    assert!(list["calls"][0].get("transcript").is_none());
    // The key never shows in what the service answers.
    for body in [
        list.to_string(),
        call.to_string(),
        app.get_json("/health").await.1.to_string(),
    ] {
        assert!(!body.contains(TEST_OPENAI_KEY));
    }

    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Caller audio lost before it reached us (a jump in Twilio's `media.timestamp`) is replaced with
/// At the default mark interval (100 ms), 60 ms chunks share a mark two by two, and the tail of
/// the response gets its own mark once the response is done: every byte is still confirmed.
#[actix_web::test]
async fn marks_are_coalesced_and_the_tail_is_marked() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.mark_interval_ms = 100;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ150", "CA150", &[]).await;
    session.recv_event("session.update").await;

    let reply = reply_chunks(13, 480);
    session.start_response("resp_1", "item_1");
    for chunk in &reply {
        session.audio_delta_bytes("resp_1", "item_1", chunk);
    }
    let expected: Vec<u8> = reply.concat();
    assert_eq!(caller.recv_audio_bytes(expected.len()).await, expected);
    caller.wait_marks(6).await;
    // Each mark follows its media in order, so all of the chunks' marks are in by now.
    assert_eq!(
        caller.marks_received().len(),
        6,
        "one mark per 120 ms, none for the tail yet"
    );
    session.finish_response("resp_1", "item_1", "Thirteen chunks.");
    caller.wait_marks(7).await;
    assert_eq!(caller.marks_received().len(), 7);
    app.wait_call("CA150", "every mark echoed", |c| {
        c["frames_out"] == 13 && c["marks_pending"] == 0
    })
    .await;
    assert_eq!(caller.media_count(), 13);
    caller.assert_no_violations();
    session.assert_no_violations();
}

/// μ-law silence, so the model's voice detection keeps its clock; `/calls` counts it.
#[actix_web::test]
async fn lost_caller_audio_is_filled_with_silence() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ150", "CA150", &[]).await;
    session.recv_event("session.update").await;

    let frames = tone_frames(6);
    for frame in &frames[..3] {
        caller.send_media(frame).await;
    }
    caller.skip_inbound_ms(60); // three packets lost
    for frame in &frames[3..] {
        caller.send_media(frame).await;
    }
    let mut expected = frames[..3].concat();
    expected.extend_from_slice(&[0xFF; 480]);
    expected.extend_from_slice(&frames[3..].concat());
    assert_eq!(session.wait_appended_bytes(expected.len()).await, expected);
    let call = app
        .wait_call("CA150", "gap counted", |c| c["silence_filled_ms"] == 60)
        .await;
    assert_eq!(call["frames_in"], 9);
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// With a greeting set, the assistant speaks first: `response.create` with the greeting is sent
/// only after `session.updated`, and caller audio waits for it too.
#[actix_web::test]
async fn greeting_is_sent_after_session_updated() {
    let fake = FakeOpenAi::start().await;
    fake.set_session_updated_delay(300);
    let mut settings = openai_settings(&fake);
    settings.openai.greeting = "Greet the caller and ask how you can help.".into();
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ200", "CA200", &[]).await;
    session.recv_event("session.update").await;

    // Audio while the session is not configured yet is held, not appended as 24 kHz PCM.
    let frames = tone_frames(5);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    sleep(Duration::from_millis(150)).await;
    assert!(session.events_of_type("response.create").is_empty());
    assert_eq!(session.append_count(), 0);

    let create = session.recv_event("response.create").await;
    assert_eq!(
        create["response"]["instructions"],
        "Greet the caller and ask how you can help."
    );
    assert_eq!(session.wait_appended_bytes(800).await, frames.concat());
    let order = types(&session);
    let update_at = order.iter().position(|t| t == "session.update").unwrap();
    let create_at = order.iter().position(|t| t == "response.create").unwrap();
    assert!(update_at < create_at, "{order:?}");
    assert_eq!(session.response_creates().len(), 1, "greeted once");

    let _ = app;
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Assistant audio that arrives before Twilio's `start` is held and delivered after it, in order;
/// nothing at all is sent to Twilio before `start`.
#[actix_web::test]
async fn audio_from_openai_before_start_is_delivered_after_it() {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.openai.greeting = "Say hello.".into();
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.send_connected().await;
    let mut session = fake.next_session().await;
    session.recv_event("response.create").await;

    let reply = reply_chunks(6, 800);
    session.start_response("resp_g", "item_g");
    for chunk in &reply {
        session.audio_delta_bytes("resp_g", "item_g", chunk);
    }
    session.finish_response("resp_g", "item_g", "Hello!");
    sleep(Duration::from_millis(200)).await;
    assert!(
        caller.events().is_empty(),
        "nothing may reach Twilio before start"
    );

    caller.send_start("MZ300", "CA300", &[]).await;
    let expected: Vec<u8> = reply.concat();
    assert_eq!(caller.recv_audio_bytes(expected.len()).await, expected);
    let call = app
        .wait_call("CA300", "greeting delivered", |c| c["frames_out"] == 6)
        .await;
    assert_eq!(call["dropped_frames"]["pre_start"], 0);
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Barge-in while a response is in flight and the server does not cancel it: Twilio gets `clear`,
/// the item is truncated at the audio confirmed played by mark echoes, `response.cancel` is sent,
/// and the late deltas of the interrupted response never reach the caller.
#[actix_web::test]
async fn barge_in_truncates_at_the_heard_audio_and_cancels_the_response_in_flight() {
    barge_in_truncates_at_the_heard_audio_and_cancels_the_response_in_flight_with(0).await
}

/// The same with the shipped `call.mark_interval_ms` (100 ms: the 100 ms chunks here are
/// marked one by one either way, and a coalescing bug would show).
#[actix_web::test]
async fn barge_in_truncates_at_the_heard_audio_and_cancels_the_response_in_flight_at_the_default_mark_interval(
) {
    barge_in_truncates_at_the_heard_audio_and_cancels_the_response_in_flight_with(
        callbridge::Settings::default().call.mark_interval_ms,
    )
    .await
}

async fn barge_in_truncates_at_the_heard_audio_and_cancels_the_response_in_flight_with(
    mark_interval_ms: u64,
) {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.mark_interval_ms = mark_interval_ms;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.set_mark_mode(MarkMode::Manual);
    let mut session = fake.next_session().await;
    caller.start_call("MZ400", "CA400", &[]).await;
    session.recv_event("session.update").await;

    // Five 100 ms chunks (800 bytes of μ-law each).
    session.start_response("resp_1", "item_1");
    for chunk in reply_chunks(5, 800) {
        session.audio_delta_bytes("resp_1", "item_1", &chunk);
    }
    caller.recv_audio_bytes(4000).await;
    caller.wait_marks(5).await;
    // The caller has heard 150 ms: only the first chunk's mark is echoed.
    caller.play(150).await;
    app.wait_call("CA400", "one mark echoed", |c| c["marks_pending"] == 4)
        .await;

    session.speech_started_without_server_cancel("item_user_1", 900);
    caller.wait_clear().await;
    let truncate = session.recv_event("conversation.item.truncate").await;
    assert_eq!(truncate["item_id"], "item_1");
    assert_eq!(truncate["content_index"], 0);
    assert_eq!(truncate["audio_end_ms"], 100);
    let cancel = session.recv_event("response.cancel").await;
    assert_eq!(cancel["response_id"], "resp_1");

    // Late deltas of the interrupted response are dropped.
    let before = caller.received_audio().len();
    session.audio_delta_bytes("resp_1", "item_1", &[0x55; 800]);
    session.audio_delta_bytes("resp_1", "item_1", &[0x56; 800]);
    sleep(Duration::from_millis(150)).await;
    assert_eq!(caller.received_audio().len(), before);

    // The next response plays normally.
    session.start_response("resp_2", "item_2");
    session.audio_delta_bytes("resp_2", "item_2", &[0x42; 400]);
    let heard = caller.recv_audio_bytes(before + 400).await;
    assert_eq!(&heard[before..], &[0x42; 400][..]);

    let call = app
        .wait_call("CA400", "barge-in counted", |c| c["barge_ins"] == 1)
        .await;
    assert_eq!(call["dropped_frames"]["interrupted"], 2);
    assert_eq!(caller.clear_count(), 1);
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Barge-in against a server that cancels the response itself (`interrupt_response`, as OpenAI
/// does): clear and truncate, but no `response.cancel`, which would fail as not active.
#[actix_web::test]
async fn barge_in_sends_no_cancel_when_the_server_already_cancelled() {
    barge_in_sends_no_cancel_when_the_server_already_cancelled_with(0).await
}

/// The same with the shipped `call.mark_interval_ms` (100 ms: the 100 ms chunks here are
/// marked one by one either way, and a coalescing bug would show).
#[actix_web::test]
async fn barge_in_sends_no_cancel_when_the_server_already_cancelled_at_the_default_mark_interval() {
    barge_in_sends_no_cancel_when_the_server_already_cancelled_with(
        callbridge::Settings::default().call.mark_interval_ms,
    )
    .await
}

async fn barge_in_sends_no_cancel_when_the_server_already_cancelled_with(mark_interval_ms: u64) {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.mark_interval_ms = mark_interval_ms;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.set_mark_mode(MarkMode::Manual);
    let mut session = fake.next_session().await;
    caller.start_call("MZ410", "CA410", &[]).await;
    session.recv_event("session.update").await;

    session.start_response("resp_1", "item_1");
    for chunk in reply_chunks(3, 800) {
        session.audio_delta_bytes("resp_1", "item_1", &chunk);
    }
    caller.wait_marks(3).await;
    caller.play(250).await; // two chunks heard
    app.wait_call("CA410", "two marks echoed", |c| c["marks_pending"] == 1)
        .await;

    session.speech_started("item_user_1", 500);
    caller.wait_clear().await;
    let truncate = session.recv_event("conversation.item.truncate").await;
    assert_eq!(truncate["audio_end_ms"], 200);
    sleep(Duration::from_millis(500)).await; // past the cancel grace period
    assert!(session.events_of_type("response.cancel").is_empty());
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Barge-in after the response finished but while its audio still plays: clear and truncate,
/// never a `response.cancel` (nothing is in flight).
#[actix_web::test]
async fn barge_in_after_the_response_is_done_does_not_cancel() {
    barge_in_after_the_response_is_done_does_not_cancel_with(0).await
}

/// The same with the shipped `call.mark_interval_ms` (100 ms: the 100 ms chunks here are
/// marked one by one either way, and a coalescing bug would show).
#[actix_web::test]
async fn barge_in_after_the_response_is_done_does_not_cancel_at_the_default_mark_interval() {
    barge_in_after_the_response_is_done_does_not_cancel_with(
        callbridge::Settings::default().call.mark_interval_ms,
    )
    .await
}

async fn barge_in_after_the_response_is_done_does_not_cancel_with(mark_interval_ms: u64) {
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.call.mark_interval_ms = mark_interval_ms;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.set_mark_mode(MarkMode::Manual);
    let mut session = fake.next_session().await;
    caller.start_call("MZ420", "CA420", &[]).await;
    session.recv_event("session.update").await;

    session.start_response("resp_1", "item_1");
    for chunk in reply_chunks(4, 800) {
        session.audio_delta_bytes("resp_1", "item_1", &chunk);
    }
    session.finish_response("resp_1", "item_1", "A long answer.");
    caller.wait_marks(4).await;
    app.wait_call("CA420", "audio queued", |c| c["marks_pending"] == 4)
        .await;

    session.speech_started("item_user_1", 500);
    caller.wait_clear().await;
    let truncate = session.recv_event("conversation.item.truncate").await;
    assert_eq!(truncate["item_id"], "item_1");
    assert_eq!(
        truncate["audio_end_ms"], 0,
        "no mark echoed: nothing confirmed heard"
    );
    sleep(Duration::from_millis(400)).await;
    assert!(session.events_of_type("response.cancel").is_empty());
    app.wait_call("CA420", "barge-in counted", |c| c["barge_ins"] == 1)
        .await;
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Speech while nothing plays is no barge-in: no clear, no truncate, no cancel.
#[actix_web::test]
async fn speech_with_nothing_playing_changes_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ430", "CA430", &[]).await;
    session.recv_event("session.update").await;
    session.start_response("resp_1", "item_1");
    session.audio_delta_bytes("resp_1", "item_1", &[1; 800]);
    session.finish_response("resp_1", "item_1", "Hi.");
    caller.wait_marks(1).await; // Immediate mode: played at once
    app.wait_call("CA430", "mark echoed", |c| c["marks_pending"] == 0)
        .await;
    session.speech_started("item_user_1", 100);
    sleep(Duration::from_millis(400)).await;
    assert_eq!(caller.clear_count(), 0);
    assert!(session
        .events_of_type("conversation.item.truncate")
        .is_empty());
    assert!(session.events_of_type("response.cancel").is_empty());
    assert_eq!(app.call("CA430").await["barge_ins"], 0);
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Caller and assistant transcripts and DTMF digits show in `/calls/{sid}`; each digit goes to the
/// model as a user text item, followed by a `response.create` once the keypad is quiet.
#[actix_web::test]
async fn transcripts_and_dtmf_are_recorded_and_digits_reach_the_model() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ500", "CA500", &[]).await;
    session.recv_event("session.update").await;

    session.caller_transcript("item_u1", "I want to check my order");
    session.start_response("resp_1", "item_1");
    session.audio_delta_bytes("resp_1", "item_1", &[7; 160]);
    session.finish_response("resp_1", "item_1", "Press 1 for orders.");
    // Wait for the assistant's line before pressing, so the order is deterministic.
    app.wait_call("CA500", "two transcript lines", |c| {
        c["transcript"].as_array().is_some_and(|t| t.len() == 2)
    })
    .await;
    caller.send_dtmf("1").await;

    let item = session.recv_event("conversation.item.create").await;
    assert_eq!(item["item"]["role"], "user");
    assert_eq!(item["item"]["content"][0]["type"], "input_text");
    assert!(item["item"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains('1'));
    let create = session.recv_event("response.create").await;
    assert!(create.get("response").is_none() || create["response"]["instructions"].is_null());

    let call = app
        .wait_call("CA500", "three transcript lines", |c| {
            c["transcript"].as_array().is_some_and(|t| t.len() == 3)
        })
        .await;
    let transcript = call["transcript"].as_array().unwrap();
    let lines: Vec<(&str, &str)> = transcript
        .iter()
        .map(|e| (e["role"].as_str().unwrap(), e["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("caller", "I want to check my order"),
            ("assistant", "Press 1 for orders."),
            ("dtmf", "1"),
        ]
    );
    assert!(transcript
        .iter()
        .all(|e| e["at"].as_str().is_some_and(|a| a.contains('T'))));
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Two calls at once never cross: each OpenAI session gets only its caller's audio, and each
/// caller only its session's replies, on its own stream SID.
#[actix_web::test]
async fn two_simultaneous_calls_never_cross() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let a = FakeTwilio::connect(&app.ws_url()).await;
    let mut sa = fake.next_session().await;
    let b = FakeTwilio::connect(&app.ws_url()).await;
    let mut sb = fake.next_session().await;
    a.start_call("MZA", "CAA", &[]).await;
    b.start_call("MZB", "CAB", &[]).await;
    sa.recv_event("session.update").await;
    sb.recv_event("session.update").await;

    let frames_a = tone_frames(30);
    let frames_b: Vec<Vec<u8>> = tone_frames(30)
        .into_iter()
        .map(|f| f.into_iter().map(|x| x ^ 0x5A).collect())
        .collect();
    for (fa, fb) in frames_a.iter().zip(&frames_b) {
        a.send_media(fa).await;
        b.send_media(fb).await;
    }
    assert_eq!(sa.wait_appended_bytes(4800).await, frames_a.concat());
    assert_eq!(sb.wait_appended_bytes(4800).await, frames_b.concat());

    sa.start_response("ra", "ia");
    sb.start_response("rb", "ib");
    for i in 0..10u8 {
        sa.audio_delta_bytes("ra", "ia", &[i; 160]);
        sb.audio_delta_bytes("rb", "ib", &[100 + i; 160]);
    }
    let heard_a = a.recv_audio_bytes(1600).await;
    let heard_b = b.recv_audio_bytes(1600).await;
    assert!(heard_a.iter().all(|&x| x < 10));
    assert!(heard_b.iter().all(|&x| x >= 100));
    sleep(Duration::from_millis(100)).await;
    assert_eq!(a.received_audio().len(), 1600);
    assert_eq!(b.received_audio().len(), 1600);

    let (_, list) = app.get_json("/calls").await;
    assert_eq!(list["count"], 2);
    let sids: Vec<&str> = list["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call_sid"].as_str().unwrap())
        .collect();
    assert!(sids.contains(&"CAA") && sids.contains(&"CAB"), "{sids:?}");
    a.assert_no_violations();
    b.assert_no_violations();
    fake.assert_no_violations();
}

/// The echo upstream plays the caller's audio back unchanged and in order (the telephony test
/// that needs no OpenAI account), without marks.
#[actix_web::test]
async fn echo_upstream_plays_the_caller_back() {
    let app = spawn_app(test_settings()).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZ600", "CA600", &[]).await;
    let frames = tone_frames(50);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    let expected = frames.concat();
    assert_eq!(caller.recv_audio_bytes(expected.len()).await, expected);
    assert!(caller.marks_received().is_empty());
    let call = app
        .wait_call("CA600", "counted", |c| c["frames_out"] == 50)
        .await;
    assert_eq!(call["upstream"], "echo");
    assert_eq!(call["frames_in"], 50);
    caller.assert_no_violations();
}

/// `/health` says which upstream is in use, warns loudly in echo mode, and counts live calls.
#[actix_web::test]
async fn health_reports_upstream_and_live_calls() {
    let app = spawn_app(test_settings()).await;
    let (status, health) = app.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["upstream"], "echo");
    assert!(health["warning"].as_str().unwrap().contains("echo"));
    assert_eq!(health["live_calls"], 0);

    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZ700", "CA700", &[]).await;
    let mut live = Value::Null;
    for _ in 0..200 {
        live = app.get_json("/health").await.1;
        if live["live_calls"] == 1 {
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(live["live_calls"], 1);

    let fake = FakeOpenAi::start().await;
    let app2 = spawn_app(openai_settings(&fake)).await;
    let (_, health2) = app2.get_json("/health").await;
    assert_eq!(health2["upstream"], "openai");
    assert!(health2.get("warning").is_none());
}

/// After a barge-in the assistant's transcript line says it was interrupted and how much was
/// heard, and the context replayed into a new session after a restart says so too, instead of
/// presenting the whole reply as spoken.
#[actix_web::test]
async fn an_interrupted_reply_is_recorded_and_replayed_as_interrupted() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.set_mark_mode(MarkMode::Manual);
    let mut first = fake.next_session().await;
    caller.start_call("MZ_tt", "CA_tt", &[]).await;
    first.recv_event("session.update").await;

    first.start_response("resp_1", "item_1");
    for chunk in reply_chunks(5, 800) {
        first.audio_delta_bytes("resp_1", "item_1", &chunk);
    }
    first.finish_response("resp_1", "item_1", "Your balance is forty two dollars.");
    caller.wait_marks(5).await;
    caller.play(150).await; // 100 ms confirmed by the first mark
    app.wait_call("CA_tt", "one mark echoed", |c| c["marks_pending"] == 4)
        .await;
    first.speech_started("item_user_1", 900);
    let truncate = first.recv_event("conversation.item.truncate").await;
    assert_eq!(truncate["audio_end_ms"], 100);
    let call = app
        .wait_call("CA_tt", "the line marked interrupted", |c| {
            c["transcript"]
                .as_array()
                .is_some_and(|t| t.iter().any(|e| e["interrupted"] == true))
        })
        .await;
    let line = &call["transcript"][0];
    assert_eq!(line["role"], "assistant");
    assert_eq!(line["heard_ms"], 100);

    first.drop_connection();
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;
    let replay = second.recv_event("conversation.item.create").await;
    assert_eq!(replay["item"]["role"], "assistant");
    let text = replay["item"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("Your balance is forty two dollars."),
        "{text}"
    );
    assert!(text.contains("interrupted"), "{text}");
    caller.assert_no_violations();
    fake.assert_no_violations();
}

/// Realtime usage: each `response.done`'s tokens are added up in `/calls/{sid}` with their
/// cost at the `[prices]` of the model; an unknown model is priced `null` with a note.
#[actix_web::test]
async fn realtime_usage_and_cost_are_summed_per_call() {
    for (model, priced) in [("gpt-realtime", true), ("gpt-realtime-2099", false)] {
        let fake = FakeOpenAi::start().await;
        let mut settings = openai_settings(&fake);
        settings.openai.model = model.into();
        let app = spawn_app(settings).await;
        let caller = FakeTwilio::connect(&app.ws_url()).await;
        let mut session = fake.next_session().await;
        caller.start_call("MZu", "CAu", &[]).await;
        session.recv_event("session.update").await;
        for id in ["r1", "r2"] {
            session.send(serde_json::json!({
                "type": "response.done",
                "response": {"id": id, "status": "completed", "output": [],
                    "usage": {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
                        "input_token_details": {"text_tokens": 1_000, "audio_tokens": 500_000,
                            "cached_tokens": 100_000,
                            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 100_000}},
                        "output_token_details": {"text_tokens": 250_000, "audio_tokens": 250_000}}}
            }));
        }
        let call = app
            .wait_call("CAu", "two responses counted", |c| {
                c["usage"]["tokens"]["input_audio"] == 1_000_000
            })
            .await;
        let usage = &call["usage"];
        assert_eq!(usage["api"], "realtime");
        assert_eq!(usage["model"], model);
        assert_eq!(usage["tokens"]["cached_audio"], 200_000);
        assert_eq!(usage["tokens"]["output_audio"], 500_000);
        if priced {
            // 2k text in at $4/M, 800k audio at $32/M, 200k cached audio at $0.40/M,
            // 500k text out at $16/M, 500k audio out at $64/M.
            assert_eq!(
                usage["cost_usd"],
                0.008 + 25.6 + 0.08 + 8.0 + 32.0,
                "{usage}"
            );
        } else {
            assert!(usage["cost_usd"].is_null(), "{usage}");
            assert!(usage["price_note"].as_str().unwrap().contains(model));
        }
        caller.hang_up().await;
        app.wait_call_count(0).await;
        let (_, health) = app.get_json("/health").await;
        assert_eq!(health["usage"]["calls"], 1, "{health}");
        assert_eq!(health["usage"]["calls_without_price"], u64::from(!priced));
    }
}
