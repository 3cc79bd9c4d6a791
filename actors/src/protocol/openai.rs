//! OpenAI Realtime API events, GA protocol only (protocols.md section B).
//!
//! The beta protocol was removed in May 2026; nothing here speaks it. Client events are built as
//! exact GA JSON (an unknown field makes OpenAI reject a whole `session.update`). Server events are
//! read with one flat, borrowing parse: the fields the bridge uses are picked out and everything
//! else is skipped, so an audio delta costs no allocation beyond the payload it forwards, and an
//! event type we do not know is [`ServerEvent::Other`], never an error.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{json, Value};

use super::JsonStr;
use crate::config::OpenAiConfig;
use crate::session::usage::TokenUsage;

/// `event_id` we put on `session.update`, so an `error` naming it is known to be about the
/// session configuration (which makes the leg unusable: audio would be read as 24 kHz PCM).
pub const SESSION_UPDATE_EVENT_ID: &str = "cb_session_update";

/// The GA `session.update` for a Twilio bridge: μ-law in and out, server VAD, transcription.
pub fn session_update(cfg: &OpenAiConfig) -> String {
    let mut input = serde_json::Map::new();
    input.insert("format".into(), json!({"type": "audio/pcmu"}));
    if !cfg.noise_reduction.is_empty() {
        input.insert(
            "noise_reduction".into(),
            json!({"type": cfg.noise_reduction}),
        );
    }
    if !cfg.transcription_model.is_empty() {
        let mut transcription = serde_json::Map::new();
        transcription.insert("model".into(), json!(cfg.transcription_model));
        if !cfg.transcription_language.is_empty() {
            transcription.insert("language".into(), json!(cfg.transcription_language));
        }
        input.insert("transcription".into(), Value::Object(transcription));
    }
    input.insert(
        "turn_detection".into(),
        json!({
            "type": "server_vad",
            "threshold": cfg.vad_threshold,
            "prefix_padding_ms": cfg.vad_prefix_padding_ms,
            "silence_duration_ms": cfg.vad_silence_duration_ms,
            "create_response": true,
            "interrupt_response": true,
        }),
    );
    let mut update = json!({
        "type": "session.update",
        "event_id": SESSION_UPDATE_EVENT_ID,
        "session": {
            "type": "realtime",
            "instructions": cfg.instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": Value::Object(input),
                "output": {"format": {"type": "audio/pcmu"}, "voice": cfg.voice},
            },
        },
    });
    let tools = crate::tools::function_definitions(&cfg.tools, &cfg.builtin_tools);
    if !tools.is_empty() {
        update["session"]["tools"] = Value::Array(tools);
        update["session"]["tool_choice"] = json!("auto");
    }
    update.to_string()
}

/// `input_audio_buffer.append` for one chunk of caller audio. `audio_b64` must be checked base64
/// (it is spliced in without escaping: this runs every 20 ms per call).
pub fn audio_append(audio_b64: &str) -> String {
    const PREFIX: &str = "{\"type\":\"input_audio_buffer.append\",\"audio\":\"";
    const SUFFIX: &str = "\"}";
    let mut out = String::with_capacity(PREFIX.len() + audio_b64.len() + SUFFIX.len());
    out.push_str(PREFIX);
    out.push_str(audio_b64);
    out.push_str(SUFFIX);
    out
}

/// `response.create`, with instructions for this response only (the greeting) or none.
pub fn response_create(instructions: Option<&str>) -> String {
    match instructions {
        Some(text) => json!({"type": "response.create", "response": {"instructions": text}}),
        None => json!({"type": "response.create"}),
    }
    .to_string()
}

/// `response.cancel` for the response in flight.
pub fn response_cancel(response_id: &str) -> String {
    json!({"type": "response.cancel", "response_id": response_id}).to_string()
}

/// `conversation.item.truncate`: the caller heard `audio_end_ms` of this assistant item.
pub fn item_truncate(item_id: &str, audio_end_ms: u64) -> String {
    json!({
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms,
    })
    .to_string()
}

/// A user message made of text (a DTMF digit, or the caller's words replayed after a restart).
pub fn user_text_item(text: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": text}]},
    })
    .to_string()
}

/// The output of a tool call, for the model (`conversation.item.create`).
pub fn function_call_output_item(call_id: &str, output: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    })
    .to_string()
}

/// An assistant message made of text (what the assistant said, replayed after a restart).
pub fn assistant_text_item(text: &str) -> String {
    json!({
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": text}]},
    })
    .to_string()
}

/// A `function_call` item of a response: the model calls a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall {
    pub call_id: String,
    pub name: String,
    pub arguments: String,
}

