//! The fake's own strictness: for each rule, a client event that breaks it is rejected (an
//! `error` of the real shape and a violation) or recorded (a violation only), and a correct
//! one passes.

use super::*;

/// A valid GA configuration, as callbridge sends it.
const UPDATE: &str = r#"{"type":"session.update","session":{"type":"realtime","output_modalities":["audio"],"audio":{"input":{"format":{"type":"audio/pcmu"},"turn_detection":{"type":"server_vad","threshold":0.5,"prefix_padding_ms":300,"silence_duration_ms":500,"create_response":true,"interrupt_response":true}},"output":{"format":{"type":"audio/pcmu"},"voice":"marin"}}}}"#;

struct Harness {
    st: SessionState,
    rx: mpsc::UnboundedReceiver<Out>,
}

fn harness(echo: Option<EchoConfig>) -> Harness {
    let (tx, rx) = mpsc::unbounded_channel();
    let st = SessionState::new(
        1,
        "gpt-realtime".into(),
        "sk-test".into(),
        tx,
        echo.map(Arc::new),
        Arc::default(),
        Arc::default(),
    );
    Harness { st, rx }
}

impl Harness {
    /// A scripted session that has been configured (no events pending).
    fn configured() -> Harness {
        let mut h = harness(None);
        h.st.created();
        h.feed(UPDATE);
        assert_eq!(h.types(), ["session.created", "session.updated"]);
        assert!(h.st.violations.is_empty(), "{:?}", h.st.violations);
        h
    }

    fn feed(&mut self, text: &str) -> Handled {
        self.st.on_text(text)
    }

    /// Server events emitted since the last call.
    fn events(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut inline = Vec::new();
        self.st.take_inline(&mut inline);
        for o in inline {
            if let Out::Text(text) = o {
                out.push(serde_json::from_str(&text).expect("the fake emits JSON"));
            }
        }
        while let Ok(o) = self.rx.try_recv() {
            if let Out::Text(text) = o {
                let v: Value = serde_json::from_str(&text).expect("the fake emits JSON");
                assert!(v["event_id"].is_string(), "no event_id in {text}");
                out.push(v);
            }
        }
        out
    }

