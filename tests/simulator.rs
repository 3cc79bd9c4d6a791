//! End-to-end: `callbridge-sim` against the real service. A generated tone played through the
//! echo upstream comes back identical; a small load through the simulator's own fake OpenAI
//! server loses nothing, on either API (Realtime and GPT-Live); the GPT-Live floor (the
//! simulator as a bridge, straight to the fake) loses nothing and sees what the fake promises
//! (transcript fragments, usage, `session.closed`, real-time pace); signed upgrades work
//! against a secured service.

mod support;

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use base64::prelude::*;
use callbridge::settings::UpstreamMode;
use callbridge_fakes::{
    live::{self as fake_live, LiveEchoConfig},
    openai::{self as fake_openai, EchoConfig, FakeStats},
};
use callbridge_sim::{
    audio,
    call::{self, CallOptions},
    load::{self, LoadOptions, Protocol},
    ws::TwilioAuth,
};
use futures_util::{SinkExt as _, StreamExt as _};
use secrecy::SecretString;
use support::{spawn_app, test_settings, TEST_OPENAI_KEY};

/// Starts the simulator's fake OpenAI Realtime server on 127.0.0.1:0.
async fn start_fake_openai(config: EchoConfig) -> (String, Arc<FakeStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a local address");
    let stats = Arc::new(FakeStats::default());
    tokio::spawn(fake_openai::serve(listener, config, stats.clone()));
    (format!("ws://{addr}/v1/realtime"), stats)
}

/// Starts the simulator's fake GPT-Live server (`fake-openai --api live`) on 127.0.0.1:0.
async fn start_fake_live(config: LiveEchoConfig) -> (String, Arc<FakeStats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a local address");
    let stats = Arc::new(FakeStats::default());
    tokio::spawn(fake_live::serve_live(listener, config, stats.clone()));
    (format!("ws://{addr}{}", fake_live::PATH), stats)
}

/// The live fake as the tests run it: only the service's key, fragments and usage often.
fn live_echo() -> LiveEchoConfig {
    LiveEchoConfig {
        api_key: Some(TEST_OPENAI_KEY.into()),
        transcript_every_ms: 200,
        usage_every_ms: 500,
        ..LiveEchoConfig::default()
    }
}

/// Waits until `stats.sessions_open` is 0 (the peer closed every socket).
async fn wait_sessions_closed(stats: &FakeStats) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.sessions_open.load(Ordering::Relaxed) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} fake sessions still open",
            stats.sessions_open.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A tone written to a WAV file and played by the simulator through the echo upstream comes