/// The server events the bridge acts on.
#[derive(Debug, PartialEq)]
pub enum ServerEvent<'a> {
    SessionCreated,
    /// The configuration is in force; audio may flow.
    SessionUpdated,
    /// An `error` event. Most are recoverable; the socket's close is what ends a session.
    Error {
        code: Option<String>,
        message: String,
        /// The `event_id` of our event that failed, when the server names it.
        event_id: Option<String>,
    },
    /// Server VAD heard the caller start speaking: the barge-in signal.
    SpeechStarted,
    /// Server VAD heard the caller stop speaking.
    SpeechStopped,
    ResponseCreated {
        response_id: String,
    },
    ResponseDone {
        response_id: String,
        status: String,
        /// The response's tokens (`response.usage`), when the server says.
        usage: Option<TokenUsage>,
        /// The tool calls of the response (`function_call` items of `response.output`).
        calls: Vec<FunctionCall>,
    },
    /// A chunk of assistant audio (base64 μ-law), passed through undecoded.
    AudioDelta {
        response_id: Cow<'a, str>,
        item_id: Cow<'a, str>,
        delta: Cow<'a, str>,
    },
    /// Everything the assistant said in one item.
    AssistantTranscript {
        transcript: String,
        /// The assistant item it belongs to (a barge-in truncates by item).
        item_id: Option<String>,
    },
    /// What the caller said in one turn.
    CallerTranscript {
        transcript: String,
    },
    /// Transcription of a caller turn failed (the call goes on).
    CallerTranscriptFailed {
        message: String,
    },
    /// Any other event, by type; logged at debug level.
    Other {
        kind: Cow<'a, str>,
    },
}

#[derive(Deserialize)]
struct RawServerEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    response_id: Option<JsonStr<'a>>,
    #[serde(borrow, default)]
    item_id: Option<JsonStr<'a>>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    error: Option<RawError>,
    #[serde(default)]
    response: Option<RawResponse>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    event_id: Option<String>,
}

#[derive(Deserialize)]
struct RawResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    output: Vec<RawOutputItem>,
}

#[derive(Deserialize)]
struct RawOutputItem {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// `response.usage` (protocols.md B: `{type:"tokens",input_tokens,output_tokens,…}`).
#[derive(Deserialize, Default)]
struct RawUsage {
    #[serde(default)]
    input_token_details: RawTokenDetails,
    #[serde(default)]
    output_token_details: RawTokenDetails,
}

#[derive(Deserialize, Default)]
struct RawTokenDetails {
    #[serde(default)]
    text_tokens: u64,
    #[serde(default)]
    audio_tokens: u64,
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    cached_tokens_details: Option<RawCachedDetails>,
}

#[derive(Deserialize, Default)]
struct RawCachedDetails {
    #[serde(default)]
    text_tokens: u64,
    #[serde(default)]
    audio_tokens: u64,
}

impl RawUsage {
    fn tokens(self) -> TokenUsage {
        let input = self.input_token_details;
        // Without the split, cached tokens count as audio first (a voice call's input is
        // mostly audio), the rest as text.
        let (cached_text, cached_audio) = match input.cached_tokens_details {
            Some(d) => (d.text_tokens, d.audio_tokens),
            None => {
                let audio = input.cached_tokens.min(input.audio_tokens);
                ((input.cached_tokens - audio).min(input.text_tokens), audio)
            }
        };
        TokenUsage {
            input_text: input.text_tokens,
            input_audio: input.audio_tokens,
            cached_text,
            cached_audio,
            output_text: self.output_token_details.text_tokens,
            output_audio: self.output_token_details.audio_tokens,
        }
    }
}

/// Why a server frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenAiParseError {
    #[error("not a JSON event with a type: {0}")]
    NotJson(String),
    #[error("{kind} without {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
}

