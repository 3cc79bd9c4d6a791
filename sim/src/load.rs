//! `callbridge-sim load`: N concurrent calls at real-time pace, every frame tagged so that its
//! echo can be matched and timed.
//!
//! Each 160-byte frame carries, in its first 16 bytes, the call's index, the frame's number
//! and the time it was sent (µs since the run began); the rest is filler that differs per
//! frame. So every payload in a run is unique, an echo identifies itself, and the round trip
//! needs no lookup table. A frame is lost when its echo has not come back by the end of the
//! drain period; an echo that does not match a frame sent on that call (or comes twice) is
//! counted as corrupt.
//!
//! Against callbridge (`Protocol::Twilio`), calls speak Media Streams and echo marks through
//! Twilio's playback model. Against an OpenAI Realtime server directly (`Protocol::OpenAi`,
//! the benchmark's floor), calls open a session and send `input_audio_buffer.append`s, and
//! the echoes are `response.output_audio.delta`s: the same frames, without callbridge.
//! Against a GPT-Live server directly (`Protocol::Live`, the floor for `openai.api = "live"`),
//! calls do what a bridge does (`gpt-live.md` §1–§4, §12): `session.start`, wait for
//! `session.started`, `session.input_audio.append`s, echoes as `session.output_audio.delta`s,
//! then `session.close` and a bounded wait for `session.closed`.

use std::{
    borrow::Cow,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use base64::prelude::*;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::time::{interval_at, sleep_until, timeout, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use callbridge_fakes::{
    playback::Playback,
    twilio::{decode_payload, parse_service_message, Caller, ServiceMessage, FRAME_BYTES},
};

use crate::{
    procstat,
    stats::Percentiles,
    ws::{connect_live, connect_openai, connect_twilio, voice_webhook, Socket, TwilioAuth},
};

const FRAME: Duration = Duration::from_millis(20);
const FRAMES_PER_SECOND: u64 = 50;
/// Bytes of each frame taken by the tag (call, frame number, send time).
const TAG_BYTES: usize = 16;
/// How often `--pid`'s memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Connection set-up (including the OpenAI session) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// After `session.close`, how long a GPT-Live call waits for `session.closed` (the bound
/// Twilio's provider and the Azure SDK use, `gpt-live.md` §12).
const LIVE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which protocol the simulated calls speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Twilio Media Streams, to callbridge.
    Twilio,
    /// OpenAI Realtime, straight to a (fake) Realtime server: the floor.
    OpenAi,
    /// GPT-Live, straight to a (fake) GPT-Live server: the floor for `openai.api = "live"`.
    Live,
}

impl Protocol {
    /// The protocol a URL asks for when none is given: a Realtime server's path
    /// (`/v1/realtime`) or a GPT-Live server's (`/v1/live/sessions`) means straight to that
    /// server (the floor); anything else is callbridge, as Twilio.
    pub fn for_url(url: &str) -> Protocol {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = path.trim_end_matches('/');
        if path.ends_with("/v1/realtime") {
            Protocol::OpenAi
        } else if path.ends_with("/v1/live/sessions") {
            Protocol::Live
        } else {
            Protocol::Twilio
        }
    }

    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Twilio => "twilio",
            Protocol::OpenAi => "openai",
            Protocol::Live => "live",
        }
    }
}

/// A load run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub url: String,
    pub protocol: Protocol,
    pub calls: usize,
    pub seconds: u64,
    /// Calls start evenly spread over this many ms.
    pub ramp_ms: u64,
    /// Echoes of frames sent in a call's first `warmup_ms` are matched but not timed
    /// (connection and session set-up are reported separately).
    pub warmup_ms: u64,
    /// After its last frame, a call waits this long for outstanding echoes.
    pub drain_ms: u64,
    /// After the calls end, wait this long before the last memory reading of `pid`.
    pub settle_ms: u64,
    /// A process (callbridge) whose CPU time and memory to report.
    pub pid: Option<u32>,
    pub auth: TwilioAuth,
    /// Bearer key for `Protocol::OpenAi` and `Protocol::Live`.
    pub api_key: String,
}

