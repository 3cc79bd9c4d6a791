//! The fake GPT-Live server over real sockets: the upgrade checks and refusals, a whole call
//! from `session.start` to `session.closed`, scripted model events, the knobs, and echo
//! mode, driven by a plain tokio-tungstenite client standing in for callbridge.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::prelude::*;
use callbridge_fakes::live::{
    serve_live, AppendKind, FakeLive, FakeStats, LiveEchoConfig, LiveError,
};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::{net::TcpStream, time::timeout};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest as _, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const KEY: (&str, &str) = ("authorization", "Bearer sk-test");

/// callbridge's `session.start` (§2), with a continued call's history.
const START: &str = r#"{"type":"session.start","event_id":"cb_start_1","session":{"model":"gpt-live-1","instructions":"You are the phone assistant of Acme Dental.","audio":{"format":{"type":"audio/pcmu","rate":8000},"output":{"voice":"marin"}},"delegation":null,"input":[{"type":"message","role":"user","content":[{"type":"input_text","text":"Move my appointment to Friday."}]},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Morning or afternoon?"}]}]}}"#;

/// Opens `url` with these headers; `Err((status, body))` when the upgrade is refused.
async fn open(url: &str, headers: &[(&str, &str)]) -> Result<Client, (u16, Value)> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes());
        request
            .headers_mut()
            .insert(name.unwrap(), HeaderValue::from_str(v).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

async fn connect(fake: &FakeLive) -> Client {
    open(&fake.url(), &[KEY]).await.expect("upgraded")
}

/// The HTTP status of a refused upgrade.
async fn refused(url: &str, headers: &[(&str, &str)]) -> u16 {
    match open(url, headers).await {
        Ok(_) => panic!("{url} was upgraded"),
        Err((status, _)) => status,
    }
}

async fn send(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// The next text event, parsed.
async fn next_event(ws: &mut Client) -> Value {
    loop {
        let frame = timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an event in time")
            .expect("the socket is open")
            .expect("a valid frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

async fn next_of(ws: &mut Client, kind: &str) -> Value {
    loop {
        let event = next_event(ws).await;
        if event["type"] == kind {
            return event;
        }
    }
}

/// The close frame's code, skipping events before it; reads on until the end, which sends
/// tungstenite's reply (as the service would).
async fn close_code(ws: &mut Client) -> Option<u16> {
    let mut code = None;
    while let Ok(Some(Ok(frame))) = timeout(Duration::from_secs(5), ws.next()).await {
        if let Message::Close(frame) = frame {
            code = frame.map(|f| u16::from(f.code));
        }
    }
    code
}

fn append(audio: &[u8]) -> String {
    format!(
        r#"{{"type":"session.input_audio.append","audio":"{}"}}"#,
        BASE64_STANDARD.encode(audio)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every §1 check on the upgrade: path, bearer key, no query; the knobs that refuse, with
/// the API's error body.
#[tokio::test]
async fn upgrades_are_checked() {
    let fake = FakeLive::start().await;
    let url = fake.url();
    assert!(url.ends_with("/v1/live/sessions"));
    assert_eq!(refused(&url, &[]).await, 401);
    let (status, body) = open(&format!("{url}?model=gpt-live-1"), &[KEY])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "unknown_parameter");
    assert_eq!(body["error"]["param"], "model");
    let realtime = url.replace("/v1/live/sessions", "/v1/realtime");
    assert_eq!(refused(&realtime, &[KEY]).await, 404);
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
    assert_eq!(fake.connection_count(), 2, "the wrong path is no handshake");

    // Refusals a test asks for are not violations.
    fake.set_refuse_connections(true);
    assert_eq!(refused(&url, &[KEY]).await, 503);
    fake.set_refuse_connections(false);
    for (status, code) in [
        (401, "invalid_api_key"),
        (403, "model_not_allowed"),
        (429, "rate_limit_exceeded"),
        (500, "server_error"),
    ] {
        fake.set_refuse_status(Some(status));
        let (got, body) = open(&url, &[KEY]).await.err().unwrap();
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)));
        assert!(body["error"]["message"].is_string());
    }
    fake.set_refuse_error(Some((429, LiveError::insufficient_quota())));
    let (status, body) = open(&url, &[KEY]).await.err().unwrap();
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "insufficient_quota");
    fake.set_refuse_status(None);

    fake.set_api_key(Some("sk-right"));
    let (status, body) = open(&url, &[KEY]).await.err().unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    fake.set_api_key(None);

    fake.set_close_after_accept(true);
    let mut ws = connect(&fake).await;
    assert_eq!(close_code(&mut ws).await, Some(1011));
    fake.set_close_after_accept(false);
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());

    // An OpenAI-Beta header is recorded; the upgrade goes on.
    let _ws = open(
        &url,
        &[KEY, ("openai-beta", "realtime=v1"), ("user-agent", "cb/1")],
    )
    .await
    .expect("upgraded");
    let session = fake.next_session().await;
    assert_eq!(session.api_key(), "sk-test");
    let handshake = session.handshake();
    assert_eq!(handshake.beta_header.as_deref(), Some("realtime=v1"));
    assert_eq!(handshake.user_agent.as_deref(), Some("cb/1"));
    assert_eq!(handshake.query, None);
    assert_eq!(handshake.status, 101);
    let violations = fake.violations();
    assert_eq!(violations.len(), 4);
    assert!(violations[3].contains("OpenAI-Beta"), "{violations:?}");
    assert_eq!(fake.accepted_count(), 2);
    assert_eq!(fake.session_count(), 1);
}

/// A whole call as callbridge makes it: start with history, greeting, caller audio, model
/// audio and transcripts, a client delegation answered, usage, DTMF, close and closed; no
/// violation.
#[tokio::test]
async fn a_call_from_start_to_closed() {
    let fake = FakeLive::start().await;
    let mut ws = connect(&fake).await;
    let mut session = fake.next_session().await;
    send(&mut ws, START).await;
    let started = next_event(&mut ws).await;
    assert_eq!(started["type"], "session.started");
    assert_eq!(started["client_event_id"], "cb_start_1");
    assert_eq!(started["session"]["id"], session.session_id());
    let expires_at = started["session"]["expires_at"].as_u64().unwrap();
    assert!(expires_at >= unix_now() + 3_590);
    assert_eq!(session.input_history().len(), 2);
    assert_eq!(
        session.wait_session_start().await["audio"]["format"],
        json!({"type": "audio/pcmu", "rate": 8000})
    );

    send(
        &mut ws,
        r#"{"type":"session.commentary.append","event_id":"cb_greet_1","delegation_id":null,"content":"Greet the caller on behalf of Acme Dental."}"#,
    )
    .await;
    let ack = next_event(&mut ws).await;
    assert_eq!(ack["type"], "session.commentary.appended");
    assert_eq!(ack["client_event_id"], "cb_greet_1");
    assert_eq!(
        session.commentary()[0].content,
        "Greet the caller on behalf of Acme Dental."
    );

    for _ in 0..5 {
        send(&mut ws, &append(&[0x7F; 160])).await;
    }
    assert_eq!(session.wait_appended_bytes(800).await, vec![0x7F; 800]);
    assert_eq!(session.timeline_ms(), 100);

    // The model's side.
    session.audio_delta_bytes(&[0xFF; 160]);
    let delta = next_event(&mut ws).await;
    assert_eq!(
        delta,
        json!({"type": "session.output_audio.delta", "delta": BASE64_STANDARD.encode([0xFF; 160])})
    );
    session.output_transcript("Sure.", 60, 100);
    session.input_transcript("Friday", 100, 140);
    let out = next_event(&mut ws).await;
    assert_eq!(
        (
            out["type"].as_str(),
            out["delta"].as_str(),
            out["start_ms"].as_u64()
        ),
        (
            Some("session.output_transcript.delta"),
            Some("Sure."),
            Some(60)
        )
    );
    assert_eq!(
        next_event(&mut ws).await["type"],
        "session.input_transcript.delta"
    );

    session.delegate_to_client("dlg_1");
    let created = next_event(&mut ws).await;
    assert_eq!(created["delegation"]["target"], "client");
    assert_eq!(created["offset_ms"], 100);
    send(
        &mut ws,
        r#"{"type":"session.commentary.append","delegation_id":"dlg_1","content":"This line cannot do that."}"#,
    )
    .await;
    next_of(&mut ws, "session.commentary.appended").await;

    send(
        &mut ws,
        r#"{"type":"session.instructions.append","event_id":"cb_dtmf_3","delegation_id":null,"content":"The caller pressed 7 on the phone keypad."}"#,
    )
    .await;
    let dtmf = session.wait_text_appends(AppendKind::Instructions, 1).await;
    assert_eq!(dtmf[0].event_id.as_deref(), Some("cb_dtmf_3"));

    session.usage_updated(37.5, Some(0.04));
    let usage = next_of(&mut ws, "session.usage.updated").await;
    assert_eq!(usage["usage"]["seconds"], 37.5);
    session.set_final_usage(95.5);

    send(&mut ws, r#"{"type":"session.close","event_id":"cb_close"}"#).await;
    let closed = next_of(&mut ws, "session.closed").await;
    assert_eq!(closed["reason"], "close_requested");
    assert_eq!(closed["client_event_id"], "cb_close");
    assert_eq!(closed["usage"]["seconds"], 95.5);
    assert_eq!(session.final_usage(), Some(95.5));
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await, "the service closed it");
    assert_eq!(session.service_close_code(), Some(1005));
    assert!(!session.socket_closed_before_session_closed());
    assert_eq!(
        session.recv_event("session.close").await["event_id"],
        "cb_close"
    );
    session.assert_no_violations();
    fake.assert_no_violations();
}

/// What the service gets wrong shows on the wire (the `error` and its ids) and in the
/// violations: a refused start, then the session's socket closed without `session.close`.
#[tokio::test]
async fn violations_over_the_wire() {
    let fake = FakeLive::start().await;
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(
        &mut ws,
        r#"{"type":"session.start","event_id":"cb_s","session":{"model":"gpt-live-1","temperature":0.8}}"#,
    )
    .await;
    let error = next_event(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["client_event_id"], "cb_s");
    assert_eq!(
        error["error"],
        json!({"type": "invalid_request_error", "code": "unknown_parameter",
            "message": "Unknown parameter: 'session.temperature'.",
            "param": "session.temperature", "client_event_id": "cb_s"})
    );
    assert_eq!(session.violations().len(), 1);

    // A started session ended without session.close.
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await);
    let violations = session.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("without session.close"));
    assert_eq!(fake.violations().len(), 2);
}

