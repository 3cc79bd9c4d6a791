//! The checks of GPT-Live client events that need no session state (`reference/gpt-live.md`
//! §2, §4, §6–§10): key sets, types and limits of `session.start` (its audio format, voice,
//! delegation and `input` history), of the append events, `session.update`, the audio
//! fixture and `response.item.create`; and callbridge's own rules for a `session.start`.
//! Pure code; a failed check is a [`Reject`], which the session turns into an `error` event of
//! the Live shape ([`error_event`]) and a violation.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde_json::{json, Map, Value};

use crate::checks::{
    boolean, check_keys, invalid_type, join, missing, non_negative_int, object, one_of, string,
    Checked, Reject,
};

/// Live models (§0). The SDK types `model` as a free string; the service knows these.
const MODELS: &[&str] = &["gpt-live-1", "gpt-live-1.1"];

/// Built-in voices named by the SDK (§2).
const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "beacon", "bossa", "cedar", "cinder", "coral", "delta", "echo",
    "gleam", "marin", "meridian", "quartz", "ripple", "sage", "shida", "shimmer", "stone", "tempo",
    "verse", "vesper", "willow",
];

/// `input` history: at most this many messages (§2.1).
pub const MAX_INPUT_MESSAGES: usize = 128;
/// `input` history: at most this many rendered tokens (§2.1, the default).
pub const MAX_INPUT_TOKENS: usize = 8_192;
/// What rendering adds to each history message's text, in the fake's count (role and
/// separators, as chat formats do).
pub const MESSAGE_OVERHEAD_TOKENS: usize = 4;
/// `instructions`: at most this many tokens (§2).
pub const MAX_INSTRUCTIONS_TOKENS: usize = 16_384;
/// `content` of the append events: at most this many tokens (§6, §7).
pub const MAX_APPEND_TOKENS: usize = 500;

/// One append's decoded audio, at most (unconfirmed for Live, §4.1: Realtime's 15 MiB).
pub(crate) const MAX_APPEND_BYTES: usize = 15 * 1024 * 1024;
/// An audio fixture: PCM16 LE mono 24 kHz, at most 30 s (§8).
pub(crate) const FIXTURE_BYTES_PER_MS: usize = 48;
const MAX_FIXTURE_BYTES: usize = 30_000 * FIXTURE_BYTES_PER_MS;

/// Client event types (§2–§12) and the keys each may carry besides `type` and `event_id`.
pub(crate) const CLIENT_EVENTS: &[(&str, &[&str])] = &[
    ("session.start", &["session"]),
    ("session.update", &["session"]),
    ("session.input_audio.append", &["audio"]),
    ("session.input_audio.mute", &[]),
    ("session.input_audio.unmute", &[]),
    ("session.commentary.append", &["delegation_id", "content"]),
    ("session.instructions.append", &["delegation_id", "content"]),
    ("session.thinking.append", &["delegation_id", "content"]),
    ("session.output_audio.fixture.play", &["audio"]),
    ("response.item.create", &["item"]),
    ("response.create", &[]),
    ("session.close", &[]),
];

/// `session` keys of `session.start` (§2). Anything else is `unknown_parameter`.
const START_KEYS: &[&str] = &[
    "model",
    "instructions",
    "audio",
    "delegation",
    "input",
    "store",
    "safety_identifier",
    "triggers",
    "client",
];

/// `session` keys of `session.update` (§10): everything else is fixed at start.
const UPDATE_KEYS: &[&str] = &["delegation", "triggers"];

/// Keys of a `responses` delegation config (the SDK's `ResponsesDelegationConfig`).
const RESPONSES_KEYS: &[&str] = &[
    "model",
    "instructions",
    "max_output_tokens",
    "parallel_tool_calls",
    "reasoning",
    "service_tier",
    "text",
    "tool_choice",
    "tools",
];

/// Tools the Responses backend runs itself; their settings are the Responses API's, not
/// checked here.
const HOSTED_TOOLS: &[&str] = &[
    "web_search",
    "file_search",
    "code_interpreter",
    "image_generation",
    "shell",
];