impl LoadOptions {
    /// Defaults for everything but the target.
    pub fn new(url: impl Into<String>, protocol: Protocol) -> LoadOptions {
        LoadOptions {
            url: url.into(),
            protocol,
            calls: 10,
            seconds: 10,
            ramp_ms: 1_000,
            warmup_ms: 1_000,
            drain_ms: 2_000,
            settle_ms: 2_000,
            pid: None,
            auth: TwilioAuth::default(),
            api_key: "sk-sim-not-a-real-key".into(),
        }
    }
}

/// CPU and memory of `--pid` over the run.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// CPU seconds (user + system) from just before the first call to just after the last.
    pub cpu_s: f64,
    /// `cpu_s` in ms per call-second (a call-second is 50 frames each way).
    pub cpu_ms_per_call_second: f64,
    pub rss_base_kib: u64,
    pub rss_peak_kib: u64,
    /// After the calls ended and `settle_ms` passed.
    pub rss_end_kib: u64,
    /// (peak − base) / calls connected.
    pub rss_per_call_kib: f64,
}

/// The result of a load run (printed as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub protocol: Protocol,
    pub url: String,
    pub calls: usize,
    pub seconds: u64,
    pub ramp_ms: u64,
    pub calls_connected: usize,
    pub calls_failed: usize,
    pub first_error: Option<String>,
    pub frames_sent: u64,
    pub frames_echoed: u64,
    pub frames_lost: u64,
    pub frames_corrupt: u64,
    pub marks_echoed: u64,
    pub clears: u64,
    pub invalid_messages: u64,
    /// `Protocol::Live`: output transcript fragments received (every session).
    pub transcript_fragments: u64,
    /// `Protocol::Live`: `session.usage.updated` events received.
    pub usage_updates: u64,
    /// `Protocol::Live`: sessions whose `session.close` was confirmed by `session.closed`.
    pub sessions_closed: u64,
    /// Round trip of every frame after its call's warm-up.
    pub latency: Percentiles,
    /// From a call's first connection attempt to its first echo.
    pub setup: Percentiles,
    pub wall_s: f64,
    pub process: Option<ProcessReport>,
    /// Each call, in index order (not in the JSON: a run can have thousands).
    #[serde(skip)]
    pub per_call: Vec<CallOutcome>,
}

/// What one call of a run saw, for a test that judges the calls one by one.
#[derive(Clone, Debug)]
pub struct CallOutcome {
    /// The call's index; against callbridge its call SID is `Caller::call_sid_for(index + 1)`.
    pub index: usize,
    pub connected: bool,
    pub error: Option<String>,
    pub frames_sent: u64,
    pub frames_echoed: u64,
    pub frames_corrupt: u64,
    pub invalid_messages: u64,
}

impl LoadReport {
    /// A few lines for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} calls ({} connected, {} failed) for {} s over {} ms of ramp, {} protocol, {:.1} s wall\n",
            self.calls,
            self.calls_connected,
            self.calls_failed,
            self.seconds,
            self.ramp_ms,
            self.protocol.name(),
            self.wall_s
        );
        if let Some(e) = &self.first_error {
            out.push_str(&format!("first error: {e}\n"));
        }
        out.push_str(&format!(
            "frames: {} sent, {} echoed, {} lost, {} corrupt; {} marks echoed, {} clears, {} invalid messages\n",
            self.frames_sent, self.frames_echoed, self.frames_lost, self.frames_corrupt,
            self.marks_echoed, self.clears, self.invalid_messages
        ));
        if self.protocol == Protocol::Live {
            out.push_str(&format!(
                "live: {} transcript fragments, {} usage updates, {} of {} sessions closed with session.closed\n",
                self.transcript_fragments, self.usage_updates, self.sessions_closed,
                self.calls_connected
            ));
        }
        let l = &self.latency;
        out.push_str(&format!(
            "round trip: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} frames)\n",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
        ));
        let s = &self.setup;
        out.push_str(&format!(
            "set-up to first echo: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            s.p50_ms, s.p99_ms, s.max_ms
        ));
        if let Some(p) = &self.process {
            out.push_str(&format!(
                "pid {}: {:.2} CPU s = {:.3} ms per call-second; RSS base {:.1} MiB, peak {:.1} MiB ({:.1} KiB per call), end {:.1} MiB\n",
                p.pid, p.cpu_s, p.cpu_ms_per_call_second,
                p.rss_base_kib as f64 / 1024.0, p.rss_peak_kib as f64 / 1024.0,
                p.rss_per_call_kib, p.rss_end_kib as f64 / 1024.0
            ));
        }
        out
    }
}

