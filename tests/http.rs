//! End-to-end: the HTTP surface — the voice webhook's TwiML, Twilio signatures, and inspection.

mod support;

use std::time::Duration;

use secrecy::SecretString;
use support::{
    compute_signature, openai_settings, spawn_app, test_settings, FakeOpenAi, FakeTwilio, Signing,
};

async fn post_voice(
    url: &str,
    form: &[(&str, &str)],
    signature: Option<&str>,
) -> (u16, String, String) {
    let mut req = awc::Client::default()
        .post(url)
        .timeout(Duration::from_secs(5));
    if let Some(sig) = signature {
        req = req.insert_header(("X-Twilio-Signature", sig));
    }
    let mut res = req.send_form(&form).await.expect("POST answered");
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = res.body().await.expect("a body");
    (
        res.status().as_u16(),
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

const FORM: &[(&str, &str)] = &[
    ("CallSid", "CA9f00"),
    ("AccountSid", "AC123"),
    ("From", "+14155550100 <&\"'>"),
    ("To", "+18005551212"),
];

/// The voice webhook answers `<Connect><Stream>` to our websocket on the request's host, with
/// From, To and CallSid as XML-escaped parameters and no `track` attribute.
#[actix_web::test]
async fn voice_webhook_answers_connect_stream_twiml() {
    let app = spawn_app(test_settings()).await;
    let (status, content_type, body) = post_voice(&app.http("/voice"), FORM, None).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/xml"), "{content_type}");
    let expected = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect>\
         <Stream url=\"wss://127.0.0.1:{}/media-stream\">\
         <Parameter name=\"From\" value=\"+14155550100 &lt;&amp;&quot;&apos;&gt;\"/>\
         <Parameter name=\"To\" value=\"+18005551212\"/>\
         <Parameter name=\"CallSid\" value=\"CA9f00\"/>\
         </Stream></Connect>\
         <Say>Sorry, our assistant is not available right now. Please try again later.</Say>\
         </Response>",
        app.port
    );
    assert_eq!(body, expected);
    assert!(!body.contains("track"));
}

/// With `server.public_url`, the stream URL is its `wss://` form.
#[actix_web::test]
async fn voice_webhook_uses_the_public_url() {
    let mut settings = test_settings();
    settings.server.public_url = "https://bridge.example.com/".into();
    let app = spawn_app(settings).await;
    let (status, _, body) = post_voice(&app.http("/voice"), FORM, None).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<Stream url=\"wss://bridge.example.com/media-stream\">"),
        "{body}"
    );
}

/// With `TWILIO_AUTH_TOKEN` set, `/voice` and the websocket upgrade need a valid
/// `X-Twilio-Signature` over the public URL (the `wss://` form for the upgrade); 403 otherwise.
#[actix_web::test]
async fn twilio_signatures_are_checked_when_a_token_is_set() {
    let token = "12345-test-auth-token";
    let mut settings = test_settings();
    settings.server.public_url = "https://bridge.example.com".into();
    settings.secrets.twilio_auth_token = Some(SecretString::from(token));
    let app = spawn_app(settings).await;

    let (status, _, body) = post_voice(&app.http("/voice"), FORM, None).await;
    assert_eq!(status, 403);
    assert!(!body.contains(token));
    let (status, _, _) = post_voice(&app.http("/voice"), FORM, Some("bm9wZQ==")).await;
    assert_eq!(status, 403);
    let params: Vec<(String, String)> = FORM
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let good = compute_signature(token, "https://bridge.example.com/voice", &params);
    let (status, _, body) = post_voice(&app.http("/voice"), FORM, Some(&good)).await;
    assert_eq!(status, 200, "{body}");

    assert_eq!(
        FakeTwilio::connect_expect_status(&app.ws_url(), &[]).await,
        403
    );
    let twiml = app
        .answer_call(
            "CA1",
            &Signing {
                auth_token: Some(token.into()),
                signed_url: Some("https://bridge.example.com/voice".into()),
            },
        )
        .await;
    let ws_sig = compute_signature(token, "wss://bridge.example.com/media-stream", &[]);
    let caller =
        FakeTwilio::connect_with_headers(&app.ws_url(), &[("X-Twilio-Signature", &ws_sig)]).await;
    caller.start_from(&twiml, "MZ1", "CA1").await;
    caller.send_media(&[0x10; 160]).await;
    assert_eq!(caller.recv_audio_bytes(160).await, vec![0x10; 160]);
    caller.assert_no_violations();
}