/// The Live `error` event (§13): the failed command's `event_id` as `client_event_id`, at the
/// top and inside `error`.
pub(crate) fn error_event(reject: &Reject, client_event_id: Option<&str>) -> Value {
    json!({"type": "error", "client_event_id": client_event_id, "error": {
        "type": "invalid_request_error", "code": reject.code, "message": reject.message,
        "param": reject.param, "client_event_id": client_event_id}})
}

/// The fake's token count of `text`: a quarter of its characters, rounded up, but at least
/// one per whitespace-separated word. Real tokenizers give about four characters of English
/// per token and at least a token per word, so this errs on the side of more tokens, never
/// fewer: a bridge that trims to the limits with a margin passes here and there.
pub fn estimate_tokens(text: &str) -> usize {
    let chars = text.chars().count();
    chars.div_ceil(4).max(text.split_whitespace().count())
}

fn tokens_over(text: &str, limit: usize, param: &str) -> Checked {
    let tokens = estimate_tokens(text);
    if tokens > limit {
        return Err(Reject::invalid_value(
            param,
            format!("Invalid '{param}': {tokens} tokens, more than the {limit} allowed."),
        ));
    }
    Ok(())
}

/// Strict standard base64 of at most `max` non-empty bytes, decoded into `out` (reused: the
/// hot path allocates nothing per frame).
pub(crate) fn decode_audio(audio: &str, out: &mut Vec<u8>, max: usize, param: &str) -> Checked {
    if audio.is_empty() {
        return Err(Reject::invalid_value(
            param,
            format!("Invalid '{param}': empty string. Expected base64-encoded audio bytes."),
        ));
    }
    out.clear();
    STANDARD.decode_vec(audio, out).map_err(|e| {
        Reject::invalid_value(
            param,
            format!("Invalid '{param}'. Expected base64-encoded audio bytes: {e}."),
        )
    })?;
    if out.len() > max {
        return Err(Reject::invalid_value(
            param,
            format!(
                "Invalid '{param}': {} bytes of audio, more than the {max} one event may carry.",
                out.len()
            ),
        ));
    }
    Ok(())
}

/// Bytes per millisecond of a valid audio format object.
pub(crate) fn bytes_per_ms(format: &Value) -> usize {
    match (format["type"].as_str(), format["rate"].as_u64()) {
        (Some("audio/pcm"), Some(rate)) => rate as usize * 2 / 1000,
        _ => 8,
    }
}

// ---------------------------------------------------------------------------------------------
// session.start (§2)

/// The API's checks of `session.start`'s `session`.
pub(crate) fn validate_start(s: &Map<String, Value>) -> Checked {
    check_keys(s, START_KEYS, "session")?;
    let model = s.get("model").ok_or_else(|| missing("session.model"))?;
    let model = string(model, "session.model")?;
    if !MODELS.contains(&model) {
        return Err(Reject::new(
            "model_not_found",
            format!("The model '{model}' does not exist or you do not have access to it."),
            Some("session.model"),
        ));
    }
    if let Some(v) = present(s, "instructions") {
        let text = string(v, "session.instructions")?;
        tokens_over(text, MAX_INSTRUCTIONS_TOKENS, "session.instructions")?;
    }
    if let Some(v) = present(s, "audio") {
        let audio = object(v, "session.audio")?;
        check_keys(audio, &["format", "output"], "session.audio")?;
        if let Some(v) = present(audio, "format") {
            validate_format(v, "session.audio.format")?;
        }
        if let Some(v) = present(audio, "output") {
            let p = "session.audio.output";
            let output = object(v, p)?;
            check_keys(output, &["voice"], p)?;
            if let Some(v) = present(output, "voice") {
                validate_voice(v, "session.audio.output.voice")?;
            }
        }
    }
    if let Some(v) = present(s, "delegation") {
        validate_delegation(v, "session.delegation", Stage::Start)?;
    }
    if let Some(v) = present(s, "input") {
        validate_input(v)?;
    }
    if let Some(v) = present(s, "store") {
        boolean(v, "session.store")?;
    }
    if let Some(v) = present(s, "safety_identifier") {
        string(v, "session.safety_identifier")?;
    }
    if let Some(v) = present(s, "client") {
        object(v, "session.client")?;
    }
    Ok(())
}