/// What one call saw.
#[derive(Default)]
struct CallResult {
    connected: bool,
    error: Option<String>,
    sent: u64,
    echoed: u64,
    corrupt: u64,
    marks: u64,
    clears: u64,
    invalid: u64,
    transcripts: u64,
    usage_updates: u64,
    closed: bool,
    rtts_us: Vec<u32>,
    setup_us: Option<u32>,
}

/// Per-call bookkeeping shared by both protocols.
struct Tracker {
    index: u32,
    epoch: Instant,
    frames: u64,
    warmup_frames: u64,
    seen: Vec<bool>,
    result: CallResult,
    began: Instant,
    /// How long to wait for echoes after the last frame.
    drain: Duration,
    /// Set when the last frame is sent.
    drain_until: Option<tokio::time::Instant>,
}

/// A 20 ms clock that keeps real time: frames a late tick missed are sent at once.
fn frame_clock() -> tokio::time::Interval {
    let mut tick = interval_at(tokio::time::Instant::now(), FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    tick
}

impl Tracker {
    /// The next tagged frame (base64), if any are left; the last one starts the drain.
    fn next_frame(&mut self) -> Option<String> {
        if self.result.sent >= self.frames {
            return None;
        }
        let payload = self.frame(self.result.sent);
        self.result.sent += 1;
        if self.result.sent == self.frames {
            self.drain_until = Some(tokio::time::Instant::now() + self.drain);
        }
        Some(payload)
    }

    /// All frames sent, and either all echoes are in (`idle`: nothing else is pending) or
    /// the drain period is over.
    fn finished(&self, idle: bool) -> bool {
        self.drain_until.is_some_and(|until| {
            (self.all_echoed() && idle) || tokio::time::Instant::now() >= until
        })
    }

    /// The tagged frame number `seq`, base64-encoded.
    fn frame(&self, seq: u64) -> String {
        let mut frame = [0u8; FRAME_BYTES];
        frame[0..4].copy_from_slice(&self.index.to_le_bytes());
        frame[4..8].copy_from_slice(&(seq as u32).to_le_bytes());
        let sent_us = self.epoch.elapsed().as_micros() as u64;
        frame[8..16].copy_from_slice(&sent_us.to_le_bytes());
        // Filler that differs per frame (an xorshift stream seeded by call and frame).
        let mut x = (u64::from(self.index) << 32 | seq) ^ 0x9E37_79B9_7F4A_7C15;
        for b in &mut frame[TAG_BYTES..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        BASE64_STANDARD.encode(frame)
    }

    /// Matches echoed audio (whole frames) against what this call sent.
    fn on_echo(&mut self, audio: &[u8]) {
        if audio.is_empty() || audio.len() % FRAME_BYTES != 0 {
            self.result.corrupt += 1;
            return;
        }
        let now_us = self.epoch.elapsed().as_micros() as u64;
        for frame in audio.chunks_exact(FRAME_BYTES) {
            let index = u32::from_le_bytes(frame[0..4].try_into().unwrap_or_default());
            let seq = u64::from(u32::from_le_bytes(
                frame[4..8].try_into().unwrap_or_default(),
            ));
            let sent_us = u64::from_le_bytes(frame[8..16].try_into().unwrap_or_default());
            let fresh = index == self.index
                && seq < self.result.sent
                && !std::mem::replace(&mut self.seen[seq as usize], true);
            if !fresh {
                self.result.corrupt += 1;
                continue;
            }
            self.result.echoed += 1;
            if self.result.setup_us.is_none() {
                self.result.setup_us = Some(self.began.elapsed().as_micros() as u32);
            }
            if seq >= self.warmup_frames {
                let rtt = now_us.saturating_sub(sent_us);
                self.result
                    .rtts_us
                    .push(rtt.min(u64::from(u32::MAX)) as u32);
            }
        }
    }

    fn all_echoed(&self) -> bool {
        self.result.echoed >= self.frames
    }
}

/// Runs the load and gathers the report. Call on a multi-threaded Tokio runtime.
pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    if options.calls == 0 || options.seconds == 0 {
        bail!("--calls and --seconds must be at least 1");
    }
    let options = Arc::new(options);
    let epoch = Instant::now();
    let ticks = procstat::ticks_per_second();
    let base = match options.pid {
        Some(pid) => {
            Some(procstat::sample(pid).with_context(|| format!("cannot read /proc/{pid}"))?)
        }
        None => None,
    };
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(
        base.map_or(0, |b| b.rss_kib),
    ));
    let sampler = options.pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(s) = procstat::sample(pid) {
                    peak.fetch_max(s.rss_kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    });

    let mut handles = Vec::with_capacity(options.calls);
    for i in 0..options.calls {
        let offset = options.ramp_ms * i as u64 / options.calls as u64;
        let options = options.clone();
        handles.push(tokio::spawn(async move {
            let start_at = tokio::time::Instant::from_std(epoch) + Duration::from_millis(offset);
            sleep_until(start_at).await;
            let frames = options.seconds * FRAMES_PER_SECOND;
            let mut tracker = Tracker {
                index: i as u32,
                epoch,
                frames,
                warmup_frames: options.warmup_ms / 20,
                seen: vec![false; frames as usize],
                result: CallResult::default(),
                began: Instant::now(),
                drain: Duration::from_millis(options.drain_ms),
                drain_until: None,
            };
            let outcome = match options.protocol {
                Protocol::Twilio => twilio_call(&options, &mut tracker).await,
                Protocol::OpenAi => openai_call(&options, &mut tracker).await,
                Protocol::Live => live_call(&options, &mut tracker).await,
            };
            if let Err(e) = outcome {
                tracker.result.error = Some(format!("call {i}: {e:#}"));
            }
            tracker.result
        }));
    }
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.unwrap_or_else(|e| CallResult {
            error: Some(format!("call task failed: {e}")),
            ..CallResult::default()
        }));
    }
    let wall_s = epoch.elapsed().as_secs_f64();
    let after_calls = match options.pid {
        Some(pid) => procstat::sample(pid).ok(),
        None => None,
    };
    if options.pid.is_some() {
        tokio::time::sleep(Duration::from_millis(options.settle_ms)).await;
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }

    let mut rtts = Vec::new();
    let mut setups = Vec::new();
    let mut report = LoadReport {
        protocol: options.protocol,
        url: options.url.clone(),
        calls: options.calls,
        seconds: options.seconds,
        ramp_ms: options.ramp_ms,
        calls_connected: 0,
        calls_failed: 0,
        first_error: None,
        frames_sent: 0,
        frames_echoed: 0,
        frames_lost: 0,
        frames_corrupt: 0,
        marks_echoed: 0,
        clears: 0,
        invalid_messages: 0,
        transcript_fragments: 0,
        usage_updates: 0,
        sessions_closed: 0,
        latency: Percentiles::default(),
        setup: Percentiles::default(),
        wall_s,
        process: None,
        per_call: Vec::with_capacity(results.len()),
    };
    for (index, r) in results.into_iter().enumerate() {
        report.per_call.push(CallOutcome {
            index,
            connected: r.connected,
            error: r.error.clone(),
            frames_sent: r.sent,
            frames_echoed: r.echoed,
            frames_corrupt: r.corrupt,
            invalid_messages: r.invalid,
        });
        report.calls_connected += usize::from(r.connected);
        if r.error.is_some() {
            report.calls_failed += 1;
            if report.first_error.is_none() {
                report.first_error = r.error;
            }
        }
        report.frames_sent += r.sent;
        report.frames_echoed += r.echoed;
        report.frames_corrupt += r.corrupt;
        report.marks_echoed += r.marks;
        report.clears += r.clears;
        report.invalid_messages += r.invalid;
        report.transcript_fragments += r.transcripts;
        report.usage_updates += r.usage_updates;
        report.sessions_closed += u64::from(r.closed);
        rtts.extend(r.rtts_us);
        setups.extend(r.setup_us);
    }
    report.frames_lost = report.frames_sent - report.frames_echoed;
    report.latency = Percentiles::of(&mut rtts);
    report.setup = Percentiles::of(&mut setups);
    if let (Some(pid), Some(base), Some(after)) = (options.pid, base, after_calls) {
        let end = procstat::sample(pid).map(|s| s.rss_kib).unwrap_or(0);
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        let cpu_s = (after.cpu_ticks - base.cpu_ticks) as f64 / ticks as f64;
        let call_seconds = (report.calls_connected as u64 * options.seconds).max(1) as f64;
        report.process = Some(ProcessReport {
            pid,
            cpu_s,
            cpu_ms_per_call_second: cpu_s * 1000.0 / call_seconds,
            rss_base_kib: base.rss_kib,
            rss_peak_kib: peak,
            rss_end_kib: end,
            rss_per_call_kib: peak.saturating_sub(base.rss_kib) as f64
                / report.calls_connected.max(1) as f64,
        });
    }
    Ok(report)
}

