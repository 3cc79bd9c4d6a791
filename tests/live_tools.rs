//! End-to-end: tools and call control on GPT-Live, against the strict fake GPT-Live server.
//! Tools go through Responses delegation (`gpt-live.md` §9.2): declared in `session.start`, a
//! delegated function call runs at its `[[tools]]` endpoint (signed; the fake receiver checks
//! with its own HMAC), its output and the `response.create` after it, error outputs, a slow
//! tool's filler, the built-ins `end_call` and `transfer_call` through the fake Twilio REST API,
//! the backend's tokens in the usage and the report, and a client delegation declined when no
//! tools are declared. The operator's say and goodbye as commentary.

mod support;

use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use callbridge_actors::tools::ToolConfig;
use callbridge_fakes::live::{AppendKind, FakeLive, FakeLiveSession};
use callbridge_fakes::receiver::{Answer, FakeReceiver};
use callbridge_fakes::twilio_rest::{Account, FakeTwilioRest};
use secrecy::SecretString;
use serde_json::{json, Value};
use support::{live_settings, spawn_app, FakeTwilio, TestApp};

const SID: &str = "CA0123456789abcdef0123456789abcdef";
const SECRET: &str = "live-tools-secret";

fn lookup(url: String) -> ToolConfig {
    ToolConfig {
        name: "lookup_order".into(),
        description: "Look up an order by its id.".into(),
        parameters: json!({"type": "object", "properties": {"order_id": {"type": "string"}}}),
        url,
        timeout_ms: 2_000,
    }
}

async fn start(app: &TestApp, fake: &FakeLive) -> (FakeTwilio, FakeLiveSession) {
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller
        .start_call(
            "MZlivetool",
            SID,
            &[("From", "+14155550100"), ("To", "+14155550199")],
        )
        .await;
    session.wait_session_start().await;
    app.wait_call(SID, "active", |c| c["state"] == "active")
        .await;
    (caller, session)
}

/// A GPT-Live call whose account has Twilio's REST API (the fake), settings tuned by `tune`.
async fn with_rest(
    tune: impl FnOnce(&mut callbridge::Settings),
) -> (
    TestApp,
    FakeTwilioRest,
    FakeLive,
    FakeTwilio,
    FakeLiveSession,
) {
    let account = Account::test();
    let rest = FakeTwilioRest::start(account.clone()).await;
    rest.add_live_call(SID, "+14155550100", "+14155550199");
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.twilio.api_base = rest.base_url();
    settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
    settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
    tune(&mut settings);
    let app = spawn_app(settings).await;
    let (caller, session) = start(&app, &fake).await;
    (app, rest, fake, caller, session)
}