/// A key whose value is not `null` (the SDK's optional fields accept an explicit null).
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn validate_format(v: &Value, p: &str) -> Checked {
    let f = object(v, p)?;
    let kind = f.get("type").ok_or_else(|| missing(&join(p, "type")))?;
    one_of(
        kind,
        &join(p, "type"),
        &["audio/pcmu", "audio/pcma", "audio/pcm"],
    )?;
    check_keys(f, &["type", "rate"], p)?;
    // `rate` is required for every type (§2), and an integer.
    let rate_param = join(p, "rate");
    let rate = f.get("rate").ok_or_else(|| missing(&rate_param))?;
    let Some(rate) = rate.as_u64() else {
        return Err(invalid_type(&rate_param, "an integer", rate));
    };
    let allowed: &[u64] = if kind == "audio/pcm" {
        &[16_000, 24_000]
    } else {
        &[8_000]
    };
    if !allowed.contains(&rate) {
        let list: Vec<String> = allowed.iter().map(u64::to_string).collect();
        return Err(Reject::invalid_value(
            &rate_param,
            format!(
                "Invalid value: {rate}. Supported values for {kind} are: {}.",
                list.join(", ")
            ),
        ));
    }
    Ok(())
}

fn validate_voice(v: &Value, p: &str) -> Checked {
    match v {
        Value::Object(o) => {
            check_keys(o, &["id"], p)?;
            let id = o.get("id").ok_or_else(|| missing(&join(p, "id")))?;
            string(id, &join(p, "id"))?;
            Ok(())
        }
        other => one_of(other, p, VOICES),
    }
}

/// Whether a delegation config comes with `session.start` (complete) or `session.update`
/// (sparse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Start,
    Update,
}

fn validate_delegation(v: &Value, p: &str, stage: Stage) -> Checked {
    let d = object(v, p)?;
    let kind_param = join(p, "type");
    let kind = d.get("type").ok_or_else(|| missing(&kind_param))?;
    one_of(kind, &kind_param, &["client", "responses", "decisions"])?;
    match kind.as_str() {
        Some("client") => check_keys(d, &["type", "acknowledgement_delay_ms"], p)?,
        Some("responses") => {
            check_keys(d, &["type", "responses", "acknowledgement_delay_ms"], p)?;
            let rp = join(p, "responses");
            match (d.get("responses"), stage) {
                (None, Stage::Start) => return Err(missing(&rp)),
                (None, Stage::Update) => {}
                (Some(r), _) => validate_responses(object(r, &rp)?, &rp, stage)?,
            }
        }
        // Decisions: not for a bridge (a violation of its own); its settings are not checked.
        _ => return Ok(()),
    }
    if let Some(v) = d.get("acknowledgement_delay_ms") {
        non_negative_int(v, &join(p, "acknowledgement_delay_ms"))?;
    }
    Ok(())
}

fn validate_responses(r: &Map<String, Value>, p: &str, stage: Stage) -> Checked {
    check_keys(r, RESPONSES_KEYS, p)?;
    match r.get("model") {
        None if stage == Stage::Start => return Err(missing(&join(p, "model"))),
        None => {}
        Some(m) => {
            string(m, &join(p, "model"))?;
        }
    }
    if let Some(v) = r.get("instructions") {
        string(v, &join(p, "instructions"))?;
    }
    if let Some(v) = r.get("max_output_tokens") {
        if v.as_u64().is_none_or(|n| n == 0) {
            return Err(invalid_type(
                &join(p, "max_output_tokens"),
                "a positive integer",
                v,
            ));
        }
    }
    if let Some(v) = r.get("parallel_tool_calls") {
        boolean(v, &join(p, "parallel_tool_calls"))?;
    }
    if let Some(v) = r.get("reasoning") {
        let rp = join(p, "reasoning");
        let reasoning = object(v, &rp)?;
        check_keys(reasoning, &["effort", "summary"], &rp)?;
        if let Some(v) = reasoning.get("effort") {
            let efforts = ["none", "minimal", "low", "medium", "high", "xhigh"];
            one_of(v, &join(&rp, "effort"), &efforts)?;
        }
        if let Some(v) = reasoning.get("summary") {
            one_of(v, &join(&rp, "summary"), &["concise", "detailed", "auto"])?;
        }
    }
    if let Some(v) = r.get("service_tier") {
        let tiers = ["auto", "default", "flex", "priority"];
        one_of(v, &join(p, "service_tier"), &tiers)?;
    }
    if let Some(v) = r.get("text") {
        let tp = join(p, "text");
        let text = object(v, &tp)?;
        check_keys(text, &["verbosity"], &tp)?;
        if let Some(v) = text.get("verbosity") {
            one_of(v, &join(&tp, "verbosity"), &["low", "medium", "high"])?;
        }
    }
    if let Some(v) = r.get("tool_choice") {
        validate_tool_choice(v, &join(p, "tool_choice"))?;
    }
    if let Some(v) = r.get("tools") {
        validate_tools(v, &join(p, "tools"))?;
    }
    Ok(())
}