async fn send(ws: &mut Socket, text: String) -> anyhow::Result<()> {
    ws.send(Message::text(text))
        .await
        .context("socket closed while sending")
}

/// One call to callbridge, as Twilio.
async fn twilio_call(options: &LoadOptions, t: &mut Tracker) -> anyhow::Result<()> {
    let n = u64::from(t.index) + 1;
    let mut caller = Caller::new(Caller::stream_sid_for(n), Caller::call_sid_for(n));
    let params = timeout(
        SETUP_TIMEOUT,
        voice_webhook(&options.url, &options.auth, caller.call_sid()),
    )
    .await
    .map_err(|_| anyhow!("voice webhook timed out"))??;
    let mut ws = timeout(SETUP_TIMEOUT, connect_twilio(&options.url, &options.auth))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    t.result.connected = true;
    send(&mut ws, caller.connected()).await?;
    send(&mut ws, caller.start(&params)).await?;

    let mut playback = Playback::new(false);
    let mut to_echo: Vec<String> = Vec::new();
    let mut tick = frame_clock();
    let mut decoded = Vec::with_capacity(FRAME_BYTES);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(payload) = t.next_frame() {
                    send(&mut ws, caller.media_b64(&payload, FRAME_BYTES)).await?;
                }
                to_echo.extend(playback.advance(FRAME_BYTES).marks);
                if t.finished(playback.is_idle()) {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => match parse_service_message(text.as_str(), caller.stream_sid()) {
                    Ok(ServiceMessage::Media { payload }) => {
                        match decode_payload(&payload, &mut decoded) {
                            Ok(()) => {
                                t.on_echo(&decoded);
                                playback.push_audio(&decoded);
                            }
                            Err(_) => t.result.invalid += 1,
                        }
                    }
                    Ok(ServiceMessage::Mark { name }) => to_echo.extend(playback.push_mark(name.into_owned())),
                    Ok(ServiceMessage::Clear) => {
                        t.result.clears += 1;
                        to_echo.extend(playback.clear().marks);
                    }
                    Err(_) => t.result.invalid += 1,
                },
                Some(Ok(Message::Close(_))) | None => bail!("the service closed the call"),
                Some(Ok(Message::Binary(_))) => t.result.invalid += 1,
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("websocket error: {e}"),
            },
        }
        for name in to_echo.drain(..) {
            t.result.marks += 1;
            send(&mut ws, caller.mark(&name)).await?;
        }
    }
    send(&mut ws, caller.stop()).await?;
    close(ws).await;
    Ok(())
}

