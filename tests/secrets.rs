//! End-to-end: the OpenAI key, the Twilio auth token and the admin token never appear in a log
//! line (at any level, trace included) or in an HTTP response, through a call that exercises the
//! paths that log: signature failures, a refused admin request, an OpenAI error that echoes the
//! key, a restart, a barge-in and a hang-up.

mod support;

use std::sync::Mutex;

use secrecy::SecretString;
use support::{
    compute_signature, openai_settings, spawn_app, FakeOpenAi, FakeTwilio, MarkMode, Signing,
    TEST_OPENAI_KEY,
};

const TWILIO_TOKEN: &str = "twilio-auth-token-e2e-secret-987";
const ADMIN_TOKEN: &str = "admin-token-e2e-secret-654";

/// Every log record of this test binary, formatted.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        // The fakes run in this process on tokio-tungstenite, which logs every frame at trace
        // (the fake's own error that echoes the key included). The service does not use it.
        if record.target().starts_with("tungstenite")
            || record.target().starts_with("tokio_tungstenite")
        {
            return;
        }
        let line = format!("{} {} {}", record.level(), record.target(), record.args());
        LINES.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

fn assert_clean(what: &str, text: &str) {
    for secret in [TEST_OPENAI_KEY, TWILIO_TOKEN, ADMIN_TOKEN] {
        assert!(!text.contains(secret), "{what} carries a secret: {text}");
    }
}

/// No secret in any log line or response, whatever happens during a call.
#[actix_web::test]
async fn secrets_never_reach_logs_or_responses() {
    log::set_boxed_logger(Box::new(Capture)).expect("the only logger of this binary");
    log::set_max_level(log::LevelFilter::Trace);

    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.server.public_url = "https://bridge.example.com".into();
    settings.secrets.twilio_auth_token = Some(SecretString::from(TWILIO_TOKEN));
    settings.twilio.validate_signatures = None;
    settings.secrets.admin_token = Some(SecretString::from(ADMIN_TOKEN));
    let app = spawn_app(settings).await;

    // Refused requests: a bad Twilio signature and a wrong admin token.
    assert_eq!(
        FakeTwilio::connect_expect_status(&app.ws_url(), &[("X-Twilio-Signature", "AAAA")]).await,
        403
    );
    let (status, body) = app
        .get_json_with("/calls", &[("Authorization", "Bearer not-the-token")])
        .await;
    assert_eq!(status, 401);
    assert_clean("a 401 body", &body.to_string());

    // A call with a restart and an error that echoes the key.
    let twiml = app
        .answer_call(
            "CAS",
            &Signing {
                auth_token: Some(TWILIO_TOKEN.into()),
                signed_url: Some("https://bridge.example.com/voice".into()),
            },
        )
        .await;
    let sig = compute_signature(TWILIO_TOKEN, "wss://bridge.example.com/media-stream", &[]);
    let caller =
        FakeTwilio::connect_with_headers(&app.ws_url(), &[("X-Twilio-Signature", &sig)]).await;
    caller.set_mark_mode(MarkMode::Manual); // audio still playing when the caller speaks
    let mut first = fake.next_session().await;
    caller.start_from(&twiml, "MZS", "CAS").await;
    first.recv_event("session.update").await;
    caller.send_media(&[0x11; 160]).await;
    first.wait_appended_bytes(160).await;
    first.error_event(
        "invalid_request_error",
        &format!("Incorrect API key provided: {TEST_OPENAI_KEY}. Find your key at ..."),
    );
    first.start_response("r1", "i1");
    first.audio_delta_bytes("r1", "i1", &[0x22; 800]);
    caller.recv_audio_bytes(800).await;
    first.speech_started_without_server_cancel("u1", 100);
    caller.wait_clear().await;
    first.drop_connection();
    let mut second = fake.next_session().await;
    second.recv_event("session.update").await;

    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    for path in ["/calls", "/calls/CAS", "/health", "/calls/CAnope"] {
        let (_, body) = app.get_json_with(path, &auth).await;
        assert_clean(path, &body.to_string());
    }
    caller.hang_up().await;
    assert!(second.wait_closed().await);

    let lines = LINES.lock().unwrap().clone();
    // The capture saw the call (so the check below is not vacuous)...
    assert!(lines.iter().any(|l| l.contains("[CAS] stream started")));
    assert!(lines.iter().any(|l| l.contains("OpenAI error")));
    assert!(lines.iter().any(|l| l.contains("X-Twilio-Signature")));
    assert!(lines.iter().any(|l| l.contains("call ended")));
    // ...and no line carries a secret, nor the caller's full number.
    for line in &lines {
        assert_clean("a log line", line);
        assert!(!line.contains("+14155550100"), "unmasked number: {line}");
    }
}