fn validate_tool_choice(v: &Value, p: &str) -> Checked {
    let Value::Object(o) = v else {
        return one_of(v, p, &["auto", "none", "required"]);
    };
    let kind = o.get("type").ok_or_else(|| missing(&join(p, "type")))?;
    one_of(kind, &join(p, "type"), &["function", "mcp"])?;
    let keys: &[&str] = if kind == "mcp" {
        &["type", "name", "server_label"]
    } else {
        &["type", "name"]
    };
    check_keys(o, keys, p)?;
    for key in &keys[1..] {
        let v = o.get(*key).ok_or_else(|| missing(&join(p, key)))?;
        string(v, &join(p, key))?;
    }
    Ok(())
}

fn validate_tools(v: &Value, p: &str) -> Checked {
    let tools = v.as_array().ok_or_else(|| invalid_type(p, "an array", v))?;
    let mut kinds: Vec<&str> = vec!["function"];
    kinds.extend_from_slice(HOSTED_TOOLS);
    for (i, tool) in tools.iter().enumerate() {
        let tp = format!("{p}[{i}]");
        let t = object(tool, &tp)?;
        let kind = t.get("type").ok_or_else(|| missing(&join(&tp, "type")))?;
        one_of(kind, &join(&tp, "type"), &kinds)?;
        if kind != "function" {
            continue;
        }
        check_keys(
            t,
            &["type", "name", "description", "parameters", "strict"],
            &tp,
        )?;
        let name_param = join(&tp, "name");
        let name = string(
            t.get("name").ok_or_else(|| missing(&name_param))?,
            &name_param,
        )?;
        // The Responses API's rule for function names.
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(Reject::invalid_value(
                &name_param,
                format!(
                    "Invalid '{name_param}': '{name}'. Expected a string that matches the \
                     pattern '^[a-zA-Z0-9_-]{{1,64}}$'."
                ),
            ));
        }
        if let Some(v) = t.get("description") {
            string(v, &join(&tp, "description"))?;
        }
        if let Some(v) = t.get("parameters") {
            object(v, &join(&tp, "parameters"))?;
        }
        if let Some(v) = t.get("strict") {
            boolean(v, &join(&tp, "strict"))?;
        }
    }
    Ok(())
}

/// The startup history (§2.1): text-only messages with exactly one part each, at most
/// [`MAX_INPUT_MESSAGES`] of them and [`MAX_INPUT_TOKENS`] rendered tokens.
fn validate_input(v: &Value) -> Checked {
    let p = "session.input";
    let items = v.as_array().ok_or_else(|| invalid_type(p, "an array", v))?;
    if items.len() > MAX_INPUT_MESSAGES {
        return Err(Reject::new(
            "array_above_max_length",
            format!(
                "Invalid '{p}': array too long. Expected an array with maximum length \
                 {MAX_INPUT_MESSAGES}, but got an array with length {} instead.",
                items.len()
            ),
            Some(p),
        ));
    }
    let mut tokens = 0;
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{p}[{i}]");
        tokens += MESSAGE_OVERHEAD_TOKENS + estimate_tokens(validate_message(item, &ip)?);
    }
    if tokens > MAX_INPUT_TOKENS {
        return Err(Reject::invalid_value(
            p,
            format!(
                "Invalid '{p}': the history renders to {tokens} tokens, more than the \
                 {MAX_INPUT_TOKENS} allowed."
            ),
        ));
    }
    Ok(())
}

