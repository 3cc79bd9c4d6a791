//! `callbridge-sim`: try and measure callbridge without a phone. See `usage()`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context as _};
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

fn usage() -> &'static str {
    "callbridge-sim: try and measure callbridge without a phone

USAGE:
  callbridge-sim call --url ws://HOST:PORT/media-stream --audio in.wav [--out reply.wav]
        [--tail-ms 1500] [--max-seconds 600] [--param NAME=VALUE]... [--dtmf MS:DIGIT,...]
        [--signed-url wss://PUBLIC/media-stream]
      One Twilio call at real-time pace: POSTs the voice webhook (/voice on the same host,
      signed as Twilio signs it), then opens the stream with the TwiML's parameters; plays in.wav (8 kHz mu-law, or 16-bit PCM at
      8/16/24/48 kHz), records what the caller hears to reply.wav, prints a timeline.
  callbridge-sim tone --out tone.wav [--hz 440] [--ms 3000]
      Writes a test tone as an 8 kHz mu-law WAV.
  callbridge-sim fake-openai [--api realtime] [--port 9090] [--host 127.0.0.1]
        [--turn-ms 5000] [--barge-in-every-ms 0] [--tool-call-every-ms 0 --tool-call NAME:JSON]
        [--require-key] [--threads 2]
      A fake OpenAI Realtime GA server at ws://HOST:PORT/v1/realtime that echoes appended
      audio as response.output_audio.delta; with --barge-in-every-ms, a scripted caller
      turn (speech_started, transcript) interrupts every so often; with --tool-call-every-ms,
      the model calls the tool NAME with the JSON arguments every so often (a tool round trip
      through callbridge's [[tools]]), and waits for its output.
  callbridge-sim fake-openai --api live [--port 9090] [--host 127.0.0.1]
        [--transcript-every-ms 1000] [--usage-every-ms 10000] [--session-secs 3600]
        [--no-pace] [--tool-call-every-ms 0 --tool-call NAME:JSON] [--require-key]
        [--threads 2]
      A fake GPT-Live server at ws://HOST:PORT/v1/live/sessions, as strict as the tests' one:
      answers session.start, echoes each session.input_audio.append as a
      session.output_audio.delta at real-time pace (a burst comes back spread out; --no-pace
      echoes at once), sends an output transcript fragment and a session.usage.updated
      every so often, and answers session.close with session.closed and the usage; with
      --tool-call-every-ms, in sessions with Responses delegation, the backend calls the
      tool NAME with the JSON arguments every so often (session.delegation.created, then a
      function_call), waits for its output, and answers its response.create with
      response.completed and a transcript fragment quoting the output.
  callbridge-sim load --url URL --calls N --seconds S [--ramp-ms 1000] [--pid PID]
        [--protocol twilio|openai|live] [--warmup-ms 1000] [--drain-ms 2000]
        [--settle-ms 2000] [--threads 2] [--json report.json]
      N concurrent calls, each POSTing the voice webhook first; every frame tagged and
      matched on its way back. A summary goes to stderr and the JSON report to stdout (or
      --json). Straight to a server, the benchmark's floor: openai when the URL path is
      /v1/realtime (session.update, input_audio_buffer.append), live when it is
      /v1/live/sessions (session.start, session.input_audio.append, session.close);
      otherwise twilio (callbridge, which decides the API itself).

ENVIRONMENT:
  TWILIO_AUTH_TOKEN  sign the upgrade (X-Twilio-Signature), as Twilio does
  OPENAI_API_KEY     the bearer key for --protocol openai|live; with fake-openai
                     --require-key, the only key accepted
"
}

/// `--name value` options (repeatable ones keep every value) and bare flags.
struct Args {
    values: HashMap<String, Vec<String>>,
    flags: Vec<String>,
}

const FLAGS: &[&str] = &["require-key", "no-pace", "help"];

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut flags = Vec::new();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument `{arg}`");
            };
            if FLAGS.contains(&name) {
                flags.push(name.to_owned());
                continue;
            }
            let value = args
                .next()
                .ok_or_else(|| anyhow!("--{name} needs a value"))?;
            values.entry(name.to_owned()).or_default().push(value);
        }
        Ok(Args { values, flags })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn required(&self, name: &str) -> anyhow::Result<&str> {
        self.get(name)
            .ok_or_else(|| anyhow!("--{name} is required"))
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow!("--{name}: `{v}` is not a valid number")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// Fails on options the command does not know (a typo must not be silently ignored).
    fn only(&self, known: &[&str]) -> anyhow::Result<()> {
        for name in self.values.keys().chain(self.flags.iter()) {
            if !known.contains(&name.as_str()) {
                bail!("unknown option --{name}");
            }
        }
        Ok(())
    }
}

