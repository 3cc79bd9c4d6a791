//! End-to-end: `callbridge-sim` against the real service. A generated tone played through the
//! echo upstream comes back identical; a small load through the simulator's own fake OpenAI
//! server loses nothing; signed upgrades work against a secured service.

mod support;

use std::sync::Arc;

use callbridge::settings::UpstreamMode;
use callbridge_fakes::openai::{self as fake_openai, EchoConfig, FakeStats};
use callbridge_sim::{
    audio,
    call::{self, CallOptions},
    load::{self, LoadOptions, Protocol},
    ws::TwilioAuth,
};
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