/// With `session.started` held back, a service that streams at once is caught; one that
/// waits is not. A startup error configured on the server fails every start.
#[tokio::test]
async fn the_start_knobs() {
    let fake = FakeLive::start().await;
    fake.set_session_started_delay(150);
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    send(&mut ws, &append(&[0xFF; 160])).await;
    next_of(&mut ws, "session.started").await;
    session.wait_appended_bytes(160).await;
    assert_eq!(session.violations().len(), 1, "{:?}", session.violations());

    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    let sent = Instant::now();
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    assert!(sent.elapsed() >= Duration::from_millis(140));
    send(&mut ws, &append(&[0xFF; 160])).await;
    session.wait_appended_bytes(160).await;
    session.assert_no_violations();

    fake.set_session_started_delay(0);
    fake.set_start_error(Some(LiveError::model_not_found("gpt-live-1")));
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    let error = next_event(&mut ws).await;
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["param"], "session.model");
    assert_eq!(error["client_event_id"], "cb_start_1");
    // The session never starts; the socket stays for the service to close.
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await);
    session.assert_no_violations();
}

/// The end of a session from the server's side: a held `session.closed` the client stops
/// waiting for, an expiry, a close frame, a dropped connection.
#[tokio::test]
async fn the_server_ends_sessions() {
    let fake = FakeLive::start().await;
    fake.set_session_closed_delay(2_000);
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    send(&mut ws, r#"{"type":"session.close"}"#).await;
    send(&mut ws, &append(&[0xFF; 160])).await;
    // The client's bounded wait runs out before the held session.closed.
    let wait = timeout(
        Duration::from_millis(200),
        next_of(&mut ws, "session.closed"),
    )
    .await;
    assert!(wait.is_err(), "session.closed was held");
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await);
    assert!(session.socket_closed_before_session_closed());
    let violations = session.violations();
    assert_eq!(
        violations.len(),
        1,
        "audio after session.close: {violations:?}"
    );

    fake.set_session_closed_delay(0);
    fake.set_session_duration_secs(1);
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    let started = next_of(&mut ws, "session.started").await;
    assert!(started["session"]["expires_at"].as_u64().unwrap() <= unix_now() + 1);
    let closed = next_of(&mut ws, "session.closed").await;
    assert_eq!(closed["reason"], "expired");
    assert_eq!(session.session_closed_reason().as_deref(), Some("expired"));
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await);
    session.assert_no_violations();

    fake.set_session_duration_secs(3_600);
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    session.session_closed("connection_lost");
    assert_eq!(next_event(&mut ws).await["reason"], "connection_lost");
    session.close(1011, "upstream gone");
    assert_eq!(close_code(&mut ws).await, Some(1011));
    assert!(!session.wait_closed().await, "the fake closed it");

    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    session.drop_connection();
    let end = timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(
        matches!(end, None | Some(Err(_))),
        "no close frame: {end:?}"
    );
    assert!(!session.wait_closed().await);
    assert_eq!(session.service_close_code(), None);
    assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
}

