//! End-to-end: watching calls. The live event streams (`/events`, `/calls/{sid}/events`) follow
//! a call through the fake OpenAI Realtime server, replay after `Last-Event-ID`, and close with
//! `ended`; `/metrics` exports every family from start-up, counts the call, and never names a
//! call or a number; both sit behind the admin auth.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use secrecy::SecretString;
use serde_json::Value;
use support::{openai_settings, spawn_app, test_settings, FakeOpenAi, FakeTwilio, TestApp};

const SID: &str = "CA5555555555555555555555555555aaaa";
const FROM: &str = "+14155550100";

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: u64,
    event: String,
    data: Value,
}

/// A strict reader of an event stream: `id`, `event`, `data` lines, a blank line after each
/// message, comments (`:`) skipped.
struct SseClient {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, String>>>>,
    buf: String,
    ended: bool,
}

impl SseClient {
    async fn open(app: &TestApp, path: &str, last_event_id: Option<u64>) -> Result<Self, u16> {
        let mut req = awc::Client::default()
            .get(app.http(path))
            .timeout(Duration::from_secs(30));
        if let Some(id) = last_event_id {
            req = req.insert_header(("Last-Event-ID", id.to_string()));
        }
        let res = req.send().await.expect("answered");
        if res.status().as_u16() != 200 {
            return Err(res.status().as_u16());
        }
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        Ok(SseClient {
            body: Box::pin(res.map(|r| r.map_err(|e| e.to_string()))),
            buf: String::new(),
            ended: false,
        })
    }

    /// The next message, or `None` when the stream ended; panics after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Sse> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut lines = block.trim_end_matches('\n').lines();
                let first = lines.next().unwrap();
                if first.starts_with(':') {
                    continue; // a comment: keep-alive or the goodbye
                }
                let id = first.strip_prefix("id: ").expect(&block).parse().unwrap();
                let event = lines.next().unwrap().strip_prefix("event: ").expect(&block);
                let data = lines.next().unwrap().strip_prefix("data: ").expect(&block);
                assert!(lines.next().is_none(), "one data line: {block}");
                let data: Value = serde_json::from_str(data).unwrap();
                assert!(data["call_sid"].is_string(), "{data}");
                return Some(Sse {
                    id,
                    event: event.to_owned(),
                    data,
                });
            }
            if self.ended {
                assert!(self.buf.trim().is_empty(), "a cut message: {:?}", self.buf);
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.next()).await {
                Err(_) => panic!("no event within {timeout:?}"),
                Ok(Some(chunk)) => self
                    .buf
                    .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                Ok(None) => self.ended = true,
            }
        }
    }

    /// Messages until one of type `event` (included).
    async fn until(&mut self, event: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let message = self
                .next(Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("the stream ended before {event}: {seen:?}"));
            let done = message.event == event;
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

async fn metrics_text(app: &TestApp) -> String {
    let mut res = awc::Client::default()
        .get(app.http("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    String::from_utf8(res.body().await.unwrap().to_vec()).unwrap()
}

/// The samples of the text format, by `name{labels}` as printed.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect(l);
            (key.to_owned(), value.parse().expect(l))
        })
        .collect()
}

fn sample(text: &str, key: &str) -> f64 {
    *samples(text)
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in\n{text}"))
}

/// A call through the fake Realtime server: an answer with audio and transcript, a digit, a
/// barge-in and the caller's words, then the caller hangs up.
async fn a_call(app: &TestApp, fake: &FakeOpenAi) {
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZobserve", SID, &[("From", FROM)]).await;
    session.recv_event("session.update").await;
    app.wait_call(SID, "active", |c| c["state"] == "active")
        .await;
    session.start_response("resp_1", "item_1");
    session.audio_delta_bytes("resp_1", "item_1", &[0x55; 800]);
    caller.recv_audio_bytes(800).await;
    session.finish_response("resp_1", "item_1", "Hello, how can I help?");
    caller.send_dtmf("5").await;
    session.start_response("resp_2", "item_2");
    session.audio_delta_bytes("resp_2", "item_2", &[0x56; 800]);
    caller.recv_audio_bytes(1600).await;
    session.speech_started("item_u1", 900);
    caller.wait_clear().await;
    session.caller_transcript("item_u1", "Wait, one question.");
    app.wait_call(SID, "the caller's words", |c| {
        c["transcript"].as_array().unwrap().len() >= 3
    })
    .await;
    caller.hang_up().await;
    app.wait_call_count(0).await;
}