#[derive(Deserialize)]
struct ServerEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    delta: Option<Cow<'a, str>>,
}

/// The session.update a Twilio bridge sends: µ-law both ways, VAD off (the floor measures
/// transport, not turn-taking).
const SESSION_UPDATE: &str = r#"{"type":"session.update","session":{"type":"realtime","output_modalities":["audio"],"audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":null},"output":{"format":{"type":"audio/pcmu"}}}}}"#;

async fn next_event_of(ws: &mut Socket, kind: &str) -> anyhow::Result<()> {
    while let Some(frame) = ws.next().await {
        if let Message::Text(text) = frame? {
            let event: ServerEvent<'_> =
                serde_json::from_str(text.as_str()).context("server sent bad JSON")?;
            if event.kind == kind {
                return Ok(());
            }
            if event.kind == "error" {
                bail!("server error while waiting for {kind}: {}", text.as_str());
            }
        }
    }
    bail!("server closed while waiting for {kind}")
}

/// One session straight to an OpenAI Realtime server: the floor.
async fn openai_call(options: &LoadOptions, t: &mut Tracker) -> anyhow::Result<()> {
    let mut ws = timeout(SETUP_TIMEOUT, async {
        let mut ws = connect_openai(&options.url, &options.api_key).await?;
        next_event_of(&mut ws, "session.created").await?;
        send(&mut ws, SESSION_UPDATE.to_owned()).await?;
        next_event_of(&mut ws, "session.updated").await?;
        anyhow::Ok(ws)
    })
    .await
    .map_err(|_| anyhow!("session set-up timed out"))??;
    t.result.connected = true;

    let mut tick = frame_clock();
    let mut decoded = Vec::with_capacity(FRAME_BYTES);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(payload) = t.next_frame() {
                    send(&mut ws, format!(r#"{{"type":"input_audio_buffer.append","audio":"{payload}"}}"#)).await?;
                }
                if t.finished(true) {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerEvent<'_>>(text.as_str()) {
                    Ok(ServerEvent { kind, delta: Some(delta) }) if kind == "response.output_audio.delta" => {
                        decoded.clear();
                        match BASE64_STANDARD.decode_vec(delta.as_bytes(), &mut decoded) {
                            Ok(()) => t.on_echo(&decoded),
                            Err(_) => t.result.invalid += 1,
                        }
                    }
                    Ok(ServerEvent { kind, .. }) if kind == "error" => t.result.invalid += 1,
                    Ok(_) => {}
                    Err(_) => t.result.invalid += 1,
                },
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the session"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("websocket error: {e}"),
            },
        }
    }
    close(ws).await;
    Ok(())
}