/// Reads one text frame from the Realtime API.
pub fn parse_server_event(text: &str) -> Result<ServerEvent<'_>, OpenAiParseError> {
    let raw: RawServerEvent<'_> =
        serde_json::from_str(text).map_err(|e| OpenAiParseError::NotJson(e.to_string()))?;
    let missing = |kind, field| OpenAiParseError::MissingField { kind, field };
    Ok(match raw.kind.as_ref() {
        "response.output_audio.delta" => ServerEvent::AudioDelta {
            delta: raw
                .delta
                .map(|s| s.0)
                .ok_or(missing("response.output_audio.delta", "delta"))?,
            response_id: raw
                .response_id
                .map(|s| s.0)
                .ok_or(missing("response.output_audio.delta", "response_id"))?,
            item_id: raw
                .item_id
                .map(|s| s.0)
                .ok_or(missing("response.output_audio.delta", "item_id"))?,
        },
        "input_audio_buffer.speech_started" => ServerEvent::SpeechStarted,
        "input_audio_buffer.speech_stopped" => ServerEvent::SpeechStopped,
        "response.created" => ServerEvent::ResponseCreated {
            response_id: raw
                .response
                .and_then(|r| r.id)
                .ok_or(missing("response.created", "response.id"))?,
        },
        "response.done" => {
            let response = raw.response.ok_or(missing("response.done", "response"))?;
            ServerEvent::ResponseDone {
                response_id: response.id.ok_or(missing("response.done", "response.id"))?,
                status: response.status.unwrap_or_default(),
                usage: response.usage.map(RawUsage::tokens),
                calls: response
                    .output
                    .into_iter()
                    .filter(|item| item.kind == "function_call")
                    .filter_map(|item| {
                        Some(FunctionCall {
                            call_id: item.call_id?,
                            name: item.name?,
                            arguments: item.arguments.unwrap_or_default(),
                        })
                    })
                    .collect(),
            }
        }
        "response.output_audio_transcript.done" => ServerEvent::AssistantTranscript {
            transcript: raw.transcript.unwrap_or_default(),
            item_id: raw.item_id.map(|s| s.0.into_owned()),
        },
        "conversation.item.input_audio_transcription.completed" => ServerEvent::CallerTranscript {
            transcript: raw.transcript.unwrap_or_default(),
        },
        "conversation.item.input_audio_transcription.failed" => {
            ServerEvent::CallerTranscriptFailed {
                message: raw.error.and_then(|e| e.message).unwrap_or_default(),
            }
        }
        "session.created" => ServerEvent::SessionCreated,
        "session.updated" => ServerEvent::SessionUpdated,
        "error" => {
            let error = raw.error.unwrap_or(RawError {
                code: None,
                message: None,
                event_id: None,
            });
            ServerEvent::Error {
                code: error.code,
                message: error.message.unwrap_or_default(),
                event_id: error.event_id,
            }
        }
        _ => ServerEvent::Other { kind: raw.kind },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn session_update_is_the_ga_shape() {
        let cfg = OpenAiConfig {
            transcription_language: "en".into(),
            ..OpenAiConfig::default()
        };
        let v = parse_json(&session_update(&cfg));
        assert_eq!(v["type"], "session.update");
        let s = &v["session"];
        assert_eq!(s["type"], "realtime");
        assert_eq!(s["output_modalities"], json!(["audio"]));
        assert_eq!(s["audio"]["input"]["format"], json!({"type": "audio/pcmu"}));
        assert_eq!(
            s["audio"]["output"]["format"],
            json!({"type": "audio/pcmu"})
        );
        assert_eq!(s["audio"]["output"]["voice"], "marin");
        assert_eq!(
            s["audio"]["input"]["transcription"],
            json!({"model": "gpt-4o-mini-transcribe", "language": "en"})
        );
        let vad = &s["audio"]["input"]["turn_detection"];
        assert_eq!(vad["type"], "server_vad");
        assert_eq!(vad["silence_duration_ms"], 500);
        assert_eq!(vad["interrupt_response"], true);
        // No beta-era or unknown keys: any of them makes OpenAI reject the whole update.
        let keys: Vec<&str> = s.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut keys = keys;
        keys.sort();
        assert_eq!(
            keys,
            vec!["audio", "instructions", "output_modalities", "type"]
        );
        for beta in ["temperature", "modalities", "input_audio_format", "voice"] {
            assert!(s.get(beta).is_none(), "{beta}");
        }
    }

    #[test]
    fn optional_session_parts_are_left_out_when_empty() {
        let cfg = OpenAiConfig {
            transcription_model: String::new(),
            noise_reduction: String::new(),
            ..OpenAiConfig::default()
        };
        let v = parse_json(&session_update(&cfg));
        let input = v["session"]["audio"]["input"].as_object().unwrap();
        assert!(input.get("transcription").is_none());
        assert!(input.get("noise_reduction").is_none());
    }

    #[test]
    fn client_events_are_exact() {
        assert_eq!(
            parse_json(&audio_append("AAAA")),
            json!({"type":"input_audio_buffer.append","audio":"AAAA"})
        );
        assert_eq!(
            parse_json(&item_truncate("item_1", 1500)),
            json!({"type":"conversation.item.truncate","item_id":"item_1","content_index":0,"audio_end_ms":1500})
        );
        assert_eq!(
            parse_json(&response_cancel("resp_1")),
            json!({"type":"response.cancel","response_id":"resp_1"})
        );
        assert_eq!(
            parse_json(&response_create(Some("Greet the caller."))),
            json!({"type":"response.create","response":{"instructions":"Greet the caller."}})
        );
        assert_eq!(
            parse_json(&user_text_item("The caller pressed 1")),
            json!({"type":"conversation.item.create","item":{"type":"message","role":"user",
                   "content":[{"type":"input_text","text":"The caller pressed 1"}]}})
        );
        assert_eq!(
            parse_json(&assistant_text_item("Hello")),
            json!({"type":"conversation.item.create","item":{"type":"message","role":"assistant",
                   "content":[{"type":"output_text","text":"Hello"}]}})
        );
    }

    #[test]
    fn audio_delta_borrows_its_payload() {
        let text = r#"{"type":"response.output_audio.delta","event_id":"e1","response_id":"resp_1",
                       "item_id":"item_1","output_index":0,"content_index":0,"delta":"//8="}"#;
        match parse_server_event(text).unwrap() {
            ServerEvent::AudioDelta {
                response_id,
                item_id,
                delta,
            } => {
                assert_eq!(response_id, "resp_1");
                assert_eq!(item_id, "item_1");
                assert!(matches!(delta, Cow::Borrowed("//8=")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_events_the_bridge_acts_on() {
        assert_eq!(
            parse_server_event(
                r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}"#
            )
            .unwrap(),
            ServerEvent::ResponseCreated {
                response_id: "resp_1".into()
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"resp_1","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#).unwrap(),
            ServerEvent::ResponseDone { response_id: "resp_1".into(), status: "cancelled".into(), usage: None, calls: vec![] }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"r2","status":"completed","usage":{"total_tokens":700,"input_tokens":400,"output_tokens":300,"input_token_details":{"text_tokens":100,"audio_tokens":300,"cached_tokens":64,"cached_tokens_details":{"text_tokens":64,"audio_tokens":0}},"output_token_details":{"text_tokens":50,"audio_tokens":250}}}}"#).unwrap(),
            ServerEvent::ResponseDone {
                response_id: "r2".into(),
                status: "completed".into(),
                usage: Some(TokenUsage { input_text: 100, input_audio: 300, cached_text: 64, cached_audio: 0, output_text: 50, output_audio: 250 }),
                calls: vec![],
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"r3","status":"completed","output":[{"type":"function_call","id":"item_1","call_id":"call_sHlR7iaFwQ2YQOqm","name":"lookup_order","arguments":"{\"order_id\":\"A123\"}","status":"completed"}]}}"#).unwrap(),
            ServerEvent::ResponseDone {
                response_id: "r3".into(),
                status: "completed".into(),
                usage: None,
                calls: vec![FunctionCall { call_id: "call_sHlR7iaFwQ2YQOqm".into(), name: "lookup_order".into(), arguments: "{\"order_id\":\"A123\"}".into() }],
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"i","content_index":0,"transcript":"hi there"}"#).unwrap(),
            ServerEvent::CallerTranscript { transcript: "hi there".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.output_audio_transcript.done","response_id":"r","item_id":"i","output_index":0,"content_index":0,"transcript":"Hello!"}"#).unwrap(),
            ServerEvent::AssistantTranscript {
                transcript: "Hello!".into(),
                item_id: Some("i".into())
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":1000,"item_id":"i"}"#).unwrap(),
            ServerEvent::SpeechStarted
        );
        assert_eq!(
            parse_server_event(
                r#"{"type":"input_audio_buffer.speech_stopped","audio_end_ms":1800,"item_id":"i"}"#
            )
            .unwrap(),
            ServerEvent::SpeechStopped
        );
        assert_eq!(
            parse_server_event(r#"{"type":"rate_limits.updated","rate_limits":[]}"#).unwrap(),
            ServerEvent::Other {
                kind: "rate_limits.updated".into()
            }
        );
    }

    #[test]
    fn reads_the_documented_error_example() {
        let text = r#"{"type":"error","event_id":"event_9","error":{"type":"invalid_request_error","code":"invalid_value",
            "message":"Invalid value: 'scooby.dooby.doo'","param":"type","event_id":"my_awesome_event"}}"#;
        assert_eq!(
            parse_server_event(text).unwrap(),
            ServerEvent::Error {
                code: Some("invalid_value".into()),
                message: "Invalid value: 'scooby.dooby.doo'".into(),
                event_id: Some("my_awesome_event".into()),
            }
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(parse_server_event("nope").is_err());
        assert!(parse_server_event(r#"{"no_type":1}"#).is_err());
        assert!(
            parse_server_event(r#"{"type":"response.output_audio.delta","delta":"AA=="}"#).is_err()
        );
    }
}