/// A subscriber to `/events` sees the call from its state to `ended`, in order, with ids that
/// increase; a late subscriber to the call's own stream gets the replay (ids from 1), and one
/// with `Last-Event-ID` only what came after; the call's stream closes after `ended`.
#[actix_web::test]
async fn events_follow_a_call_and_replay_for_late_subscribers() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    assert_eq!(
        SseClient::open(&app, &format!("/calls/{SID}/events"), None)
            .await
            .err(),
        Some(404),
        "a call never seen"
    );
    let mut all = SseClient::open(&app, "/events", None).await.unwrap();
    a_call(&app, &fake).await;

    let seen = all.until("ended").await;
    assert!(seen.iter().all(|e| e.data["call_sid"] == SID));
    assert!(
        seen.windows(2).all(|w| w[0].id < w[1].id),
        "ids increase: {seen:?}"
    );
    let kinds: Vec<&str> = seen.iter().map(|e| e.event.as_str()).collect();
    let first_of = |kind: &str| kinds.iter().position(|k| *k == kind);
    assert_eq!(kinds[0], "state", "{kinds:?}");
    let states: Vec<&str> = seen
        .iter()
        .filter(|e| e.event == "state")
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"active") && states.ends_with(&["ending"]),
        "{states:?}"
    );
    let transcript: Vec<(&str, &str)> = seen
        .iter()
        .filter(|e| e.event == "transcript")
        .map(|e| {
            assert_eq!(e.data["final"], true);
            (
                e.data["role"].as_str().unwrap(),
                e.data["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        transcript.contains(&("assistant", "Hello, how can I help?")),
        "{transcript:?}"
    );
    assert!(
        transcript.contains(&("caller", "Wait, one question.")),
        "{transcript:?}"
    );
    let dtmf = &seen[first_of("dtmf").expect("dtmf")];
    assert_eq!(dtmf.data["digit"], "5");
    let barge = &seen[first_of("barge_in").expect("barge_in")];
    assert!(barge.data["heard_ms"].is_u64(), "{barge:?}");
    let ended = seen.last().unwrap();
    assert_eq!(ended.data["reason"], "twilio_stop");
    assert_eq!(ended.data["totals"]["barge_ins"], 1);
    assert!(
        ended.data["totals"]["frames_out"].as_u64().unwrap() >= 2,
        "{ended:?}"
    );
    assert!(ended.data["ts"].as_str().unwrap().ends_with('Z'));
    // No phone number in any event.
    assert!(seen.iter().all(|e| !e.data.to_string().contains(FROM)));

    // The call's own stream, after the end: the whole replay with ids from 1, then it closes.
    let mut late = SseClient::open(&app, &format!("/calls/{SID}/events"), None)
        .await
        .unwrap();
    let replay = late.until("ended").await;
    assert_eq!(
        replay.iter().map(|e| e.id).collect::<Vec<_>>(),
        (1..=replay.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        replay.iter().map(|e| &e.event).collect::<Vec<_>>(),
        seen.iter().map(|e| &e.event).collect::<Vec<_>>(),
        "the same events"
    );
    assert!(
        late.next(Duration::from_secs(5)).await.is_none(),
        "closed after ended"
    );

    let n = replay.len() as u64;
    let mut resumed = SseClient::open(&app, &format!("/calls/{SID}/events"), Some(n - 2))
        .await
        .unwrap();
    let rest = resumed.until("ended").await;
    assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), [n - 1, n]);
    assert!(resumed.next(Duration::from_secs(5)).await.is_none());
    fake.assert_no_violations();
}

/// Every family is exported from start-up; after one call the counters and histograms hold it
/// (first audio once, a barge-in, playback lag from echoed marks, the call's duration and end
/// reason, frames both ways, the tokens it used), the live gauge is back at 0, and nothing
/// names the call or a number.
#[actix_web::test]
async fn metrics_count_a_call() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let text = metrics_text(&app).await;
    for family in [
        "callbridge_active_calls",
        "callbridge_calls_total",
        "callbridge_frames_total",
        "callbridge_dropped_frames_total",
        "callbridge_barge_ins_total",
        "callbridge_upstream_restarts_total",
        "callbridge_upstream_failures_total",
        "callbridge_openai_errors_total",
        "callbridge_rejected_requests_total",
        "callbridge_tool_calls_total",
        "callbridge_time_to_first_audio_seconds",
        "callbridge_bargein_latency_seconds",
        "callbridge_playback_lag_seconds",
        "callbridge_call_duration_seconds",
        "callbridge_tool_call_seconds",
        "callbridge_model_tokens_total",
        "callbridge_model_seconds_total",
        "callbridge_cost_usd_total",
        "callbridge_event_subscribers_dropped_total",
    ] {
        let kind = if family.ends_with("_seconds") {
            "histogram"
        } else if family == "callbridge_active_calls" {
            "gauge"
        } else {
            "counter"
        };
        let family_name = family.trim_end_matches("_total");
        assert!(
            text.contains(&format!("# TYPE {family_name} {kind}"))
                || text.contains(&format!("# TYPE {family} {kind}")),
            "{family} ({kind}) missing at start-up:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, r#"callbridge_active_calls{api="realtime"}"#),
        0.0
    );
    assert_eq!(sample(&text, "callbridge_barge_ins_total"), 0.0);

    a_call(&app, &fake).await;
    let text = metrics_text(&app).await;
    assert_eq!(
        sample(&text, r#"callbridge_active_calls{api="realtime"}"#),
        0.0
    );
    assert_eq!(
        sample(&text, r#"callbridge_calls_total{end_reason="twilio_stop"}"#),
        1.0
    );
    assert!(sample(&text, r#"callbridge_frames_total{direction="out"}"#) >= 2.0);
    assert_eq!(sample(&text, "callbridge_barge_ins_total"), 1.0);
    assert_eq!(
        sample(&text, "callbridge_time_to_first_audio_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(&text, "callbridge_bargein_latency_seconds_count"),
        1.0
    );
    assert_eq!(sample(&text, "callbridge_call_duration_seconds_count"), 1.0);
    assert!(sample(&text, "callbridge_playback_lag_seconds_count") >= 1.0);
    assert!(
        sample(
            &text,
            r#"callbridge_time_to_first_audio_seconds_bucket{le="+Inf"}"#
        ) == 1.0
    );
    assert!(
        !text.contains(SID) && !text.contains("4155550100"),
        "{text}"
    );
    fake.assert_no_violations();
}

/// `/metrics` and the event streams answer the admin token (or the dashboard's cookie) only;
/// refusals are counted.
#[actix_web::test]
async fn metrics_and_events_need_the_admin_token() {
    let mut settings = test_settings();
    settings.secrets.admin_token = Some(SecretString::from("observe-token"));
    let app = spawn_app(settings).await;
    for path in ["/metrics", "/events", "/calls/CA1/events"] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    let mut res = awc::Client::default()
        .get(app.http("/metrics"))
        .insert_header(("Authorization", "Bearer observe-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let text = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
    assert_eq!(
        sample(
            &text,
            r#"callbridge_rejected_requests_total{reason="unauthorized"}"#
        ),
        3.0
    );
    let res = awc::Client::default()
        .get(app.http("/events"))
        .insert_header(("Authorization", "Bearer observe-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

/// On GPT-Live a turn streams as it is spoken: `transcript` events with `final: false` carry
/// the turn so far, then one with `final: true` when it closes (only that one is in the call's
/// transcript).
#[actix_web::test]
async fn live_turns_stream_as_partials_then_close() {
    use callbridge_fakes::live::FakeLive;
    let fake = FakeLive::start().await;
    let app = spawn_app(support::live_settings(&fake)).await;
    let mut all = SseClient::open(&app, "/events", None).await.unwrap();
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let session = fake.next_session().await;
    caller.start_call("MZlivep", SID, &[]).await;
    session.wait_session_start().await;
    session.output_transcript(" Morning", 1_000, 1_200);
    session.output_transcript(" or afternoon?", 1_200, 1_600);
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let e = all.next(Duration::from_secs(5)).await.expect("events");
        if e.event == "transcript" {
            lines.push((
                e.data["text"].as_str().unwrap().to_owned(),
                e.data["final"].as_bool().unwrap(),
            ));
        }
    }
    assert_eq!(
        lines,
        [
            ("Morning".to_owned(), false),
            ("Morning or afternoon?".to_owned(), false),
            ("Morning or afternoon?".to_owned(), true),
        ]
    );
    let call = app.call(SID).await;
    assert_eq!(call["transcript"].as_array().unwrap().len(), 1, "{call}");
    caller.hang_up().await;
    fake.assert_no_violations();
}