/// Responses delegation end to end: a function call, its one output and `response.create`;
/// a second output is an error.
#[tokio::test]
async fn a_function_call() {
    let fake = FakeLive::start().await;
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(
        &mut ws,
        r#"{"type":"session.start","session":{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":8000}},"delegation":{"type":"responses","responses":{"model":"gpt-5.5","tools":[{"type":"function","name":"move_appointment","parameters":{"type":"object","properties":{"day":{"type":"string"}}}}]}}}}"#,
    )
    .await;
    next_of(&mut ws, "session.started").await;
    session.delegate_to_responses("dlg_5b2e", "resp_77c1");
    session.function_call(
        "dlg_5b2e",
        "call_Q8n2",
        "move_appointment",
        r#"{"day":"Friday"}"#,
    );
    let created = next_event(&mut ws).await;
    assert_eq!(created["delegation"]["response_id"], "resp_77c1");
    let call = next_event(&mut ws).await;
    assert_eq!(call["type"], "response.event");
    assert_eq!(call["delegation_id"], "dlg_5b2e");
    assert_eq!(call["event"]["item"]["call_id"], "call_Q8n2");
    assert_eq!(call["event"]["item"]["status"], "completed");
    assert_eq!(session.calls_awaiting_output(), ["call_Q8n2"]);
    let output = r#"{"type":"response.item.create","event_id":"cb_tool_1","item":{"type":"function_call_output","call_id":"call_Q8n2","output":"{\"moved\":true}"}}"#;
    send(&mut ws, output).await;
    send(
        &mut ws,
        r#"{"type":"response.create","event_id":"cb_tool_2"}"#,
    )
    .await;
    send(&mut ws, output).await;
    let error = next_of(&mut ws, "error").await;
    assert_eq!(error["client_event_id"], "cb_tool_1");
    assert_eq!(error["error"]["param"], "item.call_id");
    assert!(session.calls_awaiting_output().is_empty());
    assert_eq!(session.item_creates().len(), 1);
    assert_eq!(session.response_create_count(), 1);
    session.response_completed("dlg_5b2e", "resp_77c1");
    let done = next_event(&mut ws).await;
    assert_eq!(done["event"]["type"], "response.completed");
    assert_eq!(done["event"]["sequence_number"], 1);
    assert_eq!(session.violations().len(), 1);
}