fn twilio_auth(args: &Args) -> TwilioAuth {
    TwilioAuth {
        auth_token: std::env::var("TWILIO_AUTH_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        signed_url: args.get("signed-url").map(str::to_owned),
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// Many sockets: raise the soft open-files limit to the hard one.
fn raise_open_files_limit() {
    // SAFETY: plain libc calls on a stack struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn cmd_call(args: &Args) -> anyhow::Result<()> {
    args.only(&[
        "url",
        "audio",
        "out",
        "tail-ms",
        "max-seconds",
        "param",
        "dtmf",
        "signed-url",
    ])?;
    let path = args.required("audio")?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
    let input = audio::read_wav(&bytes).with_context(|| path.to_owned())?;
    let mut options = CallOptions::new(args.required("url")?, audio::to_mulaw_8k(&input));
    options.auth = twilio_auth(args);
    options.tail_ms = args.number("tail-ms", options.tail_ms)?;
    options.max_ms = args.number::<u64>("max-seconds", 600)? * 1000;
    for param in args.all("param") {
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| anyhow!("--param {param}: expected NAME=VALUE"))?;
        options.custom_parameters.push((k.to_owned(), v.to_owned()));
    }
    if let Some(list) = args.get("dtmf") {
        for item in list.split(',') {
            let (ms, digit) = item
                .split_once(':')
                .ok_or_else(|| anyhow!("--dtmf {item}: expected MS:DIGIT"))?;
            let ms = ms.parse().map_err(|_| anyhow!("--dtmf {item}: bad ms"))?;
            let mut chars = digit.chars();
            match (chars.next(), chars.next()) {
                (Some(d), None) if d.is_ascii_digit() || d == '*' || d == '#' => {
                    options.dtmf.push((ms, d));
                }
                _ => bail!("--dtmf {item}: the digit must be one of 0-9 * #"),
            }
        }
    }
    let out = args.get("out").map(str::to_owned);
    eprintln!(
        "playing {} ms of audio from {path}",
        options.audio.len() / 8
    );
    let report = runtime(1)?.block_on(call::run(options))?;
    print!("{}", report.render());
    if let Some(out) = out {
        std::fs::write(&out, audio::write_wav_mulaw(&report.played))
            .with_context(|| format!("cannot write {out}"))?;
        println!("reply written to {out} ({} ms)", report.played.len() / 8);
    }
    Ok(())
}

fn cmd_tone(args: &Args) -> anyhow::Result<()> {
    args.only(&["out", "hz", "ms"])?;
    let out = args.required("out")?;
    let hz: f64 = args.number("hz", 440.0)?;
    let ms: u32 = args.number("ms", 3000)?;
    let tone = audio::tone_mulaw(hz, ms, 8000);
    std::fs::write(out, audio::write_wav_mulaw(&tone))
        .with_context(|| format!("cannot write {out}"))?;
    println!("{out}: {ms} ms of {hz} Hz, 8 kHz mu-law");
    Ok(())
}

/// Which fake `fake-openai` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FakeApi {
    Realtime,
    Live,
}

/// `--require-key`: the key to accept, from `OPENAI_API_KEY`.
fn required_key(args: &Args) -> anyhow::Result<Option<String>> {
    if !args.flag("require-key") {
        return Ok(None);
    }
    match std::env::var("OPENAI_API_KEY") {
        Ok(key) if !key.is_empty() => Ok(Some(key)),
        _ => bail!("--require-key needs OPENAI_API_KEY set to the key to accept"),
    }
}

/// `--tool-call NAME` or `--tool-call NAME:JSON-ARGUMENTS` (arguments `{}` when none).
fn tool_call(args: &Args) -> anyhow::Result<Option<(String, String)>> {
    let Some(spec) = args.get("tool-call") else {
        return Ok(None);
    };
    let (name, arguments) = spec.split_once(':').unwrap_or((spec, "{}"));
    serde_json::from_str::<serde_json::Value>(arguments)
        .map_err(|_| anyhow!("--tool-call {spec}: expected NAME or NAME:JSON-ARGUMENTS"))?;
    Ok(Some((name.to_owned(), arguments.to_owned())))
}

/// `fake-openai`'s options: which fake, configured.
fn fake_upstream(args: &Args) -> anyhow::Result<(FakeApi, Upstream)> {
    let api = match args.get("api") {
        None | Some("realtime") => FakeApi::Realtime,
        Some("live") => FakeApi::Live,
        Some(other) => bail!("--api {other}: expected realtime or live"),
    };
    let common = [
        "api",
        "port",
        "host",
        "require-key",
        "threads",
        "tool-call-every-ms",
        "tool-call",
    ];
    let own: &[&str] = match api {
        FakeApi::Realtime => &["turn-ms", "barge-in-every-ms"],
        FakeApi::Live => &[
            "transcript-every-ms",
            "usage-every-ms",
            "session-secs",
            "no-pace",
        ],
    };
    args.only(&[&common[..], own].concat())?;
    let api_key = required_key(args)?;
    let tool_call_every_ms = args.number("tool-call-every-ms", 0)?;
    let tool_call = tool_call(args)?;
    let upstream = match api {
        FakeApi::Realtime => Upstream::Realtime(EchoConfig {
            turn_ms: args.number("turn-ms", 5000)?,
            barge_in_every_ms: args.number("barge-in-every-ms", 0)?,
            api_key,
            tool_call_every_ms,
            tool_call,
            ..EchoConfig::default()
        }),
        FakeApi::Live => {
            let defaults = LiveEchoConfig::default();
            let config = LiveEchoConfig {
                api_key,
                transcript_every_ms: args
                    .number("transcript-every-ms", defaults.transcript_every_ms)?,
                usage_every_ms: args.number("usage-every-ms", defaults.usage_every_ms)?,
                session_secs: args.number("session-secs", defaults.session_secs)?,
                pace_output: !args.flag("no-pace"),
                tool_call_every_ms,
                tool_call,
            };
            if config.session_secs == 0 {
                bail!("--session-secs must be at least 1");
            }
            Upstream::Live(config)
        }
    };
    Ok((api, upstream))
}

fn cmd_fake_openai(args: &Args) -> anyhow::Result<()> {
    let (api, upstream) = fake_upstream(args)?;
    let host = args.get("host").unwrap_or("127.0.0.1").to_owned();
    let port: u16 = args.number("port", 9090)?;
    let (name, path) = match api {
        FakeApi::Realtime => ("fake-openai", "/v1/realtime"),
        FakeApi::Live => ("fake-openai (GPT-Live)", fake_live::PATH),
    };
    let threads = args.number("threads", 2)?;
    runtime(threads)?.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        println!("{name} listening on ws://{addr}{path}");
        let stats = Arc::new(FakeStats::default());
        let report = stats.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut last = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let now = (report.sessions_opened.load(Relaxed), report.appends.load(Relaxed));
                if now != last {
                    eprintln!(
                        "{name}: {} sessions open ({} in all), {} appends echoed, {} errors sent, {} violations",
                        report.sessions_open.load(Relaxed),
                        now.0,
                        now.1,
                        report.errors_sent.load(Relaxed),
                        report.violations.load(Relaxed)
                    );
                    last = now;
                }
            }
        });
        match upstream {
            Upstream::Realtime(config) => fake_openai::serve(listener, config, stats).await,
            Upstream::Live(config) => fake_live::serve_live(listener, config, stats).await,
        }
        anyhow::Ok(())
    })
}