/// The `function_call_output` the service sent for `call_id` (`response.item.create`).
async fn output_for(session: &FakeLiveSession, call_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(item) = session
            .item_creates()
            .into_iter()
            .find(|i| i["type"] == "function_call_output" && i["call_id"] == call_id)
        {
            return item;
        }
        assert!(Instant::now() < deadline, "no output for {call_id}");
        sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_response_creates(session: &FakeLiveSession, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while session.response_create_count() < n {
        assert!(
            Instant::now() < deadline,
            "{} response.create, wanted {n}",
            session.response_create_count()
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// Tools are declared as Responses delegation; a completed delegated call runs once at its
/// endpoint (signed), its exact answer goes back as the output followed by `response.create`,
/// and the transcript shows it. A call cut short is not run. The backend's tokens are in the
/// call's usage, not in its cost.
#[actix_web::test]
async fn a_delegated_tool_call_runs_and_its_output_goes_back() {
    let tool_server = FakeReceiver::start(Some(SECRET)).await;
    tool_server.answer_always(Answer::ok(r#"{"status":"shipped","eta":"Friday"}"#));
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/tools/lookup"))];
    settings.secrets.tools_secret = Some(SecretString::from(SECRET));
    settings.openai.live_delegation_model = "gpt-5.5".into();
    settings.openai.live_delegation_instructions = "You are the order backend.".into();
    let app = spawn_app(settings).await;
    let (caller, session) = start(&app, &fake).await;
    let delegation = session.session_config()["delegation"].clone();
    assert_eq!(delegation["type"], "responses", "{delegation}");
    assert_eq!(delegation["responses"]["model"], "gpt-5.5");
    assert_eq!(
        delegation["responses"]["instructions"],
        "You are the order backend."
    );
    assert_eq!(
        delegation["responses"]["tools"][0]["name"], "lookup_order",
        "{delegation}"
    );

    session.delegate_to_responses("dlg_1", "resp_1");
    session.function_call_cut_short("dlg_1", "call_0", "lookup_order", "incomplete");
    session.function_call("dlg_1", "call_1", "lookup_order", r#"{"order_id":"A123"}"#);
    let output = output_for(&session, "call_1").await;
    assert_eq!(output["output"], r#"{"status":"shipped","eta":"Friday"}"#);
    wait_response_creates(&session, 1).await;
    let got = tool_server.received();
    assert_eq!(got.len(), 1, "only the completed call runs");
    assert_eq!(
        got[0].body,
        json!({"call_sid": SID, "tool": "lookup_order", "arguments": {"order_id": "A123"}, "call_id": "call_1"})
    );
    assert_eq!(got[0].header("x-callbridge-call-sid"), Some(SID));

    session.response_completed("dlg_1", "resp_1");
    let call = app
        .wait_call(SID, "delegated usage", |c| {
            c["usage"]["delegated"]["input_tokens"] == 100
        })
        .await;
    assert_eq!(call["usage"]["delegated"]["model"], "gpt-5.5", "{call}");
    assert_eq!(call["usage"]["delegated"]["output_tokens"], 10);
    let tool_lines: Vec<&Value> = call["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["role"] == "tool")
        .collect();
    assert_eq!(tool_lines.len(), 1, "{call}");
    assert!(tool_lines[0]["text"]
        .as_str()
        .unwrap()
        .starts_with("lookup_order: ok"));
    assert!(
        session.calls_awaiting_output().is_empty(),
        "{:?}",
        session.calls_awaiting_output()
    );
    caller.hang_up().await;
    app.wait_call_count(0).await;
    tool_server.assert_no_violations();
    fake.assert_no_violations();
}

/// An unknown tool and arguments that are not JSON are error outputs, each followed by
/// `response.create`; the call goes on and audio still flows.
#[actix_web::test]
async fn delegated_tool_failures_are_error_outputs() {
    let tool_server = FakeReceiver::start(None).await;
    tool_server.answer_always(Answer::status(500));
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/t"))];
    let app = spawn_app(settings).await;
    let (caller, session) = start(&app, &fake).await;
    session.delegate_to_responses("dlg_1", "resp_1");
    let cases = [
        ("c500", "lookup_order", r#"{"order_id":"1"}"#, "HTTP 500"),
        ("cnope", "reboot_server", "{}", "no tool named"),
        ("cbad", "lookup_order", "{not json", "not a JSON object"),
    ];
    for (n, (call_id, name, args, why)) in cases.iter().enumerate() {
        session.function_call("dlg_1", call_id, name, args);
        let output = output_for(&session, call_id).await;
        let error: Value = serde_json::from_str(output["output"].as_str().unwrap()).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(why),
            "{call_id}: {error}"
        );
        wait_response_creates(&session, n + 1).await;
    }
    assert_eq!(tool_server.received().len(), 1);
    assert_eq!(app.call(SID).await["state"], "active");
    caller.send_media(&[0x15; 160]).await;
    session.wait_appended_bytes(160).await;
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// The built-in `end_call` on GPT-Live: the call ends through Twilio's REST API and the
/// backend is not asked to go on.
#[actix_web::test]
async fn builtin_end_call_on_live() {
    let (app, rest, fake, caller, session) = with_rest(|s| {
        s.call.builtin_tools = vec!["end_call".into()];
    })
    .await;
    let tools = session.session_config()["delegation"]["responses"]["tools"].clone();
    assert_eq!(tools[0]["name"], "end_call", "{tools}");
    session.delegate_to_responses("dlg_1", "resp_1");
    session.function_call("dlg_1", "c1", "end_call", "{}");
    let done = output_for(&session, "c1").await;
    assert_eq!(done["output"], r#"{"ok":true}"#);
    tokio::time::timeout(Duration::from_secs(10), rest.on_stream_end(SID))
        .await
        .expect("the REST request");
    assert_eq!(rest.updates_for(SID)[0].param("Status"), Some("completed"));
    caller.hang_up().await;
    app.wait_ended("hung_up", Duration::from_secs(3)).await;
    assert_eq!(session.response_create_count(), 0, "asked to go on");
    rest.assert_no_violations();
    fake.assert_no_violations();
}

/// Without tools the session uses client delegation; a delegation to us is declined with a
/// short commentary carrying its id (§9.1), so the model does not wait for an answer.
#[actix_web::test]
async fn without_tools_a_client_delegation_is_declined() {
    let fake = FakeLive::start().await;
    let app = spawn_app(live_settings(&fake)).await;
    let (caller, session) = start(&app, &fake).await;
    assert_eq!(session.session_config()["delegation"]["type"], "client");
    session.delegate_to_client("dlg_c");
    let appends = session.wait_text_appends(AppendKind::Commentary, 1).await;
    let decline = appends
        .iter()
        .find(|a| a.delegation_id.as_deref() == Some("dlg_c"))
        .expect("a commentary for the delegation");
    assert!(decline.content.contains("cannot do that"), "{decline:?}");
    caller.hang_up().await;
    fake.assert_no_violations();
}

/// The operator API on GPT-Live: `say` goes as a commentary carrying the exact words; a hang-up
/// with a goodbye goes as the next commentary (after the assistant's turn in flight), and the
/// REST hang-up waits until the goodbye's audio has played (its marks echoed).
#[actix_web::test]
async fn say_and_a_goodbye_on_live() {
    let (app, rest, fake, caller, session) = with_rest(|_| {}).await;
    caller.set_mark_mode(support::MarkMode::Manual);
    let client = awc::Client::default();
    let post = |path: String, body: &'static str| {
        client
            .post(app.http(&path))
            .insert_header(("Content-Type", "application/json"))
            .send_body(body)
    };
    let said = post(
        format!("/calls/{SID}/say"),
        r#"{"text": "Your table is booked for 7 pm."}"#,
    )
    .await
    .unwrap();
    assert_eq!(said.status().as_u16(), 202);
    let appends = session.wait_text_appends(AppendKind::Commentary, 1).await;
    assert!(
        appends[0]
            .content
            .contains("Your table is booked for 7 pm."),
        "{appends:?}"
    );
    // The model says it (its turn), then the operator hangs up with a goodbye.
    session.output_transcript("Your table is booked for 7 pm.", 1_000, 2_000);
    let bye = post(
        format!("/calls/{SID}/hangup"),
        r#"{"goodbye": "Thank the caller and say goodbye."}"#,
    )
    .await
    .unwrap();
    assert_eq!(bye.status().as_u16(), 202);
    let appends = session.wait_text_appends(AppendKind::Commentary, 2).await;
    assert!(appends[1]
        .content
        .contains("Thank the caller and say goodbye."));
    session.output_transcript("Thanks for calling, goodbye!", 3_000, 4_000);
    session.audio_delta_bytes(&[0x61; 1_600]);
    caller.recv_audio_bytes(1_600).await;
    sleep(Duration::from_millis(1_200)).await; // the turn is over, the audio not yet heard
    assert!(
        rest.updates_for(SID).is_empty(),
        "hung up before the goodbye played"
    );
    caller.play(200).await; // the caller hears it: marks echo
    let played = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), rest.on_stream_end(SID))
        .await
        .expect("the REST hang-up");
    let update = &rest.updates_for(SID)[0];
    assert_eq!(update.param("Status"), Some("completed"));
    assert!(update.at >= played, "before the marks were echoed");
    caller.hang_up().await;
    app.wait_ended("hung_up", Duration::from_secs(3)).await;
    rest.assert_no_violations();
    fake.assert_no_violations();
}

/// The end-of-call report of a GPT-Live call: sent once the session's final usage is in (its
/// seconds, the cost at $0.05 a minute, the delegated backend's tokens), with the tool line in
/// the transcript; signed.
#[actix_web::test]
async fn the_report_of_a_live_call_carries_its_final_usage_and_tool_calls() {
    let receiver = FakeReceiver::start(Some(SECRET)).await;
    let tool_server = FakeReceiver::start(Some(SECRET)).await;
    tool_server.answer_always(Answer::ok(r#"{"status":"shipped"}"#));
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/t"))];
    settings.report.url = receiver.url("/calls/ended");
    settings.secrets.tools_secret = Some(SecretString::from(SECRET));
    let app = spawn_app(settings).await;
    let (caller, session) = start(&app, &fake).await;
    session.delegate_to_responses("dlg_1", "resp_1");
    session.function_call("dlg_1", "call_1", "lookup_order", r#"{"order_id":"A1"}"#);
    output_for(&session, "call_1").await;
    session.response_completed("dlg_1", "resp_1");
    session.usage_updated(30.0, None);
    session.set_final_usage(48.0);
    app.wait_call(SID, "delegated usage", |c| {
        c["usage"]["delegated"]["input_tokens"] == 100
    })
    .await;
    caller.hang_up().await;

    let got = receiver.wait_received(1, Duration::from_secs(15)).await;
    let body = &got[0].body;
    assert_eq!(got[0].header("x-callbridge-call-sid"), Some(SID));
    assert_eq!(body["api"], "live");
    assert_eq!(body["end_reason"], "twilio_stop");
    assert_eq!(body["usage"]["seconds"], 48.0, "the final value: {body}");
    assert_eq!(body["cost_usd"], 0.04, "48 s at $0.05 a minute");
    assert_eq!(body["usage"]["delegated"]["output_tokens"], 10);
    let tool_lines = body["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["role"] == "tool")
        .count();
    assert_eq!(tool_lines, 1, "{body}");
    receiver.assert_no_violations();
    fake.assert_no_violations();
}

/// The built-in `transfer_call` on GPT-Live: a target `call.transfer_allow` refuses is an error
/// output (and the backend goes on); an allowed one is a `<Dial>` through REST.
#[actix_web::test]
async fn builtin_transfer_call_on_live() {
    let (app, rest, fake, caller, session) = with_rest(|s| {
        s.call.builtin_tools = vec!["transfer_call".into()];
        s.call.transfer_allow = vec!["+1415".into()];
    })
    .await;
    session.delegate_to_responses("dlg_1", "resp_1");
    session.function_call("dlg_1", "c0", "transfer_call", r#"{"to":"+12125550100"}"#);
    let refused = output_for(&session, "c0").await;
    assert!(refused["output"].as_str().unwrap().contains("not allowed"));
    wait_response_creates(&session, 1).await;
    assert!(rest.updates_for(SID).is_empty(), "no REST request");
    session.function_call("dlg_1", "c1", "transfer_call", r#"{"to":"+14155550123"}"#);
    let done = output_for(&session, "c1").await;
    assert_eq!(done["output"], r#"{"ok":true}"#);
    tokio::time::timeout(Duration::from_secs(10), rest.on_stream_end(SID))
        .await
        .expect("the REST request");
    assert!(rest.updates_for(SID)[0]
        .param("Twiml")
        .unwrap()
        .contains("+14155550123"));
    caller.hang_up().await;
    app.wait_ended("transferred", Duration::from_secs(3)).await;
    assert_eq!(session.response_create_count(), 1, "not after the transfer");
    rest.assert_no_violations();
    fake.assert_no_violations();
}

/// A slow delegated tool (longer than `call.tool_filler_after_ms`) gets one short filler, as a
/// commentary, while it runs; its output still goes back afterwards.
#[actix_web::test]
async fn a_slow_delegated_tool_gets_one_filler() {
    let tool_server = FakeReceiver::start(None).await;
    tool_server.answer_next(Answer {
        status: 200,
        body: r#"{"ok":true}"#.into(),
        delay: Duration::from_millis(1_000),
    });
    let fake = FakeLive::start().await;
    let mut settings = live_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/t"))];
    settings.call.tool_filler_after_ms = 200;
    let app = spawn_app(settings).await;
    let (caller, session) = start(&app, &fake).await;
    session.delegate_to_responses("dlg_1", "resp_1");
    session.function_call("dlg_1", "slow", "lookup_order", r#"{"order_id":"9"}"#);
    let appends = session.wait_text_appends(AppendKind::Commentary, 1).await;
    assert!(appends[0].content.contains("still checking"), "{appends:?}");
    assert!(
        session.item_creates().is_empty(),
        "the filler came after the output"
    );
    let output = output_for(&session, "slow").await;
    assert_eq!(output["output"], r#"{"ok":true}"#);
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        session.commentary().len(),
        1,
        "one filler: {:?}",
        session.commentary()
    );
    caller.hang_up().await;
    fake.assert_no_violations();
}