/// Assistant audio at real-time pace (§4.2): 100 ms of audio in 20 ms deltas takes about
/// 80 ms after the first.
#[tokio::test]
async fn audio_at_real_time_pace() {
    let fake = FakeLive::start().await;
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    let stream = session.stream_audio(vec![0x55; 800], 160);
    let first = next_of(&mut ws, "session.output_audio.delta").await;
    let t0 = Instant::now();
    let mut bytes = BASE64_STANDARD
        .decode(first["delta"].as_str().unwrap())
        .unwrap()
        .len();
    while bytes < 800 {
        let delta = next_of(&mut ws, "session.output_audio.delta").await;
        bytes += BASE64_STANDARD
            .decode(delta["delta"].as_str().unwrap())
            .unwrap()
            .len();
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(70), "{took:?}");
    assert_eq!(stream.wait_finished(Duration::from_secs(2)).await, 800);
}

/// While paused, nothing the client sends is read; resumed, it all arrives in order.
#[tokio::test]
async fn a_paused_session_reads_nothing() {
    let fake = FakeLive::start().await;
    let mut ws = connect(&fake).await;
    let session = fake.next_session().await;
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    session.pause_reading();
    let read = session.bytes_read();
    for _ in 0..10 {
        send(&mut ws, &append(&[0xFF; 160])).await;
    }
    session.error_event("test_marker", "the fake still talks");
    assert_eq!(next_event(&mut ws).await["error"]["code"], "test_marker");
    assert_eq!(session.bytes_read(), read);
    assert_eq!(session.append_count(), 0);
    session.resume_reading();
    session.wait_appended_bytes(1_600).await;
    session.assert_no_violations();
}

