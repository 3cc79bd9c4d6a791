//! The fake's own strictness: for each rule, a client event that breaks it is rejected (an
//! `error` of the Live shape and a violation) or recorded (a violation only), and a correct
//! one passes.

use base64::prelude::*;

use super::*;
use crate::live::{estimate_tokens, MAX_APPEND_TOKENS, MAX_INPUT_TOKENS, MESSAGE_OVERHEAD_TOKENS};

/// A valid `session.start` as callbridge sends it (§2).
const START: &str = r#"{"type":"session.start","event_id":"cb_start_1","session":{"model":"gpt-live-1","instructions":"You are the phone assistant of Acme Dental.","audio":{"format":{"type":"audio/pcmu","rate":8000},"output":{"voice":"marin"}},"delegation":null}}"#;

struct Harness {
    st: SessionState,
    rx: mpsc::UnboundedReceiver<Out>,
    knobs: Arc<Knobs>,
}

fn harness(echo: Option<LiveEchoConfig>) -> Harness {
    let (tx, rx) = mpsc::unbounded_channel();
    let knobs = Arc::new(Knobs::new(3_600));
    let st = SessionState::new(
        1,
        "sk-test".into(),
        tx,
        echo.map(Arc::new),
        Arc::default(),
        knobs.clone(),
    );
    Harness { st, rx, knobs }
}

