//! Fault injection of the fake OpenAI server's echo mode, over real sockets: the attempt a
//! rule names gets its fault (after the configured number of appends, or at the upgrade),
//! the others are served normally, and every injected fault is counted by kind.

use std::{sync::atomic::Ordering, sync::Arc, time::Duration};

use base64::prelude::*;
use callbridge_fakes::openai::{serve, EchoConfig, FakeStats, Fault};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::{net::TcpStream, time::timeout};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest as _,
        http::HeaderValue,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    MaybeTlsStream, WebSocketStream,
};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const UPDATE: &str = r#"{"type":"session.update","session":{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcmu"}},"output":{"format":{"type":"audio/pcmu"}}}}}"#;

/// An echo fake with `config`, on 127.0.0.1:0.
async fn start(config: EchoConfig) -> (String, Arc<FakeStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/v1/realtime?model=gpt-realtime",
        listener.local_addr().unwrap()
    );
    let stats = Arc::new(FakeStats::default());
    tokio::spawn(serve(listener, config, stats.clone()));
    (url, stats)
}

/// Opens a session; `Err(status)` when the upgrade is refused.
async fn open(url: &str) -> Result<Client, u16> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer sk-test"));
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

/// Opens and configures a session (µ-law both ways), as callbridge does.
async fn session(url: &str) -> Client {
    let mut ws = open(url).await.expect("upgraded");
    next_of(&mut ws, "session.created").await;
    ws.send(Message::text(UPDATE)).await.unwrap();
    next_of(&mut ws, "session.updated").await;
    ws
}

/// The next text frame as it came.
async fn next_text(ws: &mut Client) -> String {
    loop {
        let frame = timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .expect("a valid frame");
        match frame {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Close(frame) => panic!("closed while a text frame was awaited: {frame:?}"),
            _ => {}
        }
    }
}

async fn next_of(ws: &mut Client, kind: &str) -> Value {
    loop {
        let event: Value = serde_json::from_str(&next_text(ws).await).expect("JSON");
        if event["type"] == kind {
            return event;
        }
    }
}

/// Frame `n` of a test: 160 bytes of `n`, base64.
fn frame(n: u8) -> String {
    BASE64_STANDARD.encode([n; 160])
}

async fn append(ws: &mut Client, n: u8) {
    ws.send(Message::text(format!(
        r#"{{"type":"input_audio_buffer.append","audio":"{}"}}"#,
        frame(n)
    )))
    .await
    .unwrap();
}

/// Appends frames `from..to`, each awaited as its echo.
async fn echoed(ws: &mut Client, from: u8, to: u8) {
    for n in from..to {
        append(ws, n).await;
        let delta = next_of(ws, "response.output_audio.delta").await;
        assert_eq!(delta["delta"], frame(n).as_str(), "the echo of frame {n}");
    }
}