/// The `session.start` of a Twilio bridge (`gpt-live.md` §2): µ-law at 8 kHz both ways,
/// client delegation; no instructions (the echo fake has no use for them).
const LIVE_START: &str = r#"{"type":"session.start","event_id":"sim_start","session":{"model":"gpt-live-1.1","audio":{"format":{"type":"audio/pcmu","rate":8000}},"delegation":null}}"#;

const LIVE_CLOSE: &str = r#"{"type":"session.close","event_id":"sim_close"}"#;

/// What one GPT-Live server event means to a call.
#[derive(Debug, PartialEq, Eq)]
enum LiveEvent {
    /// `session.output_audio.delta`: audio to match (decoded into the buffer).
    Audio,
    Transcript,
    Usage,
    Closed,
    /// `error`, a delta that is not base64, or a frame that is not an event.
    Invalid,
    /// Anything else (acks, `info`, input transcripts…): ignored, as a bridge ignores unknown
    /// events (§14).
    Other,
}

/// Reads one GPT-Live server event; audio is decoded into `audio`.
fn live_event(text: &str, audio: &mut Vec<u8>) -> LiveEvent {
    let Ok(event) = serde_json::from_str::<ServerEvent<'_>>(text) else {
        return LiveEvent::Invalid;
    };
    match (event.kind.as_ref(), event.delta) {
        ("session.output_audio.delta", Some(delta)) => {
            audio.clear();
            match BASE64_STANDARD.decode_vec(delta.as_bytes(), audio) {
                Ok(()) => LiveEvent::Audio,
                Err(_) => LiveEvent::Invalid,
            }
        }
        ("session.output_audio.delta", None) | ("error", _) => LiveEvent::Invalid,
        ("session.output_transcript.delta", _) => LiveEvent::Transcript,
        ("session.usage.updated", _) => LiveEvent::Usage,
        ("session.closed", _) => LiveEvent::Closed,
        _ => LiveEvent::Other,
    }
}