/// `session.start` with this `session` object.
fn start_with(session: &str) -> String {
    format!(r#"{{"type":"session.start","event_id":"cb_start_1","session":{session}}}"#)
}

/// A `session` object for callbridge's start with `extra` fields added (`"k":v,…`).
fn session_with(extra: &str) -> String {
    let base = r#""model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":8000}}"#;
    if extra.is_empty() {
        format!("{{{base}}}")
    } else {
        format!("{{{base},{extra}}}")
    }
}

fn append(b64: &str) -> String {
    format!(r#"{{"type":"session.input_audio.append","audio":"{b64}"}}"#)
}

fn frame_b64() -> String {
    BASE64_STANDARD.encode([0xFFu8; 160])
}

fn commentary(delegation_id: &str, content: &str) -> String {
    format!(
        r#"{{"type":"session.commentary.append","event_id":"cb_c","delegation_id":{delegation_id},"content":"{content}"}}"#
    )
}

impl Harness {
    /// A scripted session whose `session.started` has been sent.
    fn started() -> Harness {
        Harness::started_with(None, START)
    }

    fn started_with(echo: Option<LiveEchoConfig>, start: &str) -> Harness {
        let mut h = harness(echo);
        h.feed(start);
        assert_eq!(h.types(), ["session.started"]);
        assert!(h.st.violations.is_empty(), "{:?}", h.st.violations);
        h
    }

    fn feed(&mut self, text: &str) -> Handled {
        self.st.on_text(text)
    }

    /// Server events emitted since the last call.
    fn events(&mut self) -> Vec<Value> {
        let mut raw = Vec::new();
        self.st.take_inline(&mut raw);
        while let Ok(o) = self.rx.try_recv() {
            raw.push(o);
        }
        raw.into_iter()
            .filter_map(|o| match o {
                Out::Text(text) | Out::Audio(text, _) => {
                    Some(serde_json::from_str(&text).expect("the fake emits JSON"))
                }
                _ => None,
            })
            .inspect(|v: &Value| {
                // Every server event has an id, except audio deltas on a primary socket (§4.2).
                let delta = v["type"] == "session.output_audio.delta";
                assert_eq!(v["event_id"].is_string(), !delta, "{v}");
            })
            .collect()
    }

    fn types(&mut self) -> Vec<String> {
        self.events()
            .iter()
            .map(|v| v["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Feeds `text`, expecting exactly one `error` with `code` and one new violation; returns
    /// the error event.
    fn rejects(&mut self, text: &str, code: &str) -> Value {
        let before = self.st.violation_count;
        self.feed(text);
        let events = self.events();
        assert_eq!(events.len(), 1, "for {text}: {events:?}");
        let error = events[0].clone();
        assert_eq!(error["type"], "error", "for {text}");
        assert_eq!(error["error"]["code"], code, "for {text}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(
            error["client_event_id"], error["error"]["client_event_id"],
            "the id twice (§3)"
        );
        assert_eq!(self.st.violation_count, before + 1, "for {text}");
        error
    }

    /// Feeds `text`, expecting no error and no new violation; returns the events.
    fn accepts(&mut self, text: &str) -> Vec<Value> {
        let before = self.st.violation_count;
        self.feed(text);
        let events = self.events();
        assert!(
            events.iter().all(|e| e["type"] != "error"),
            "for {text}: {events:?}"
        );
        assert_eq!(
            self.st.violation_count, before,
            "for {text}: {:?}",
            self.st.violations
        );
        events
    }

    /// Feeds `text`, expecting one new violation but no error (the API's behaviour is
    /// unconfirmed, or the rule is callbridge's); returns the events.
    fn records(&mut self, text: &str) -> Vec<Value> {
        let before = self.st.violation_count;
        self.feed(text);
        let events = self.events();
        assert!(
            events.iter().all(|e| e["type"] != "error"),
            "for {text}: {events:?}"
        );
        assert_eq!(
            self.st.violation_count,
            before + 1,
            "for {text}: {:?}",
            self.st.violations
        );
        events
    }
}

/// Frames that are not client events at all, and event types Live does not have.
#[test]
fn envelope_rules() {
    let mut h = Harness::started();
    h.rejects("not json", "invalid_json");
    h.rejects("[1,2]", "invalid_type");
    h.rejects(
        r#"{"type":"session.input_audio.mute","event_id":7}"#,
        "invalid_type",
    );
    h.rejects(r#"{"audio":"//8="}"#, "missing_required_parameter");
    h.rejects(r#"{"type":7}"#, "invalid_type");
    h.rejects(r#"{"type":"no.such.event"}"#, "invalid_value");
    // Realtime's events do not exist here (§0.1).
    for realtime in [
        r#"{"type":"input_audio_buffer.append","audio":"//8="}"#,
        r#"{"type":"input_audio_buffer.commit"}"#,
        r#"{"type":"conversation.item.create","item":{}}"#,
        r#"{"type":"conversation.item.truncate","item_id":"i","content_index":0,"audio_end_ms":1}"#,
        r#"{"type":"response.cancel"}"#,
    ] {
        h.rejects(realtime, "invalid_value");
    }
    // Live's response.create has no `response` (Realtime's greeting shape).
    let error = h.rejects(
        r#"{"type":"response.create","response":{"instructions":"Greet."}}"#,
        "unknown_parameter",
    );
    assert_eq!(error["error"]["param"], "response");
    h.rejects(
        r#"{"type":"session.input_audio.mute","extra":1}"#,
        "unknown_parameter",
    );
    // The client event id is echoed at the top and inside `error`.
    let error = h.rejects(
        r#"{"type":"no.such.event","event_id":"cb_9"}"#,
        "invalid_value",
    );
    assert_eq!(error["client_event_id"], "cb_9");
    assert_eq!(error["error"]["client_event_id"], "cb_9");
    h.st.on_binary(3);
    assert_eq!(h.types(), ["error"]);
    assert_eq!(h.st.violation_count, 15);
    let events = h.accepts(r#"{"type":"session.input_audio.mute","event_id":"cb_m"}"#);
    assert_eq!(events[0]["type"], "session.input_audio.muted");
    assert_eq!(events[0]["client_event_id"], "cb_m");
    assert_eq!(h.st.log.len(), 17, "every frame is recorded, valid or not");
}

/// `session.start`'s `session` (§2): strict keys, the Live models, formats with a rate,
/// known voices, well-formed delegation. A refused start means the session will not start.
#[test]
fn session_start_rules() {
    let long = "word ".repeat(16_385);
    let instructions_too_long = format!(r#""instructions":"{long}""#);
    for (session, code, param) in [
        ("7".to_owned(), "invalid_type", "session"),
        (session_with(r#""temperature":0.8"#), "unknown_parameter", "session.temperature"),
        (session_with(r#""type":"realtime""#), "unknown_parameter", "session.type"),
        (r#"{"audio":{}}"#.to_owned(), "missing_required_parameter", "session.model"),
        (r#"{"model":7}"#.to_owned(), "invalid_type", "session.model"),
        (r#"{"model":"gpt-realtime"}"#.to_owned(), "model_not_found", "session.model"),
        (session_with(r#""instructions":7"#), "invalid_type", "session.instructions"),
        (session_with(&instructions_too_long), "invalid_value", "session.instructions"),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu"}}}"#.to_owned(),
            "missing_required_parameter",
            "session.audio.format.rate",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":"8000"}}}"#.to_owned(),
            "invalid_type",
            "session.audio.format.rate",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":16000}}}"#.to_owned(),
            "invalid_value",
            "session.audio.format.rate",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcm","rate":8000}}}"#.to_owned(),
            "invalid_value",
            "session.audio.format.rate",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"g711_ulaw","rate":8000}}}"#.to_owned(),
            "invalid_value",
            "session.audio.format.type",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":8000,"channels":1}}}"#.to_owned(),
            "unknown_parameter",
            "session.audio.format.channels",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"input":{"format":{"type":"audio/pcmu"}}}}"#.to_owned(),
            "unknown_parameter",
            "session.audio.input",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"output":{"voice":"nobody"}}}"#.to_owned(),
            "invalid_value",
            "session.audio.output.voice",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"output":{"voice":{"name":"x"}}}}"#.to_owned(),
            "unknown_parameter",
            "session.audio.output.voice.name",
        ),
        (
            r#"{"model":"gpt-live-1","audio":{"output":{"speed":1.2}}}"#.to_owned(),
            "unknown_parameter",
            "session.audio.output.speed",
        ),
        (session_with(r#""delegation":{"type":"server"}"#), "invalid_value", "session.delegation.type"),
        (session_with(r#""delegation":{}"#), "missing_required_parameter", "session.delegation.type"),
        (
            session_with(r#""delegation":{"type":"client","tools":[]}"#),
            "unknown_parameter",
            "session.delegation.tools",
        ),
        (
            session_with(r#""delegation":{"type":"client","acknowledgement_delay_ms":-1}"#),
            "invalid_type",
            "session.delegation.acknowledgement_delay_ms",
        ),
        (
            session_with(r#""delegation":{"type":"responses"}"#),
            "missing_required_parameter",
            "session.delegation.responses",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"tools":[]}}"#),
            "missing_required_parameter",
            "session.delegation.responses.model",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","tools":[{"type":"function"}]}}"#),
            "missing_required_parameter",
            "session.delegation.responses.tools[0].name",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","tools":[{"type":"function","name":"move appointment"}]}}"#),
            "invalid_value",
            "session.delegation.responses.tools[0].name",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","tools":[{"type":"computer"}]}}"#),
            "invalid_value",
            "session.delegation.responses.tools[0].type",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","tool_choice":"sometimes"}}"#),
            "invalid_value",
            "session.delegation.responses.tool_choice",
        ),
        (
            session_with(r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","temperature":1}}"#),
            "unknown_parameter",
            "session.delegation.responses.temperature",
        ),
        (session_with(r#""store":"yes""#), "invalid_type", "session.store"),
        (session_with(r#""safety_identifier":5"#), "invalid_type", "session.safety_identifier"),
        (session_with(r#""input":{}"#), "invalid_type", "session.input"),
    ] {
        let mut h = harness(None);
        let error = h.rejects(&start_with(&session), code);
        assert_eq!(error["error"]["param"], param, "for {session}");
        assert_eq!(error["client_event_id"], "cb_start_1");
        // The session will not start: what follows is ignored and recorded.
        assert!(h.records(&append(&frame_b64())).is_empty());
        assert!(h.records(START).is_empty(), "no second chance on this socket");
        assert!(h.st.start.is_none());
    }
    let mut h = harness(None);
    h.rejects(r#"{"type":"session.start"}"#, "missing_required_parameter");
}

/// A valid start is answered with the resolved configuration (§3): server defaults, the
/// session id, `expires_at`, the start's event id.
#[test]
fn session_started_carries_the_resolved_configuration() {
    let mut h = harness(None);
    h.feed(&start_with(&session_with("")));
    let events = h.events();
    assert_eq!(events.len(), 1);
    let started = &events[0];
    assert_eq!(started["type"], "session.started");
    assert_eq!(started["client_event_id"], "cb_start_1");
    let s = &started["session"];
    assert_eq!(s["id"], "live_fake0001");
    assert_eq!(s["status"], "active");
    assert_eq!(s["model"], "gpt-live-1");
    assert_eq!(
        s["audio"],
        json!({"format": {"type": "audio/pcmu", "rate": 8000}, "output": {"voice": "marin"}})
    );
    assert_eq!(s["delegation"], json!({"type": "client"}));
    assert_eq!(s["input"], json!([]));
    assert_eq!(s["store"], false);
    let expires_in = s["expires_at"].as_u64().unwrap() - unix_now();
    assert!((3_599..=3_600).contains(&expires_in), "{expires_in}");
    assert!(h.st.violations.is_empty(), "{:?}", h.st.violations);
    // A second start on the same connection is an error.
    h.rejects(START, "session_already_started");
}

/// What the API accepts but callbridge must not send: not µ-law 8 kHz, Decisions and
/// WebRTC-only settings, a phone number as safety identifier.
#[test]
fn callbridge_rules_on_start() {
    for session in [
        r#"{"model":"gpt-live-1"}"#.to_owned(),
        r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcm","rate":24000}}}"#.to_owned(),
        r#"{"model":"gpt-live-1","audio":{"format":{"type":"audio/pcma","rate":8000}}}"#.to_owned(),
        session_with(r#""safety_identifier":"+1 (555) 010-9999""#),
        session_with(r#""client":{}"#),
        session_with(r#""triggers":[]"#),
        session_with(r#""delegation":{"type":"decisions"}"#),
    ] {
        let mut h = harness(None);
        let events = h.records(&start_with(&session));
        assert_eq!(
            events[0]["type"], "session.started",
            "the API accepts {session}"
        );
    }
    let mut h = harness(None);
    h.accepts(&start_with(&session_with(
        r#""safety_identifier":"caller-5f2a9c0e""#,
    )));
    // The resolved format of a start without one is the (assumed) default.
    let h = Harness::started_with(None, &start_with(&session_with(r#""store":true"#)));
    assert_eq!(h.st.start.as_ref().unwrap().resolved["store"], true);
}

/// The startup history (§2.1): text messages with one part each, ≤ 128 messages and ≤ 8,192
/// rendered tokens (in the fake's count).
#[test]
fn input_history_rules_and_limits() {
    let msg = |role: &str, part: &str| {
        format!(r#"{{"type":"message","role":"{role}","content":[{part}]}}"#)
    };
    let user = msg("user", r#"{"type":"input_text","text":"hi"}"#);
    let with_input =
        |items: &[String]| start_with(&session_with(&format!(r#""input":[{}]"#, items.join(","))));

    // The shapes the doc allows.
    let mut h = harness(None);
    let items = [
        user.clone(),
        msg("user", r#"{"text":"untyped user text"}"#),
        msg("assistant", r#"{"type":"output_text","text":"Sure."}"#),
        msg("assistant", r#"{"type":"text","text":"Sure."}"#),
        msg("developer", r#"{"type":"input_text","text":"Continue."}"#),
        r#"{"role":"user","id":"m1","status":"incomplete","content":[{"text":"x"}]}"#.into(),
    ];
    let events = h.accepts(&with_input(&items));
    assert_eq!(events[0]["session"]["input"].as_array().unwrap().len(), 6);

    for (item, code, param) in [
        (
            msg("system", r#"{"text":"x"}"#),
            "invalid_value",
            "session.input[0].role",
        ),
        (
            r#"{"content":[{"text":"x"}]}"#.into(),
            "missing_required_parameter",
            "session.input[0].role",
        ),
        (
            r#"{"role":"user","content":[{"text":"a"},{"text":"b"}]}"#.into(),
            "invalid_value",
            "session.input[0].content",
        ),
        (
            r#"{"role":"user","content":[]}"#.into(),
            "invalid_value",
            "session.input[0].content",
        ),
        (
            r#"{"role":"user","content":"hi"}"#.into(),
            "invalid_type",
            "session.input[0].content",
        ),
        (
            msg("assistant", r#"{"type":"input_text","text":"x"}"#),
            "invalid_value",
            "session.input[0].content[0].type",
        ),
        (
            msg("assistant", r#"{"text":"x"}"#),
            "missing_required_parameter",
            "session.input[0].content[0].type",
        ),
        (
            msg("user", r#"{"type":"input_audio","audio":"//8="}"#),
            "invalid_value",
            "session.input[0].content[0].type",
        ),
        (
            msg("user", r#"{"type":"input_text"}"#),
            "missing_required_parameter",
            "session.input[0].content[0].text",
        ),
        (
            r#"{"role":"user","status":"in_progress","content":[{"text":"x"}]}"#.into(),
            "invalid_value",
            "session.input[0].status",
        ),
        (
            r#"{"role":"user","name":"bob","content":[{"text":"x"}]}"#.into(),
            "unknown_parameter",
            "session.input[0].name",
        ),
        (
            r#"{"type":"function_call_output","role":"user","content":[{"text":"x"}]}"#.into(),
            "invalid_value",
            "session.input[0].type",
        ),
    ] {
        let mut h = harness(None);
        let error = h.rejects(&with_input(std::slice::from_ref(&item)), code);
        assert_eq!(error["error"]["param"], param, "for {item}");
    }

    // At most 128 messages.
    let mut h = harness(None);
    h.accepts(&with_input(&vec![user.clone(); 128]));
    let mut h = harness(None);
    let error = h.rejects(
        &with_input(&vec![user.clone(); 129]),
        "array_above_max_length",
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("129"));

    // At most 8,192 rendered tokens: one message of 4 + ⌈chars / 4⌉ tokens.
    let fits = "x".repeat((MAX_INPUT_TOKENS - MESSAGE_OVERHEAD_TOKENS) * 4);
    let text = |t: &str| msg("user", &format!(r#"{{"text":"{t}"}}"#));
    let mut h = harness(None);
    h.accepts(&with_input(&[text(&fits)]));
    let mut h = harness(None);
    let error = h.rejects(&with_input(&[text(&format!("{fits}x"))]), "invalid_value");
    assert_eq!(error["error"]["param"], "session.input");
    // The per-message overhead counts: the same text split over two messages is too much.
    let half = &fits[..fits.len() / 2];
    let mut h = harness(None);
    h.rejects(&with_input(&[text(half), text(half)]), "invalid_value");
}

/// The fake's token count: a quarter of the characters, at least one per word.
#[test]
fn token_estimate() {
    assert_eq!(estimate_tokens(""), 0);
    assert_eq!(estimate_tokens("abcd"), 1);
    assert_eq!(estimate_tokens("abcde"), 2);
    assert_eq!(estimate_tokens("a a a a a"), 5);
    assert_eq!(estimate_tokens("The caller pressed 7."), 6);
    assert_eq!(estimate_tokens("éééé"), 1, "characters, not bytes");
}

/// Before `session.start` there is no session; after a refused one it will not start. Both
/// are violations without an error (the real behaviour is unconfirmed), and ignored.
#[test]
fn events_before_the_session_are_recorded_and_ignored() {
    let mut h = harness(None);
    assert!(h.records(&append(&frame_b64())).is_empty());
    let before = h.st.violation_count;
    h.feed(&append(&frame_b64()));
    assert_eq!(h.st.violation_count, before, "audio is reported once");
    assert_eq!(h.st.append_count, 0, "and ignored");
    assert!(h
        .records(&commentary("null", "Greet the caller."))
        .is_empty());
    assert!(h.records(r#"{"type":"session.close"}"#).is_empty());
    assert!(h
        .records(r#"{"type":"session.update","session":{}}"#)
        .is_empty());
    // Shape errors are still errors.
    h.rejects(&append("AB=="), "invalid_value");
    h.feed(START);
    assert_eq!(h.types(), ["session.started"]);
}

/// The configured startup failure: an `error` answering `session.start` (its event id
/// echoed), the session never starts, no violation for the error itself.
#[test]
fn configured_start_error() {
    let mut h = harness(None);
    *crate::lock(&h.knobs.start_error) = Some(LiveError::insufficient_quota());
    h.feed(START);
    let events = h.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "error");
    assert_eq!(events[0]["error"]["code"], "insufficient_quota");
    assert_eq!(events[0]["error"]["type"], "insufficient_quota");
    assert_eq!(events[0]["client_event_id"], "cb_start_1");
    assert_eq!(events[0]["error"]["client_event_id"], "cb_start_1");
    assert!(h.st.violations.is_empty());
    assert!(h.records(&append(&frame_b64())).is_empty());
}

/// With `session.started` held back, audio and commands are violations (the service did not
/// wait) but processed; `session.close` is not, and is answered after `session.started`.
#[test]
fn a_held_session_started() {
    let mut h = harness(None);
    h.knobs.started_delay_ms.store(100, Ordering::SeqCst);
    let handled = h.feed(START);
    assert_eq!(
        handled.timers,
        [(Duration::from_millis(100), Timer::Started)]
    );
    assert!(h.types().is_empty());
    h.records(&append(&frame_b64()));
    h.feed(&append(&frame_b64()));
    assert_eq!(h.st.violation_count, 1, "audio once");
    assert_eq!(h.st.append_count, 2, "processed");
    let events = h.records(&commentary("null", "Greet."));
    assert_eq!(events[0]["type"], "session.commentary.appended");
    h.accepts(r#"{"type":"session.close","event_id":"cb_close"}"#);
    let handled = h.st.fire(Timer::Started);
    assert_eq!(h.types(), ["session.started", "session.closed"]);
    assert_eq!(h.st.closed_reason.as_deref(), Some("close_requested"));
    assert_eq!(handled.timers[0].1, Timer::Expire);
}

/// `session.input_audio.append` (§4.1): strict base64, no acknowledgement; the timeline
/// advances; callbridge's whole 20 ms frames.
#[test]
fn append_rules() {
    let mut h = Harness::started();
    h.rejects(
        r#"{"type":"session.input_audio.append"}"#,
        "missing_required_parameter",
    );
    h.rejects(
        r#"{"type":"session.input_audio.append","audio":160}"#,
        "invalid_type",
    );
    h.rejects(&append(""), "invalid_value");
    h.rejects(&append("abc"), "invalid_value");
    h.rejects(&append("ab!="), "invalid_value");
    // Not canonical: the last character carries bits that the padding says are unused.
    h.rejects(&append("AB=="), "invalid_value");
    h.rejects(&append("//8"), "invalid_value");
    h.rejects(&append(&format!("{} ", frame_b64())), "invalid_value");
    assert!(
        h.accepts(&append(&frame_b64())).is_empty(),
        "no acknowledgement"
    );
    h.accepts(&append(&frame_b64()));
    assert_eq!(h.st.append_count, 2);
    assert_eq!(h.st.audio, vec![0xFF; 320]);
    assert_eq!(h.st.timeline_ms(), 40);
    // Not whole Twilio frames: recorded once per session.
    h.records(&append("AA=="));
    h.accepts(&append(&BASE64_STANDARD.encode([0u8; 100])));
    assert_eq!(h.st.append_count, 4, "the API accepts them");
}

/// The three append events (§6, §7): `delegation_id` required and nullable, `content` ≤ 500
/// tokens, acknowledged at the timeline position.
#[test]
fn text_append_rules() {
    let mut h = Harness::started();
    h.accepts(&append(&frame_b64()));
    for kind in ["commentary", "instructions", "thinking"] {
        let event = |rest: &str| format!(r#"{{"type":"session.{kind}.append",{rest}}}"#);
        h.rejects(&event(r#""content":"x""#), "missing_required_parameter");
        h.rejects(&event(r#""delegation_id":5,"content":"x""#), "invalid_type");
        h.rejects(
            &event(r#""delegation_id":null"#),
            "missing_required_parameter",
        );
        h.rejects(
            &event(r#""delegation_id":null,"content":7"#),
            "invalid_type",
        );
        h.rejects(
            &event(r#""delegation_id":null,"content":" ""#),
            "invalid_value",
        );
        let long = "abc ".repeat(MAX_APPEND_TOKENS + 1);
        h.rejects(
            &event(&format!(r#""delegation_id":null,"content":"{long}""#)),
            "invalid_value",
        );
        h.rejects(
            &event(r#""delegation_id":"dlg_nope","content":"x""#),
            "invalid_value",
        );
        h.rejects(
            &event(r#""delegation_id":null,"content":"x","role":"user""#),
            "unknown_parameter",
        );
        let fits = "abc ".repeat(MAX_APPEND_TOKENS);
        h.accepts(&event(&format!(
            r#""delegation_id":null,"content":"{fits}""#
        )));
        let events = h.accepts(&event(
            r#""event_id":"cb_1","delegation_id":null,"content":"The caller pressed 7.""#,
        ));
        assert_eq!(
            events,
            [json!({"type": format!("session.{kind}.appended"),
                "event_id": events[0]["event_id"], "client_event_id": "cb_1",
                "start_ms": 20, "end_ms": 20})]
        );
    }
    let appends = &h.st.text_appends;
    assert_eq!(appends.len(), 6);
    assert_eq!(appends[5].kind, AppendKind::Thinking);
    assert_eq!(appends[5].content, "The caller pressed 7.");
    assert_eq!(appends[5].event_id.as_deref(), Some("cb_1"));
    assert_eq!(appends[5].delegation_id, None);
    assert_eq!(appends[5].at_ms, 20);
}

/// Client delegation (§9.1): appends may answer a delegation the fake announced, and only
/// a client one.
#[test]
fn client_delegation_answers() {
    let mut h = Harness::started();
    h.st.delegations.insert("dlg_1".into(), "client".into());
    h.st.delegations.insert("dlg_2".into(), "responses".into());
    h.accepts(&commentary(r#""dlg_1""#, "This line cannot do that."));
    h.rejects(&commentary(r#""dlg_2""#, "x"), "invalid_value");
    assert_eq!(h.st.text_appends[0].delegation_id.as_deref(), Some("dlg_1"));
    // Tool events need Responses delegation.
    h.rejects(
        r#"{"type":"response.create"}"#,
        "responses_delegation_required",
    );
    h.rejects(
        r#"{"type":"response.item.create","item":{"type":"function_call_output","call_id":"c","output":"{}"}}"#,
        "responses_delegation_required",
    );
}

/// Responses delegation (§9.2): appends take only a null delegation id; one output per
/// scripted function call; `response.create` accepted.
#[test]
fn responses_delegation_rules() {
    let start = start_with(&session_with(
        r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","instructions":"Backend.","tools":[{"type":"function","name":"move_appointment","description":"Move it.","parameters":{"type":"object","properties":{}},"strict":true},{"type":"web_search"}],"tool_choice":"auto"}}"#,
    ));
    let mut h = Harness::started_with(None, &start);
    h.st.delegations.insert("dlg_1".into(), "responses".into());
    h.rejects(&commentary(r#""dlg_1""#, "x"), "invalid_value");
    h.accepts(&commentary("null", "Say that you are checking."));
    let output = |call: &str| {
        format!(
            r#"{{"type":"response.item.create","event_id":"cb_t","item":{{"type":"function_call_output","call_id":"{call}","output":"{{\"moved\":true}}"}}}}"#
        )
    };
    h.rejects(&output("call_unknown"), "invalid_value");
    h.st.calls.insert("call_1".into(), Call { answered: false });
    assert!(h.accepts(&output("call_1")).is_empty());
    let error = h.rejects(&output("call_1"), "invalid_value");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("one output per call"));
    assert!(h
        .accepts(r#"{"type":"response.create","event_id":"cb_r"}"#)
        .is_empty());
    assert_eq!(h.st.response_creates, 1);
    let item = |item: &str| format!(r#"{{"type":"response.item.create","item":{item}}}"#);
    for (item_json, code) in [
        ("7", "invalid_type"),
        (
            r#"{"call_id":"c","output":"x"}"#,
            "missing_required_parameter",
        ),
        (r#"{"type":"function_call","call_id":"c"}"#, "invalid_value"),
        (
            r#"{"type":"function_call_output","output":"x"}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"function_call_output","call_id":"c","output":{}}"#,
            "invalid_type",
        ),
        (
            r#"{"type":"function_call_output","call_id":"c","output":"x","name":"f"}"#,
            "unknown_parameter",
        ),
    ] {
        h.rejects(&item(item_json), code);
    }
    h.rejects(
        r#"{"type":"response.item.create"}"#,
        "missing_required_parameter",
    );
    h.accepts(&item(
        r#"{"type":"message","role":"user","content":"The caller is a patient."}"#,
    ));
    assert_eq!(h.st.item_creates.len(), 2);
}

/// `session.update` (§10): only delegation (and triggers); the type stays; sparse updates.
#[test]
fn session_update_rules() {
    let mut h = Harness::started();
    let update = |session: &str| format!(r#"{{"type":"session.update","session":{session}}}"#);
    for (session, code, param) in [
        (
            r#"{"instructions":"Be brief."}"#,
            "unknown_parameter",
            "session.instructions",
        ),
        (
            r#"{"model":"gpt-live-1.1"}"#,
            "unknown_parameter",
            "session.model",
        ),
        (
            r#"{"audio":{"output":{"voice":"ash"}}}"#,
            "unknown_parameter",
            "session.audio",
        ),
        (r#"{"input":[]}"#, "unknown_parameter", "session.input"),
        (
            r#"{"type":"realtime"}"#,
            "unknown_parameter",
            "session.type",
        ),
        (
            r#"{"delegation":{"type":"responses","responses":{"model":"gpt-5.5"}}}"#,
            "invalid_value",
            "session.delegation.type",
        ),
        (
            r#"{"delegation":{"type":"client","x":1}}"#,
            "unknown_parameter",
            "session.delegation.x",
        ),
    ] {
        let error = h.rejects(&update(session), code);
        assert_eq!(error["error"]["param"], param, "for {session}");
    }
    h.rejects(r#"{"type":"session.update"}"#, "missing_required_parameter");
    let events = h.accepts(
        r#"{"type":"session.update","event_id":"cb_u","session":{"delegation":{"type":"client","acknowledgement_delay_ms":500}}}"#,
    );
    assert_eq!(events[0]["type"], "session.updated");
    assert_eq!(events[0]["client_event_id"], "cb_u");
    assert_eq!(
        events[0]["session"]["delegation"],
        json!({"type": "client", "acknowledgement_delay_ms": 500})
    );
    assert_eq!(events[0]["session"]["id"], "live_fake0001");
    h.records(&update(r#"{"triggers":[]}"#));
    assert_eq!(h.st.updates_accepted, 2);

    // Responses: omitted settings keep their values.
    let start = start_with(&session_with(
        r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","instructions":"Backend."}}"#,
    ));
    let mut h = Harness::started_with(None, &start);
    let events = h.accepts(&update(
        r#"{"delegation":{"type":"responses","responses":{"tools":[{"type":"function","name":"cancel_appointment","parameters":{"type":"object","properties":{}}}]}}}"#,
    ));
    let responses = &events[0]["session"]["delegation"]["responses"];
    assert_eq!(responses["model"], "gpt-5.5");
    assert_eq!(responses["instructions"], "Backend.");
    assert_eq!(responses["tools"][0]["name"], "cancel_appointment");
    h.rejects(&update(r#"{"delegation":null}"#), "invalid_value");
}

/// `session.close` (§12): `session.closed` with reason, the event id, the final usage and
/// the snapshot; nothing after it is processed.
#[test]
fn close_flow() {
    let mut h = Harness::started();
    h.st.usage_override = Some(95.5);
    let events = h.accepts(r#"{"type":"session.close","event_id":"cb_close"}"#);
    assert_eq!(events.len(), 1);
    let closed = &events[0];
    assert_eq!(closed["type"], "session.closed");
    assert_eq!(closed["client_event_id"], "cb_close");
    assert_eq!(closed["reason"], "close_requested");
    assert_eq!(closed["usage"], json!({"seconds": 95.5}));
    assert_eq!(closed["session"]["status"], "active");
    assert_eq!(closed["session"]["id"], "live_fake0001");
    assert_eq!(
        closed["session"]["audio"]["format"],
        json!({"type": "audio/pcmu", "rate": 8000})
    );
    assert!(h.records(&append(&frame_b64())).is_empty());
    assert!(h.records(r#"{"type":"session.close"}"#).is_empty());
    assert!(h.records(&commentary("null", "x")).is_empty());
    assert_eq!(h.st.final_usage, Some(95.5));
    assert_eq!(h.st.append_count, 0);

    // Held back: what comes while closing is recorded; the timer answers.
    let mut h = Harness::started();
    h.knobs.closed_delay_ms.store(300, Ordering::SeqCst);
    let handled = h.feed(r#"{"type":"session.close"}"#);
    assert_eq!(
        handled.timers,
        [(Duration::from_millis(300), Timer::Closed)]
    );
    assert!(h.types().is_empty());
    h.records(&append(&frame_b64()));
    h.st.fire(Timer::Closed);
    let events = h.events();
    assert_eq!(events[0]["type"], "session.closed");
    assert_eq!(events[0]["client_event_id"], Value::Null);

    // Ignored: never answered.
    let mut h = Harness::started();
    h.knobs.ignore_close.store(true, Ordering::SeqCst);
    assert!(h.feed(r#"{"type":"session.close"}"#).timers.is_empty());
    assert!(h.types().is_empty());
}

/// Usage (§11): cumulative, never below what was reported; the final value is the test's
/// when set.
#[test]
fn usage_is_cumulative() {
    let mut h = Harness::started();
    assert!(h.st.usage_now() < 1.0);
    h.st.send_usage(37.5, Some(0.04));
    let events = h.events();
    assert_eq!(events[0]["usage"], json!({"seconds": 37.5}));
    assert_eq!(events[0]["context_window"], json!({"usage_ratio": 0.04}));
    assert_eq!(h.st.usage_now(), 37.5);
    h.st.send_closed("expired");
    let events = h.events();
    assert_eq!(events[0]["reason"], "expired");
    assert_eq!(events[0]["usage"]["seconds"], 37.5);
    h.st.send_closed("content");
    assert!(h.events().is_empty(), "one session.closed per session");
}

/// The session's end: `expires_at` comes (§12, `expired`).
#[test]
fn expiry() {
    let mut h = Harness::started();
    h.st.fire(Timer::Expire);
    let events = h.events();
    assert_eq!(events[0]["type"], "session.closed");
    assert_eq!(events[0]["reason"], "expired");
    assert!(h.records(&append(&frame_b64())).is_empty());

    // Timers of a connection that is gone answer nothing.
    let mut h = Harness::started();
    h.st.closer = Some(Closer::Fake);
    h.st.socket_ended();
    h.st.fire(Timer::Expire);
    assert!(h.events().is_empty());
    assert_eq!(h.st.closed_reason, None);
}

/// The socket's end: a started session must be ended with `session.close` (§0.6).
#[test]
fn closing_the_socket() {
    let mut h = Harness::started();
    h.st.socket_ended();
    assert_eq!(h.st.violation_count, 1, "{:?}", h.st.violations);

    let mut h = Harness::started();
    h.feed(r#"{"type":"session.close"}"#);
    h.st.socket_ended();
    assert!(h.st.violations.is_empty());
    assert!(!h.st.closed_before_session_closed);

    let mut h = Harness::started();
    h.knobs.ignore_close.store(true, Ordering::SeqCst);
    h.feed(r#"{"type":"session.close"}"#);
    h.st.socket_ended();
    assert!(h.st.violations.is_empty(), "its bounded wait ran out");
    assert!(h.st.closed_before_session_closed);

    // Ended by the server's session.closed, by the fake, or before any session: fine.
    let mut h = Harness::started();
    h.st.send_closed("connection_lost");
    h.st.socket_ended();
    let mut h2 = Harness::started();
    h2.st.closer = Some(Closer::Fake);
    h2.st.socket_ended();
    let mut h3 = harness(None);
    h3.st.socket_ended();
    assert_eq!(
        h.st.violation_count + h2.st.violation_count + h3.st.violation_count,
        0
    );
}

/// Mute/unmute are acknowledged; an audio fixture plays alone and blocks appends (§8).
#[test]
fn mute_and_fixture() {
    let mut h = Harness::started();
    h.accepts(r#"{"type":"session.input_audio.mute"}"#);
    assert!(h.st.muted);
    let events = h.accepts(r#"{"type":"session.input_audio.unmute","event_id":"u"}"#);
    assert_eq!(events[0]["type"], "session.input_audio.unmuted");
    assert!(!h.st.muted);

    let fixture = |bytes: usize| {
        format!(
            r#"{{"type":"session.output_audio.fixture.play","event_id":"cb_fix","audio":"{}"}}"#,
            BASE64_STANDARD.encode(vec![0u8; bytes])
        )
    };
    h.rejects(&fixture(3), "invalid_value");
    h.rejects(&fixture(30_000 * 48 + 2), "invalid_value");
    h.rejects(
        r#"{"type":"session.output_audio.fixture.play","audio":"AB=="}"#,
        "invalid_value",
    );
    let before = h.st.violation_count;
    let handled = h.feed(&fixture(4_800));
    assert_eq!(h.st.violation_count, before);
    assert_eq!(
        handled.timers,
        [(Duration::from_millis(100), Timer::FixturePlayed)]
    );
    assert_eq!(h.types(), ["session.output_audio.fixture.playing"]);
    h.rejects(&fixture(4_800), "audio_fixture_active");
    h.rejects(&commentary("null", "x"), "audio_fixture_active");
    h.accepts(&append(&frame_b64()));
    h.st.fire(Timer::FixturePlayed);
    let events = h.events();
    assert_eq!(events[0]["type"], "session.output_audio.fixture.played");
    assert_eq!(events[0]["client_event_id"], "cb_fix");
    assert_eq!(h.st.fixtures_played, 1);
    h.accepts(&commentary("null", "x"));
}

fn echo(transcript_every_ms: u64, usage_every_ms: u64) -> Harness {
    Harness::started_with(
        Some(LiveEchoConfig {
            transcript_every_ms,
            usage_every_ms,
            ..LiveEchoConfig::default()
        }),
        START,
    )
}

/// Echo mode: each append comes back as a delta with the same base64 and no id; transcript
/// fragments and usage now and then; nothing recorded.
#[test]
fn echo_mode_echoes() {
    let mut h = echo(40, 60);
    let frame = frame_b64();
    let events = h.accepts(&append(&frame));
    assert_eq!(
        events,
        [json!({"type": "session.output_audio.delta", "delta": frame})]
    );
    let types: Vec<_> = h
        .accepts(&append(&frame))
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "session.output_audio.delta",
            "session.output_transcript.delta"
        ]
    );
    let events = h.accepts(&append(&frame));
    assert_eq!(events[1]["type"], "session.usage.updated");
    assert!(
        h.st.log.is_empty() && h.st.audio.is_empty(),
        "echo mode records nothing"
    );
    assert_eq!(h.st.stats.appends.load(Ordering::Relaxed), 3);
    let events = h.accepts(r#"{"type":"session.close"}"#);
    assert_eq!(events[0]["type"], "session.closed");
}

/// Echo mode judges appends exactly as scripted mode does, fast path or not.
#[test]
fn echo_mode_is_as_strict() {
    let mut h = echo(0, 0);
    h.rejects(&append("AB=="), "invalid_value");
    h.rejects(&append(""), "invalid_value");
    h.rejects(
        r#"{"type":"session.input_audio.append","audio":"//8=","event_id":null}"#,
        "invalid_type",
    );
    h.rejects(
        r#"{"type":"session.input_audio.append","audio":"//8=","x":1}"#,
        "unknown_parameter",
    );
    // A JSON escape takes the slow path, and is still the same valid audio.
    let frame = frame_b64().replace('/', "\\/");
    let events = h.accepts(&append(&frame));
    assert_eq!(events[0]["delta"], frame_b64());
    assert_eq!(h.st.stats.errors_sent.load(Ordering::Relaxed), 4);
    // Before session.start, echo mode is as strict too.
    let mut h = harness(Some(LiveEchoConfig::default()));
    assert!(h.records(&append(&frame_b64())).is_empty());
}

/// Echo mode marks each delta with the audio it carries: the connection paces it (`pace`).
#[test]
fn echo_deltas_carry_their_duration() {
    let mut h = echo(0, 0);
    assert!(h.st.paces_output());
    h.feed(&append(&frame_b64()));
    let mut raw = Vec::new();
    h.st.take_inline(&mut raw);
    assert!(
        matches!(raw.as_slice(), [Out::Audio(_, d)] if *d == Duration::from_millis(20)),
        "{raw:?}"
    );
    let h = Harness::started_with(
        Some(LiveEchoConfig {
            pace_output: false,
            ..LiveEchoConfig::default()
        }),
        START,
    );
    assert!(!h.st.paces_output());
    assert!(!Harness::started().st.paces_output(), "scripted mode");
}

/// A `session.start` with Responses delegation (§9.2) and one function tool.
fn responses_start() -> String {
    start_with(&session_with(
        r#""delegation":{"type":"responses","responses":{"model":"gpt-5.5","instructions":"Backend.","tools":[{"type":"function","name":"lookup_order","description":"Look it up.","parameters":{"type":"object","properties":{}}}],"tool_choice":"auto"}}"#,
    ))
}

/// Echo mode calling `lookup_order` every 40 ms of caller audio (no fragments, no usage).
fn echo_tools(start: &str) -> Harness {
    Harness::started_with(
        Some(LiveEchoConfig {
            transcript_every_ms: 0,
            usage_every_ms: 0,
            tool_call_every_ms: 40,
            tool_call: Some(("lookup_order".into(), r#"{"order_id":"A1"}"#.into())),
            ..LiveEchoConfig::default()
        }),
        start,
    )
}

fn output_for(call_id: &str, output: &str) -> String {
    json!({"type": "response.item.create", "event_id": "cb_t",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output}})
    .to_string()
}

/// Echo mode with Responses delegation: after every 40 ms of caller audio, a delegation and
/// its completed function call (§9.2); nothing more until the output comes; the output's
/// `response.create` gets `response.completed` and a transcript fragment quoting the output;
/// outputs are judged as in scripted mode.
#[test]
fn echo_mode_scripts_tool_calls() {
    let mut h = echo_tools(&responses_start());
    let frame = frame_b64();
    assert_eq!(h.accepts(&append(&frame)).len(), 1, "20 ms: audio only");
    let events = h.accepts(&append(&frame));
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "session.output_audio.delta",
            "session.delegation.created",
            "response.event"
        ]
    );
    let delegation = &events[1]["delegation"];
    assert_eq!(delegation["type"], "delegation");
    assert_eq!(delegation["target"], "responses");
    assert_eq!(events[1]["offset_ms"], 40);
    let dlg = delegation["id"].as_str().unwrap().to_owned();
    let resp = delegation["response_id"].as_str().unwrap().to_owned();
    assert!(
        dlg.starts_with("dlg_") && resp.starts_with("resp_"),
        "{delegation}"
    );
    assert_eq!(events[2]["delegation_id"], dlg.as_str());
    let inner = &events[2]["event"];
    assert_eq!(inner["type"], "response.output_item.done");
    assert!(inner["sequence_number"].is_u64());
    let item = &inner["item"];
    let call_id = item["call_id"].as_str().unwrap().to_owned();
    assert!(call_id.starts_with("call_"), "{item}");
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["name"], "lookup_order");
    assert_eq!(item["arguments"], r#"{"order_id":"A1"}"#);
    assert_eq!(item["status"], "completed");

    // The model waits for the output: no second call, however long the caller talks.
    for _ in 0..5 {
        assert_eq!(h.accepts(&append(&frame)).len(), 1);
    }
    h.rejects(&output_for("call_unknown", "{}"), "invalid_value");
    let long = format!(r#"{{"status":"shipped","note":"{}"}}"#, "x".repeat(100));
    assert!(h.accepts(&output_for(&call_id, &long)).is_empty());
    let error = h.rejects(&output_for(&call_id, "{}"), "invalid_value");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("one output per call"));

    let events = h.accepts(r#"{"type":"response.create","event_id":"cb_r"}"#);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["type"], "response.event");
    assert_eq!(events[0]["delegation_id"], dlg.as_str());
    let completed = &events[0]["event"];
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(completed["response"]["id"], resp.as_str());
    assert_eq!(completed["response"]["status"], "completed");
    assert!(completed["response"]["usage"]["total_tokens"].is_u64());
    assert_eq!(events[1]["type"], "session.output_transcript.delta");
    let said: String = long.chars().take(60).collect();
    assert_eq!(events[1]["delta"], format!(" tool said: {said}"));
    assert_eq!(events[1]["end_ms"], 7 * 20);
    // Nothing more to complete.
    assert!(h
        .accepts(r#"{"type":"response.create","event_id":"cb_r2"}"#)
        .is_empty());

    // The next call comes 40 ms of audio later, with fresh ids.
    assert_eq!(h.accepts(&append(&frame)).len(), 1);
    let events = h.accepts(&append(&frame));
    assert_eq!(events.len(), 3, "{events:?}");
    assert_ne!(events[1]["delegation"]["id"], dlg.as_str());
    assert_ne!(events[1]["delegation"]["response_id"], resp.as_str());
    assert_ne!(events[2]["event"]["item"]["call_id"], call_id.as_str());
    assert!(h.st.log.is_empty(), "echo mode records nothing");
}

/// With client delegation the server sends no function calls: echo mode scripts none and
/// keeps nothing.
#[test]
fn echo_mode_scripts_no_tool_call_with_client_delegation() {
    let mut h = echo_tools(START);
    for _ in 0..10 {
        let events = h.accepts(&append(&frame_b64()));
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "session.output_audio.delta");
    }
    assert!(h.st.delegations.is_empty() && h.st.calls.is_empty());
    assert!(h.st.echo_calls.is_empty());
}

/// Without `tool_call` (or at 0 ms), no calls either.
#[test]
fn echo_mode_tool_calls_are_off_by_default() {
    let mut h = Harness::started_with(
        Some(LiveEchoConfig {
            transcript_every_ms: 0,
            usage_every_ms: 0,
            tool_call_every_ms: 20,
            ..LiveEchoConfig::default()
        }),
        &responses_start(),
    );
    for _ in 0..5 {
        assert_eq!(h.accepts(&append(&frame_b64())).len(), 1);
    }
    assert_eq!(h.st.echo_since_tool, 0, "nothing counted");
}
