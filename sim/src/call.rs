//! `callbridge-sim call`: one Twilio call played from a WAV file at real-time pace.
//!
//! Sends `connected`, `start`, one `media` per 20 ms of the input and, at the end, `stop`
//! (then closes the socket, as Twilio does on hang-up). The service's audio is played through
//! Twilio's buffer model ([`Playback`]): marks come back when the audio before them has played,
//! `clear` drops what was queued. What was played is the reply: with the echo upstream it must
//! equal the input, byte for byte.
//!
//! The call hangs up once the input is over, nothing is left to play and no audio has come
//! back for `tail_ms` (or at `max_ms`, whichever is first).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::{interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use callbridge_fakes::{
    playback::Playback,
    twilio::{
        decode_payload, parse_service_message, Caller, ServiceMessage, BYTES_PER_MS, FRAME_BYTES,
    },
};

use crate::ws::{connect_twilio, voice_webhook, Socket, TwilioAuth};

/// One frame of audio every 20 ms.
const FRAME: Duration = Duration::from_millis(20);

/// Invalid messages quoted in the timeline (the rest are only counted).
const MAX_QUOTED_INVALID: usize = 5;

/// What to play and where.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// `ws://HOST:PORT/media-stream` of the service.
    pub url: String,
    /// The caller's audio: 8 kHz µ-law.
    pub audio: Vec<u8>,
    pub auth: TwilioAuth,
    /// After the input ends: hang up once no audio has come back for this long.
    pub tail_ms: u64,
    /// Hang up after this long whatever happens.
    pub max_ms: u64,
    /// `<Parameter>` pairs sent in `start.customParameters`.
    pub custom_parameters: Vec<(String, String)>,
    /// Digits to press: (ms after `start`, digit).
    pub dtmf: Vec<(u64, char)>,
}

impl CallOptions {
    /// Defaults for everything but the URL and the audio.
    pub fn new(url: impl Into<String>, audio: Vec<u8>) -> CallOptions {
        CallOptions {
            url: url.into(),
            audio,
            auth: TwilioAuth::default(),
            tail_ms: 1_500,
            max_ms: 600_000,
            custom_parameters: Vec::new(),
            dtmf: Vec::new(),
        }
    }
}

/// One line of the timeline: ms since the call began (the connection attempt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineEntry {
    pub at_ms: u64,
    pub what: String,
}

/// What happened on the call.
#[derive(Debug, Default)]
pub struct CallReport {
    pub timeline: Vec<TimelineEntry>,
    /// µ-law bytes sent.
    pub sent_bytes: usize,
    /// µ-law bytes received from the service.
    pub received_bytes: usize,
    /// What the caller heard (received audio minus what a `clear` dropped).
    pub played: Vec<u8>,
    /// Audio dropped by `clear`s, in bytes.
    pub cleared_bytes: usize,
    /// Marks echoed back to the service.
    pub marks_echoed: usize,
    /// `clear`s received (barge-ins).
    pub clears: usize,
    /// ms from `start` to the first audio back.
    pub first_audio_ms: Option<u64>,
    /// Messages Twilio would have rejected (warnings 31950/31951).
    pub invalid_messages: usize,
    /// The service closed the stream before the caller hung up.
    pub closed_by_service: bool,
}

impl CallReport {
    /// The timeline and a summary, for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for entry in &self.timeline {
            out.push_str(&format!("{:>8} ms  {}\n", entry.at_ms, entry.what));
        }
        let ms = |bytes: usize| bytes / BYTES_PER_MS;
        out.push_str(&format!(
            "summary: sent {} ms, received {} ms, played {} ms, cleared {} ms; {} marks echoed, {} clears, {} invalid messages; first audio back {}\n",
            ms(self.sent_bytes),
            ms(self.received_bytes),
            ms(self.played.len()),
            ms(self.cleared_bytes),
            self.marks_echoed,
            self.clears,
            self.invalid_messages,
            match self.first_audio_ms {
                Some(ms) => format!("{ms} ms after start"),
                None => "never".into(),
            }
        ));
        out
    }
}

/// Timeline with consecutive mark echoes folded into one line.
struct Timeline {
    t0: Instant,
    entries: Vec<TimelineEntry>,
    /// (count, first name, last name, at) of the marks echoed since the last other event.
    marks: Option<(usize, String, String, u64)>,
}