/// One history message; returns its text.
fn validate_message<'a>(item: &'a Value, p: &str) -> Result<&'a str, Reject> {
    let m = object(item, p)?;
    let role_param = join(p, "role");
    let role = m.get("role").ok_or_else(|| missing(&role_param))?;
    one_of(role, &role_param, &["developer", "user", "assistant"])?;
    check_keys(m, &["type", "role", "content", "id", "status"], p)?;
    if let Some(v) = m.get("type") {
        one_of(v, &join(p, "type"), &["message"])?;
    }
    if let Some(v) = m.get("id") {
        string(v, &join(p, "id"))?;
    }
    if let Some(v) = m.get("status") {
        one_of(v, &join(p, "status"), &["incomplete", "completed"])?;
    }
    let cp = join(p, "content");
    let content = m.get("content").ok_or_else(|| missing(&cp))?;
    let parts = content
        .as_array()
        .ok_or_else(|| invalid_type(&cp, "an array", content))?;
    if parts.len() != 1 {
        return Err(Reject::invalid_value(
            &cp,
            format!(
                "Invalid '{cp}': {} parts. A history message takes exactly one text part.",
                parts.len()
            ),
        ));
    }
    let pp = format!("{cp}[0]");
    let part = object(&parts[0], &pp)?;
    let type_param = join(&pp, "type");
    match (role.as_str(), part.get("type")) {
        (Some("assistant"), None) => return Err(missing(&type_param)),
        (Some("assistant"), Some(t)) => one_of(t, &type_param, &["output_text", "text"])?,
        (_, Some(t)) => one_of(t, &type_param, &["input_text"])?,
        (_, None) => {}
    }
    check_keys(part, &["type", "text"], &pp)?;
    let text_param = join(&pp, "text");
    string(
        part.get("text").ok_or_else(|| missing(&text_param))?,
        &text_param,
    )
}

/// callbridge's rules for a `session.start` the API accepts (violations, no `error`).
pub(crate) fn bridge_findings(s: &Map<String, Value>) -> Vec<String> {
    let mut found = Vec::new();
    let format = &s.get("audio").unwrap_or(&Value::Null)["format"];
    if *format != json!({"type": "audio/pcmu", "rate": 8000}) {
        found.push(format!(
            "callbridge requires session.audio.format {{\"type\":\"audio/pcmu\",\"rate\":8000}} \
             (Twilio µ-law passes straight through, §0.2); got {format}"
        ));
    }
    if s.get("delegation").and_then(|d| d.get("type")) == Some(&json!("decisions")) {
        found.push("Decisions delegation is not for a bridge (§2)".to_owned());
    }
    for key in ["triggers", "client"] {
        if s.contains_key(key) {
            found.push(format!(
                "session.{key} is for Decisions / WebRTC frontends, not for a bridge (§2)"
            ));
        }
    }
    if let Some(id) = s.get("safety_identifier").and_then(Value::as_str) {
        if looks_like_phone_number(id) {
            found.push(format!(
                "session.safety_identifier {id:?} looks like a phone number: send a stable \
                 hash of the caller, never the number itself (§2)"
            ));
        }
    }
    found
}

/// Seven or more digits once `+`, spaces, dashes, dots and parentheses are removed, and
/// nothing else.
fn looks_like_phone_number(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let rest = s
        .chars()
        .filter(|c| !c.is_ascii_digit() && !"+ -.()".contains(*c))
        .count();
    digits >= 7 && rest == 0
}

// ---------------------------------------------------------------------------------------------
// Other client events

/// `session.update`'s `session` (§10): only `delegation` and `triggers`.
pub(crate) fn validate_update(s: &Map<String, Value>) -> Checked {
    if let Some(key) = s.keys().find(|k| !UPDATE_KEYS.contains(&k.as_str())) {
        let param = join("session", key);
        let why = if START_KEYS.contains(&key.as_str()) {
            " It is fixed at session.start: only delegation and triggers can change."
        } else {
            ""
        };
        return Err(Reject::new(
            "unknown_parameter",
            format!("Unknown parameter: '{param}'.{why}"),
            Some(&param),
        ));
    }
    if let Some(v) = present(s, "delegation") {
        validate_delegation(v, "session.delegation", Stage::Update)?;
    }
    Ok(())
}