/// How the socket ended: `Some(code)` after a close frame (read on until the end, which
/// sends the reply), `None` when it just ended. Text frames before it are returned too.
async fn end(ws: &mut Client) -> (Option<u16>, Vec<String>) {
    let mut texts = Vec::new();
    let mut code = None;
    loop {
        match timeout(Duration::from_secs(5), ws.next()).await {
            Err(_) => panic!("the socket did not end within 5 s"),
            Ok(Some(Ok(Message::Text(text)))) => texts.push(text.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                code = Some(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return (code, texts),
        }
    }
}

/// Closes with 1000 and returns the code of the fake's answer.
async fn hang_up(ws: &mut Client) -> Option<u16> {
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .unwrap();
    end(ws).await.0
}

fn faults(stats: &FakeStats) -> Vec<u64> {
    Fault::ALL.iter().map(|&f| stats.faults.get(f)).collect()
}

/// Which attempts a rule names: every Nth, kinds in turn; nothing by default.
#[test]
fn the_rule_names_every_nth_attempt_and_rotates_the_kinds() {
    let off = EchoConfig::default();
    assert!((1..1_000).all(|n| off.fault_for(n).is_none()));
    let every3 = EchoConfig {
        fault_every: 3,
        ..EchoConfig::default()
    };
    let planned: Vec<_> = (1..=21).filter_map(|n| every3.fault_for(n)).collect();
    assert_eq!(planned.len(), 7);
    assert_eq!(
        planned[..6],
        Fault::ALL,
        "attempts 3, 6, … 18 take the kinds in turn"
    );
    assert_eq!(planned[6], Fault::Drop, "then the rotation starts again");
    assert!(every3.fault_for(4).is_none() && every3.fault_for(5).is_none());
    let none = EchoConfig {
        fault_every: 1,
        faults: Vec::new(),
        ..EchoConfig::default()
    };
    assert!(none.fault_for(1).is_none());
}

/// Every kind, one attempt each (fault_every = 1): a drop without a close frame,
/// `session_expired` then 1001, close 1011, garbage that the session survives, HTTP 503 and
/// 429 at the upgrade; then the rotation starts again. Each fires after the K-th append, not
/// before, and is counted by kind.
#[tokio::test]
async fn each_kind_of_fault_is_injected_and_counted() {
    let (url, stats) = start(EchoConfig {
        fault_every: 1,
        fault_after_appends: 3,
        ..EchoConfig::default()
    })
    .await;

    // 1: dropped without a close frame after the third append.
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 2).await;
    assert_eq!(stats.faults.total(), 0, "nothing before the K-th append");
    append(&mut ws, 2).await;
    let (code, _) = end(&mut ws).await;
    assert_eq!(code, None, "no close frame: an abnormal closure");
    assert_eq!(faults(&stats), [1, 0, 0, 0, 0, 0]);

    // 2: session_expired, then close 1001.
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 2).await;
    append(&mut ws, 2).await;
    let error = next_of(&mut ws, "error").await;
    assert_eq!(error["error"]["code"], "session_expired");
    assert_eq!(end(&mut ws).await.0, Some(1001));

    // 3: close 1011.
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 3).await;
    assert_eq!(end(&mut ws).await.0, Some(1011));

    // 4: a text frame that is not JSON, and the session goes on.
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 3).await;
    let garbage = next_text(&mut ws).await;
    assert!(
        serde_json::from_str::<Value>(&garbage).is_err(),
        "not JSON: {garbage}"
    );
    echoed(&mut ws, 3, 10).await;
    assert_eq!(
        hang_up(&mut ws).await,
        Some(1000),
        "closed by the client only"
    );

    // 5, 6: refused at the upgrade.
    assert_eq!(open(&url).await.err(), Some(503));
    assert_eq!(open(&url).await.err(), Some(429));

    // 7: the rotation starts again.
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 2).await;
    append(&mut ws, 2).await;
    assert_eq!(end(&mut ws).await.0, None);

    assert_eq!(faults(&stats), [2, 1, 1, 1, 1, 1]);
    assert_eq!(stats.faults.total(), 7);
    assert_eq!(stats.faults.ending_sessions(), 6, "all but the garbage");
    assert_eq!(stats.attempts.load(Ordering::Relaxed), 7);
    assert_eq!(stats.sessions_opened.load(Ordering::Relaxed), 5);
    assert_eq!(stats.errors_sent.load(Ordering::Relaxed), 1);
    assert_eq!(stats.violations.load(Ordering::Relaxed), 0);
    let open_now = || stats.sessions_open.load(Ordering::Relaxed);
    for _ in 0..200 {
        if open_now() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        open_now(),
        0,
        "every faulted socket is closed on the fake's side"
    );
}

/// With fault_every = 3, attempts 1, 2, 4 and 5 echo on well past K appends; attempt 3 (and
/// 6, refused) get their fault.
#[tokio::test]
async fn only_the_attempts_the_rule_names_are_faulted() {
    let (url, stats) = start(EchoConfig {
        fault_every: 3,
        faults: vec![Fault::Close1011, Fault::Refuse503],
        fault_after_appends: 2,
        ..EchoConfig::default()
    })
    .await;
    let mut healthy = vec![session(&url).await, session(&url).await];
    let mut faulted = session(&url).await;
    healthy.push(session(&url).await);
    healthy.push(session(&url).await);
    assert_eq!(open(&url).await.err(), Some(503), "attempt 6");
    for ws in &mut healthy {
        echoed(ws, 0, 20).await;
    }
    echoed(&mut faulted, 0, 2).await;
    assert_eq!(end(&mut faulted).await.0, Some(1011));
    for ws in &mut healthy {
        echoed(ws, 20, 25).await;
        assert_eq!(hang_up(ws).await, Some(1000));
    }
    assert_eq!(faults(&stats), [0, 0, 1, 0, 1, 0]);
    assert_eq!(stats.sessions_opened.load(Ordering::Relaxed), 5);
    assert_eq!(stats.appends.load(Ordering::Relaxed), 4 * 25 + 2);
}

/// A session that ends before its K-th append is not faulted, and no fault is counted.
#[tokio::test]
async fn a_session_that_ends_before_the_kth_append_is_not_faulted() {
    let (url, stats) = start(EchoConfig {
        fault_every: 1,
        faults: vec![Fault::Drop],
        fault_after_appends: 50,
        ..EchoConfig::default()
    })
    .await;
    let mut ws = session(&url).await;
    echoed(&mut ws, 0, 49).await;
    assert_eq!(hang_up(&mut ws).await, Some(1000));
    assert_eq!(stats.faults.total(), 0);
    assert_eq!(stats.attempts.load(Ordering::Relaxed), 1);
}