impl Timeline {
    fn at(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn event(&mut self, what: impl Into<String>) {
        self.flush_marks();
        let at_ms = self.at();
        self.entries.push(TimelineEntry {
            at_ms,
            what: what.into(),
        });
    }

    fn mark(&mut self, name: &str) {
        let at = self.at();
        match &mut self.marks {
            Some((count, _, last, when)) => {
                *count += 1;
                *last = name.to_owned();
                *when = at;
            }
            None => self.marks = Some((1, name.to_owned(), name.to_owned(), at)),
        }
    }

    fn flush_marks(&mut self) {
        if let Some((count, first, last, at_ms)) = self.marks.take() {
            let what = if count == 1 {
                format!("mark {first} echoed")
            } else {
                format!("{count} marks echoed ({first} … {last})")
            };
            self.entries.push(TimelineEntry { at_ms, what });
        }
    }
}

/// Plays one call. Errors are connection failures; protocol problems are in the report.
pub async fn run(options: CallOptions) -> anyhow::Result<CallReport> {
    let mut timeline = Timeline {
        t0: Instant::now(),
        entries: Vec::new(),
        marks: None,
    };
    let n =
        u64::from(std::process::id()) << 20 | u64::from(timeline.t0.elapsed().subsec_nanos() >> 12);
    let mut caller = Caller::new(Caller::stream_sid_for(n), Caller::call_sid_for(n));
    let mut params = voice_webhook(&options.url, &options.auth, caller.call_sid()).await?;
    timeline.event(format!(
        "voice webhook answered <Connect><Stream> with {} parameters",
        params.len()
    ));
    params.extend(options.custom_parameters.iter().cloned());
    let mut ws = connect_twilio(&options.url, &options.auth).await?;
    timeline.event(format!("connected to {}", options.url));

    send(&mut ws, caller.connected()).await?;
    send(&mut ws, caller.start(&params)).await?;
    let started = Instant::now();
    timeline.event(format!(
        "start sent (call {}, stream {})",
        caller.call_sid(),
        caller.stream_sid()
    ));

    let mut report = CallReport::default();
    let mut playback = Playback::new(true);
    let mut frames = options.audio.chunks(FRAME_BYTES);
    let mut dtmf = options.dtmf.clone();
    dtmf.sort_by_key(|(at, _)| *at);
    let mut dtmf = dtmf.into_iter().peekable();
    let mut tick = interval(FRAME);
    // Twilio keeps real time: frames a late tick missed are sent at once, not skipped.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let tail = Duration::from_millis(options.tail_ms);
    let max = Duration::from_millis(options.max_ms);
    let mut input_done: Option<Instant> = None;
    let mut last_audio = started;
    let mut to_echo: Vec<String> = Vec::new();
    let mut audio = Vec::with_capacity(FRAME_BYTES);

    loop {
        tokio::select! {
            _ = tick.tick() => {
                let since_start = started.elapsed().as_millis() as u64;
                while let Some(&(at, digit)) = dtmf.peek() {
                    if at > since_start { break; }
                    dtmf.next();
                    send(&mut ws, caller.dtmf(digit)).await?;
                    timeline.event(format!("digit {digit} pressed"));
                }
                match frames.next() {
                    Some(frame) => {
                        send(&mut ws, caller.media(frame)).await?;
                        report.sent_bytes += frame.len();
                    }
                    None if input_done.is_none() => {
                        input_done = Some(Instant::now());
                        timeline.event(format!(
                            "input finished ({} ms of audio sent)",
                            report.sent_bytes / BYTES_PER_MS
                        ));
                    }
                    None => {}
                }
                to_echo.extend(playback.advance(FRAME_BYTES).marks);
                if let Some(done) = input_done {
                    if playback.is_idle() && last_audio.elapsed() >= tail && done.elapsed() >= tail {
                        break;
                    }
                }
                if timeline.t0.elapsed() >= max {
                    timeline.event("time limit reached");
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    match parse_service_message(text.as_str(), caller.stream_sid()) {
                        Ok(ServiceMessage::Media { payload }) => match decode_payload(&payload, &mut audio) {
                            Ok(()) => {
                                if report.first_audio_ms.is_none() {
                                    let ms = started.elapsed().as_millis() as u64;
                                    report.first_audio_ms = Some(ms);
                                    timeline.event(format!("first audio back ({ms} ms after start)"));
                                }
                                report.received_bytes += audio.len();
                                last_audio = Instant::now();
                                playback.push_audio(&audio);
                            }
                            Err(why) => invalid(&mut report, &mut timeline, why),
                        },
                        Ok(ServiceMessage::Mark { name }) => {
                            to_echo.extend(playback.push_mark(name.into_owned()));
                        }
                        Ok(ServiceMessage::Clear) => {
                            report.clears += 1;
                            let cleared = playback.clear();
                            report.cleared_bytes += cleared.bytes;
                            timeline.event(format!(
                                "clear received (barge-in #{}): {} ms of queued audio dropped",
                                report.clears,
                                cleared.bytes / BYTES_PER_MS
                            ));
                            to_echo.extend(cleared.marks);
                        }
                        Err(why) => invalid(&mut report, &mut timeline, why),
                    }
                }
                Some(Ok(Message::Binary(_))) => invalid(
                    &mut report,
                    &mut timeline,
                    "binary frame (Twilio warning 31950)".into(),
                ),
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                    timeline.event(format!("the service closed the stream {why}"));
                    report.closed_by_service = true;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    timeline.event(format!("websocket error: {e}"));
                    report.closed_by_service = true;
                    break;
                }
                None => {
                    timeline.event("the service closed the connection");
                    report.closed_by_service = true;
                    break;
                }
            },
        }
        for name in to_echo.drain(..) {
            send(&mut ws, caller.mark(&name)).await?;
            report.marks_echoed += 1;
            timeline.mark(&name);
        }
    }

    if !report.closed_by_service {
        send(&mut ws, caller.stop()).await?;
        let _ = ws.close(None).await;
        timeline.event("stop sent, socket closed (hang-up)");
        // Read until the service's close arrives, briefly: nothing after `stop` matters.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
    timeline.flush_marks();
    report.timeline = timeline.entries;
    report.played = playback.take_recording();
    Ok(report)
}

fn invalid(report: &mut CallReport, timeline: &mut Timeline, why: String) {
    report.invalid_messages += 1;
    if report.invalid_messages <= MAX_QUOTED_INVALID {
        timeline.event(format!("invalid message from the service: {why}"));
    }
}

async fn send(ws: &mut Socket, text: String) -> anyhow::Result<()> {
    ws.send(Message::text(text))
        .await
        .context("the service's socket closed while sending")
}