    fn types(&mut self) -> Vec<String> {
        self.events()
            .iter()
            .map(|v| v["type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Feeds `text`, expecting exactly one `error` with `code` and one new violation.
    fn rejects(&mut self, text: &str, code: &str) {
        let before = self.st.violation_count;
        self.feed(text);
        let events = self.events();
        assert_eq!(events.len(), 1, "for {text}: {events:?}");
        assert_eq!(events[0]["type"], "error", "for {text}");
        assert_eq!(
            events[0]["error"]["code"], code,
            "for {text}: {}",
            events[0]
        );
        assert_eq!(events[0]["error"]["type"], "invalid_request_error");
        assert_eq!(self.st.violation_count, before + 1, "for {text}");
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

    /// Feeds `text`, expecting a violation but no error (a callbridge rule, not an API one).
    fn records(&mut self, text: &str) {
        let before = self.st.violation_count;
        self.feed(text);
        assert!(
            self.events().iter().all(|e| e["type"] != "error"),
            "for {text}"
        );
        assert_eq!(self.st.violation_count, before + 1, "for {text}");
    }
}

fn append(b64: &str) -> String {
    format!(r#"{{"type":"input_audio_buffer.append","audio":"{b64}"}}"#)
}

fn frame_b64() -> String {
    BASE64_STANDARD.encode([0xFFu8; 160])
}

use base64::prelude::*;

/// Frames that are not client events at all.
#[test]
fn envelope_rules() {
    let mut h = Harness::configured();
    h.rejects("not json", "invalid_json");
    h.rejects("[1,2]", "invalid_type");
    h.rejects(
        r#"{"type":"input_audio_buffer.clear","event_id":7}"#,
        "invalid_type",
    );
    h.rejects(r#"{"audio":"//8="}"#, "missing_required_parameter");
    h.rejects(r#"{"type":7}"#, "invalid_type");
    h.rejects(r#"{"type":"no.such.event"}"#, "invalid_value");
    h.rejects(
        r#"{"type":"input_audio_buffer.clear","extra":1}"#,
        "unknown_parameter",
    );
    // The client event id is echoed in the error.
    h.feed(r#"{"type":"no.such.event","event_id":"evt_9"}"#);
    assert_eq!(h.events()[0]["error"]["event_id"], "evt_9");
    h.st.on_binary(3);
    assert_eq!(h.types(), ["error"]);
    let types = h.accepts(r#"{"type":"input_audio_buffer.clear","event_id":"e1"}"#);
    assert_eq!(types[0]["type"], "input_audio_buffer.cleared");
    assert_eq!(h.st.log.len(), 11, "every frame is recorded, valid or not");
}

/// `session.update` (B2): GA keys only, `type:"realtime"`, values in range.
#[test]
fn session_update_rules() {
    let mut h = Harness::configured();
    let update = |session: &str| format!(r#"{{"type":"session.update","session":{session}}}"#);
    for (session, code) in [
        ("7", "invalid_type"),
        (
            r#"{"type":"realtime","temperature":0.8}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"realtime","modalities":["audio"]}"#,
            "unknown_parameter",
        ),
        (r#"{"instructions":"x"}"#, "missing_required_parameter"),
        (r#"{"type":"transcription"}"#, "invalid_value"),
        (r#"{"type":"realtime","instructions":7}"#, "invalid_type"),
        (
            r#"{"type":"realtime","output_modalities":["audio","text"]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"format":{"type":"g711_ulaw"}}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcm","rate":8000}}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcmu","rate":8000}}}}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"realtime","audio":{"output":{"voice":"nobody"}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"output":{"speed":3.0}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","threshold":2}}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","eagerness":"low"}}}}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"turn_detection":{"type":"semantic_vad","eagerness":"max"}}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"turn_detection":{"create_response":true}}}}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","create_response":"yes"}}}}"#,
            "invalid_type",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"noise_reduction":{"type":"loud"}}}}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","audio":{"input":{"transcription":{"model":"whisper-1","beam":2}}}}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"realtime","audio":{"inputs":{}}}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"realtime","tools":[{"type":"function"}]}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"realtime","tools":[{"type":"code"}]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","tool_choice":"sometimes"}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","max_output_tokens":5000}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","max_output_tokens":"lots"}"#,
            "invalid_type",
        ),
        (
            r#"{"type":"realtime","truncation":"sometimes"}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"realtime","include":["everything"]}"#,
            "invalid_value",
        ),
    ] {
        h.rejects(&update(session), code);
    }
    h.rejects(r#"{"type":"session.update"}"#, "missing_required_parameter");
    assert_eq!(h.st.updates_accepted, 1, "rejected updates change nothing");
    assert_eq!(h.st.session["audio"]["output"]["voice"], "marin");

    // Valid: merged key by key into the effective session and echoed.
    let events = h.accepts(&update(
        r#"{"type":"realtime","instructions":"Be brief.","audio":{"output":{"speed":1.2}}}"#,
    ));
    assert_eq!(events[0]["type"], "session.updated");
    assert_eq!(events[0]["session"]["instructions"], "Be brief.");
    assert_eq!(events[0]["session"]["audio"]["output"]["voice"], "marin");
    assert_eq!(events[0]["session"]["audio"]["output"]["speed"], 1.2);
}

/// callbridge requires µ-law both ways: a valid update that leaves pcm is recorded.
#[test]
fn non_pcmu_formats_are_recorded() {
    let mut h = harness(None);
    h.feed(r#"{"type":"session.update","session":{"type":"realtime","audio":{"input":{"format":{"type":"audio/pcmu"}}}}}"#);
    assert_eq!(h.types(), ["session.updated"], "the API accepts it");
    assert_eq!(h.st.violations.len(), 1, "{:?}", h.st.violations);
    assert!(h.st.violations[0].contains("audio.output.format"));
}

/// The voice is fixed once the model has produced audio.
#[test]
fn voice_cannot_change_after_audio() {
    let mut h = Harness::configured();
    h.st.open_response("resp_1", "item_1");
    h.st.book_output_audio("item_1", 160);
    h.events();
    h.rejects(
        r#"{"type":"session.update","session":{"type":"realtime","audio":{"output":{"voice":"ash"}}}}"#,
        "cannot_update_voice",
    );
    h.accepts(r#"{"type":"session.update","session":{"type":"realtime","audio":{"output":{"voice":"marin"}}}}"#);
}

/// Appends: present, a non-empty string of strict base64, after `session.updated`.
#[test]
fn append_rules() {
    let mut h = harness(None);
    // Before any session.update: accepted by the API, recorded once.
    h.records(&append(&frame_b64()));
    h.accepts(&append(&frame_b64()));
    let mut h = Harness::configured();
    h.rejects(
        r#"{"type":"input_audio_buffer.append"}"#,
        "missing_required_parameter",
    );
    h.rejects(
        r#"{"type":"input_audio_buffer.append","audio":160}"#,
        "invalid_type",
    );
    h.rejects(&append(""), "invalid_value");
    h.rejects(&append("abc"), "invalid_value");
    h.rejects(&append("ab!="), "invalid_value");
    // Not canonical: the last character carries bits that the padding says are unused.
    h.rejects(&append("AB=="), "invalid_value");
    h.rejects(&append("//8"), "invalid_value");
    assert!(h.accepts(&append("AA==")).is_empty(), "no acknowledgement");
    h.accepts(&append(&frame_b64()));
    assert_eq!(h.st.append_count, 2);
    assert_eq!(h.st.audio.len(), 161);
}

/// While a delayed `session.updated` is pending, audio, items and responses are recorded.
#[test]
fn traffic_before_a_delayed_session_updated_is_recorded() {
    let mut h = harness(None);
    h.st.updated_delay_ms.store(100, Ordering::SeqCst);
    let handled = h.feed(UPDATE);
    let (delay, reply) = handled.delayed_update.expect("held back");
    assert_eq!(delay, 100);
    assert!(h.types().is_empty());
    h.records(&append(&frame_b64()));
    h.records(r#"{"type":"response.create"}"#);
    h.records(r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}}"#);
    h.st.deliver_delayed_update(reply);
    assert_eq!(h.types(), ["session.updated"]);
    h.accepts(&append(&frame_b64()));
}

/// A commit needs 100 ms of audio in the buffer.
#[test]
fn commit_rules() {
    let mut h = Harness::configured();
    h.accepts(&append(&frame_b64()));
    h.rejects(
        r#"{"type":"input_audio_buffer.commit"}"#,
        "input_audio_buffer_commit_empty",
    );
    for _ in 0..4 {
        h.accepts(&append(&frame_b64()));
    }
    let events = h.accepts(r#"{"type":"input_audio_buffer.commit"}"#);
    assert_eq!(events[0]["type"], "input_audio_buffer.committed");
    h.accepts(r#"{"type":"input_audio_buffer.clear"}"#);
    h.rejects(
        r#"{"type":"input_audio_buffer.commit"}"#,
        "input_audio_buffer_commit_empty",
    );
}

/// `conversation.item.create` (B3): known item shapes only; no assistant audio.
#[test]
fn item_create_rules() {
    let mut h = Harness::configured();
    let create = |item: &str| format!(r#"{{"type":"conversation.item.create","item":{item}}}"#);
    h.rejects(
        r#"{"type":"conversation.item.create"}"#,
        "missing_required_parameter",
    );
    h.rejects(
        r#"{"type":"conversation.item.create","previous_item_id":"nope","item":{"type":"message","role":"user","content":[]}}"#,
        "invalid_value",
    );
    for (item, code) in [
        ("[]", "invalid_type"),
        (r#"{"type":"picture"}"#, "invalid_value"),
        (
            r#"{"type":"message","content":[]}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"message","role":"robot","content":[]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"message","role":"user","content":[],"extra":1}"#,
            "unknown_parameter",
        ),
        (
            r#"{"type":"message","role":"assistant","content":[{"type":"output_audio","transcript":"x"}]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"message","role":"assistant","content":[{"type":"text","text":"beta"}]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"message","role":"user","content":[{"type":"input_audio","audio":"AB=="}]}"#,
            "invalid_value",
        ),
        (
            r#"{"type":"message","role":"user","content":[{"type":"input_text"}]}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"function_call_output","output":"{}"}"#,
            "missing_required_parameter",
        ),
        (
            r#"{"type":"function_call","call_id":"c","name":"f","arguments":{}}"#,
            "invalid_type",
        ),
        (
            r#"{"type":"message","role":"user","status":"lost","content":[]}"#,
            "invalid_value",
        ),
    ] {
        h.rejects(&create(item), code);
    }
    let events = h.accepts(&create(
        r#"{"id":"item_u1","type":"message","role":"user","content":[{"type":"input_text","text":"Hi"}]}"#,
    ));
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["conversation.item.added", "conversation.item.done"]);
    h.accepts(
        r#"{"type":"conversation.item.create","previous_item_id":"item_u1","item":{"type":"function_call_output","call_id":"c1","output":"{}"}}"#,
    );
}

/// `conversation.item.truncate`: an assistant audio item, index 0, not past the audio sent.
#[test]
fn truncate_rules() {
    let mut h = Harness::configured();
    h.st.open_response("resp_1", "item_a");
    h.st.book_output_audio("item_a", 800); // 100 ms of µ-law
    h.st.register_item("item_user", false);
    h.events();
    let truncate = |rest: &str| format!(r#"{{"type":"conversation.item.truncate",{rest}}}"#);
    for (rest, code) in [
        (
            r#""content_index":0,"audio_end_ms":10"#,
            "missing_required_parameter",
        ),
        (
            r#""item_id":"item_a","audio_end_ms":10"#,
            "missing_required_parameter",
        ),
        (
            r#""item_id":"item_a","content_index":0"#,
            "missing_required_parameter",
        ),
        (
            r#""item_id":"item_a","content_index":1,"audio_end_ms":10"#,
            "invalid_value",
        ),
        (
            r#""item_id":"item_a","content_index":0,"audio_end_ms":-5"#,
            "invalid_type",
        ),
        (
            r#""item_id":"item_x","content_index":0,"audio_end_ms":10"#,
            "item_truncate_invalid_item_id",
        ),
        (
            r#""item_id":"item_user","content_index":0,"audio_end_ms":10"#,
            "item_truncate_invalid_item_id",
        ),
        (
            r#""item_id":"item_a","content_index":0,"audio_end_ms":101"#,
            "invalid_value",
        ),
    ] {
        h.rejects(&truncate(rest), code);
    }
    let events = h.accepts(&truncate(
        r#""item_id":"item_a","content_index":0,"audio_end_ms":60"#,
    ));
    assert_eq!(events[0]["type"], "conversation.item.truncated");
    assert_eq!(h.st.items["item_a"].audio_bytes, 480);
    assert_eq!(h.st.truncates.len(), 9, "every truncate is recorded");
}

/// `conversation.item.delete` needs a known item.
#[test]
fn delete_rules() {
    let mut h = Harness::configured();
    h.rejects(
        r#"{"type":"conversation.item.delete","item_id":"nope"}"#,
        "item_delete_invalid_item_id",
    );
    h.rejects(
        r#"{"type":"conversation.item.delete"}"#,
        "missing_required_parameter",
    );
    h.st.register_item("item_1", false);
    let events = h.accepts(r#"{"type":"conversation.item.delete","item_id":"item_1"}"#);
    assert_eq!(events[0]["type"], "conversation.item.deleted");
}

/// `response.create` and `response.cancel` (B3, B6).
#[test]
fn response_rules() {
    let mut h = harness(None);
    h.records(r#"{"type":"response.create"}"#);
    let mut h = Harness::configured();
    h.rejects(
        r#"{"type":"response.create","response":{"modalities":["audio"]}}"#,
        "unknown_parameter",
    );
    h.rejects(
        r#"{"type":"response.create","response":{"conversation":"maybe"}}"#,
        "invalid_value",
    );
    h.rejects(
        r#"{"type":"response.create","response":{"audio":{"output":{"speed":1.0}}}}"#,
        "unknown_parameter",
    );
    let metadata: Vec<String> = (0..17).map(|i| format!(r#""k{i}":"v""#)).collect();
    h.rejects(
        &format!(
            r#"{{"type":"response.create","response":{{"metadata":{{{}}}}}}}"#,
            metadata.join(",")
        ),
        "invalid_value",
    );
    h.accepts(r#"{"type":"response.create","response":{"instructions":"Greet.","output_modalities":["audio"]}}"#);
    h.rejects(
        r#"{"type":"response.cancel"}"#,
        "response_cancel_not_active",
    );
    h.st.open_response("resp_1", "item_1");
    h.events();
    h.rejects(
        r#"{"type":"response.create"}"#,
        "conversation_already_has_active_response",
    );
    h.rejects(
        r#"{"type":"response.cancel","response_id":"resp_2"}"#,
        "response_cancel_not_active",
    );
    let events = h.accepts(r#"{"type":"response.cancel","response_id":"resp_1"}"#);
    assert_eq!(events[0]["type"], "response.done");
    assert_eq!(events[0]["response"]["status"], "cancelled");
    assert_eq!(
        events[0]["response"]["status_details"]["reason"],
        "client_cancelled"
    );
    assert!(h.st.active.is_none());
    assert_eq!(h.st.response_creates.len(), 6);
}

fn echo(turn_ms: u64, barge_in_every_ms: u64) -> Harness {
    let mut h = harness(Some(EchoConfig {
        turn_ms,
        barge_in_every_ms,
        api_key: None,
        ..EchoConfig::default()
    }));
    h.feed(UPDATE);
    h.events();
    h
}

/// Echo mode: appends come back as deltas of one response, opened and closed in GA order.
#[test]
fn echoes_appends_inside_a_response() {
    let mut h = echo(40, 0);
    let frame = frame_b64();
    let events = h.accepts(&append(&frame));
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_audio.delta"
        ]
    );
    assert_eq!(events[4]["delta"], frame.as_str());
    assert_eq!(events[4]["response_id"], events[0]["response"]["id"]);
    let events = h.accepts(&append(&frame));
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done"
        ]
    );
    assert_eq!(events[6]["response"]["status"], "completed");
    assert!(
        h.st.log.is_empty() && h.st.audio.is_empty(),
        "echo mode records nothing"
    );
    assert_eq!(h.st.stats.appends.load(Ordering::Relaxed), 2);
}

/// Echo mode judges appends exactly as scripted mode does, fast path or not.
#[test]
fn echo_mode_is_as_strict() {
    let mut h = echo(0, 0);
    h.rejects(&append("AB=="), "invalid_value");
    h.rejects(&append(""), "invalid_value");
    h.rejects(
        r#"{"type":"input_audio_buffer.append","audio":"//8=","event_id":null}"#,
        "invalid_type",
    );
    h.rejects(
        r#"{"type":"input_audio_buffer.append","audio":"//8=","x":1}"#,
        "unknown_parameter",
    );
    // A JSON escape takes the slow path, and is still the same valid audio.
    let events = h.accepts(r#"{"type":"input_audio_buffer.append","audio":"\/\/8="}"#);
    assert_eq!(events.last().unwrap()["delta"], "//8=");
    assert_eq!(h.st.stats.errors_sent.load(Ordering::Relaxed), 4);
    // Other events are checked as in scripted mode; a response.create opens a response.
    h.rejects(
        r#"{"type":"response.create"}"#,
        "conversation_already_has_active_response",
    );
    let events = h.accepts(r#"{"type":"response.cancel"}"#);
    assert_eq!(events.last().unwrap()["response"]["status"], "cancelled");
    let events = h.accepts(r#"{"type":"response.create"}"#);
    assert_eq!(events[0]["type"], "response.created");
}

/// Echo mode: a scripted caller turn interrupts the response the way server VAD does.
#[test]
fn scripted_barge_in() {
    let mut h = echo(0, 40);
    let frame = frame_b64();
    h.accepts(&append(&frame));
    let types: Vec<String> = h
        .accepts(&append(&frame))
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types[0], "input_audio_buffer.speech_started");
    assert!(types.contains(&"response.done".to_owned()));
    assert_eq!(
        types.last().unwrap(),
        "conversation.item.input_audio_transcription.completed"
    );
}
