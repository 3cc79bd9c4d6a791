//! The checks of client events that need no session state (`reference/protocols.md` B2–B3):
//! key sets, types and value ranges of `session.update`, `response.create` and
//! `conversation.item.create`. Pure code; a failed check is a [`Reject`], which the session
//! turns into an `error` event of the real shape and a violation.

use base64::prelude::*;
use serde_json::{json, Map, Value};

use crate::checks::{boolean, check_keys, join, non_negative_int, one_of};
pub(crate) use crate::checks::{invalid_type, missing, object, string, unknown, Checked, Reject};

/// Voices the GA API accepts by name (B2).
const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

/// Client event types of B3 and the keys each may carry besides `type` and `event_id`.
pub(crate) const CLIENT_EVENTS: &[(&str, &[&str])] = &[
    ("session.update", &["session"]),
    ("input_audio_buffer.append", &["audio"]),
    ("input_audio_buffer.commit", &[]),
    ("input_audio_buffer.clear", &[]),
    ("conversation.item.create", &["previous_item_id", "item"]),
    (
        "conversation.item.truncate",
        &["item_id", "content_index", "audio_end_ms"],
    ),
    ("conversation.item.delete", &["item_id"]),
    ("response.create", &["response"]),
    ("response.cancel", &["response_id"]),
];

/// GA `session` keys (B2). Everything else, beta keys included, is `unknown_parameter`.
const SESSION_KEYS: &[&str] = &[
    "type",
    "instructions",
    "output_modalities",
    "audio",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "truncation",
    "tracing",
    "prompt",
    "include",
];

/// GA `response.create` `response` keys (B3).
const RESPONSE_KEYS: &[&str] = &[
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "output_modalities",
    "audio",
    "conversation",
    "input",
    "metadata",
];

// An inherent method of the shared type, kept beside the Realtime checks whose wire shape it
// is (the Live fake builds its own).
impl Reject {
    /// The B4 error event shape; `event_id` of the failed client event is echoed.
    pub(crate) fn to_event(&self, client_event_id: Option<&str>) -> Value {
        json!({"type": "error", "error": {"type": "invalid_request_error", "code": self.code,
            "message": self.message, "param": self.param, "event_id": client_event_id}})
    }
}

pub(crate) fn validate_session(s: &Map<String, Value>) -> Checked {
    check_keys(s, SESSION_KEYS, "session")?;
    match s.get("type") {
        None => return Err(missing("session.type")),
        Some(Value::String(t)) if t == "realtime" => {}
        // The real API also knows "transcription" sessions; callbridge must never send one.
        Some(other) => one_of(other, "session.type", &["realtime"])?,
    }
    if let Some(v) = s.get("instructions") {
        string(v, "session.instructions")?;
    }
    if let Some(v) = s.get("output_modalities") {
        validate_modalities(v, "session.output_modalities")?;
    }
    if let Some(v) = s.get("audio") {
        let audio = object(v, "session.audio")?;
        check_keys(audio, &["input", "output"], "session.audio")?;
        if let Some(v) = audio.get("input") {
            validate_audio_input(object(v, "session.audio.input")?)?;
        }
        if let Some(v) = audio.get("output") {
            validate_audio_output(
                object(v, "session.audio.output")?,
                "session.audio.output",
                true,
            )?;
        }
    }
    if let Some(v) = s.get("tools") {
        validate_tools(v, "session.tools")?;
    }
    if let Some(v) = s.get("tool_choice") {
        validate_tool_choice(v, "session.tool_choice")?;
    }
    if let Some(v) = s.get("max_output_tokens") {
        validate_max_tokens(v, "session.max_output_tokens")?;
    }
    if let Some(v) = s.get("truncation") {
        if !v.is_object() {
            one_of(v, "session.truncation", &["auto", "disabled"])?;
        }
    }
    if let Some(v) = s.get("tracing") {
        if !v.is_null() && !v.is_object() {
            one_of(v, "session.tracing", &["auto"])?;
        }
    }
    if let Some(v) = s.get("prompt") {
        if !v.is_null() {
            object(v, "session.prompt")?;
        }
    }
    if let Some(v) = s.get("include") {
        if !v.is_null() {
            let list = v
                .as_array()
                .ok_or_else(|| invalid_type("session.include", "an array", v))?;
            for (i, entry) in list.iter().enumerate() {
                one_of(
                    entry,
                    &format!("session.include[{i}]"),
                    &["item.input_audio_transcription.logprobs"],
                )?;
            }
        }
    }
    Ok(())
}