/// The fake to serve, configured.
enum Upstream {
    Realtime(EchoConfig),
    Live(LiveEchoConfig),
}

fn cmd_load(args: &Args) -> anyhow::Result<()> {
    args.only(&[
        "url",
        "calls",
        "seconds",
        "ramp-ms",
        "pid",
        "protocol",
        "warmup-ms",
        "drain-ms",
        "settle-ms",
        "threads",
        "json",
        "signed-url",
    ])?;
    let url = args.required("url")?;
    let protocol = match args.get("protocol") {
        Some("twilio") => Protocol::Twilio,
        Some("openai") => Protocol::OpenAi,
        Some("live") => Protocol::Live,
        Some(other) => bail!("--protocol {other}: expected twilio, openai or live"),
        None => Protocol::for_url(url),
    };
    let mut options = LoadOptions::new(url, protocol);
    options.calls = args.number("calls", options.calls)?;
    options.seconds = args.number("seconds", options.seconds)?;
    options.ramp_ms = args.number("ramp-ms", options.ramp_ms)?;
    options.warmup_ms = args.number("warmup-ms", options.warmup_ms)?;
    options.drain_ms = args.number("drain-ms", options.drain_ms)?;
    options.settle_ms = args.number("settle-ms", options.settle_ms)?;
    options.pid = match args.get("pid") {
        Some(_) => Some(args.number("pid", 0)?),
        None => None,
    };
    options.auth = twilio_auth(args);
    if let Ok(key) = std::env::var("OPENAI_API_KEY") {
        if !key.is_empty() {
            options.api_key = key;
        }
    }
    let threads = args.number("threads", 2)?;
    let report = runtime(threads)?.block_on(load::run(options))?;
    eprint!("{}", report.render());
    let json = serde_json::to_string_pretty(&report)?;
    match args.get("json") {
        Some(path) => {
            std::fs::write(path, json + "\n").with_context(|| format!("cannot write {path}"))?
        }
        None => println!("{json}"),
    }
    Ok(())
}

