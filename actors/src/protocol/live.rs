//! OpenAI GPT-Live events (`reference/gpt-live.md`), for a server audio bridge on the primary
//! WebSocket.
//!
//! Client events are built as exact JSON (the session object is strict: an unknown field
//! refuses the whole `session.start`). Server events are read with one flat, borrowing parse, as
//! for Realtime: an audio delta costs no allocation beyond the payload it forwards, and an event
//! type we do not know is [`LiveEvent::Other`], never an error.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{json, Value};

use super::JsonStr;
use crate::config::OpenAiConfig;
use crate::messages::{ContextLine, Role};

/// `event_id` of our `session.start`: an `error` naming it means the session will not start.
pub const SESSION_START_EVENT_ID: &str = "cb_session_start";

/// `event_id` of our `session.close`.
pub const SESSION_CLOSE_EVENT_ID: &str = "cb_session_close";

/// `input` history limits (§2.1): at most this many messages…
pub const MAX_HISTORY_MESSAGES: usize = 128;
/// …and this many rendered tokens (the documented default).
pub const MAX_HISTORY_TOKENS: usize = 8_192;
/// What we allow ourselves of that token limit: our count is an estimate.
const HISTORY_TOKEN_BUDGET: usize = 6_000;

/// The developer note that ends the history of a continued session (§2.1).
pub const CONTINUED_NOTE: &str = "The line to the assistant dropped for a moment and the \
    conversation continues on a new connection. Continue the conversation without greeting the \
    caller again.";

/// A generous estimate of the tokens a message costs: a token per 3 characters or per word,
/// whichever is more, and 8 for the message around it. Over-counting only trims older lines.
pub fn estimate_tokens(text: &str) -> usize {
    let chars = text.chars().count();
    let words = text.split_whitespace().count();
    chars.div_ceil(3).max(words) + 8
}

/// The `input` messages for a session that continues a call: the newest lines that fit the
/// message and token limits, in order, then the developer note. Empty history: none at all.
pub fn history_input(history: &[ContextLine]) -> Vec<Value> {
    if history.is_empty() {
        return Vec::new();
    }
    let mut budget = HISTORY_TOKEN_BUDGET.saturating_sub(estimate_tokens(CONTINUED_NOTE));
    let mut kept: Vec<Value> = Vec::new();
    for line in history.iter().rev() {
        if kept.len() + 1 >= MAX_HISTORY_MESSAGES {
            break;
        }
        let text = line.as_text();
        let cost = estimate_tokens(&text);
        if cost > budget {
            break;
        }
        budget -= cost;
        kept.push(match line.role {
            Role::Assistant => json!({"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": text}]}),
            Role::Caller | Role::Dtmf | Role::Tool => json!({"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}]}),
        });
    }
    kept.reverse();
    kept.push(json!({"type": "message", "role": "developer",
        "content": [{"type": "input_text", "text": CONTINUED_NOTE}]}));
    kept
}

/// `session.start` for Twilio audio (§2): μ-law at 8 kHz both ways, client delegation, and the
/// conversation so far for a continued session.
pub fn session_start(cfg: &OpenAiConfig, history: &[ContextLine]) -> String {
    let mut session = serde_json::Map::new();
    session.insert("model".into(), json!(cfg.live_model));
    if !cfg.instructions.trim().is_empty() {
        session.insert("instructions".into(), json!(cfg.instructions));
    }
    session.insert(
        "audio".into(),
        json!({"format": {"type": "audio/pcmu", "rate": 8000}, "output": {"voice": cfg.voice}}),
    );
    session.insert("delegation".into(), delegation(cfg));
    let input = history_input(history);
    if !input.is_empty() {
        session.insert("input".into(), Value::Array(input));
    }
    json!({"type": "session.start", "event_id": SESSION_START_EVENT_ID, "session": session})
        .to_string()
}

/// The session's delegation (§9): with tools declared (`[[tools]]`, `call.builtin_tools`),
/// Responses delegation whose function tools come back to us; otherwise client delegation
/// (`null`), whose delegations we decline ([`decline_delegation`]).
pub fn delegation(cfg: &OpenAiConfig) -> Value {
    let tools = crate::tools::function_definitions(&cfg.tools, &cfg.builtin_tools);
    if tools.is_empty() {
        return Value::Null;
    }
    let mut responses = serde_json::Map::new();
    responses.insert("model".into(), json!(cfg.live_delegation_model));
    if !cfg.live_delegation_instructions.trim().is_empty() {
        responses.insert(
            "instructions".into(),
            json!(cfg.live_delegation_instructions),
        );
    }
    responses.insert("tools".into(), Value::Array(tools));
    responses.insert("tool_choice".into(), json!("auto"));
    json!({"type": "responses", "responses": responses})
}