/// One session straight to a GPT-Live server, as a bridge runs it: the floor for
/// `openai.api = "live"`.
async fn live_call(options: &LoadOptions, t: &mut Tracker) -> anyhow::Result<()> {
    let mut ws = timeout(SETUP_TIMEOUT, async {
        let mut ws = connect_live(&options.url, &options.api_key).await?;
        send(&mut ws, LIVE_START.to_owned()).await?;
        next_event_of(&mut ws, "session.started").await?;
        anyhow::Ok(ws)
    })
    .await
    .map_err(|_| anyhow!("session set-up timed out"))??;
    t.result.connected = true;

    let mut tick = frame_clock();
    let mut decoded = Vec::with_capacity(FRAME_BYTES);
    let mut on_text = |t: &mut Tracker, text: &str| -> bool {
        match live_event(text, &mut decoded) {
            LiveEvent::Audio => t.on_echo(&decoded),
            LiveEvent::Transcript => t.result.transcripts += 1,
            LiveEvent::Usage => t.result.usage_updates += 1,
            LiveEvent::Closed => return true,
            LiveEvent::Invalid => t.result.invalid += 1,
            LiveEvent::Other => {}
        }
        false
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(payload) = t.next_frame() {
                    send(&mut ws, format!(r#"{{"type":"session.input_audio.append","audio":"{payload}"}}"#)).await?;
                }
                if t.finished(true) {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => if on_text(t, text.as_str()) {
                    bail!("the server closed the session before the call ended: {}", text.as_str());
                },
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the socket"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("websocket error: {e}"),
            },
        }
    }
    // §12: session.close, then session.closed (output still queued comes first and is
    // matched), then the bridge closes the socket.
    send(&mut ws, LIVE_CLOSE.to_owned()).await?;
    let closed = timeout(LIVE_CLOSE_TIMEOUT, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    if on_text(t, text.as_str()) {
                        return Ok(());
                    }
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(e) => bail!("websocket error while closing: {e}"),
            }
        }
        bail!("the server closed the socket before session.closed")
    })
    .await;
    close(ws).await;
    match closed {
        Ok(Ok(())) => {
            t.result.closed = true;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!(
            "no session.closed within {} s of session.close",
            LIVE_CLOSE_TIMEOUT.as_secs()
        ),
    }
}