fn validate_modalities(v: &Value, param: &str) -> Checked {
    if *v == json!(["audio"]) || *v == json!(["text"]) {
        return Ok(());
    }
    if !v.is_array() {
        return Err(invalid_type(param, "an array", v));
    }
    Err(Reject::invalid_value(
        param,
        format!("Invalid value for '{param}': {v}. Supported values are ['audio'] or ['text'] (not both)."),
    ))
}

fn validate_audio_input(input: &Map<String, Value>) -> Checked {
    let p = "session.audio.input";
    check_keys(
        input,
        &[
            "format",
            "noise_reduction",
            "transcription",
            "turn_detection",
        ],
        p,
    )?;
    if let Some(v) = input.get("format") {
        validate_format(v, &join(p, "format"))?;
    }
    if let Some(v) = input.get("noise_reduction") {
        if !v.is_null() {
            let nr = object(v, "session.audio.input.noise_reduction")?;
            check_keys(nr, &["type"], "session.audio.input.noise_reduction")?;
            if let Some(t) = nr.get("type") {
                one_of(
                    t,
                    "session.audio.input.noise_reduction.type",
                    &["near_field", "far_field"],
                )?;
            }
        }
    }
    if let Some(v) = input.get("transcription") {
        if !v.is_null() {
            let p = "session.audio.input.transcription";
            let t = object(v, p)?;
            check_keys(t, &["model", "language", "prompt"], p)?;
            for key in ["model", "language", "prompt"] {
                if let Some(v) = t.get(key) {
                    string(v, &join(p, key))?;
                }
            }
        }
    }
    if let Some(v) = input.get("turn_detection") {
        validate_turn_detection(v)?;
    }
    Ok(())
}

fn validate_turn_detection(v: &Value) -> Checked {
    let p = "session.audio.input.turn_detection";
    if v.is_null() {
        return Ok(());
    }
    let td = object(v, p)?;
    let kind = string(
        td.get("type").ok_or_else(|| missing(&join(p, "type")))?,
        &join(p, "type"),
    )?;
    match kind {
        "server_vad" => {
            check_keys(
                td,
                &[
                    "type",
                    "threshold",
                    "prefix_padding_ms",
                    "silence_duration_ms",
                    "create_response",
                    "interrupt_response",
                    "idle_timeout_ms",
                ],
                p,
            )?;
            if let Some(t) = td.get("threshold") {
                let x = t
                    .as_f64()
                    .ok_or_else(|| invalid_type(&join(p, "threshold"), "a number", t))?;
                if !(0.0..=1.0).contains(&x) {
                    return Err(Reject::invalid_value(
                        &join(p, "threshold"),
                        format!("Invalid 'threshold': {x}. Expected a value between 0.0 and 1.0."),
                    ));
                }
            }
            for key in ["prefix_padding_ms", "silence_duration_ms"] {
                if let Some(v) = td.get(key) {
                    non_negative_int(v, &join(p, key))?;
                }
            }
            if let Some(v) = td.get("idle_timeout_ms") {
                if !v.is_null() {
                    non_negative_int(v, &join(p, "idle_timeout_ms"))?;
                }
            }
        }
        "semantic_vad" => {
            check_keys(
                td,
                &["type", "eagerness", "create_response", "interrupt_response"],
                p,
            )?;
            if let Some(v) = td.get("eagerness") {
                one_of(v, &join(p, "eagerness"), &["low", "medium", "high", "auto"])?;
            }
        }
        _ => one_of(
            &td["type"],
            &join(p, "type"),
            &["server_vad", "semantic_vad"],
        )?,
    }
    for key in ["create_response", "interrupt_response"] {
        if let Some(v) = td.get(key) {
            boolean(v, &join(p, key))?;
        }
    }
    Ok(())
}

/// `audio.output` of a session (`format`, `voice`, `speed`) or of a response (`format`,
/// `voice`).
fn validate_audio_output(out: &Map<String, Value>, p: &str, with_speed: bool) -> Checked {
    let keys: &[&str] = if with_speed {
        &["format", "voice", "speed"]
    } else {
        &["format", "voice"]
    };
    check_keys(out, keys, p)?;
    if let Some(v) = out.get("format") {
        validate_format(v, &join(p, "format"))?;
    }
    if let Some(v) = out.get("voice") {
        match v {
            Value::Object(o) => {
                check_keys(o, &["id"], &join(p, "voice"))?;
                string(
                    o.get("id").ok_or_else(|| missing(&join(p, "voice.id")))?,
                    &join(p, "voice.id"),
                )?;
            }
            other => one_of(other, &join(p, "voice"), VOICES)?,
        }
    }
    if let Some(v) = out.get("speed") {
        let x = v
            .as_f64()
            .ok_or_else(|| invalid_type(&join(p, "speed"), "a number", v))?;
        if !(0.25..=1.5).contains(&x) {
            return Err(Reject::invalid_value(
                &join(p, "speed"),
                format!("Invalid 'speed': {x}. Expected a value between 0.25 and 1.5."),
            ));
        }
    }
    Ok(())
}