/// What a client delegation is told when this line has no backend for it (§9.1).
pub const DECLINE: &str = "This line cannot do that. Offer to help with something else.";

/// The answer to a client delegation: a short commentary that it cannot be done here (§9.1).
pub fn decline_delegation(delegation_id: &str) -> String {
    json!({"type": "session.commentary.append", "delegation_id": delegation_id,
        "content": DECLINE})
    .to_string()
}

/// `response.item.create` with the output of the delegated function call `call_id` (§9.2).
pub fn function_call_output(call_id: &str, output: &str) -> String {
    json!({"type": "response.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output}})
    .to_string()
}

/// `response.create`: the delegated backend goes on (§9.2).
pub fn response_create() -> String {
    json!({"type": "response.create"}).to_string()
}

/// `session.input_audio.append` for one chunk of caller audio. `audio_b64` must be checked
/// base64 (it is spliced in without escaping: this runs every 20 ms per call).
pub fn audio_append(audio_b64: &str) -> String {
    const PREFIX: &str = "{\"type\":\"session.input_audio.append\",\"audio\":\"";
    const SUFFIX: &str = "\"}";
    let mut out = String::with_capacity(PREFIX.len() + audio_b64.len() + SUFFIX.len());
    out.push_str(PREFIX);
    out.push_str(audio_b64);
    out.push_str(SUFFIX);
    out
}

/// `session.commentary.append`: speakable context, the model relays it in its own words (the
/// greeting, worded as an instruction).
pub fn commentary_append(content: &str) -> String {
    json!({"type": "session.commentary.append", "delegation_id": null, "content": content})
        .to_string()
}

/// `session.instructions.append`: developer text (keypad digits).
pub fn instructions_append(content: &str) -> String {
    json!({"type": "session.instructions.append", "delegation_id": null, "content": content})
        .to_string()
}

/// The text of keypad digits pressed together, for [`instructions_append`].
pub fn digits_text(digits: &[String]) -> String {
    match digits {
        [one] => format!("The caller pressed {one} on the phone keypad."),
        many => format!(
            "The caller pressed {} on the phone keypad, in this order.",
            many.join(", ")
        ),
    }
}

/// `session.close`.
pub fn session_close() -> String {
    json!({"type": "session.close", "event_id": SESSION_CLOSE_EVENT_ID}).to_string()
}

/// The server events the bridge acts on.
#[derive(Debug, PartialEq)]
pub enum LiveEvent<'a> {
    /// The session is configured: audio may flow.
    Started {
        id: String,
        /// Unix seconds at which the session expires.
        expires_at: Option<i64>,
    },
    /// A chunk of assistant audio (base64 μ-law), passed through undecoded.
    AudioDelta { delta: Cow<'a, str> },
    /// A fragment of what the caller said.
    InputTranscript { delta: String },
    /// A fragment of what the assistant said.
    OutputTranscript { delta: String },
    /// The session's cumulative billable seconds so far.
    Usage { seconds: f64 },
    /// The session is over; the final cumulative seconds.
    Closed {
        reason: String,
        seconds: Option<f64>,
    },
    Error {
        code: Option<String>,
        message: String,
        /// The `event_id` of our event that failed, when the server names it.
        client_event_id: Option<String>,
    },
    /// The model delegated a task (`session.delegation.created`): to us (`client`) or to the
    /// Responses backend.
    Delegation { id: String, target: String },
    /// A function call of the delegated backend (`response.event` wrapping
    /// `response.output_item.done` with a `function_call` item). Only `completed` ones run.
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
        status: String,
    },
    /// The delegated backend's response ended (`response.completed`, `incomplete`, `failed`),
    /// with its token usage when given.
    DelegationDone {
        status: String,
        input_tokens: u64,
        cached_tokens: u64,
        output_tokens: u64,
    },
    /// Any other event (acks, `info`, …), by type.
    Other { kind: Cow<'a, str> },
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<JsonStr<'a>>,
    #[serde(default)]
    session: Option<RawSession>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    error: Option<RawError>,
    #[serde(default)]
    client_event_id: Option<String>,
    #[serde(default)]
    delegation: Option<RawDelegation>,
    /// `response.event`'s wrapped backend event (read only for that type).
    #[serde(default)]
    event: Option<Value>,
}

#[derive(Deserialize)]
struct RawDelegation {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    target: Option<String>,
}

#[derive(Deserialize)]
struct RawSession {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    expires_at: Option<i64>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    seconds: Option<f64>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    client_event_id: Option<String>,
}

/// Why a server frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveParseError {
    #[error("not a JSON event with a type: {0}")]
    NotJson(String),
    #[error("{kind} without {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
}

/// Reads one text frame from GPT-Live.
pub fn parse_server_event(text: &str) -> Result<LiveEvent<'_>, LiveParseError> {
    let raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| LiveParseError::NotJson(e.to_string()))?;
    let missing = |kind, field| LiveParseError::MissingField { kind, field };
    Ok(match raw.kind.as_ref() {
        "session.output_audio.delta" => LiveEvent::AudioDelta {
            delta: raw
                .delta
                .map(|s| s.0)
                .ok_or(missing("session.output_audio.delta", "delta"))?,
        },
        "session.input_transcript.delta" => LiveEvent::InputTranscript {
            delta: raw
                .delta
                .map(|s| s.0.into_owned())
                .ok_or(missing("session.input_transcript.delta", "delta"))?,
        },
        "session.output_transcript.delta" => LiveEvent::OutputTranscript {
            delta: raw
                .delta
                .map(|s| s.0.into_owned())
                .ok_or(missing("session.output_transcript.delta", "delta"))?,
        },
        "session.started" => {
            let session = raw.session.ok_or(missing("session.started", "session"))?;
            LiveEvent::Started {
                id: session.id.ok_or(missing("session.started", "session.id"))?,
                expires_at: session.expires_at,
            }
        }
        "session.usage.updated" => LiveEvent::Usage {
            seconds: raw
                .usage
                .and_then(|u| u.seconds)
                .ok_or(missing("session.usage.updated", "usage.seconds"))?,
        },
        "session.closed" => LiveEvent::Closed {
            reason: raw.reason.unwrap_or_else(|| "unknown".into()),
            seconds: raw.usage.and_then(|u| u.seconds),
        },
        "error" => {
            let error = raw.error.ok_or(missing("error", "error"))?;
            LiveEvent::Error {
                code: error.code,
                message: error.message.unwrap_or_default(),
                client_event_id: error.client_event_id.or(raw.client_event_id),
            }
        }
        "session.delegation.created" => {
            let d = raw
                .delegation
                .ok_or(missing("session.delegation.created", "delegation"))?;
            LiveEvent::Delegation {
                id: d
                    .id
                    .ok_or(missing("session.delegation.created", "delegation.id"))?,
                target: d.target.unwrap_or_else(|| "client".into()),
            }
        }
        "response.event" => {
            let event = raw.event.ok_or(missing("response.event", "event"))?;
            backend_event(event)?.unwrap_or(LiveEvent::Other { kind: raw.kind })
        }
        _ => LiveEvent::Other { kind: raw.kind },
    })
}