/// Echo mode as the simulator runs it: the key is checked, appends come back as deltas with
/// the same base64, transcript fragments come now and then, close gets its usage.
#[tokio::test]
async fn echo_mode_serves_the_simulator() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/live/sessions", listener.local_addr().unwrap());
    let stats = Arc::new(FakeStats::default());
    let config = LiveEchoConfig {
        api_key: Some("sk-right".into()),
        transcript_every_ms: 100,
        ..LiveEchoConfig::default()
    };
    tokio::spawn(serve_live(listener, config, stats.clone()));

    let (status, body) = open(&url, &[("authorization", "Bearer sk-wrong")])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    let mut ws = open(&url, &[("authorization", "Bearer sk-right")])
        .await
        .unwrap();
    send(&mut ws, START).await;
    next_of(&mut ws, "session.started").await;
    let mut transcripts = 0;
    for i in 0..10u8 {
        let frame = [i; 160];
        send(&mut ws, &append(&frame)).await;
        let delta = next_event(&mut ws).await;
        assert_eq!(delta["delta"], BASE64_STANDARD.encode(frame));
        if i % 5 == 4 {
            let fragment = next_event(&mut ws).await;
            assert_eq!(fragment["type"], "session.output_transcript.delta");
            transcripts += 1;
        }
    }
    assert_eq!(transcripts, 2);
    send(
        &mut ws,
        r#"{"type":"session.input_audio.append","audio":"AB=="}"#,
    )
    .await;
    assert_eq!(next_event(&mut ws).await["error"]["code"], "invalid_value");
    send(&mut ws, r#"{"type":"session.close"}"#).await;
    let closed = next_of(&mut ws, "session.closed").await;
    assert!(closed["usage"]["seconds"].as_f64().unwrap() >= 0.0);
    ws.close(None).await.unwrap();
    close_code(&mut ws).await;
    assert_eq!(stats.appends.load(Ordering::Relaxed), 10);
    assert_eq!(stats.errors_sent.load(Ordering::Relaxed), 1);
    assert_eq!(stats.sessions_opened.load(Ordering::Relaxed), 1);
    assert_eq!(stats.violations.load(Ordering::Relaxed), 1);
}
