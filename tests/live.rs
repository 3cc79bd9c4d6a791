//! End-to-end: calls on GPT-Live (`openai.api = "live"`) against the strict fake GPT-Live server
//! (`callbridge_fakes::live`): the session start, audio both ways, the greeting, DTMF,
//! transcripts, the end of a session, restarts and usage.

mod support;

use std::time::Duration;

use actix_web::rt::time::sleep;
use callbridge_fakes::live::{AppendKind, FakeLive, LiveError};
use support::{live_settings, spawn_app, tone_frames, FakeTwilio};

/// The session starts as `gpt-live.md` §2 says; caller audio sent before `session.started` is
/// held (never sent early) and then delivered; audio goes both ways byte for byte, in order.
#[actix_web::test]
async fn a_live_call_starts_and_audio_flows_both_ways_unchanged() {
    let fake = FakeLive::start().await;
    fake.set_session_started_delay(300);
    let app = spawn_app(live_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZl1", "CAl1", &[]).await;
    let start = session.wait_session_start().await;
    assert_eq!(start["model"], "gpt-live-1");
    assert_eq!(
        start["audio"]["format"],
        serde_json::json!({"type": "audio/pcmu", "rate": 8000})
    );
    assert!(
        start.get("input").is_none(),
        "a first session has no history"
    );
    let handshake = session.handshake();
    assert_eq!(handshake.query, None, "no query on the URL");

    let frames = tone_frames(20);
    for frame in &frames[..5] {
        caller.send_media(frame).await; // before session.started: held
    }
    let held = session.wait_appended_bytes(5 * 160).await;
    assert_eq!(held, frames[..5].concat());
    for frame in &frames[5..] {
        caller.send_media(frame).await;
    }
    assert_eq!(session.wait_appended_bytes(20 * 160).await, frames.concat());

    let reply: Vec<Vec<u8>> = tone_frames(30)[10..].to_vec();
    for chunk in &reply {
        session.audio_delta_bytes(chunk);
    }
    assert_eq!(caller.recv_audio_bytes(20 * 160).await, reply.concat());

    let call = app.call("CAl1").await;
    assert_eq!(call["api"], "live", "{call}");
    caller.hang_up().await;
    fake.assert_no_violations();
    caller.assert_no_violations();
}

/// The greeting goes as commentary right after `session.started`; keypad digits pressed
/// together go as one instructions append, and into the transcript.
#[actix_web::test]
async fn greeting_and_dtmf_on_live() {
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.openai.greeting = "Greet the caller on behalf of Acme Dental.".into();
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZl2", "CAl2", &[]).await;
    let greeting = session.wait_text_appends(AppendKind::Commentary, 1).await;
    assert_eq!(
        greeting[0].content,
        "Greet the caller on behalf of Acme Dental."
    );
    assert_eq!(greeting[0].delegation_id, None);

    for digit in ["1", "2", "#"] {
        caller.send_dtmf(digit).await;
    }
    let digits = session.wait_text_appends(AppendKind::Instructions, 1).await;
    assert_eq!(digits.len(), 1, "{digits:?}");
    assert!(
        digits[0].content.contains("1, 2, #"),
        "{}",
        digits[0].content
    );
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        session.instructions_appends().len(),
        1,
        "one append for the three digits"
    );
    let call = app.call("CAl2").await;
    let dtmf: Vec<&str> = call["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["role"] == "dtmf")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(dtmf, vec!["1", "2", "#"]);
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// Transcript fragments become turns: a speaker change closes one, a back-channel in the middle
/// of the assistant's turn is its own line in order, and a quiet gap closes the last.
#[actix_web::test]
async fn live_transcript_fragments_become_turns() {
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.openai.live_turn_gap_ms = 300;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZl3", "CAl3", &[]).await;
    session.wait_session_start().await;
    app.wait_call("CAl3", "active", |c| c["state"] == "active")
        .await;

    session.input_transcript("I'd like to move", 5_200, 5_400);
    session.input_transcript(" my appointment to Friday.", 5_400, 5_800);
    session.output_transcript("Sure. Your new time", 6_600, 6_800);
    session.input_transcript("mhm", 6_800, 6_900);
    session.output_transcript(" is Friday at three.", 6_900, 7_400);
    let call = app
        .wait_call("CAl3", "four transcript lines", |c| {
            c["transcript"].as_array().is_some_and(|t| t.len() == 4)
        })
        .await;
    let lines: Vec<(String, String)> = call["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["role"].as_str().unwrap().to_owned(),
                e["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("caller", "I'd like to move my appointment to Friday."),
        ("assistant", "Sure. Your new time"),
        ("caller", "mhm"),
        ("assistant", "is Friday at three."),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(r, t)| (r.to_string(), t.to_string()))
        .collect();
    assert_eq!(lines, want);
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// Hang-up: `session.close`, then the socket closes at `session.closed`; the call leaves
/// `/calls` at once and its final seconds and cost are recorded (`/health` totals).
#[actix_web::test]
async fn hang_up_closes_the_session_and_records_its_final_usage() {
    let fake = FakeLive::start().await;
    let app = spawn_app(live_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZl4", "CAl4", &[]).await;
    session.wait_session_start().await;
    session.usage_updated(30.0, Some(0.01));
    let call = app
        .wait_call("CAl4", "usage", |c| c["usage"]["seconds"] == 30.0)
        .await;
    assert_eq!(call["usage"]["api"], "live");
    assert_eq!(call["usage"]["model"], "gpt-live-1");
    assert_eq!(call["usage"]["cost_usd"], 0.025, "{call}");

    session.set_final_usage(42.0);
    caller.hang_up().await;
    app.wait_call_count(0).await;
    assert!(session.wait_closed().await, "the service closed the socket");
    assert_eq!(
        session.session_closed_reason().as_deref(),
        Some("close_requested")
    );
    assert!(!session.socket_closed_before_session_closed());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (_, health) = app.get_json("/health").await;
        if health["usage"]["calls"] == 1 {
            assert_eq!(health["usage"]["minutes"], 0.7, "{health}");
            assert_eq!(health["usage"]["cost_usd"], 0.035, "{health}");
            assert_eq!(health["api"], "live");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health}");
        sleep(Duration::from_millis(20)).await;
    }
    fake.assert_no_violations();
}

/// A server that never answers `session.close`: the socket is closed after
/// `openai.live_close_timeout_ms`; the caller's side never waited for it.
#[actix_web::test]
async fn a_server_that_never_confirms_the_close_is_left_after_the_timeout() {
    let fake = FakeLive::start().await;
    fake.set_ignore_session_close(true);
    let mut settings = live_settings(&fake);
    settings.openai.live_close_timeout_ms = 400;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZl5", "CAl5", &[]).await;
    session.wait_session_start().await;
    session.usage_updated(12.0, None);
    caller.hang_up().await;
    let hung_up = std::time::Instant::now();
    app.wait_call_count(0).await;
    assert!(
        hung_up.elapsed() < Duration::from_millis(300),
        "the registry waited"
    );
    assert!(session.wait_closed().await);
    let waited = hung_up.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "closed after {waited:?}"
    );
    assert!(session.socket_closed_before_session_closed());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while app.get_json("/health").await.1["usage"]["calls"] != 1 {
        assert!(std::time::Instant::now() < deadline);
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.get_json("/health").await.1["usage"]["minutes"], 0.2);
}

/// A dropped socket: a new session continues the call with the conversation as `input`
/// history (and the developer note), no greeting, audio flowing again; the restart is counted.
#[actix_web::test]
async fn a_dropped_live_session_is_continued_with_its_history() {
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.openai.greeting = "Greet the caller.".into();
    settings.openai.live_turn_gap_ms = 200;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let first = fake.next_session().await;
    caller.start_call("MZl6", "CAl6", &[]).await;
    first.wait_text_appends(AppendKind::Commentary, 1).await;
    first.output_transcript("Hello, Acme Dental.", 100, 600);
    first.input_transcript("I need an appointment.", 900, 1_400);
    app.wait_call("CAl6", "two lines", |c| {
        c["transcript"].as_array().is_some_and(|t| t.len() == 2)
    })
    .await;
    first.usage_updated(5.0, None);
    app.wait_call("CAl6", "usage of the first session", |c| {
        c["usage"]["seconds"] == 5.0
    })
    .await;
    first.drop_connection();

    let second = fake.next_session().await;
    let start = second.wait_session_start().await;
    let input = start["input"].as_array().expect("history").clone();
    let texts: Vec<&str> = input
        .iter()
        .map(|m| m["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts[0], "Hello, Acme Dental.");
    assert_eq!(input[0]["role"], "assistant");
    assert_eq!(texts[1], "I need an appointment.");
    assert_eq!(input[1]["role"], "user");
    assert_eq!(input[2]["role"], "developer");
    caller.send_media(&[0x31; 160]).await;
    second.wait_appended_bytes(160).await;
    sleep(Duration::from_millis(200)).await;
    assert!(second.commentary().is_empty(), "greeted again");
    second.usage_updated(3.0, None);
    let call = app
        .wait_call("CAl6", "restart and usage", |c| {
            c["upstream_restarts"] == 1 && c["usage"]["seconds"] == 8.0
        })
        .await;
    assert_eq!(call["state"], "active");
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// `session.closed` with reason `expired` continues at once in a new session.
#[actix_web::test]
async fn an_expired_live_session_is_continued() {
    let fake = FakeLive::start().await;
    let app = spawn_app(live_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let first = fake.next_session().await;
    caller.start_call("MZl7", "CAl7", &[]).await;
    first.wait_session_start().await;
    first.session_expired();
    let second = fake.next_session().await;
    second.wait_session_start().await;
    app.wait_call("CAl7", "restarted", |c| {
        c["upstream_restarts"] == 1 && c["state"] == "active"
    })
    .await;
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// A refused key (an error before `session.started`, or HTTP 401) is permanent: no second
/// attempt, the stream is closed for the fallback.
#[actix_web::test]
async fn a_permanent_live_error_is_not_retried() {
    for refusal in ["start_error", "http_401"] {
        let fake = FakeLive::start().await;
        match refusal {
            "start_error" => fake.set_start_error(Some(LiveError::invalid_api_key())),
            _ => fake.set_refuse_status(Some(401)),
        }
        let app = spawn_app(live_settings(&fake)).await;
        let caller = FakeTwilio::connect(&app.ws_url()).await;
        caller.start_call("MZl8", "CAl8", &[]).await;
        assert!(caller.wait_closed().await, "{refusal}: stream closed");
        app.wait_ended("upstream_refused", Duration::from_secs(3))
            .await;
        sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.connection_count(), 1, "{refusal}: retried");
    }
}

/// Two live calls at once never cross: each session hears its own caller, each caller its own
/// session.
#[actix_web::test]
async fn two_live_calls_never_cross() {
    let fake = FakeLive::start().await;
    let app = spawn_app(live_settings(&fake)).await;
    let a = FakeTwilio::connect(&app.ws_url()).await;
    let session_a = fake.next_session().await;
    a.start_call("MZa", "CAa", &[]).await;
    let b = FakeTwilio::connect(&app.ws_url()).await;
    let session_b = fake.next_session().await;
    b.start_call("MZb", "CAb", &[]).await;
    session_a.wait_session_start().await;
    session_b.wait_session_start().await;
    app.wait_call_count(2).await;
    for _ in 0..5 {
        a.send_media(&[0xA1; 160]).await;
        b.send_media(&[0xB2; 160]).await;
    }
    assert_eq!(session_a.wait_appended_bytes(800).await, vec![0xA1; 800]);
    assert_eq!(session_b.wait_appended_bytes(800).await, vec![0xB2; 800]);
    session_a.audio_delta_bytes(&[0x1A; 320]);
    session_b.audio_delta_bytes(&[0x2B; 320]);
    assert_eq!(a.recv_audio_bytes(320).await, vec![0x1A; 320]);
    assert_eq!(b.recv_audio_bytes(320).await, vec![0x2B; 320]);
    sleep(Duration::from_millis(100)).await;
    assert_eq!(session_a.appended_audio().len(), 800);
    assert_eq!(a.received_audio().len(), 320);
    a.hang_up().await;
    b.hang_up().await;
    fake.assert_no_violations();
}

/// A GPT-Live session's rollover is planned from `expires_at`: with 4 s left at its start, the
/// call moves to a new session at a pause (about halfway), with the conversation as history;
/// the old session gets `session.close`, and every caller frame reaches exactly one session.
#[actix_web::test]
async fn a_live_session_is_rolled_over_before_it_expires() {
    let fake = FakeLive::start().await;
    fake.set_session_duration_secs(4);
    let mut settings = live_settings(&fake);
    settings.openai.live_turn_gap_ms = 200;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let first = fake.next_session().await;
    caller.start_call("MZlr", "CAlr", &[]).await;
    first.wait_session_start().await;
    first.output_transcript("Hello, Acme Dental.", 0, 500);

    let frames = tone_frames(150);
    let t0 = std::time::Instant::now();
    for (i, frame) in frames.iter().enumerate() {
        caller.send_media(frame).await;
        let due = t0 + Duration::from_millis(20 * (i as u64 + 1));
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            sleep(wait).await;
        }
    }
    assert_eq!(fake.session_count(), 2, "one rollover within 3 s");
    let second = fake.next_session().await;
    let start = second.wait_session_start().await;
    assert_eq!(
        start["input"][0]["content"][0]["text"], "Hello, Acme Dental.",
        "{start}"
    );
    assert!(first.wait_closed().await);
    assert_eq!(
        first.session_closed_reason().as_deref(),
        Some("close_requested")
    );
    let old = first.appended_audio();
    let sent = frames.concat();
    let new = second.wait_appended_bytes(sent.len() - old.len()).await;
    let mut joined = old.clone();
    joined.extend_from_slice(&new);
    assert!(
        joined == sent,
        "audio lost or doubled across the switch ({} + {})",
        old.len(),
        new.len()
    );
    app.wait_call("CAlr", "one rollover", |c| {
        c["rollovers"] == 1 && c["upstream_restarts"] == 0
    })
    .await;
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// GPT-Live bills per second of session: a media stream that never sends `start` gets a
/// connection but never a session (`session.start` is sent only at Twilio's `start`), and the
/// connection is closed with the stream at `call.start_timeout_ms`.
#[actix_web::test]
async fn no_live_session_starts_before_twilio_does() {
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.call.start_timeout_ms = 500;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.send_connected().await;
    let session = fake.next_session().await;
    assert!(
        caller.wait_closed().await,
        "the stream without start is closed"
    );
    assert!(session.wait_closed().await, "its GPT-Live connection too");
    assert!(
        session.session_start().is_none(),
        "a session was started (and billed)"
    );
    assert_eq!(app.ended("no_start").await, 1);
    fake.assert_no_violations();
}
