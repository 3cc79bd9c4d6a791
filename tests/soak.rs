//! The fault-injection soak: a few hundred calls through the OpenAI leg, about fifty at a
//! time, against the fake OpenAI server in echo mode with every 10th connection attempt
//! faulted (dropped without a close frame, `session_expired` + 1001, close 1011, a garbage
//! frame, HTTP 503 and 429 at the upgrade, in turn). Afterwards the registry is empty, the
//! service holds no media stream, every fake socket was closed, every session-ending fault
//! cost exactly one restart of the AI leg and no call, and frames were lost only around the
//! faults.
//!
//! The fake and the simulated callers run on a runtime of their own (two threads), as the
//! separate processes of a real deployment would; the service runs its one worker thread.
//! The service's log is captured (a `log` logger of this test binary) to read, per call, the
//! end reason and restarts of its `call ended` line.
//!
//! `cargo test --test soak -- --nocapture` prints the figures.

mod support;

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use callbridge::settings::UpstreamMode;
use callbridge_fakes::{
    openai::{self as fake_openai, EchoConfig, FakeStats, Fault},
    twilio::Caller,
};
use callbridge_sim::load::{self, LoadOptions, LoadReport, Protocol};
use secrecy::SecretString;
use serde_json::json;
use support::{spawn_app, test_settings, TestApp, TEST_OPENAI_KEY};

/// Calls in the soak, each `SECONDS` long, starting evenly over `RAMP_MS`: about
/// CALLS × SECONDS / RAMP = 50 calls live at once (about 60 at the peak, with set-up and
/// drain).
/// A debug build of the service, the fake and the callers share two cores here: at 100 live
/// calls (and other jobs on the machine) they fall behind real time, and echoes come back
/// later than the callers wait for them.
const CALLS: usize = 300;
const SECONDS: u64 = 4;
const RAMP_MS: u64 = 24_000;
/// Every 10th connection attempt to the fake gets a fault (10 % of the attempts).
const FAULT_EVERY: u64 = 10;
/// A session fault fires after this many appends (0.5 s of audio into the session), so it
/// always lands mid-call: a call lasts 200 frames.
const FAULT_AFTER_APPENDS: u64 = 25;
/// What a call may lose at a restart of its AI leg is what was between the caller and the
/// fake when the session died: frames the service had written to the old socket, or queued
/// for it, that the fake did not echo (after a drop it reads nothing more; after its close
/// frame it echoes nothing more, and the service sends until it reads that close), and frames
/// the caller sent until the service noticed and rerouted its audio (those reach the dead leg
/// and are dropped, counted as `upstream_not_ready`). That is at most one round trip of audio,
/// which the callers measure (its p99, in 20 ms frames), plus this many frames for the
/// service's actors to pass the news on. From then on caller audio is held
/// (`call.upstream_buffer_ms` = 2 s, far more than a restart here: backoff ≤ 100 ms plus a
/// local connect) and sent to the new session, so it is not lost. The bound catches a
/// service that does not route caller audio to the new leg (the rest of the call, ≥ 150
/// frames) or that drops the held audio of a slow reconnect; a few held frames lost on a fast
/// reconnect would hide under it.
const NOTICE_FRAMES: u64 = 5;

// ---------------------------------------------------------------------------------------------
// The service's log

/// Keeps the service's warnings and errors, and its `call ended` lines.
struct Capture {
    lines: Mutex<Vec<(log::Level, String)>>,
}

static CAPTURE: Capture = Capture {
    lines: Mutex::new(Vec::new()),
};

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            self.push(record.level(), record.args().to_string());
        } else if record.level() == log::Level::Info && record.target().starts_with("callbridge") {
            let msg = record.args().to_string();
            if msg.contains(" call ended (") {
                self.push(record.level(), msg);
            }
        }
    }

    fn flush(&self) {}
}

impl Capture {
    fn push(&self, level: log::Level, msg: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((level, msg));
    }