/// The backend events of a `response.event` the bridge acts on (§9.2); `None` for the others.
fn backend_event(event: Value) -> Result<Option<LiveEvent<'static>>, LiveParseError> {
    let missing = |field| LiveParseError::MissingField {
        kind: "response.event",
        field,
    };
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Ok(match event["type"].as_str() {
        Some("response.output_item.done") if event["item"]["type"] == "function_call" => {
            let item = &event["item"];
            Some(LiveEvent::FunctionCall {
                call_id: text(&item["call_id"]).ok_or(missing("event.item.call_id"))?,
                name: text(&item["name"]).ok_or(missing("event.item.name"))?,
                arguments: text(&item["arguments"]).unwrap_or_default(),
                status: text(&item["status"]).unwrap_or_else(|| "completed".into()),
            })
        }
        Some(kind @ ("response.completed" | "response.incomplete" | "response.failed")) => {
            let usage = &event["response"]["usage"];
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            Some(LiveEvent::DelegationDone {
                status: kind.trim_start_matches("response.").to_owned(),
                input_tokens: n(&usage["input_tokens"]),
                cached_tokens: n(&usage["input_tokens_details"]["cached_tokens"]),
                output_tokens: n(&usage["output_tokens"]),
            })
        }
        Some(_) => None,
        None => return Err(missing("event.type")),
    })
}

