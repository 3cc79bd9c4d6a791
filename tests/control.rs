//! End-to-end: the operator API (hang up, transfer, say) through the fake Twilio REST API. After
//! Twilio takes a hang-up or transfer it ends the stream (`stop`), which the fake harness sends
//! as Twilio would; the call then ends as `hung_up` / `transferred`, not as a failure.

mod support;

use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use callbridge_fakes::twilio_rest::{Account, FakeTwilioRest};
use callbridge_fakes::twiml::Verb;
use secrecy::SecretString;
use support::{openai_settings, spawn_app, FakeOpenAi, FakeTwilio, MarkMode, TestApp};

const SID: &str = "CA0123456789abcdef0123456789abcdef";
const CALLER: &str = "+14155550100";
const DIALLED: &str = "+14155550199";

struct Rig {
    app: TestApp,
    rest: FakeTwilioRest,
    fake: FakeOpenAi,
    caller: FakeTwilio,
    session: callbridge_fakes::openai::FakeSession,
}

async fn rig(tune: impl FnOnce(&mut callbridge::Settings)) -> Rig {
    let account = Account::test();
    let rest = FakeTwilioRest::start(account.clone()).await;
    rest.add_live_call(SID, CALLER, DIALLED);
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.twilio.api_base = rest.base_url();
    settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
    settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
    settings.call.transfer_allow = vec!["+1415".into(), "sip:desk@".into()];
    tune(&mut settings);
    let token = settings
        .secrets
        .admin_token
        .as_ref()
        .map(|t| format!("Bearer {}", secrecy::ExposeSecret::expose_secret(t)));
    let app = spawn_app(settings).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller
        .start_call("MZctl", SID, &[("From", CALLER), ("To", DIALLED)])
        .await;
    session.recv_event("session.update").await;
    let auth: Vec<(&str, &str)> = token
        .iter()
        .map(|t| ("Authorization", t.as_str()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.get_json_with(&format!("/calls/{SID}"), &auth).await.1["state"] != "active" {
        assert!(Instant::now() < deadline, "the call never became active");
        sleep(Duration::from_millis(10)).await;
    }
    Rig {
        app,
        rest,
        fake,
        caller,
        session,
    }
}

async fn post(
    app: &TestApp,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = awc::Client::default()
        .post(app.http(path))
        .insert_header(("Content-Type", "application/json"))
        .timeout(Duration::from_secs(5));
    if let Some(token) = token {
        req = req.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let mut res = req.send_body(body.to_owned()).await.expect("answered");
    let json = res.json().await.unwrap_or(serde_json::Value::Null);
    (res.status().as_u16(), json)
}

/// Twilio's part after a REST update that ends the stream: `stop`, then the close.
async fn twilio_ends_the_stream(rig: &Rig) {
    let ended = rig.rest.on_stream_end(SID);
    tokio::time::timeout(Duration::from_secs(12), ended)
        .await
        .expect("a REST request that ends the stream");
    rig.caller.hang_up().await;
}

/// A hang-up without words: at once through REST (`Status=completed`); Twilio's stop then ends
/// the call as `hung_up`, with no restart and no fallback.
#[actix_web::test]
async fn hangup_ends_the_call_through_twilio() {
    let rig = rig(|_| {}).await;
    let (status, body) = post(&rig.app, &format!("/calls/{SID}/hangup"), "{}", None).await;
    assert_eq!(status, 202, "{body}");
    twilio_ends_the_stream(&rig).await;
    let updates = rig.rest.updates_for(SID);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].param("Status"), Some("completed"));
    rig.app.wait_ended("hung_up", Duration::from_secs(3)).await;
    assert_eq!(rig.app.ended("twilio_stop").await, 0);
    assert!(rig.session.wait_closed().await);
    assert_eq!(rig.fake.session_count(), 1, "no restart");
    rig.rest.assert_no_violations();
}

/// With a goodbye: the assistant is asked to say it, and the REST hang-up waits until its last
/// chunk's mark is echoed (the caller heard it).
#[actix_web::test]
async fn hangup_after_the_goodbye_has_played() {
    let mut rig = rig(|_| {}).await;
    rig.caller.set_mark_mode(MarkMode::Manual);
    let (status, _) = post(
        &rig.app,
        &format!("/calls/{SID}/hangup"),
        r#"{"goodbye": "Thank the caller and say goodbye."}"#,
        None,
    )
    .await;
    assert_eq!(status, 202);
    let create = rig.session.recv_event("response.create").await;
    assert!(create
        .to_string()
        .contains("Thank the caller and say goodbye."));
    rig.session.start_response("r9", "i9");
    rig.session.audio_delta_bytes("r9", "i9", &[0x61; 1_600]);
    rig.session
        .finish_response("r9", "i9", "Thanks for calling, goodbye!");
    rig.caller.recv_audio_bytes(1_600).await;
    sleep(Duration::from_millis(300)).await;
    assert!(
        rig.rest.updates_for(SID).is_empty(),
        "hung up before the goodbye played"
    );
    rig.caller.play(200).await; // the caller hears it: marks echo
    let played = Instant::now();
    twilio_ends_the_stream(&rig).await;
    let update = &rig.rest.updates_for(SID)[0];
    assert!(
        update.at >= played,
        "the REST request came before the marks were echoed"
    );
    rig.app.wait_ended("hung_up", Duration::from_secs(3)).await;
    rig.rest.assert_no_violations();
}

/// A goodbye that never plays (the caller's marks never come back) is bounded by
/// `call.goodbye_timeout_ms`.
#[actix_web::test]
async fn a_goodbye_that_never_plays_is_bounded() {
    let mut rig = rig(|s| s.call.goodbye_timeout_ms = 600).await;
    rig.caller.set_mark_mode(MarkMode::Manual);
    let asked = Instant::now();
    post(
        &rig.app,
        &format!("/calls/{SID}/hangup"),
        r#"{"goodbye": "Say goodbye."}"#,
        None,
    )
    .await;
    rig.session.recv_event("response.create").await;
    rig.session.start_response("r9", "i9");
    rig.session.audio_delta_bytes("r9", "i9", &[0x61; 800]);
    rig.session.finish_response("r9", "i9", "Goodbye!");
    twilio_ends_the_stream(&rig).await;
    let waited = rig.rest.updates_for(SID)[0].at.duration_since(asked);
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_millis(2_000),
        "{waited:?}"
    );
    rig.app.wait_ended("hung_up", Duration::from_secs(3)).await;
}