/// Closes as a well-behaved peer does: close frame, then wait (briefly) for the other side's.
async fn close(mut ws: Socket) {
    let _ = ws.close(None).await;
    let _ = timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(frames: u64) -> Tracker {
        Tracker {
            index: 7,
            epoch: Instant::now(),
            frames,
            warmup_frames: 1,
            seen: vec![false; frames as usize],
            result: CallResult::default(),
            began: Instant::now(),
            drain: Duration::from_millis(100),
            drain_until: None,
        }
    }

    #[test]
    fn protocols_follow_the_url() {
        for (url, protocol) in [
            ("ws://127.0.0.1:9090/v1/realtime", Protocol::OpenAi),
            (
                "ws://127.0.0.1:9090/v1/realtime?model=gpt-realtime",
                Protocol::OpenAi,
            ),
            ("wss://api.openai.com/v1/live/sessions", Protocol::Live),
            ("ws://127.0.0.1:9090/v1/live/sessions/", Protocol::Live),
            ("ws://127.0.0.1:8080/media-stream", Protocol::Twilio),
            (
                "ws://127.0.0.1:8080/v1/live/sessions/media-stream",
                Protocol::Twilio,
            ),
            ("ws://127.0.0.1:8080", Protocol::Twilio),
        ] {
            assert_eq!(Protocol::for_url(url), protocol, "{url}");
        }
        assert_eq!(Protocol::Live.name(), "live");
        assert_eq!(serde_json::to_value(Protocol::Live).unwrap(), "live");
    }

    /// GPT-Live server events as a call reads them.
    #[test]
    fn live_events_are_read() {
        let mut audio = Vec::new();
        let frame = BASE64_STANDARD.encode([0x7Fu8; FRAME_BYTES]);
        let delta = format!(r#"{{"type":"session.output_audio.delta","delta":"{frame}"}}"#);
        assert_eq!(live_event(&delta, &mut audio), LiveEvent::Audio);
        assert_eq!(audio, [0x7Fu8; FRAME_BYTES]);
        for (text, want) in [
            (
                r#"{"type":"session.output_transcript.delta","event_id":"e","delta":" echo","start_ms":0,"end_ms":1000}"#,
                LiveEvent::Transcript,
            ),
            (
                r#"{"type":"session.usage.updated","event_id":"e","usage":{"seconds":1.5}}"#,
                LiveEvent::Usage,
            ),
            (
                r#"{"type":"session.closed","event_id":"e","reason":"close_requested","usage":{"seconds":2.0}}"#,
                LiveEvent::Closed,
            ),
            (
                r#"{"type":"error","event_id":"e","error":{"code":"invalid_value"}}"#,
                LiveEvent::Invalid,
            ),
            (
                r#"{"type":"session.output_audio.delta","delta":"AB=="}"#,
                LiveEvent::Invalid,
            ),
            (
                r#"{"type":"session.output_audio.delta"}"#,
                LiveEvent::Invalid,
            ),
            ("not json", LiveEvent::Invalid),
            (
                r#"{"type":"info","event_id":"e","code":"x","message":"y"}"#,
                LiveEvent::Other,
            ),
        ] {
            assert_eq!(live_event(text, &mut audio), want, "{text}");
        }
    }

    /// The start a bridge sends (§2): the model in the event, µ-law 8 kHz, client delegation.
    #[test]
    fn the_live_start_is_a_bridge_start() {
        let start: serde_json::Value = serde_json::from_str(LIVE_START).unwrap();
        assert_eq!(start["type"], "session.start");
        assert_eq!(start["session"]["model"], "gpt-live-1.1");
        assert_eq!(
            start["session"]["audio"]["format"],
            serde_json::json!({"type": "audio/pcmu", "rate": 8000})
        );
        assert!(start["session"]["delegation"].is_null());
        let close: serde_json::Value = serde_json::from_str(LIVE_CLOSE).unwrap();
        assert_eq!(close["type"], "session.close");
    }

    /// A frame's echo is matched once; duplicates, strangers and partial frames are corrupt.
    #[test]
    fn frames_are_tagged_and_matched() {
        let mut t = tracker(3);
        let f0 = BASE64_STANDARD.decode(t.frame(0)).unwrap();
        let f1 = BASE64_STANDARD.decode(t.frame(1)).unwrap();
        assert_eq!(f0.len(), FRAME_BYTES);
        assert_ne!(f0[TAG_BYTES..], f1[TAG_BYTES..]);
        t.result.sent = 2;
        let mut both = f0.clone();
        both.extend(&f1);
        t.on_echo(&both);
        assert_eq!(t.result.echoed, 2);
        assert_eq!(t.result.rtts_us.len(), 1, "frame 0 is warm-up");
        t.on_echo(&f1);
        t.on_echo(&f0[..100]);
        let mut other = tracker(3);
        other.index = 8;
        other.result.sent = 1;
        other.on_echo(&f0);
        assert_eq!((t.result.corrupt, other.result.corrupt), (2, 1));
        assert!(!t.all_echoed());
    }
}