fn validate_format(v: &Value, p: &str) -> Checked {
    let f = object(v, p)?;
    let kind = string(
        f.get("type").ok_or_else(|| missing(&join(p, "type")))?,
        &join(p, "type"),
    )?;
    match kind {
        "audio/pcm" => {
            check_keys(f, &["type", "rate"], p)?;
            if let Some(rate) = f.get("rate") {
                if rate.as_u64() != Some(24000) {
                    return Err(Reject::invalid_value(
                        &join(p, "rate"),
                        format!("Invalid value: {rate}. Supported values are: 24000."),
                    ));
                }
            }
            Ok(())
        }
        "audio/pcmu" | "audio/pcma" => check_keys(f, &["type"], p),
        _ => one_of(
            &f["type"],
            &join(p, "type"),
            &["audio/pcm", "audio/pcmu", "audio/pcma"],
        ),
    }
}

fn validate_tools(v: &Value, p: &str) -> Checked {
    let tools = v.as_array().ok_or_else(|| invalid_type(p, "an array", v))?;
    for (i, tool) in tools.iter().enumerate() {
        let tp = format!("{p}[{i}]");
        let t = object(tool, &tp)?;
        let kind = t.get("type").ok_or_else(|| missing(&join(&tp, "type")))?;
        one_of(kind, &join(&tp, "type"), &["function", "mcp"])?;
        if kind == "function" {
            check_keys(t, &["type", "name", "description", "parameters"], &tp)?;
            string(
                t.get("name").ok_or_else(|| missing(&join(&tp, "name")))?,
                &join(&tp, "name"),
            )?;
            if let Some(d) = t.get("description") {
                string(d, &join(&tp, "description"))?;
            }
            if let Some(params) = t.get("parameters") {
                object(params, &join(&tp, "parameters"))?;
            }
        }
    }
    Ok(())
}

fn validate_tool_choice(v: &Value, p: &str) -> Checked {
    match v {
        Value::Object(o) => {
            let kind = o.get("type").ok_or_else(|| missing(&join(p, "type")))?;
            one_of(kind, &join(p, "type"), &["function", "mcp"])?;
            if kind == "function" {
                check_keys(o, &["type", "name"], p)?;
                string(
                    o.get("name").ok_or_else(|| missing(&join(p, "name")))?,
                    &join(p, "name"),
                )?;
            }
            Ok(())
        }
        other => one_of(other, p, &["auto", "none", "required"]),
    }
}

fn validate_max_tokens(v: &Value, p: &str) -> Checked {
    match v {
        Value::String(s) if s == "inf" => Ok(()),
        Value::Number(n) => match n.as_u64() {
            Some(1..=4096) => Ok(()),
            _ => Err(Reject::invalid_value(
                p,
                format!("Invalid '{p}': {n}. Expected an integer between 1 and 4096, or 'inf'."),
            )),
        },
        other => Err(invalid_type(p, "an integer or 'inf'", other)),
    }
}