fn main() {
    raise_open_files_limit();
    // wss:// URLs: rustls needs its crypto provider chosen once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let result = Args::parse(argv).and_then(|args| {
        if args.flag("help") {
            print!("{}", usage());
            return Ok(());
        }
        match command.as_str() {
            "call" => cmd_call(&args),
            "tone" => cmd_tone(&args),
            "fake-openai" => cmd_fake_openai(&args),
            "load" => cmd_load(&args),
            "help" | "--help" | "-h" => {
                print!("{}", usage());
                Ok(())
            }
            "" => Err(anyhow!("no command given")),
            other => Err(anyhow!("unknown command `{other}`")),
        }
    });
    if let Err(e) = result {
        eprintln!("callbridge-sim: {e:#}\n\n{}", usage());
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::parse(list.iter().map(|s| (*s).to_owned())).expect("parses")
    }

    fn live(list: &[&str]) -> anyhow::Result<LiveEchoConfig> {
        match fake_upstream(&args(list))? {
            (FakeApi::Live, Upstream::Live(config)) => Ok(config),
            _ => panic!("not the live fake"),
        }
    }

    fn realtime(list: &[&str]) -> anyhow::Result<EchoConfig> {
        match fake_upstream(&args(list))? {
            (FakeApi::Realtime, Upstream::Realtime(config)) => Ok(config),
            _ => panic!("not the realtime fake"),
        }
    }

    /// Both fakes take `--tool-call-every-ms N --tool-call NAME:JSON`, parsed the same way.
    #[test]
    fn both_fakes_take_the_tool_flags() {
        let flags = [
            "--tool-call-every-ms",
            "2000",
            "--tool-call",
            r#"lookup_order:{"order_id":"A123"}"#,
        ];
        let expected = Some((
            "lookup_order".to_owned(),
            r#"{"order_id":"A123"}"#.to_owned(),
        ));
        let config = live(&[&["--api", "live"][..], &flags].concat()).unwrap();
        assert_eq!(config.tool_call_every_ms, 2000);
        assert_eq!(config.tool_call, expected);
        assert!(config.pace_output, "the other options keep their defaults");
        let config = realtime(&flags).unwrap();
        assert_eq!(config.tool_call_every_ms, 2000);
        assert_eq!(config.tool_call, expected);
        // A bare name gets empty arguments.
        let config = live(&["--api", "live", "--tool-call", "ping"]).unwrap();
        assert_eq!(config.tool_call, Some(("ping".into(), "{}".into())));
        assert_eq!(config.tool_call_every_ms, 0, "off by default");
        let config = live(&["--api", "live"]).unwrap();
        assert_eq!((config.tool_call_every_ms, config.tool_call), (0, None));
    }

    #[test]
    fn bad_tool_flags_are_refused() {
        for api in ["live", "realtime"] {
            let err = fake_upstream(&args(&["--api", api, "--tool-call", "f:{nope"]))
                .err()
                .unwrap();
            assert!(err.to_string().contains("NAME:JSON-ARGUMENTS"), "{err}");
            let err = fake_upstream(&args(&["--api", api, "--tool-call-every-ms", "x"]))
                .err()
                .unwrap();
            assert!(err.to_string().contains("tool-call-every-ms"), "{err}");
        }
        // Each API's own options stay its own.
        assert!(fake_upstream(&args(&["--api", "live", "--turn-ms", "5"])).is_err());
        assert!(fake_upstream(&args(&["--no-pace"])).is_err());
    }
}
