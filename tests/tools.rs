//! End-to-end: tools the model calls (Realtime `function_call` items): a `[[tools]]` endpoint
//! (the fake receiver, checking the signature with its own HMAC), its failures as error
//! outputs, and the built-in `end_call` / `transfer_call` through the fake Twilio REST API.

mod support;

use std::time::Duration;

use actix_web::rt::time::sleep;
use callbridge_actors::tools::ToolConfig;
use callbridge_fakes::receiver::{Answer, FakeReceiver};
use callbridge_fakes::twilio_rest::{Account, FakeTwilioRest};
use secrecy::SecretString;
use serde_json::{json, Value};
use support::{openai_settings, spawn_app, FakeOpenAi, FakeSession, FakeTwilio, TestApp};

const SID: &str = "CAfedcba9876543210fedcba9876543210";
const SECRET: &str = "tools-secret-e2e";

fn lookup(url: String, timeout_ms: u64) -> ToolConfig {
    ToolConfig {
        name: "lookup_order".into(),
        description: "Look up an order by its id.".into(),
        parameters: json!({"type": "object", "properties": {"order_id": {"type": "string"}}}),
        url,
        timeout_ms,
    }
}

/// The model calls `name` with `arguments` (a completed response with one `function_call`).
fn model_calls(
    session: &FakeSession,
    response_id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
) {
    session.send(json!({
        "type": "response.done",
        "response": {"id": response_id, "status": "completed", "output": [{
            "type": "function_call", "id": format!("item_{call_id}"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": "completed"}]}
    }));
}

/// The `function_call_output` the service sent for `call_id`.
async fn output_for(session: &mut FakeSession, call_id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(item) = session
            .events_of_type("conversation.item.create")
            .into_iter()
            .find(|e| {
                e["item"]["type"] == "function_call_output" && e["item"]["call_id"] == call_id
            })
        {
            return item["item"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no output for {call_id}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

async fn start(app: &TestApp, fake: &FakeOpenAi) -> (FakeTwilio, FakeSession) {
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller
        .start_call(
            "MZtool",
            SID,
            &[("From", "+14155550100"), ("To", "+14155550199")],
        )
        .await;
    session.recv_event("session.update").await;
    app.wait_call(SID, "active", |c| c["state"] == "active")
        .await;
    (caller, session)
}

/// A tool called and answered: the signed request has the call, the tool, the parsed
/// arguments and the call id; the exact answer reaches the model as the output, then a
/// response is asked for; the transcript shows the tool. A call id is never run twice.
#[actix_web::test]
async fn a_tool_is_called_and_its_answer_reaches_the_model() {
    let tool_server = FakeReceiver::start(Some(SECRET)).await;
    tool_server.answer_always(Answer::ok(r#"{"status":"shipped","eta":"Friday"}"#));
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/tools/lookup"), 2_000)];
    settings.secrets.tools_secret = Some(SecretString::from(SECRET));
    let app = spawn_app(settings).await;
    let (caller, mut session) = start(&app, &fake).await;
    let tools = session.session_config()["tools"].clone();
    assert_eq!(tools[0]["name"], "lookup_order", "{tools}");

    model_calls(
        &session,
        "rt1",
        "call_1",
        "lookup_order",
        r#"{"order_id":"A123"}"#,
    );
    let output = output_for(&mut session, "call_1").await;
    assert_eq!(output["output"], r#"{"status":"shipped","eta":"Friday"}"#);
    session.recv_event("response.create").await;
    let got = tool_server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].body,
        json!({"call_sid": SID, "tool": "lookup_order", "arguments": {"order_id": "A123"}, "call_id": "call_1"})
    );
    assert_eq!(got[0].header("x-callbridge-call-sid"), Some(SID));

    model_calls(
        &session,
        "rt1b",
        "call_1",
        "lookup_order",
        r#"{"order_id":"A123"}"#,
    );
    sleep(Duration::from_millis(300)).await;
    assert_eq!(tool_server.received().len(), 1, "run twice");
    let call = app.call(SID).await;
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
    caller.hang_up().await;
    tool_server.assert_no_violations();
}

/// Every way a tool can fail goes back to the model as an error output, and the call goes on:
/// a 500, a timeout, too long an answer, an unknown tool, arguments that are not JSON.
#[actix_web::test]
async fn tool_failures_are_error_outputs_and_the_call_goes_on() {
    let tool_server = FakeReceiver::start(None).await;
    tool_server.answer_next(Answer::status(500));
    tool_server.answer_next(Answer {
        status: 200,
        body: "{}".into(),
        delay: Duration::from_millis(1_500),
    });
    tool_server.answer_next(Answer::ok(&"x".repeat(200)));
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/t"), 400)];
    settings.call.tool_output_max_bytes = 64;
    let app = spawn_app(settings).await;
    let (caller, mut session) = start(&app, &fake).await;
    let cases = [
        ("c500", "lookup_order", r#"{"order_id":"1"}"#, "HTTP 500"),
        ("cslow", "lookup_order", r#"{"order_id":"2"}"#, "in time"),
        (
            "cbig",
            "lookup_order",
            r#"{"order_id":"3"}"#,
            "over 64 bytes",
        ),
        ("cnope", "reboot_server", "{}", "no tool named"),
        ("cbad", "lookup_order", "{not json", "not a JSON object"),
    ];
    for (n, (call_id, name, args, why)) in cases.iter().enumerate() {
        model_calls(&session, &format!("r{n}"), call_id, name, args);
        let output = output_for(&mut session, call_id).await;
        let error: Value = serde_json::from_str(output["output"].as_str().unwrap()).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(why),
            "{call_id}: {error}"
        );
    }
    assert_eq!(
        tool_server.received().len(),
        3,
        "only the known tool with good arguments"
    );
    let call = app.call(SID).await;
    assert_eq!(call["state"], "active");
    caller.send_media(&[0x15; 160]).await;
    session.wait_appended_bytes(160).await;
    caller.hang_up().await;
}

/// The built-in `end_call`: the audio already sent plays, then the call ends through Twilio's
/// REST API, and the model is not asked to speak again. `transfer_call` to a target not allowed
/// is an error output; to an allowed one, a `<Dial>` through REST.
#[actix_web::test]
async fn builtin_end_call_and_transfer_call() {
    for tool in ["end_call", "transfer_call"] {
        let account = Account::test();
        let rest = FakeTwilioRest::start(account.clone()).await;
        rest.add_live_call(SID, "+14155550100", "+14155550199");
        let fake = FakeOpenAi::start().await;
        let mut settings = openai_settings(&fake);
        settings.twilio.api_base = rest.base_url();
        settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
        settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
        settings.call.builtin_tools = vec!["end_call".into(), "transfer_call".into()];
        settings.call.transfer_allow = vec!["+1415".into()];
        let app = spawn_app(settings).await;
        let (caller, mut session) = start(&app, &fake).await;
        let names: Vec<String> = session.session_config()["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["end_call", "transfer_call"]);
        let reason = if tool == "end_call" {
            model_calls(&session, "r1", "c1", "end_call", "{}");
            "hung_up"
        } else {
            model_calls(
                &session,
                "r1",
                "c0",
                "transfer_call",
                r#"{"to":"+12125550100"}"#,
            );
            let refused = output_for(&mut session, "c0").await;
            assert!(refused["output"].as_str().unwrap().contains("not allowed"));
            session.recv_event("response.create").await;
            model_calls(
                &session,
                "r2",
                "c1",
                "transfer_call",
                r#"{"to":"+14155550123"}"#,
            );
            "transferred"
        };
        let done = output_for(&mut session, "c1").await;
        assert_eq!(done["output"], r#"{"ok":true}"#);
        tokio::time::timeout(Duration::from_secs(10), rest.on_stream_end(SID))
            .await
            .expect("the REST request");
        caller.hang_up().await;
        app.wait_ended(reason, Duration::from_secs(3)).await;
        let creates_after = session
            .received_types()
            .iter()
            .filter(|t| *t == "response.create")
            .count();
        let expected = if tool == "end_call" { 0 } else { 1 };
        assert_eq!(
            creates_after, expected,
            "{tool}: the model was asked to speak again"
        );
        let update = &rest.updates_for(SID)[0];
        if tool == "end_call" {
            assert_eq!(update.param("Status"), Some("completed"));
        } else {
            assert!(update.param("Twiml").unwrap().contains("+14155550123"));
        }
        rest.assert_no_violations();
    }
}

/// A slow tool (longer than `call.tool_filler_after_ms`) gets one short spoken filler while it
/// runs; its answer still reaches the model afterwards.
#[actix_web::test]
async fn a_slow_tool_gets_one_filler() {
    let tool_server = FakeReceiver::start(None).await;
    tool_server.answer_next(Answer {
        status: 200,
        body: r#"{"ok":true}"#.into(),
        delay: Duration::from_millis(1_000),
    });
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.tools = vec![lookup(tool_server.url("/t"), 3_000)];
    settings.call.tool_filler_after_ms = 200;
    let app = spawn_app(settings).await;
    let (caller, mut session) = start(&app, &fake).await;
    model_calls(
        &session,
        "r1",
        "slow",
        "lookup_order",
        r#"{"order_id":"9"}"#,
    );
    let filler = session.recv_event("response.create").await;
    assert!(filler.to_string().contains("still checking"), "{filler}");
    assert!(
        session
            .events_of_type("conversation.item.create")
            .iter()
            .all(|e| e["item"]["type"] != "function_call_output"),
        "the filler came after the answer"
    );
    let output = output_for(&mut session, "slow").await;
    assert_eq!(output["output"], r#"{"ok":true}"#);
    let fillers = session
        .response_creates()
        .iter()
        .filter(|c| c.to_string().contains("still checking"))
        .count();
    assert_eq!(fillers, 1);
    caller.hang_up().await;
}
