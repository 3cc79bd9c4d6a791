//! The fake OpenAI server over real sockets: the upgrade checks, pausing the reader, floods
//! and echo mode, driven by a plain tokio-tungstenite client standing in for callbridge.

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use base64::prelude::*;
use callbridge_fakes::openai::{serve, EchoConfig, FakeOpenAi, FakeStats};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest as _, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const UPDATE: &str = r#"{"type":"session.update","session":{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcmu"}},"output":{"format":{"type":"audio/pcmu"}}}}}"#;

/// Opens `url` with these headers; `Err(status)` when the upgrade is refused.
async fn open(url: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
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
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

async fn connect(fake_url: &str) -> Client {
    open(
        &format!("{fake_url}?model=gpt-realtime"),
        &[("authorization", "Bearer sk-test")],
    )
    .await
    .expect("upgraded")
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

/// Every B1 check on the upgrade: key, model, path, beta header; the knobs that refuse.
#[tokio::test]
async fn upgrades_are_checked() {
    let fake = FakeOpenAi::start().await;
    let url = fake.url();
    let model = format!("{url}?model=gpt-realtime");
    let key = ("authorization", "Bearer sk-test");
    assert_eq!(open(&model, &[]).await.err(), Some(401));
    assert_eq!(open(&url, &[key]).await.err(), Some(400));
    let wrong_path = url.replace("/v1/realtime", "/v1/realtime/extra");
    assert_eq!(open(&wrong_path, &[key]).await.err(), Some(404));
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());
    assert_eq!(
        fake.connection_count(),
        2,
        "the wrong path is not a handshake"
    );

    fake.set_refuse_connections(true);
    assert_eq!(open(&model, &[key]).await.err(), Some(503));
    fake.set_refuse_connections(false);

    fake.set_close_after_accept(true);
    let mut ws = open(&model, &[key]).await.expect("upgraded");
    assert_eq!(close_code(&mut ws).await, Some(1011));
    fake.set_close_after_accept(false);

    let mut ws = open(&model, &[key, ("openai-beta", "realtime=v1")])
        .await
        .expect("upgraded");
    let error = next_event(&mut ws).await;
    assert_eq!(error["error"]["code"], "beta_api_shape_disabled");
    assert_eq!(close_code(&mut ws).await, Some(4000));
    assert_eq!(fake.violations().len(), 4);
    assert_eq!(fake.session_count(), 0);
    assert_eq!(fake.accepted_count(), 2);

    let mut ws = connect(&url).await;
    let created = next_event(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], "gpt-realtime");
    let session = fake.next_session().await;
    assert_eq!(
        (session.model(), session.api_key()),
        ("gpt-realtime".into(), "sk-test".into())
    );
    assert_eq!(fake.session_count(), 1);
    assert_eq!(fake.handshakes().last().unwrap().status, 101);

    // A GET that is no websocket upgrade never reaches the checks: a violation of its own.
    let mut raw = TcpStream::connect(fake.addr()).await.unwrap();
    raw.write_all(b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    for _ in 0..100 {
        if fake.violations().len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let violations = fake.violations();
    assert_eq!(violations.len(), 5, "{violations:?}");
    assert!(violations[4].contains("not a websocket upgrade request"));
}

/// While a session's reader is paused nothing the client sends is read (its sends back up),
/// but the fake still sends; resumed, everything arrives in order.
#[tokio::test]
async fn a_paused_session_reads_nothing_but_still_sends() {
    let fake = FakeOpenAi::start().await;
    let mut ws = connect(&fake.url()).await;
    let session = fake.next_session().await;
    next_of(&mut ws, "session.created").await;
    ws.send(Message::text(UPDATE)).await.unwrap();
    next_of(&mut ws, "session.updated").await;
    let read_before = session.bytes_read();
    assert_eq!(read_before, UPDATE.len());

    session.pause_reading();
    assert!(session.is_reading_paused());
    let chunk = BASE64_STANDARD.encode(vec![0xFFu8; 48_000]);
    let append = format!(r#"{{"type":"input_audio_buffer.append","audio":"{chunk}"}}"#);
    let mut sent = 0;
    // Send until the socket stops taking more (the kernel buffers are full).
    while timeout(
        Duration::from_millis(300),
        ws.send(Message::text(append.clone())),
    )
    .await
    .is_ok()
    {
        sent += 1;
        assert!(sent < 2_000, "the sends never backed up");
    }
    assert!(sent > 0);
    assert_eq!(
        session.bytes_read(),
        read_before,
        "nothing was read while paused"
    );
    assert_eq!(session.append_count(), 0);

    // The fake still speaks.
    session.error_event("test_marker", "still talking");
    let marker = next_of(&mut ws, "error").await;
    assert_eq!(marker["error"]["code"], "test_marker");

    session.resume_reading();
    // The send that timed out was cancelled mid-frame; the socket is still flushed by the
    // next operation, so finish it and count every append that got out whole.
    ws.flush().await.unwrap();
    let want = sent + 1;
    let mut waited = 0;
    while session.append_count() < sent && waited < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert!(
        (sent..=want).contains(&session.append_count()),
        "appends {} of {sent}",
        session.append_count()
    );
    session.assert_no_violations();
}

/// A flood goes as fast as the client reads: it stalls while the client reads nothing and
/// completes when it reads again; the deltas are the item's audio.
#[tokio::test]
async fn a_flood_follows_the_clients_reading() {
    let fake = FakeOpenAi::start().await;
    let mut ws = connect(&fake.url()).await;
    let session = fake.next_session().await;
    next_of(&mut ws, "session.created").await;
    ws.send(Message::text(UPDATE)).await.unwrap();
    next_of(&mut ws, "session.updated").await;

    session.start_response("resp_1", "item_1");
    let total = 16 * 1024 * 1024;
    let flood = session.flood_audio("resp_1", "item_1", total, 32_000);
    // The client reads nothing: the flood stalls well short of the total.
    let stalled = flood.wait_stalled(Duration::from_millis(300)).await;
    assert!(stalled > 0 && stalled < total, "written {stalled}");
    assert!(!flood.is_finished());
    assert!(flood.bytes_queued() - flood.bytes_written() <= 4 * 32_000);

    // Reading everything lets it finish.
    let mut received = 0;
    let mut deltas = 0;
    while received < total {
        let event = next_event(&mut ws).await;
        if event["type"] == "response.output_audio.delta" {
            assert_eq!(event["item_id"], "item_1");
            received += BASE64_STANDARD
                .decode(event["delta"].as_str().unwrap())
                .unwrap()
                .len();
            deltas += 1;
        }
    }
    assert_eq!(received, total);
    assert_eq!(deltas, total.div_ceil(32_000));
    assert_eq!(flood.wait_written(total).await, total);
    assert!(flood.is_finished());
    assert_eq!(session.item_audio_bytes("item_1"), Some(total));
    assert!(
        session.bytes_written() > total,
        "counts the JSON around the audio too"
    );

    // A stopped flood stops (the few deltas already queued still go out).
    session.finish_response("resp_1", "item_1", "");
    session.start_response("resp_2", "item_2");
    let flood = session.flood_audio("resp_2", "item_2", total, 32_000);
    flood.wait_written(64_000).await;
    flood.stop();
    let queued = {
        while !flood.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        flood.bytes_queued()
    };
    assert!(queued < total);
    session.assert_no_violations();
}

/// `close` sends a close frame; `drop_connection` ends the TCP connection without one.
#[tokio::test]
async fn the_fake_closes_or_drops() {
    let fake = FakeOpenAi::start().await;
    let mut ws = connect(&fake.url()).await;
    let session = fake.next_session().await;
    session.session_expired();
    let error = next_of(&mut ws, "error").await;
    assert_eq!(error["error"]["code"], "session_expired");
    assert_eq!(close_code(&mut ws).await, Some(1001));
    assert!(!session.wait_closed().await, "the fake closed it");
    assert!(session.is_closed());

    let mut ws = connect(&fake.url()).await;
    let session = fake.next_session().await;
    next_of(&mut ws, "session.created").await;
    session.drop_connection();
    let end = timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(
        matches!(end, None | Some(Err(_))),
        "no close frame: {end:?}"
    );
    assert!(!session.wait_closed().await);
    assert_eq!(session.service_close_code(), None);

    // The service closing is recorded with its code.
    let mut ws = connect(&fake.url()).await;
    let session = fake.next_session().await;
    ws.close(None).await.unwrap();
    assert!(session.wait_closed().await, "the service closed it");
    assert_eq!(session.service_close_code(), Some(1005));
}

/// Echo mode as the simulator runs it: the key is checked, appends come back as deltas, and
/// the counters count.
#[tokio::test]
async fn echo_mode_serves_the_simulator() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
    let stats = Arc::new(FakeStats::default());
    let config = EchoConfig {
        api_key: Some("sk-right".into()),
        ..EchoConfig::default()
    };
    tokio::spawn(serve(listener, config, stats.clone()));
    let model = format!("{url}?model=gpt-realtime");

    let mut ws = open(&model, &[("authorization", "Bearer sk-wrong")])
        .await
        .unwrap();
    let error = next_event(&mut ws).await;
    assert_eq!(error["error"]["code"], "invalid_api_key");
    assert_eq!(close_code(&mut ws).await, Some(3000));

    let mut ws = open(&model, &[("authorization", "Bearer sk-right")])
        .await
        .unwrap();
    next_of(&mut ws, "session.created").await;
    ws.send(Message::text(UPDATE)).await.unwrap();
    next_of(&mut ws, "session.updated").await;
    let frame = BASE64_STANDARD.encode([0x55u8; 160]);
    ws.send(Message::text(format!(
        r#"{{"type":"input_audio_buffer.append","audio":"{frame}"}}"#
    )))
    .await
    .unwrap();
    let delta = next_of(&mut ws, "response.output_audio.delta").await;
    assert_eq!(delta["delta"], frame.as_str());
    ws.send(Message::text(
        r#"{"type":"input_audio_buffer.append","audio":"AB=="}"#,
    ))
    .await
    .unwrap();
    let error = next_of(&mut ws, "error").await;
    assert_eq!(error["error"]["code"], "invalid_value");
    assert_eq!(stats.appends.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors_sent.load(Ordering::Relaxed), 2);
    assert_eq!(stats.sessions_opened.load(Ordering::Relaxed), 1);
    assert_eq!(stats.sessions_open.load(Ordering::Relaxed), 1);
    assert_eq!(stats.violations.load(Ordering::Relaxed), 1);
}