/// `/calls/{sid}` of an unknown call and unknown paths are JSON 404s.
#[actix_web::test]
async fn unknown_calls_and_paths_are_json_404s() {
    let app = spawn_app(test_settings()).await;
    let (status, body) = app.get_json("/calls/CAnope").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("CAnope"));
    let (status, body) = app.get_json("/nope").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, body) = app.get_json("/calls").await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 0);
    assert_eq!(body["calls"], serde_json::json!([]));
}

/// With `CALLBRIDGE_ADMIN_TOKEN` set, `/calls` needs the bearer token; `/health` stays open.
#[actix_web::test]
async fn calls_require_the_admin_token_when_one_is_set() {
    let mut settings = test_settings();
    settings.secrets.admin_token = Some(SecretString::from("admin-secret-token"));
    let app = spawn_app(settings).await;
    let (status, body) = app.get_json("/calls").await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains("admin-secret-token"));
    let (status, _) = app
        .get_json_with("/calls", &[("Authorization", "Bearer wrong")])
        .await;
    assert_eq!(status, 401);
    let (status, body) = app
        .get_json_with("/calls", &[("Authorization", "Bearer admin-secret-token")])
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app.get_json("/health").await;
    assert_eq!(status, 200);
}

/// The dashboard's sign-in: the admin token once at `POST /login` for an `HttpOnly`,
/// `SameSite=Strict` session cookie that then stands for the token (until `POST /logout`); a
/// wrong token is 401 and sets nothing; a made-up cookie grants nothing.
#[actix_web::test]
async fn the_admin_token_is_exchanged_for_a_session_cookie() {
    let mut settings = test_settings();
    settings.secrets.admin_token = Some(SecretString::from("admin-secret-token"));
    let app = spawn_app(settings).await;
    let client = awc::Client::default();
    let login = |token: &str| {
        client
            .post(app.http("/login"))
            .insert_header(("Content-Type", "application/json"))
            .send_body(serde_json::json!({ "token": token }).to_string())
    };
    let mut wrong = login("wrong").await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let body = wrong.body().await.unwrap();
    assert!(!String::from_utf8_lossy(&body).contains("admin-secret-token"));

    let right = login("admin-secret-token").await.unwrap();
    assert_eq!(right.status().as_u16(), 204);
    let cookie = right
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("admin-secret-token"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    assert!(
        pair.starts_with("callbridge_session=") && pair.len() > 60,
        "{pair}"
    );

    let (status, body) = app.get_json_with("/calls", &[("Cookie", &pair)]).await;
    assert_eq!(status, 200, "{body}");
    let forged = format!("callbridge_session={}", "a".repeat(64));
    let (status, _) = app.get_json_with("/calls", &[("Cookie", &forged)]).await;
    assert_eq!(status, 401);

    let out = client
        .post(app.http("/logout"))
        .insert_header(("Cookie", pair.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status().as_u16(), 204);
    let (status, _) = app.get_json_with("/calls", &[("Cookie", &pair)]).await;
    assert_eq!(status, 401, "signed out");
}

/// The fallback after `</Connect>` says the configured sentence and dials the configured
/// number, escaped; Twilio plays it when callbridge closes the stream.
#[actix_web::test]
async fn voice_webhook_appends_the_configured_fallback() {
    let mut settings = test_settings();
    settings.fallback.say = "Back <soon> & sorry.".into();
    settings.fallback.dial = "+14155550199".into();
    let app = spawn_app(settings).await;
    let (status, _, body) = post_voice(&app.http("/voice"), FORM, None).await;
    assert_eq!(status, 200);
    assert!(
        body.ends_with(
            "</Stream></Connect><Say>Back &lt;soon&gt; &amp; sorry.</Say>\
             <Dial>+14155550199</Dial></Response>"
        ),
        "{body}"
    );
}

/// Past `server.max_calls`, `/voice` answers the fallback alone (no `<Connect>`) and a new
/// media stream gets 503; once a call ends, calls are taken again. `/health` shows the load.
#[actix_web::test]
async fn calls_past_max_calls_get_the_fallback_and_streams_are_refused() {
    let mut settings = test_settings();
    settings.server.max_calls = 1;
    let app = spawn_app(settings).await;
    let first = FakeTwilio::connect(&app.ws_url()).await;
    first.start_call("MZ_max1", "CA_max1", &[]).await;
    app.wait_call_count(1).await;

    let (status, _, body) = post_voice(&app.http("/voice"), FORM, None).await;
    assert_eq!(status, 200);
    assert!(!body.contains("<Connect>"), "{body}");
    assert!(body.contains("<Say>"), "{body}");
    assert_eq!(
        FakeTwilio::connect_expect_status(&app.ws_url(), &[]).await,
        503
    );
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["media_streams"], 1);
    assert_eq!(health["max_calls"], 1);

    first.hang_up().await;
    app.wait_call_count(0).await;
    let mut taken = false;
    for _ in 0..100 {
        let (_, _, body) = post_voice(&app.http("/voice"), FORM, None).await;
        if body.contains("<Connect>") {
            taken = true;
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(taken, "calls are taken again once the first ended");
    first.assert_no_violations();
}

/// A drain (SIGTERM): `/ready` answers 503 at once, new calls get the fallback and new streams
/// 503, the live call goes on (its audio still flows), and the server stops when it ends.
#[actix_web::test]
async fn a_drain_takes_no_new_calls_lets_live_ones_finish_then_stops() {
    let mut settings = test_settings();
    settings.server.drain_timeout_s = 30;
    let app = spawn_app(settings).await;
    assert_eq!(app.get_json("/ready").await.0, 200);
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZ_drain", "CA_drain", &[]).await;
    app.wait_call_count(1).await;

    app.start_drain();
    let (status, body) = app.get_json("/ready").await;
    assert_eq!(status, 503, "{body}");
    let (_, _, twiml) = post_voice(&app.http("/voice"), FORM, None).await;
    assert!(!twiml.contains("<Connect>"), "{twiml}");
    assert_eq!(
        FakeTwilio::connect_expect_status(&app.ws_url(), &[]).await,
        503
    );
    // The live call goes on: the echo still answers.
    caller.send_media(&[0x42; 160]).await;
    assert_eq!(caller.recv_audio_bytes(160).await, vec![0x42; 160]);
    assert!(!app.has_stopped());

    caller.hang_up().await;
    for _ in 0..300 {
        if app.has_stopped() {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        app.has_stopped(),
        "the server stops once the last call ended"
    );
    caller.assert_no_violations();
}

/// A drain whose live call does not end in `server.drain_timeout_s`: the call's socket is
/// closed (Twilio then plays the fallback) and the server stops.
#[actix_web::test]
async fn a_drain_closes_calls_still_live_at_its_timeout() {
    let mut settings = test_settings();
    settings.server.drain_timeout_s = 1;
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZ_drain2", "CA_drain2", &[]).await;
    app.wait_call_count(1).await;
    app.start_drain();
    assert!(caller.wait_closed().await, "closed at the drain timeout");
    for _ in 0..300 {
        if app.has_stopped() {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(app.has_stopped());
}

/// With signatures checked, `/voice` gives each call a stream token (a `<Parameter>`), and a
/// stream whose `start` does not carry its own call's token is closed (1008) before any caller
/// audio reaches OpenAI: a replayed upgrade signature (the signed string is the constant URL)
/// with no token, with another call's token, or with a token for a made-up call, gets nothing.
#[actix_web::test]
async fn a_stream_must_carry_the_token_issued_for_its_call() {
    let token = "stream-token-test-auth-token";
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.server.public_url = "https://bridge.example.com".into();
    settings.secrets.twilio_auth_token = Some(SecretString::from(token));
    settings.twilio.validate_signatures = None;
    let app = spawn_app(settings).await;
    let signing = Signing {
        auth_token: Some(token.into()),
        signed_url: Some("https://bridge.example.com/voice".into()),
    };
    let ws_sig = compute_signature(token, "wss://bridge.example.com/media-stream", &[]);
    let upgrade = [("X-Twilio-Signature", ws_sig.as_str())];

    // The genuine call: its token is in the TwiML, and its audio flows.
    let twiml = app.answer_call("CAgood", &signing).await;
    let (_, params) = twiml.stream().unwrap();
    let issued = params
        .iter()
        .find(|(k, _)| k == "callbridgeToken")
        .map(|(_, v)| v.clone())
        .expect("a stream token parameter");
    let caller = FakeTwilio::connect_with_headers(&app.ws_url(), &upgrade).await;
    let mut session = fake.next_session().await;
    caller.start_from(&twiml, "MZgood", "CAgood").await;
    session.recv_event("session.update").await;
    caller.send_media(&[0x21; 160]).await;
    assert_eq!(session.wait_appended_bytes(160).await, vec![0x21; 160]);

    // Replays of the same upgrade signature.
    let attempts: [(&str, Vec<(&str, &str)>); 3] = [
        ("CAforged", vec![]),
        ("CAforged", vec![("callbridgeToken", issued.as_str())]),
        (
            "CAforged",
            vec![("callbridgeToken", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")],
        ),
    ];
    for (n, (call_sid, params)) in attempts.iter().enumerate() {
        let attacker = FakeTwilio::connect_with_headers(&app.ws_url(), &upgrade).await;
        let session = fake.next_session().await;
        attacker
            .start_call(&format!("MZbad{n}"), call_sid, params)
            .await;
        for _ in 0..5 {
            attacker.send_media(&[0x66; 160]).await;
        }
        assert!(attacker.wait_closed().await, "attempt {n} not closed");
        assert_eq!(attacker.service_close_code(), Some(1008), "attempt {n}");
        assert!(
            session.wait_closed().await,
            "attempt {n}: OpenAI leg left open"
        );
        assert_eq!(
            session.append_count(),
            0,
            "attempt {n}: audio reached OpenAI"
        );
        assert_eq!(attacker.received_audio(), Vec::<u8>::new());
    }
    assert_eq!(app.ended("bad_stream_token").await, 3);
    // The replays never showed up as calls; the genuine one is untouched.
    let (_, calls) = app.get_json("/calls").await;
    assert_eq!(calls["count"], 1, "{calls}");
    caller.send_media(&[0x22; 160]).await;
    session.wait_appended_bytes(320).await;
    caller.hang_up().await;
    fake.assert_no_violations();
    caller.assert_no_violations();
}

/// With signature checks off (explicitly), there is no stream token to issue or check.
#[actix_web::test]
async fn without_signature_checks_there_is_no_stream_token() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let twiml = app.answer_call("CAopen", &Signing::default()).await;
    let (_, params) = twiml.stream().unwrap();
    assert!(
        params.iter().all(|(k, _)| k != "callbridgeToken"),
        "{params:?}"
    );
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZopen", "CAopen", &[]).await;
    session.recv_event("session.update").await;
    caller.send_media(&[0x31; 160]).await;
    session.wait_appended_bytes(160).await;
    caller.hang_up().await;
}

/// `/voice` without a CallSid of Twilio's format is a 400 (nothing to connect, nothing to log).
#[actix_web::test]
async fn voice_without_a_valid_call_sid_is_refused() {
    let app = spawn_app(test_settings()).await;
    for sid in ["", "CA\n[fake] injected", "CA<script>"] {
        let form = [("CallSid", sid), ("From", "+1"), ("To", "+2")];
        let (status, _, body) = post_voice(&app.http("/voice"), &form, None).await;
        assert_eq!(status, 400, "{sid:?}: {body}");
        assert!(body.contains("CallSid"), "{body}");
    }
}

/// A local address of this machine that is not loopback, if it has one: the source address of
/// a route to a non-local destination (a UDP `connect` sends nothing).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    [
        "192.0.2.1:9",
        "10.255.255.254:9",
        "172.31.255.254:9",
        "192.168.255.254:9",
    ]
    .iter()
    .find_map(|dest| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.connect(dest).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    })
}

/// Without an admin token, `/calls` answers the local host only: a request from another
/// address (this machine's own non-loopback address, the service listening on all of them)
/// gets 401 with a JSON error, and so does a local request relayed by a proxy (forwarding
/// headers). `/health` answers both.
#[actix_web::test]
async fn without_an_admin_token_calls_answer_loopback_peers_only() {
    let mut settings = test_settings();
    settings.server.host = "0.0.0.0".into();
    let app = spawn_app(settings).await;

    let (status, _) = app.get_json("/calls").await;
    assert_eq!(status, 200, "loopback peer");
    let (status, body) = app
        .get_json_with("/calls", &[("X-Forwarded-For", "203.0.113.9")])
        .await;
    assert_eq!(status, 401, "relayed by a local proxy: {body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("CALLBRIDGE_ADMIN_TOKEN"));

    let Some(ip) = non_loopback_address() else {
        // The peer check itself is unit-tested in src/routes.rs.
        eprintln!("no non-loopback address on this machine: the remote-peer half is skipped");
        return;
    };
    let url = |path: &str| format!("http://{ip}:{}{path}", app.port);
    for path in ["/calls", "/calls/CA1"] {
        let mut res = awc::Client::default()
            .get(url(path))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("answered");
        assert_eq!(res.status().as_u16(), 401, "{path} from {ip}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("local host"),
            "{body}"
        );
    }
    let res = awc::Client::default()
        .get(url("/health"))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status().as_u16(), 200, "/health from {ip}");
}