/// `delegation_id` (required, nullable) and `content` (≤ 500 tokens) of the append events
/// (§6, §7).
pub(crate) fn validate_text_append(
    event: &Map<String, Value>,
) -> Result<(Option<&str>, &str), Reject> {
    let delegation_id = match event.get("delegation_id") {
        None => return Err(missing("delegation_id")),
        Some(Value::Null) => None,
        Some(v) => Some(string(v, "delegation_id")?),
    };
    let content = string(
        event.get("content").ok_or_else(|| missing("content"))?,
        "content",
    )?;
    if content.trim().is_empty() {
        return Err(Reject::invalid_value(
            "content",
            "Invalid 'content': empty string. Expected text for the model.".into(),
        ));
    }
    tokens_over(content, MAX_APPEND_TOKENS, "content")?;
    Ok((delegation_id, content))
}

/// The clip of `session.output_audio.fixture.play` (§8): strict base64 of PCM16 (whole
/// samples), at most 30 s at 24 kHz. Returns its duration in ms.
pub(crate) fn validate_fixture(audio: &str, scratch: &mut Vec<u8>) -> Result<u64, Reject> {
    decode_audio(audio, scratch, MAX_FIXTURE_BYTES, "audio")?;
    if scratch.len() % 2 != 0 {
        return Err(Reject::invalid_value(
            "audio",
            format!(
                "Invalid 'audio': {} bytes is not whole PCM16 samples.",
                scratch.len()
            ),
        ));
    }
    Ok((scratch.len() / FIXTURE_BYTES_PER_MS) as u64)
}

/// What `response.item.create` carries.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ItemKind<'a> {
    /// A tool result for this call.
    FunctionCallOutput { call_id: &'a str },
    /// A message for the backend conversation.
    Message,
}

/// `response.item.create`'s `item` (§9.2): a `function_call_output` (what a bridge sends) or
/// a message; other Responses input items are not what a bridge has to say.
pub(crate) fn validate_item(item: &Value) -> Result<ItemKind<'_>, Reject> {
    let it = object(item, "item")?;
    let kind = it.get("type").ok_or_else(|| missing("item.type"))?;
    one_of(kind, "item.type", &["function_call_output", "message"])?;
    if let Some(v) = it.get("id") {
        string(v, "item.id")?;
    }
    if let Some(v) = it.get("status") {
        one_of(
            v,
            "item.status",
            &["in_progress", "completed", "incomplete"],
        )?;
    }
    if kind == "message" {
        check_keys(it, &["type", "role", "content", "id", "status"], "item")?;
        let role = it.get("role").ok_or_else(|| missing("item.role"))?;
        one_of(
            role,
            "item.role",
            &["user", "developer", "system", "assistant"],
        )?;
        let content = it.get("content").ok_or_else(|| missing("item.content"))?;
        if !content.is_string() && !content.is_array() {
            return Err(invalid_type(
                "item.content",
                "a string or an array",
                content,
            ));
        }
        return Ok(ItemKind::Message);
    }
    check_keys(it, &["type", "call_id", "output", "id", "status"], "item")?;
    let call_id = string(
        it.get("call_id").ok_or_else(|| missing("item.call_id"))?,
        "item.call_id",
    )?;
    string(
        it.get("output").ok_or_else(|| missing("item.output"))?,
        "item.output",
    )?;
    Ok(ItemKind::FunctionCallOutput { call_id })
}

/// A `session.update` delegation applied to the effective one: the type stays; `responses`
/// settings present in the patch replace theirs, the others keep their values (§10).
pub(crate) fn merge_delegation(current: &mut Value, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if key == "responses" {
            if let (Some(cur), Some(new)) = (
                current.get_mut("responses").and_then(Value::as_object_mut),
                value.as_object(),
            ) {
                for (k, v) in new {
                    cur.insert(k.clone(), v.clone());
                }
                continue;
            }
        }
        current[key] = value.clone();
    }
}