/// back byte for byte: the offline "can the caller hear us" check.
#[actix_rt::test]
async fn a_tone_through_the_echo_upstream_comes_back_identical() {
    let app = spawn_app(test_settings()).await;
    let tone = audio::tone_mulaw(440.0, 2_000, 8_000);
    let dir = std::env::temp_dir().join(format!("callbridge-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tone.wav");
    std::fs::write(&path, audio::write_wav_mulaw(&tone)).unwrap();
    let input = audio::to_mulaw_8k(&audio::read_wav(&std::fs::read(&path).unwrap()).unwrap());
    assert_eq!(input, tone, "the WAV file round trip");

    let mut options = CallOptions::new(app.ws_url(), input.clone());
    options.tail_ms = 500;
    options.max_ms = 20_000;
    let report = call::run(options).await.expect("the call connects");
    println!("{}", report.render());

    assert_eq!(report.invalid_messages, 0, "{}", report.render());
    assert_eq!(report.sent_bytes, tone.len());
    assert_eq!(report.received_bytes, tone.len());
    assert!(report.played == tone, "the reply differs from the input");
    let first = report.first_audio_ms.expect("audio came back");
    assert!(first < 2_000, "first audio back after {first} ms");
    assert!(!report.closed_by_service, "the service hung up first");
    std::fs::remove_dir_all(&dir).ok();
}

/// A 16 kHz PCM recording is low-passed and decimated to 8 kHz µ-law before it is sent, and
/// what comes back through the echo upstream is exactly what was sent.
#[actix_rt::test]
async fn a_16khz_pcm_file_is_converted_and_echoed() {
    let app = spawn_app(test_settings()).await;
    let samples: Vec<i16> = (0..16_000)
        .map(|i| {
            ((i as f64 * 2.0 * std::f64::consts::PI * 700.0 / 16_000.0).sin() * 9_000.0) as i16
        })
        .collect();
    let wav = audio::write_wav_pcm16(&samples, 16_000);
    let input = audio::to_mulaw_8k(&audio::read_wav(&wav).unwrap());
    assert_eq!(input.len(), 8_000, "1 s at 8 kHz");

    let mut options = CallOptions::new(app.ws_url(), input.clone());
    options.tail_ms = 500;
    let report = call::run(options).await.expect("the call connects");
    assert_eq!(report.invalid_messages, 0);
    assert!(report.played == input, "the reply differs from the input");
}

/// Five calls for two seconds through the OpenAI leg (to the simulator's fake server): every
/// frame comes back, untouched and exactly once; every mark is echoed as Twilio would.
#[actix_rt::test]
async fn a_small_load_through_the_openai_leg_loses_nothing() {
    let (url, stats) = start_fake_openai(EchoConfig::default()).await;
    let mut settings = test_settings();
    settings.upstream = UpstreamMode::OpenAi;
    settings.twilio.validate_signatures = Some(false);
    settings.openai.url = url.clone();
    settings.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    settings.call.mark_interval_ms = 100;
    let app = spawn_app(settings).await;

    let mut options = LoadOptions::new(app.ws_url(), Protocol::Twilio);
    options.calls = 5;
    options.seconds = 2;
    options.ramp_ms = 100;
    options.warmup_ms = 200;
    options.pid = Some(std::process::id());
    options.settle_ms = 0;
    let report = load::run(options).await.expect("the load runs");
    eprintln!("{}", report.render());

    assert_eq!(report.calls_connected, 5, "{:?}", report.first_error);
    assert_eq!(report.calls_failed, 0, "{:?}", report.first_error);
    assert_eq!(report.frames_sent, 5 * 2 * 50);
    assert_eq!(report.frames_lost, 0);
    assert_eq!(report.frames_corrupt, 0);
    assert_eq!(report.invalid_messages, 0);
    // Marks at the default interval, 100 ms of audio: about 5 a second per call (the last of
    // a call may still be in flight when it hangs up).
    assert!(
        report.marks_echoed >= 5 * 9,
        "marks echoed: {}",
        report.marks_echoed
    );
    assert_eq!(
        report.latency.count,
        5 * 90,
        "frames after warm-up are timed"
    );
    assert!(report.process.is_some());
    assert_eq!(
        stats.appends.load(std::sync::atomic::Ordering::Relaxed),
        5 * 2 * 50,
        "every frame reached the fake OpenAI server once"
    );
    assert_eq!(
        stats.errors_sent.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // The floor: the same load straight to the fake server.
    let mut floor = LoadOptions::new(url, Protocol::OpenAi);
    floor.calls = 3;
    floor.seconds = 1;
    floor.ramp_ms = 50;
    let report = load::run(floor).await.expect("the floor runs");
    assert_eq!((report.calls_connected, report.frames_lost), (3, 0));
    assert_eq!(report.frames_echoed, 150);
}

/// With a Twilio auth token, the simulator POSTs the signed voice webhook, signs the upgrade
/// and sends the TwiML's stream token in `start`, as Twilio does, and a secured service
/// accepts the call (it would close a stream without its token); a wrong token is refused.
#[actix_rt::test]
async fn signed_upgrades_work_against_a_secured_service() {
    let mut settings = test_settings();
    settings.secrets.twilio_auth_token = Some(SecretString::from("twilio-test-token"));
    let app = spawn_app(settings).await;
    let tone = audio::tone_mulaw(300.0, 200, 8_000);

    let mut options = CallOptions::new(app.ws_url(), tone.clone());
    options.tail_ms = 300;
    options.auth = TwilioAuth {
        auth_token: Some("twilio-test-token".into()),
        signed_url: None,
    };
    let report = call::run(options.clone())
        .await
        .expect("a signed call connects");
    assert!(report.played == tone);

    options.auth.auth_token = Some("another-token".into());
    let err = call::run(options)
        .await
        .expect_err("a wrongly signed call is refused");
    let text = format!("{err:#}");
    assert!(text.contains("403") || text.contains("401"), "{text}");
    assert!(!text.contains("another-token"), "the token leaked: {text}");
}

/// More than a hundred calls at once each get their OpenAI leg straight away (awc's default
/// connector caps a client at 100 connections, which held the 101st call's leg until another
/// call ended).
#[actix_rt::test]
async fn more_than_a_hundred_calls_are_bridged_at_once() {
    let (url, stats) = start_fake_openai(EchoConfig::default()).await;
    let mut settings = test_settings();
    settings.upstream = UpstreamMode::OpenAi;
    settings.twilio.validate_signatures = Some(false);
    settings.openai.url = url;
    settings.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    let app = spawn_app(settings).await;

    let mut options = LoadOptions::new(app.ws_url(), Protocol::Twilio);
    options.calls = 110;
    options.seconds = 3;
    options.ramp_ms = 300;
    options.warmup_ms = 0;
    let load = tokio::spawn(load::run(options));
    let open = || {
        stats
            .sessions_open
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(2_500);
    while open() < 110 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(open(), 110, "OpenAI sessions open while 110 calls are live");
    let report = load.await.unwrap().expect("the load runs");
    assert_eq!(report.calls_connected, 110, "{:?}", report.first_error);
    // Every call had audio back. (Loss is not asserted: on a debug build sharing one thread
    // with the simulator and the fake, 110 calls can fall behind real time.)
    assert_eq!(report.setup.count, 110, "calls that had audio back");
    assert_eq!(report.frames_corrupt, 0);
}

/// Five calls for two seconds through the service in live mode (`openai.api = "live"`) to the
/// simulator's GPT-Live echo fake: every frame comes back untouched and exactly once, the
/// strict fake finds nothing wrong with what the service sent, every session is closed with
/// `session.close` and its socket closed, and the service's `/calls` empties.
#[actix_rt::test]
async fn a_small_load_through_the_live_leg_loses_nothing() {
    let (url, stats) = start_fake_live(live_echo()).await;
    let mut settings = test_settings();
    settings.upstream = UpstreamMode::OpenAi;
    settings.openai.api = callbridge_actors::config::OpenAiApi::Live;
    settings.openai.live_url = url;
    settings.twilio.validate_signatures = Some(false);
    settings.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    let app = spawn_app(settings).await;

    let mut options = LoadOptions::new(app.ws_url(), Protocol::Twilio);
    options.calls = 5;
    options.seconds = 2;
    options.ramp_ms = 100;
    options.warmup_ms = 200;
    let report = load::run(options).await.expect("the load runs");
    eprintln!("{}", report.render());

    assert_eq!(report.calls_connected, 5, "{:?}", report.first_error);
    assert_eq!(report.calls_failed, 0, "{:?}", report.first_error);
    assert_eq!(report.frames_sent, 5 * 2 * 50);
    assert_eq!(report.frames_lost, 0);
    assert_eq!(report.frames_corrupt, 0);
    assert_eq!(report.invalid_messages, 0);
    assert_eq!(
        report.clears, 0,
        "GPT-Live has no barge-in event to clear on"
    );
    assert_eq!(stats.appends.load(Ordering::Relaxed), 5 * 2 * 50);
    assert_eq!(stats.sessions_opened.load(Ordering::Relaxed), 5);
    assert_eq!(stats.errors_sent.load(Ordering::Relaxed), 0);
    assert_eq!(stats.violations.load(Ordering::Relaxed), 0);

    app.wait_call_count(0).await;
    wait_sessions_closed(&stats).await;
    // Closed the GPT-Live way (session.close, then the socket), not by a dropped socket,
    // which the strict fake would have counted as a violation.
    assert_eq!(stats.violations.load(Ordering::Relaxed), 0);
}

/// `load --protocol live`, the floor for GPT-Live: the simulator as a bridge straight to the
/// fake (bearer key, no query, session.start → session.started, appends, session.close →
/// session.closed). Every frame comes back; the transcript fragments and usage updates the
/// fake promises arrive; a wrong key is refused without being shown.
#[actix_rt::test]
async fn the_live_floor_runs_straight_against_the_fake() {
    let (url, stats) = start_fake_live(live_echo()).await;
    let mut options = LoadOptions::new(url.clone(), Protocol::for_url(&url));
    assert_eq!(options.protocol, Protocol::Live);
    options.api_key = TEST_OPENAI_KEY.into();
    options.calls = 3;
    options.seconds = 2;
    options.ramp_ms = 50;
    options.warmup_ms = 200;
    let report = load::run(options.clone()).await.expect("the floor runs");
    eprintln!("{}", report.render());

    assert_eq!(report.calls_connected, 3, "{:?}", report.first_error);
    assert_eq!(report.calls_failed, 0, "{:?}", report.first_error);
    assert_eq!(
        (report.frames_sent, report.frames_echoed, report.frames_lost),
        (300, 300, 0)
    );
    assert_eq!((report.frames_corrupt, report.invalid_messages), (0, 0));
    // 2 s of audio per call: a fragment every 200 ms, a usage update every 500 ms, and all
    // of them before session.closed.
    assert_eq!(report.transcript_fragments, 3 * 10);
    assert_eq!(report.usage_updates, 3 * 4);
    assert_eq!(report.sessions_closed, 3);
    assert_eq!(
        report.latency.count,
        3 * 90,
        "frames after warm-up are timed"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["protocol"], "live");
    assert_eq!(stats.appends.load(Ordering::Relaxed), 300);
    assert_eq!(stats.errors_sent.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.violations.load(Ordering::Relaxed),
        0,
        "the strict fake"
    );
    wait_sessions_closed(&stats).await;

    options.api_key = "sk-not-the-key".into();
    options.calls = 1;
    options.seconds = 1;
    let report = load::run(options).await.expect("the load runs");
    assert_eq!((report.calls_connected, report.calls_failed), (0, 1));
    let error = report.first_error.unwrap_or_default();
    assert!(error.contains("401"), "{error}");
    assert!(!error.contains("sk-not-the-key"), "the key leaked: {error}");
}

/// The next server event, within 5 s.
async fn next_json(ws: &mut callbridge_sim::ws::Socket) -> serde_json::Value {
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an event within 5 s")
        .expect("the socket is open")
        .expect("no socket error");
    serde_json::from_str(frame.to_text().expect("a text frame")).expect("JSON")
}

/// GPT-Live's output is a real-time stream (gpt-live.md §4.2), and so is the fake's: a second
/// of audio appended at once comes back in order, spread over about a second (never more
/// than `PACE_SLACK` ahead of real time); with pacing off it comes back at once.
#[actix_rt::test]
async fn the_live_fake_echoes_at_real_time_pace() {
    async fn burst(pace_output: bool) -> Vec<Duration> {
        let (url, stats) = start_fake_live(LiveEchoConfig {
            pace_output,
            transcript_every_ms: 100,
            ..LiveEchoConfig::default()
        })
        .await;
        let mut ws = callbridge_sim::ws::connect_live(&url, "sk-any")
            .await
            .expect("connects");
        let start = r#"{"type":"session.start","session":{"model":"gpt-live-1.1","audio":{"format":{"type":"audio/pcmu","rate":8000}},"delegation":null}}"#;
        ws.send(start.into()).await.unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "session.started");
        let frames: Vec<String> = (0..50u8)
            .map(|i| BASE64_STANDARD.encode([i; 160]))
            .collect();
        let t0 = Instant::now();
        for frame in &frames {
            let append = format!(r#"{{"type":"session.input_audio.append","audio":"{frame}"}}"#);
            ws.feed(append.into()).await.unwrap();
        }
        ws.flush().await.unwrap();
        let mut fragments = 0;
        let mut arrivals = Vec::new();
        while arrivals.len() < frames.len() {
            let event = next_json(&mut ws).await;
            match event["type"].as_str() {
                Some("session.output_audio.delta") => {
                    assert_eq!(event["delta"], frames[arrivals.len()], "in order");
                    arrivals.push(t0.elapsed());
                }
                Some("session.output_transcript.delta") => fragments += 1,
                other => panic!("unexpected {other:?}: {event}"),
            }
        }
        ws.send(r#"{"type":"session.close"}"#.into()).await.unwrap();
        loop {
            let event = next_json(&mut ws).await;
            match event["type"].as_str() {
                Some("session.output_transcript.delta") => fragments += 1,
                Some("session.closed") => break,
                other => panic!("unexpected {other:?}: {event}"),
            }
        }
        assert_eq!(fragments, 10, "a fragment per 100 ms echoed");
        ws.close(None).await.unwrap();
        assert_eq!(stats.violations.load(Ordering::Relaxed), 0);
        arrivals
    }

    let paced = burst(true).await;
    let slack = fake_live::PACE_SLACK;
    assert!(
        paced[0] < Duration::from_millis(500),
        "first echo {paced:?}"
    );
    // Frame k may leave at (k × 20 ms − slack) at the earliest.
    for (k, at) in paced.iter().enumerate() {
        let earliest = (Duration::from_millis(20) * k as u32).saturating_sub(slack);
        assert!(*at >= earliest, "echo {k} at {at:?}, before {earliest:?}");
    }
    let spread = paced[49] - paced[0];
    assert!(
        spread >= Duration::from_millis(900),
        "a second of audio came back in {spread:?}"
    );

    let unpaced = burst(false).await;
    assert!(
        unpaced[49] - unpaced[0] < Duration::from_millis(500),
        "unpaced: {unpaced:?}"
    );
}

/// The simulator's fake OpenAI can script tool calls: a call played through the service makes
/// the model call a `[[tools]]` tool, whose server gets the signed request; the fake gets the
/// output and goes on (no violation).
#[actix_rt::test]
async fn the_simulator_scripts_a_tool_round_trip() {
    use callbridge_fakes::receiver::{Answer, FakeReceiver};
    let tool_server = FakeReceiver::start(None).await;
    tool_server.answer_always(Answer::ok(r#"{"status":"shipped"}"#));
    let (url, stats) = start_fake_openai(EchoConfig {
        tool_call_every_ms: 500,
        tool_call: Some(("lookup_order".into(), r#"{"order_id":"A1"}"#.into())),
        ..EchoConfig::default()
    })
    .await;
    let mut settings = test_settings();
    settings.upstream = UpstreamMode::OpenAi;
    settings.twilio.validate_signatures = Some(false);
    settings.openai.url = url;
    settings.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    settings.tools = vec![callbridge_actors::tools::ToolConfig {
        name: "lookup_order".into(),
        description: "Look up an order.".into(),
        parameters: serde_json::json!({"type": "object", "properties": {"order_id": {"type": "string"}}}),
        url: tool_server.url("/lookup"),
        timeout_ms: 2_000,
    }];
    let app = spawn_app(settings).await;
    let tone = audio::tone_mulaw(440.0, 2_000, 8_000);
    let mut options = CallOptions::new(app.ws_url(), tone);
    options.tail_ms = 300;
    let report = call::run(options).await.expect("the call connects");
    assert_eq!(report.invalid_messages, 0, "{}", report.render());
    let got = tool_server.received();
    assert!(!got.is_empty(), "no tool request");
    assert_eq!(got[0].body["tool"], "lookup_order");
    assert_eq!(got[0].body["arguments"]["order_id"], "A1");
    assert_eq!(
        stats.violations.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the fake saw a protocol violation"
    );
}