pub(crate) fn validate_response(r: &Map<String, Value>) -> Checked {
    check_keys(r, RESPONSE_KEYS, "response")?;
    if let Some(v) = r.get("instructions") {
        string(v, "response.instructions")?;
    }
    if let Some(v) = r.get("output_modalities") {
        validate_modalities(v, "response.output_modalities")?;
    }
    if let Some(v) = r.get("audio") {
        let audio = object(v, "response.audio")?;
        check_keys(audio, &["output"], "response.audio")?;
        if let Some(v) = audio.get("output") {
            validate_audio_output(
                object(v, "response.audio.output")?,
                "response.audio.output",
                false,
            )?;
        }
    }
    if let Some(v) = r.get("tools") {
        validate_tools(v, "response.tools")?;
    }
    if let Some(v) = r.get("tool_choice") {
        validate_tool_choice(v, "response.tool_choice")?;
    }
    if let Some(v) = r.get("max_output_tokens") {
        validate_max_tokens(v, "response.max_output_tokens")?;
    }
    if let Some(v) = r.get("conversation") {
        one_of(v, "response.conversation", &["auto", "none"])?;
    }
    if let Some(v) = r.get("input") {
        v.as_array()
            .ok_or_else(|| invalid_type("response.input", "an array", v))?;
    }
    if let Some(v) = r.get("metadata") {
        if !v.is_null() {
            let m = object(v, "response.metadata")?;
            if m.len() > 16 {
                return Err(Reject::invalid_value(
                    "response.metadata",
                    format!(
                        "Invalid 'response.metadata': too many pairs ({} > 16).",
                        m.len()
                    ),
                ));
            }
            for (k, v) in m {
                string(v, &format!("response.metadata.{k}"))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn validate_item(item: &Value) -> Checked {
    let it = object(item, "item")?;
    let kind = string(
        it.get("type").ok_or_else(|| missing("item.type"))?,
        "item.type",
    )?;
    let common = ["id", "type", "object", "status"];
    let keys = |extra: &[&'static str]| -> Vec<&'static str> {
        common.iter().chain(extra.iter()).copied().collect()
    };
    match kind {
        "message" => check_keys(it, &keys(&["role", "content"]), "item")?,
        "function_call" => check_keys(it, &keys(&["call_id", "name", "arguments"]), "item")?,
        "function_call_output" => check_keys(it, &keys(&["call_id", "output"]), "item")?,
        _ => one_of(
            &it["type"],
            "item.type",
            &["message", "function_call", "function_call_output"],
        )?,
    }
    if let Some(v) = it.get("id") {
        string(v, "item.id")?;
    }
    if let Some(v) = it.get("object") {
        one_of(v, "item.object", &["realtime.item"])?;
    }
    if let Some(v) = it.get("status") {
        one_of(
            v,
            "item.status",
            &["completed", "incomplete", "in_progress"],
        )?;
    }
    match kind {
        "function_call" => {
            for key in ["call_id", "name", "arguments"] {
                string(
                    it.get(key).ok_or_else(|| missing(&join("item", key)))?,
                    &join("item", key),
                )?;
            }
            Ok(())
        }
        "function_call_output" => {
            for key in ["call_id", "output"] {
                string(
                    it.get(key).ok_or_else(|| missing(&join("item", key)))?,
                    &join("item", key),
                )?;
            }
            Ok(())
        }
        _ => validate_message(it),
    }
}

fn validate_message(it: &Map<String, Value>) -> Checked {
    let role_v = it.get("role").ok_or_else(|| missing("item.role"))?;
    one_of(role_v, "item.role", &["user", "assistant", "system"])?;
    let role = role_v.as_str().unwrap_or_default();
    let content_v = it.get("content").ok_or_else(|| missing("item.content"))?;
    let content = content_v
        .as_array()
        .ok_or_else(|| invalid_type("item.content", "an array", content_v))?;
    for (i, part) in content.iter().enumerate() {
        let p = format!("item.content[{i}]");
        let part = object(part, &p)?;
        let kind_v = part.get("type").ok_or_else(|| missing(&join(&p, "type")))?;
        let kind = string(kind_v, &join(&p, "type"))?;
        match (role, kind) {
            ("user" | "system", "input_text") | ("assistant", "output_text") => {
                check_keys(part, &["type", "text"], &p)?;
                string(
                    part.get("text").ok_or_else(|| missing(&join(&p, "text")))?,
                    &join(&p, "text"),
                )?;
            }
            ("user", "input_audio") => {
                check_keys(part, &["type", "audio", "transcript"], &p)?;
                let audio = string(
                    part.get("audio")
                        .ok_or_else(|| missing(&join(&p, "audio")))?,
                    &join(&p, "audio"),
                )?;
                if BASE64_STANDARD.decode(audio).is_err() {
                    return Err(Reject::invalid_value(
                        &join(&p, "audio"),
                        "Invalid 'audio'. Expected base64-encoded audio bytes.".into(),
                    ));
                }
            }
            ("user", "input_image") => {
                check_keys(part, &["type", "image_url", "detail"], &p)?;
            }
            ("assistant", "output_audio") => {
                return Err(Reject::invalid_value(
                    &join(&p, "type"),
                    "Assistant audio cannot be created by the client: an assistant message \
                     may only carry 'output_text' content."
                        .into(),
                ))
            }
            _ => {
                let allowed: &[&str] = match role {
                    "user" => &["input_text", "input_audio", "input_image"],
                    "system" => &["input_text"],
                    _ => &["output_text"],
                };
                one_of(kind_v, &join(&p, "type"), allowed)?;
            }
        }
    }
    Ok(())
}

/// GA `session.update` semantics: only present fields change; `audio.input` and
/// `audio.output` merge key by key; everything else (including `turn_detection`,
/// `transcription`, `format`) is replaced as a whole.
pub(crate) fn merge_session(effective: &mut Value, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if key == "audio" {
            for dir in ["input", "output"] {
                if let Some(fields) = value.get(dir).and_then(Value::as_object) {
                    for (k, v) in fields {
                        effective["audio"][dir][k] = v.clone();
                    }
                }
            }
        } else {
            effective[key] = value.clone();
        }
    }
}