    fn lines(&self) -> Vec<(log::Level, String)> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `name=<number>` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// What the service's `call ended` line says of one call.
#[derive(Debug, Default, Clone)]
struct Ended {
    reason: String,
    restarts: u64,
    upstream_not_ready: u64,
}

/// The `call ended` lines by call index (`[CA<32 hex>] call ended (reason): …`).
fn ended_calls(lines: &[(log::Level, String)]) -> BTreeMap<usize, Ended> {
    let mut calls = BTreeMap::new();
    for (_, line) in lines {
        let Some(rest) = line.strip_prefix("[CA") else {
            continue;
        };
        let Some((hex, rest)) = rest.split_once("] call ended (") else {
            continue;
        };
        let (Ok(n), Some((reason, _))) = (u64::from_str_radix(hex, 16), rest.split_once(')'))
        else {
            continue;
        };
        let ended = Ended {
            reason: reason.to_owned(),
            restarts: field(line, "upstream_restarts").unwrap_or(0),
            upstream_not_ready: field(line, "upstream_not_ready").unwrap_or(0),
        };
        assert!(
            calls.insert(n as usize - 1, ended).is_none(),
            "two `call ended` lines for call {n}"
        );
    }
    calls
}

// ---------------------------------------------------------------------------------------------

/// Resident memory of this process (the service, the fake and the callers), KiB.
fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `/health`'s live calls and media streams.
async fn live(app: &TestApp) -> (u64, u64) {
    let (_, health) = app.get_json("/health").await;
    (
        health["live_calls"].as_u64().unwrap_or(u64::MAX),
        health["media_streams"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Polls until nothing is left of the calls: the registry empty, no live call or media
/// stream, no fake socket open. Returns what is left when that takes over 5 s.
async fn wait_drained(app: &TestApp, stats: &FakeStats) -> (u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, calls) = app.get_json("/calls").await;
        let registry = calls["count"].as_u64().unwrap_or(u64::MAX);
        let (live_calls, streams) = live(app).await;
        let sockets = stats.sessions_open.load(Ordering::Relaxed);
        let left = (registry, live_calls, streams, sockets);
        if left == (0, 0, 0, 0) || Instant::now() > deadline {
            return left;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The peers' runtime, shut down without blocking (a runtime dropped inside the test's async
/// context would panic, over the assertion that failed).
struct Peers(Option<tokio::runtime::Runtime>);

impl Peers {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the peers' runtime runs until the end")
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[actix_web::test]
async fn a_soak_with_injected_faults_loses_no_call_and_leaks_nothing() {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let began = Instant::now();
    let rss_before = rss_kib("VmRSS:");

    // The peers' runtime: the fake OpenAI server and the callers.
    let peers = Peers(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("soak-peers")
            .enable_all()
            .build()
            .expect("a runtime for the peers"),
    ));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("non-blocking");
    let fake_url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
    let stats = Arc::new(FakeStats::default());
    let config = EchoConfig {
        fault_every: FAULT_EVERY,
        faults: Fault::ALL.to_vec(),
        fault_after_appends: FAULT_AFTER_APPENDS,
        ..EchoConfig::default()
    };
    let fake_stats = stats.clone();
    peers.rt().spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        fake_openai::serve(listener, config, fake_stats).await;
    });

    let mut settings = test_settings();
    settings.upstream = UpstreamMode::OpenAi;
    settings.twilio.validate_signatures = Some(false);
    settings.openai.url = fake_url;
    settings.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    // Ample: a call's faults are far apart, and a budget spent would end it (upstream_failed).
    settings.openai.max_restarts = 10;
    // The default (test_settings shorten it): on a starved debug build a session.updated
    // slower than 2 s would be a restart no fault caused.
    settings.openai.connect_timeout_ms = 5_000;
    // The default coalescing of marks (test_settings mark every chunk).
    settings.call.mark_interval_ms = 100;
    let app = spawn_app(settings).await;

    let mut options = LoadOptions::new(app.ws_url(), Protocol::Twilio);
    options.calls = CALLS;
    options.seconds = SECONDS;
    options.ramp_ms = RAMP_MS;
    options.warmup_ms = 0;
    // A call waits this long for its last echoes, and only when some are missing.
    options.drain_ms = 3_000;
    let load = peers.rt().spawn(load::run(options));
    let mut peak_live = 0;
    while !load.is_finished() {
        peak_live = peak_live.max(live(&app).await.0);
        actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    }
    let report: LoadReport = load.await.expect("the load task").expect("the load runs");
    eprintln!("{}", report.render());

    let left = wait_drained(&app, &stats).await;
    let (registry_left, live_left, streams_left, sockets_left) = left;
    let (_, health) = app.get_json("/health").await;
    let rss_after = rss_kib("VmRSS:");
    let rss_peak = rss_kib("VmHWM:");
    let lines = CAPTURE.lines();
    let ended = ended_calls(&lines);

    // The figures.
    let faults = &stats.faults;
    let attempts = stats.attempts.load(Ordering::Relaxed);
    let opened = stats.sessions_opened.load(Ordering::Relaxed);
    let restarts: u64 = ended.values().map(|e| e.restarts).sum();
    let recovered = ended
        .iter()
        .filter(|(i, e)| {
            e.restarts > 0
                && e.reason == "twilio_stop"
                && report.per_call.get(**i).is_some_and(|c| c.error.is_none())
        })
        .count();
    let not_ready_dropped: u64 = ended.values().map(|e| e.upstream_not_ready).sum();
    println!(
        "soak figures: calls={} connected={} | faults={} ({}) over {} connection attempts | \
         sessions_opened={} restarts={} recovered_calls={} | frames sent={} echoed={} lost={} corrupt={} \
         invalid_messages={} service_dropped_not_ready={} | leaks: registry={} live_calls={} \
         media_streams={} fake_sockets={} | rss_kib before={} after={} peak={} | \
         peak_live_calls={} | wall={:.1}s",
        CALLS,
        report.calls_connected,
        faults.total(),
        faults.summary(),
        attempts,
        opened,
        restarts,
        recovered,
        report.frames_sent,
        report.frames_echoed,
        report.frames_lost,
        report.frames_corrupt,
        report.invalid_messages,
        not_ready_dropped,
        registry_left,
        live_left,
        streams_left,
        sockets_left,
        rss_before,
        rss_after,
        rss_peak,
        peak_live,
        began.elapsed().as_secs_f64()
    );

    // Frames lost, explained: dropped by the service (caller audio for a leg that was gone,
    // `upstream_not_ready` in its log), or taken by the fake after its fault closed the
    // session; the rest was in flight in a dropped connection.
    let unechoed = faults.unechoed_appends.load(Ordering::Relaxed);
    println!(
        "soak frames lost: {} = {} dropped by the service at a dead leg + {} taken by the \
         fake after its close + {} otherwise (in flight)",
        report.frames_lost,
        not_ready_dropped,
        unechoed,
        report.frames_lost as i64 - not_ready_dropped as i64 - unechoed as i64
    );

    // Where frames were lost: calls whose leg restarted, and the others.
    let lost_of = |i: usize| report.per_call[i].frames_sent - report.per_call[i].frames_echoed;
    let restarted: Vec<String> = ended
        .iter()
        .filter(|(_, e)| e.restarts > 0)
        .map(|(i, e)| format!("{}:{}", e.restarts, lost_of(*i)))
        .collect();
    let others: Vec<u64> = (0..report.per_call.len())
        .filter(|i| ended.get(i).is_none_or(|e| e.restarts == 0))
        .map(lost_of)
        .filter(|&lost| lost > 0)
        .collect();
    println!(
        "soak frames lost per restarted call (restarts:lost): {}; other calls with a loss: {} \
         (max {}); bound per restart {} frames",
        restarted.join(" "),
        others.len(),
        others.iter().max().unwrap_or(&0),
        (report.latency.p99_ms / 20.0).ceil() as u64 + NOTICE_FRAMES
    );

    // Every call connected and was carried to its end, as the caller ended it.
    assert_eq!(report.calls_connected, CALLS, "{:?}", report.first_error);
    assert_eq!(report.calls_failed, 0, "{:?}", report.first_error);
    assert_eq!(
        health["calls_ended"],
        json!({ "twilio_stop": CALLS }),
        "every call ended by the caller's stop (none upstream_failed): {health}"
    );
    assert_eq!(ended.len(), CALLS, "a `call ended` line for every call");
    assert!(
        peak_live >= 20,
        "the calls overlapped: {peak_live} live at most"
    );

    // Leaks: nothing left once the calls are over.
    assert_eq!(registry_left, 0, "calls left in the registry (/calls)");
    assert_eq!((live_left, streams_left), (0, 0), "/health: {health}");
    assert_eq!(sockets_left, 0, "fake OpenAI sockets left open");

    // The faults happened, about 10 % of the attempts, every kind.
    assert_eq!(
        attempts / FAULT_EVERY,
        faults.total(),
        "faults fired: {}",
        faults.summary()
    );
    for fault in Fault::ALL {
        assert!(
            faults.get(fault) > 0,
            "no {} fault: {}",
            fault.name(),
            faults.summary()
        );
    }
    assert_eq!(
        opened + faults.get(Fault::Refuse503) + faults.get(Fault::Refuse429),
        attempts,
        "every attempt was a session or a refusal"
    );

    // Every session-ending fault cost exactly one restart; the garbage none; nothing else
    // restarted a leg. Counted three ways: the fake's attempts, the service's `call ended`
    // lines, and its `AI leg lost` warnings.
    assert_eq!(
        attempts,
        CALLS as u64 + faults.ending_sessions(),
        "connection attempts = calls + restarts"
    );
    assert_eq!(
        restarts,
        faults.ending_sessions(),
        "restarts per the service's log"
    );
    let count = |needle: &str| lines.iter().filter(|(_, l)| l.contains(needle)).count() as u64;
    assert_eq!(count("AI leg lost"), faults.ending_sessions());
    assert_eq!(
        count("unreadable event from OpenAI"),
        faults.get(Fault::Garbage),
        "each garbage frame logged (and counted) once"
    );
    assert!(recovered > 0);
    let errors: Vec<_> = lines
        .iter()
        .filter(|(level, _)| *level == log::Level::Error)
        .collect();
    assert!(errors.is_empty(), "errors logged: {errors:#?}");
    // The garbage is logged twice: by the leg (the frame) and by the call (the error it
    // counts).
    assert_eq!(
        count("OpenAI error unreadable_event"),
        faults.get(Fault::Garbage)
    );
    let known = [
        "AI leg lost",
        "unreadable event from OpenAI",
        "OpenAI error unreadable_event",
    ];
    let unexpected: Vec<_> = lines
        .iter()
        .filter(|(level, l)| *level == log::Level::Warn && !known.iter().any(|k| l.contains(k)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected warnings: {unexpected:#?}"
    );

    // Frames: all sent, none corrupt, and only lost around a restart, per call.
    assert_eq!(report.frames_sent, CALLS as u64 * SECONDS * 50);
    assert_eq!(report.frames_corrupt, 0);
    assert_eq!(report.invalid_messages, 0);
    let per_restart = (report.latency.p99_ms / 20.0).ceil() as u64 + NOTICE_FRAMES;
    for call in &report.per_call {
        let restarts_of_call = ended.get(&call.index).map_or(0, |e| e.restarts);
        let lost = call.frames_sent - call.frames_echoed;
        assert!(
            lost <= restarts_of_call * per_restart,
            "call {} ({}) lost {lost} frames with {restarts_of_call} restart(s) (at most \
             {per_restart} a restart: p99 round trip {:.0} ms)",
            call.index,
            Caller::call_sid_for(call.index as u64 + 1),
            report.latency.p99_ms
        );
    }
    assert!(report.frames_lost <= faults.ending_sessions() * per_restart);
    assert!(
        not_ready_dropped + unechoed <= report.frames_lost,
        "frames the service or the fake dropped came back anyway?"
    );

    // The fake saw a well-behaved client throughout, and sent no error but the faults'.
    assert_eq!(
        stats.violations.load(Ordering::Relaxed),
        0,
        "fake violations"
    );
    assert_eq!(
        stats.errors_sent.load(Ordering::Relaxed),
        faults.get(Fault::SessionExpired)
    );
}

/// The log parsing the soak relies on.
#[test]
fn call_ended_lines_are_parsed() {
    let line = format!(
        "[{}] call ended (twilio_stop): the caller hung up; 6400 ms, frames in=300 out=298, \
         barge_ins=0, upstream_restarts=2, rollovers=0, malformed=0, dropped: pre_start=0 \
         upstream_not_ready=3 interrupted=0 twilio_backpressure=0 openai_backpressure=0",
        Caller::call_sid_for(42)
    );
    let calls = ended_calls(&[(log::Level::Info, line), (log::Level::Warn, "x".into())]);
    let call = &calls[&41];
    assert_eq!(call.reason, "twilio_stop");
    assert_eq!((call.restarts, call.upstream_not_ready), (2, 3));
}