/// A transfer to an allowed target: `<Dial>` TwiML through REST, the caller ID the number the
/// caller dialled; Twilio's stop then ends the call as `transferred`. A target not allowed is a
/// 403 and no request to Twilio.
#[actix_web::test]
async fn transfer_allowed_and_refused() {
    let rig = rig(|_| {}).await;
    for (body, want) in [
        (r#"{"to": "+12125550100"}"#, 403),
        (r#"{"to": "sip:other@example.com"}"#, 403),
        (r#"{"to": "not a number"}"#, 400),
        (r#"{"to": "+14155550123", "extra": 1}"#, 400),
    ] {
        let (status, json) = post(&rig.app, &format!("/calls/{SID}/transfer"), body, None).await;
        assert_eq!(status, want, "{body}: {json}");
        assert!(json["error"].is_string());
    }
    assert!(
        rig.rest.requests().is_empty(),
        "a refused transfer reached Twilio"
    );
    let (status, _) = post(
        &rig.app,
        &format!("/calls/{SID}/transfer"),
        r#"{"to": "+14155550123"}"#,
        None,
    )
    .await;
    assert_eq!(status, 202);
    twilio_ends_the_stream(&rig).await;
    let update = &rig.rest.updates_for(SID)[0];
    let twiml = callbridge_fakes::twiml::parse(update.param("Twiml").expect("Twiml")).unwrap();
    let dial = twiml
        .verbs
        .iter()
        .find_map(|v| match v {
            Verb::Dial(dial) => Some(dial.clone()),
            _ => None,
        })
        .expect("a <Dial>");
    assert_eq!(dial.caller_id.as_deref(), Some(DIALLED));
    assert!(format!("{:?}", dial.nouns).contains("+14155550123"));
    rig.app
        .wait_ended("transferred", Duration::from_secs(3))
        .await;
    rig.rest.assert_no_violations();
}

/// `say`: the assistant's next turn carries the exact words; an unknown call is a 404; with an
/// admin token, a request without it is a 401 and never reaches the call.
#[actix_web::test]
async fn say_auth_and_unknown_calls() {
    let mut rig = rig(|s| {
        s.secrets.admin_token = Some(SecretString::from("admin-token-ctl"));
    })
    .await;
    let (status, _) = post(
        &rig.app,
        &format!("/calls/{SID}/say"),
        r#"{"text": "Hi"}"#,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post(
        &rig.app,
        "/calls/CAnope/hangup",
        "{}",
        Some("admin-token-ctl"),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post(
        &rig.app,
        &format!("/calls/{SID}/say"),
        r#"{"text": "Your table is booked for 7 pm."}"#,
        Some("admin-token-ctl"),
    )
    .await;
    assert_eq!(status, 202);
    let create = rig.session.recv_event("response.create").await;
    assert!(
        create["response"]["instructions"]
            .as_str()
            .unwrap()
            .contains("\"Your table is booked for 7 pm.\""),
        "{create}"
    );
    assert!(rig.rest.requests().is_empty());
    rig.caller.hang_up().await;
}

/// Without Twilio REST credentials, a hang-up is a 503 naming what to set.
#[actix_web::test]
async fn without_rest_credentials_hangup_is_unavailable() {
    let rig = rig(|s| s.secrets.twilio_account_sid = None).await;
    let (status, body) = post(&rig.app, &format!("/calls/{SID}/hangup"), "{}", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("TWILIO_ACCOUNT_SID"));
    rig.caller.hang_up().await;
}

/// `POST /calls`: an outbound call through Twilio whose `Url` is this service's `/voice` (with
/// a query that the signature covers); when the callee answers, the fake Twilio fetches it,
/// signed, and the call flows like an inbound one, with its greeting and `params`, shown as
/// `direction: outbound`. A Twilio error answers 502 with Twilio's code.
#[actix_web::test]
async fn outbound_calls_flow_like_inbound_ones() {
    let account = Account::test();
    let rest = FakeTwilioRest::start(account.clone()).await;
    rest.add_number("+14155550142");
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.twilio.api_base = rest.base_url();
    settings.twilio.validate_signatures = None; // the fake Twilio signs its webhooks
    settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
    settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
    let app = spawn_app(settings).await;

    let (status, body) = post(
        &app,
        "/calls",
        r#"{"to": "+14155550177", "from": "+14155550142", "greeting": "Remind the caller of the 3 pm appointment.", "params": {"patient": "4411", "tries": 2}}"#,
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let sid = body["call_sid"].as_str().expect("call_sid").to_owned();
    let created = rest.created_calls();
    assert_eq!(created.len(), 1);
    let request = rest
        .requests()
        .into_iter()
        .find(|r| r.call_sid.is_none())
        .unwrap();
    let url = request.param("Url").unwrap();
    assert!(url.starts_with(&app.http("/voice?cbOutbound=")), "{url}");
    assert_eq!(request.param("To"), Some("+14155550177"));
    let (_, health) = app.get_json("/health").await;
    assert_eq!(health["outbound_pending"], 1, "{health}");

    let twiml = rest
        .answer_created_call(&sid)
        .await
        .expect("the callee answers");
    let (stream_url, params) = twiml.stream().expect("<Connect><Stream>");
    // Twilio signs the upgrade over the stream URL the TwiML gave it.
    let signature = support::compute_signature(&account.auth_token, stream_url, &[]);
    let caller =
        FakeTwilio::connect_with_headers(&app.ws_url(), &[("X-Twilio-Signature", &signature)])
            .await;
    let mut session = fake.next_session().await;
    caller.start_from(&twiml, "MZout", &sid).await;
    assert!(params.iter().any(|(k, v)| k == "patient" && v == "4411"));
    let create = session.recv_event("response.create").await;
    assert!(
        create
            .to_string()
            .contains("Remind the caller of the 3 pm appointment."),
        "{create}"
    );
    let call = app
        .wait_call(&sid, "active", |c| c["state"] == "active")
        .await;
    assert_eq!(call["direction"], "outbound", "{call}");
    assert_eq!(call["params"]["patient"], "4411");
    assert_eq!(call["params"]["tries"], "2");
    assert_eq!(app.get_json("/health").await.1["outbound_pending"], 0);
    caller.hang_up().await;

    // A From the account does not own: Twilio's error, as a 502 with its code.
    let (status, body) = post(
        &app,
        "/calls",
        r#"{"to": "+14155550177", "from": "+19995550100"}"#,
        None,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], 21210);
    assert_eq!(app.get_json("/health").await.1["outbound_pending"], 0);
    rest.assert_no_violations();
}

/// An outbound call that is never answered lets go of its greeting and params when Twilio's
/// status callback says so (busy), and the callback's signature is checked.
#[actix_web::test]
async fn an_unanswered_outbound_call_is_forgotten() {
    let account = Account::test();
    let rest = FakeTwilioRest::start(account.clone()).await;
    rest.add_number("+14155550142");
    let mut settings = support::test_settings();
    settings.twilio.api_base = rest.base_url();
    settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
    settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
    let app = spawn_app(settings).await;
    let (status, body) = post(
        &app,
        "/calls",
        r#"{"to": "+14155550177", "from": "+14155550142"}"#,
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let sid = body["call_sid"].as_str().unwrap().to_owned();
    assert_eq!(app.get_json("/health").await.1["outbound_pending"], 1);
    let answer = rest
        .complete_created_call(&sid, callbridge_fakes::twilio_rest::CallStatus::Busy)
        .await
        .expect("the status callback")
        .expect("an answer");
    assert_eq!(answer.status, 204);
    assert_eq!(app.get_json("/health").await.1["outbound_pending"], 0);
    // Bad input never reaches Twilio.
    for body in [
        r#"{"to": "12345", "from": "+14155550142"}"#,
        r#"{"to": "+14155550177", "from": "+14155550142", "params": {"CallSid": "x"}}"#,
        r#"{"to": "+14155550177"}"#,
    ] {
        let (status, _) = post(&app, "/calls", body, None).await;
        assert_eq!(status, 400, "{body}");
    }
    assert_eq!(rest.created_calls().len(), 1);
    rest.assert_no_violations();
}