/// What a `session.closed` reason means for the call (§12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMeaning {
    /// We asked (`close_requested`): the normal end.
    Requested,
    /// The session ended but the call can go on in a new one (`expired`, `connection_lost`).
    Continue,
    /// Do not reopen (`content`: a safety filter; `remote_hangup`; anything unknown).
    End,
}

pub fn close_meaning(reason: &str) -> CloseMeaning {
    match reason {
        "close_requested" => CloseMeaning::Requested,
        "expired" | "connection_lost" => CloseMeaning::Continue,
        _ => CloseMeaning::End,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OpenAiConfig {
        OpenAiConfig {
            live_model: "gpt-live-1".into(),
            instructions: "You are the phone assistant of Acme Dental. Keep answers short and ask one question at a time.".into(),
            voice: "marin".into(),
            ..Default::default()
        }
    }

    /// §2's example, field for field.
    #[test]
    fn session_start_is_the_documented_one() {
        let ours: Value = serde_json::from_str(&session_start(&cfg(), &[])).unwrap();
        let doc: Value = serde_json::from_str(
            r#"{"type":"session.start","event_id":"cb_session_start",
             "session":{"model":"gpt-live-1",
                        "instructions":"You are the phone assistant of Acme Dental. Keep answers short and ask one question at a time.",
                        "audio":{"format":{"type":"audio/pcmu","rate":8000},"output":{"voice":"marin"}},
                        "delegation":null}}"#,
        )
        .unwrap();
        assert_eq!(ours, doc);
    }

    /// §2.1's example: the turns so far, then the developer note.
    #[test]
    fn a_continued_session_gets_the_conversation_as_input() {
        let history = vec![
            ContextLine {
                role: Role::Caller,
                text: "I'd like to move my appointment to Friday.".into(),
            },
            ContextLine {
                role: Role::Assistant,
                text: "Sure. Morning or afternoon?".into(),
            },
            ContextLine {
                role: Role::Dtmf,
                text: "2".into(),
            },
        ];
        let ours: Value = serde_json::from_str(&session_start(&cfg(), &history)).unwrap();
        let input = ours["session"]["input"].as_array().unwrap();
        assert_eq!(input.len(), 4);
        assert_eq!(input[0]["role"], "user");
        assert_eq!(input[0]["content"][0]["type"], "input_text");
        assert_eq!(input[1]["role"], "assistant");
        assert_eq!(input[1]["content"][0]["type"], "output_text");
        assert_eq!(
            input[1]["content"][0]["text"],
            "Sure. Morning or afternoon?"
        );
        assert!(input[2]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("pressed the key 2"));
        assert_eq!(input[3]["role"], "developer");
        assert_eq!(input[3]["content"][0]["text"], CONTINUED_NOTE);
    }

    #[test]
    fn history_keeps_the_newest_lines_within_the_limits() {
        let many: Vec<ContextLine> = (0..500)
            .map(|i| ContextLine {
                role: Role::Caller,
                text: format!("line {i}"),
            })
            .collect();
        let input = history_input(&many);
        assert_eq!(input.len(), MAX_HISTORY_MESSAGES);
        assert_eq!(input[126]["content"][0]["text"], "line 499", "newest kept");
        assert_eq!(input[127]["role"], "developer");
        let long: Vec<ContextLine> = (0..40)
            .map(|i| ContextLine {
                role: Role::Assistant,
                text: format!("{i} {}", "word ".repeat(300)),
            })
            .collect();
        let input = history_input(&long);
        let tokens: usize = input
            .iter()
            .map(|m| estimate_tokens(m["content"][0]["text"].as_str().unwrap()))
            .sum();
        assert!(tokens <= MAX_HISTORY_TOKENS, "{tokens}");
        assert!(input.len() > 1 && input.len() < 40);
        assert!(input[input.len() - 2]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("39 "));
    }

    #[test]
    fn client_events() {
        assert_eq!(
            audio_append("AAAA"),
            r#"{"type":"session.input_audio.append","audio":"AAAA"}"#
        );
        let greet: Value = serde_json::from_str(&commentary_append("Greet the caller.")).unwrap();
        assert_eq!(
            greet,
            json!({"type":"session.commentary.append","delegation_id":null,"content":"Greet the caller."})
        );
        let dtmf: Value =
            serde_json::from_str(&instructions_append(&digits_text(&["7".into()]))).unwrap();
        assert_eq!(dtmf["type"], "session.instructions.append");
        assert_eq!(dtmf["delegation_id"], Value::Null);
        assert_eq!(dtmf["content"], "The caller pressed 7 on the phone keypad.");
        assert!(digits_text(&["1".into(), "2".into(), "#".into()]).contains("1, 2, #"));
        let close: Value = serde_json::from_str(&session_close()).unwrap();
        assert_eq!(close["type"], "session.close");
    }

    /// The server examples of `gpt-live.md`.
    #[test]
    fn server_events() {
        assert_eq!(
            parse_server_event(r#"{"type":"session.started","event_id":"evt_8c1f02","client_event_id":"cb_start_1","session":{"id":"live_68f2c41ad0e3","status":"active","expires_at":1796142600,"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":8000},"output":{"voice":"marin"}},"delegation":{"type":"client"},"input":[],"store":false}}"#).unwrap(),
            LiveEvent::Started { id: "live_68f2c41ad0e3".into(), expires_at: Some(1796142600) }
        );
        let delta =
            parse_server_event(r#"{"type":"session.output_audio.delta","delta":"/3/+fg=="}"#)
                .unwrap();
        assert_eq!(
            delta,
            LiveEvent::AudioDelta {
                delta: Cow::Borrowed("/3/+fg==")
            }
        );
        assert!(
            matches!(
                delta,
                LiveEvent::AudioDelta {
                    delta: Cow::Borrowed(_)
                }
            ),
            "borrowed"
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.input_transcript.delta","event_id":"evt_8c1f10","delta":"I'd like to move","start_ms":5200,"end_ms":5400}"#).unwrap(),
            LiveEvent::InputTranscript { delta: "I'd like to move".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.output_transcript.delta","event_id":"evt_8c1f21","delta":" Morning or afternoon?","start_ms":6800,"end_ms":7400}"#).unwrap(),
            LiveEvent::OutputTranscript { delta: " Morning or afternoon?".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.usage.updated","event_id":"evt_8c1f40","usage":{"seconds":37.5},"context_window":{"usage_ratio":0.04}}"#).unwrap(),
            LiveEvent::Usage { seconds: 37.5 }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.closed","event_id":"evt_8c1f99","client_event_id":"cb_close","reason":"close_requested","usage":{"seconds":95.5},"session":{"id":"live_68f2c41ad0e3","status":"active","expires_at":1796142600,"model":"gpt-live-1","audio":{"format":{"type":"audio/pcmu","rate":8000},"output":{"voice":"marin"}}}}"#).unwrap(),
            LiveEvent::Closed { reason: "close_requested".into(), seconds: Some(95.5) }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"error","event_id":"evt_8c1f50","client_event_id":"cb_start_1","error":{"type":"invalid_request_error","code":"unknown_parameter","message":"Unknown parameter: 'session.temperature'.","param":"session.temperature","client_event_id":"cb_start_1"}}"#).unwrap(),
            LiveEvent::Error { code: Some("unknown_parameter".into()), message: "Unknown parameter: 'session.temperature'.".into(), client_event_id: Some("cb_start_1".into()) }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.commentary.appended","event_id":"evt_8c1f03","client_event_id":"cb_greet_1","start_ms":240,"end_ms":240}"#).unwrap(),
            LiveEvent::Other { kind: Cow::Borrowed("session.commentary.appended") }
        );
        assert!(parse_server_event("nope").is_err());
        assert!(parse_server_event(r#"{"type":"session.output_audio.delta"}"#).is_err());
        assert!(parse_server_event(r#"{"type":"session.started","session":{}}"#).is_err());
    }

    /// §9.2's examples: the start with Responses delegation, the function call, our answer.
    #[test]
    fn tools_go_through_responses_delegation() {
        let mut c = cfg();
        assert_eq!(delegation(&c), Value::Null, "no tools: client delegation");
        c.tools = vec![crate::tools::ToolConfig {
            name: "move_appointment".into(),
            description: "Move the caller's appointment to another day.".into(),
            parameters: Value::String(
                r#"{"type":"object","properties":{"day":{"type":"string"}},"required":["day"],"additionalProperties":false}"#.into(),
            ),
            url: "http://127.0.0.1:1/tool".into(),
            timeout_ms: 5000,
        }];
        c.builtin_tools = vec!["end_call".into()];
        let start: Value = serde_json::from_str(&session_start(&c, &[])).unwrap();
        let d = &start["session"]["delegation"];
        assert_eq!(d["type"], "responses");
        assert_eq!(d["responses"]["model"], "gpt-5.5");
        assert_eq!(d["responses"]["tool_choice"], "auto");
        assert!(d["responses"].get("instructions").is_none());
        let tools = d["responses"]["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(
            tools[0],
            json!({"type":"function","name":"move_appointment",
                "description":"Move the caller's appointment to another day.",
                "parameters":{"type":"object","properties":{"day":{"type":"string"}},
                              "required":["day"],"additionalProperties":false}})
        );
        assert_eq!(tools[1]["name"], "end_call");
        c.live_delegation_instructions = "You are the booking backend.".into();
        assert_eq!(
            delegation(&c)["responses"]["instructions"],
            "You are the booking backend."
        );

        assert_eq!(
            parse_server_event(r#"{"type":"session.delegation.created","event_id":"evt_9a0002","offset_ms":18420,"delegation":{"type":"delegation","id":"dlg_5b2e","target":"responses","response_id":"resp_77c1"}}"#).unwrap(),
            LiveEvent::Delegation { id: "dlg_5b2e".into(), target: "responses".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.event","event_id":"evt_9a0007","delegation_id":"dlg_5b2e","event":{"type":"response.output_item.done","sequence_number":6,"output_index":0,"item":{"type":"function_call","id":"fc_31d0","call_id":"call_Q8n2","name":"move_appointment","arguments":"{\"day\":\"Friday\"}","status":"completed"}}}"#).unwrap(),
            LiveEvent::FunctionCall {
                call_id: "call_Q8n2".into(),
                name: "move_appointment".into(),
                arguments: r#"{"day":"Friday"}"#.into(),
                status: "completed".into(),
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.event","event_id":"evt_9a0011","delegation_id":"dlg_5b2e","event":{"type":"response.completed","sequence_number":14,"response":{"id":"resp_77c1","object":"response","created_at":1796139000,"model":"gpt-5.5","status":"completed","output":[],"tools":[],"tool_choice":"auto","parallel_tool_calls":true,"usage":{"input_tokens":812,"input_tokens_details":{"cached_tokens":512,"cache_write_tokens":0},"output_tokens":64,"output_tokens_details":{"reasoning_tokens":16},"total_tokens":876}}}}"#).unwrap(),
            LiveEvent::DelegationDone { status: "completed".into(), input_tokens: 812, cached_tokens: 512, output_tokens: 64 }
        );
        assert!(matches!(
            parse_server_event(r#"{"type":"response.event","delegation_id":"d","event":{"type":"response.output_text.delta","delta":"x"}}"#).unwrap(),
            LiveEvent::Other { .. }
        ));
        assert!(parse_server_event(r#"{"type":"response.event","delegation_id":"d"}"#).is_err());

        let out: Value =
            serde_json::from_str(&function_call_output("call_Q8n2", r#"{"moved":true}"#)).unwrap();
        assert_eq!(
            out,
            json!({"type":"response.item.create",
                "item":{"type":"function_call_output","call_id":"call_Q8n2","output":"{\"moved\":true}"}})
        );
        let create: Value = serde_json::from_str(&response_create()).unwrap();
        assert_eq!(create, json!({"type": "response.create"}));
        let decline: Value = serde_json::from_str(&decline_delegation("dlg_5b2e")).unwrap();
        assert_eq!(decline["type"], "session.commentary.append");
        assert_eq!(decline["delegation_id"], "dlg_5b2e");
    }

    #[test]
    fn close_reasons() {
        assert_eq!(close_meaning("close_requested"), CloseMeaning::Requested);
        assert_eq!(close_meaning("expired"), CloseMeaning::Continue);
        assert_eq!(close_meaning("connection_lost"), CloseMeaning::Continue);
        assert_eq!(close_meaning("content"), CloseMeaning::End);
        assert_eq!(close_meaning("remote_hangup"), CloseMeaning::End);
    }
}
