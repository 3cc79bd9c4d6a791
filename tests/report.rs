//! End-to-end: the end-of-call report (`report.url`): one signed POST per call after it ends,
//! with its fields; retried after a failure; bounded queue.

mod support;

use std::time::Duration;

use callbridge_fakes::receiver::{Answer, FakeReceiver};
use secrecy::SecretString;
use support::{openai_settings, spawn_app, test_settings, FakeOpenAi, FakeTwilio};

const SECRET: &str = "tools-secret-for-reports";

/// One report per call, after it ends: the call's fields, usage, transcript; signed with the
/// tools secret (checked by the receiver with its own HMAC), the SID in a header.
#[actix_web::test]
async fn a_signed_report_is_posted_once_per_call() {
    let receiver = FakeReceiver::start(Some(SECRET)).await;
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.report.url = receiver.url("/calls/ended");
    settings.secrets.tools_secret = Some(SecretString::from(SECRET));
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller
        .start_call(
            "MZrep",
            "CArep",
            &[("From", "+14155550100"), ("To", "+14155550199")],
        )
        .await;
    session.recv_event("session.update").await;
    session.start_response("r1", "i1");
    session.audio_delta_bytes("r1", "i1", &[0x55; 320]);
    session.finish_response("r1", "i1", "Hello there.");
    caller.recv_audio_bytes(320).await;
    caller.send_dtmf("5").await;
    app.wait_call("CArep", "two lines", |c| {
        c["transcript"].as_array().is_some_and(|t| t.len() == 2)
    })
    .await;
    caller.hang_up().await;

    let got = receiver.wait_received(1, Duration::from_secs(5)).await;
    let report = &got[0];
    assert_eq!(report.header("x-callbridge-call-sid"), Some("CArep"));
    let body = &report.body;
    assert_eq!(body["call_sid"], "CArep");
    assert_eq!(body["stream_sid"], "MZrep");
    assert_eq!(body["from"], "+14155550100");
    assert_eq!(body["to"], "+14155550199");
    assert_eq!(body["direction"], "inbound");
    assert_eq!(body["end_reason"], "twilio_stop");
    assert_eq!(body["upstream"], "openai");
    assert_eq!(body["api"], "realtime");
    assert!(body["started_at"].is_string() && body["ended_at"].is_string());
    assert!(body["duration_ms"].as_u64().is_some());
    assert_eq!(
        body["counters"]["frames_out"], 1,
        "one delta, one media message"
    );
    assert_eq!(body["usage"]["api"], "realtime");
    assert!(body.get("cost_usd").is_some());
    let transcript = body["transcript"].as_array().unwrap();
    assert_eq!(transcript[0]["text"], "Hello there.");
    assert_eq!(transcript[1]["role"], "dtmf");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.received().len(), 1, "sent once");
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["reports"]["sent"], 1, "{health}");
    receiver.assert_no_violations();
}

/// A report the receiver refuses (500) is tried again within 2 s; without a secret it is not
/// signed.
#[actix_web::test]
async fn a_failed_report_is_retried() {
    let receiver = FakeReceiver::start(None).await;
    receiver.answer_next(Answer::status(500));
    let mut settings = test_settings();
    settings.report.url = receiver.url("/r");
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZret", "CAret", &[]).await;
    app.wait_call_count(1).await;
    caller.hang_up().await;
    let got = receiver.wait_received(2, Duration::from_secs(4)).await;
    assert_eq!(got[0].status, 500);
    assert_eq!(got[1].status, 200);
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap <= Duration::from_millis(2_200),
        "first retry after {gap:?}"
    );
    assert_eq!(got[0].raw, got[1].raw, "the same report");
    assert!(got[1].header("x-callbridge-signature").is_none());
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["reports"]["sent"], 1, "{health}");
    receiver.assert_no_violations();
}

/// The queue is bounded: with the receiver down and room for one report, a second call's
/// report pushes out the first, counted in `/health`.
#[actix_web::test]
async fn the_report_queue_is_bounded() {
    let receiver = FakeReceiver::start(None).await;
    receiver.answer_always(Answer::status(503));
    let mut settings = test_settings();
    settings.report.url = receiver.url("/r");
    settings.report.queue_max = 1;
    settings.report.max_attempts = 20;
    let app = spawn_app(settings).await;
    for n in 0..3 {
        let caller = FakeTwilio::connect(&app.ws_url()).await;
        caller
            .start_call(&format!("MZq{n}"), &format!("CAq{n}"), &[])
            .await;
        app.wait_call_count(1).await;
        caller.hang_up().await;
        app.wait_call_count(0).await;
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, health) = app.get_json("/health").await;
    assert!(
        health["reports"]["queued"].as_u64().unwrap() <= 1,
        "{health}"
    );
    assert!(
        health["reports"]["dropped"].as_u64().unwrap() >= 1,
        "{health}"
    );
    assert_eq!(health["reports"]["sent"], 0);
}
