//! Tools the model can call: the `[[tools]]` of the settings (each an HTTP endpoint) and the
//! built-in `end_call` and `transfer_call` (`call.builtin_tools`).
//!
//! A tool call POSTs `{"call_sid", "tool", "arguments", "call_id"}` as JSON to the tool's `url`
//! (`arguments` parsed), signed like end-of-call reports (`X-Callbridge-Signature`, keyed by
//! `CALLBRIDGE_TOOLS_SECRET`) with the call's SID in `X-Callbridge-Call-Sid`. The answer's body
//! (at most `call.tool_output_max_bytes`) is the tool's output for the model; a timeout, a
//! non-2xx answer, too long an answer, bad JSON arguments or an unknown tool become an error
//! output `{"error": "…"}`. Nothing here ends a call.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ConfigError;

/// The built-in tools.
pub const END_CALL: &str = "end_call";
pub const TRANSFER_CALL: &str = "transfer_call";

/// One `[[tools]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    pub name: String,
    pub description: String,
    /// A JSON Schema object, as a TOML table or a JSON string.
    #[serde(default = "empty_schema")]
    pub parameters: Value,
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn empty_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

fn default_timeout() -> u64 {
    5_000
}

impl ToolConfig {
    /// The JSON Schema of the parameters (a JSON string is parsed).
    pub fn schema(&self) -> Result<Value, String> {
        let schema = match &self.parameters {
            Value::String(text) => {
                serde_json::from_str(text).map_err(|e| format!("parameters is not JSON: {e}"))?
            }
            other => other.clone(),
        };
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(
                "parameters must be a JSON Schema object ({\"type\": \"object\", …})".into(),
            );
        }
        Ok(schema)
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks the tools and the built-ins; the message names the key.
pub fn validate(tools: &[ToolConfig], builtins: &[String]) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = Vec::new();
    for tool in tools {
        if !valid_name(&tool.name) {
            return Err(ConfigError::new(
                "tools.name",
                format!("{:?}: letters, digits, _ and -, 1 to 64", tool.name),
            ));
        }
        if names.contains(&tool.name.as_str())
            || [END_CALL, TRANSFER_CALL].contains(&tool.name.as_str())
        {
            return Err(ConfigError::new(
                "tools.name",
                format!(
                    "{:?} is used twice (or is a built-in tool's name)",
                    tool.name
                ),
            ));
        }
        names.push(&tool.name);
        if !(tool.url.starts_with("https://") || tool.url.starts_with("http://")) {
            return Err(ConfigError::new(
                "tools.url",
                format!("tool {:?}: must be an http(s):// URL", tool.name),
            ));
        }
        if !(100..=60_000).contains(&tool.timeout_ms) {
            return Err(ConfigError::new(
                "tools.timeout_ms",
                format!("tool {:?}: must be between 100 and 60000", tool.name),
            ));
        }
        tool.schema().map_err(|why| {
            ConfigError::new("tools.parameters", format!("tool {:?}: {why}", tool.name))
        })?;
    }
    if let Some(bad) = builtins
        .iter()
        .find(|b| ![END_CALL, TRANSFER_CALL].contains(&b.as_str()))
    {
        return Err(ConfigError::new(
            "call.builtin_tools",
            format!("{bad:?} is not a built-in tool (end_call, transfer_call)"),
        ));
    }
    Ok(())
}

/// The function tool definitions: Realtime's `session.tools` and GPT-Live's
/// `delegation.responses.tools` take the same flat shape.
pub fn function_definitions(tools: &[ToolConfig], builtins: &[String]) -> Vec<Value> {
    let mut out: Vec<Value> = tools
        .iter()
        .filter_map(|tool| {
            Some(json!({
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.schema().ok()?,
            }))
        })
        .collect();
    for builtin in builtins {
        match builtin.as_str() {
            END_CALL => out.push(json!({
                "type": "function",
                "name": END_CALL,
                "description": "End the phone call. Say goodbye first: what you already said is played to the caller before the line is cut.",
                "parameters": {"type": "object", "properties": {}},
            })),
            TRANSFER_CALL => out.push(json!({
                "type": "function",
                "name": TRANSFER_CALL,
                "description": "Transfer the caller to another phone number or SIP address (a human colleague). Tell the caller first.",
                "parameters": {"type": "object", "properties": {
                    "to": {"type": "string", "description": "E.164 number (+14155550100) or sip: URI"}},
                    "required": ["to"]},
            })),
            _ => {}
        }
    }
    out
}

/// An error output for the model.
pub fn error_output(why: &str) -> String {
    json!({"error": why}).to_string()
}

/// What a tool call came to.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutcome {
    /// The output for the model.
    pub output: String,
    /// `ok`, or what went wrong (`timeout`, `http_500`, `too_large`, …).
    pub outcome: String,
    pub ms: u64,
}

/// Calls the tool `tool` over HTTP for the call `call_sid`.
pub async fn call_http(
    tool: &ToolConfig,
    call_sid: &str,
    call_id: &str,
    arguments: Value,
    secret: Option<&SecretString>,
    max_bytes: usize,
) -> ToolOutcome {
    let started = Instant::now();
    let body = json!({
        "call_sid": call_sid,
        "tool": tool.name,
        "arguments": arguments,
        "call_id": call_id,
    })
    .to_string();
    let timeout = Duration::from_millis(tool.timeout_ms);
    let mut request = crate::ai_socket::client_for(timeout)
        .post(tool.url.as_str())
        .timeout(timeout)
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("X-Callbridge-Call-Sid", call_sid.to_owned()));
    if let Some(secret) = secret {
        request = request.insert_header((
            "X-Callbridge-Signature",
            crate::report::signature(secret.expose_secret(), body.as_bytes()),
        ));
    }
    let result = async {
        let mut response = request.send_body(body).await.map_err(|e| match e {
            awc::error::SendRequestError::Timeout => {
                ("timeout", "the tool did not answer in time".to_string())
            }
            other => (
                "unreachable",
                format!("the tool could not be reached: {other}"),
            ),
        })?;
        let status = response.status();
        let bytes = response.body().limit(max_bytes + 1).await.map_err(|_| {
            (
                "too_large",
                format!("the tool's answer is over {max_bytes} bytes"),
            )
        })?;
        if bytes.len() > max_bytes {
            return Err((
                "too_large",
                format!("the tool's answer is over {max_bytes} bytes"),
            ));
        }
        if !status.is_success() {
            return Err((
                "http_error",
                format!("the tool answered HTTP {}", status.as_u16()),
            ));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let result = match tokio_timeout(timeout, result).await {
        Some(result) => result,
        None => Err(("timeout", "the tool did not answer in time".to_string())),
    };
    let ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(output) => ToolOutcome {
            output,
            outcome: "ok".into(),
            ms,
        },
        Err((outcome, why)) => ToolOutcome {
            output: error_output(&why),
            outcome: outcome.into(),
            ms,
        },
    }
}

async fn tokio_timeout<F: std::future::Future>(d: Duration, f: F) -> Option<F::Output> {
    actix_rt::time::timeout(d, f).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, parameters: Value) -> ToolConfig {
        ToolConfig {
            name: name.into(),
            description: "d".into(),
            parameters,
            url: "http://127.0.0.1:1/t".into(),
            timeout_ms: 5_000,
        }
    }

    #[test]
    fn schemas_from_tables_or_json_strings() {
        let as_string = tool(
            "a",
            json!("{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"string\"}}}"),
        );
        assert_eq!(
            as_string.schema().unwrap()["properties"]["x"]["type"],
            "string"
        );
        assert!(tool("b", json!({"type": "array"})).schema().is_err());
        assert!(tool("c", json!("not json")).schema().is_err());
        let defs = function_definitions(&[as_string], &[END_CALL.into()]);
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[0]["type"], "function");
        assert_eq!(defs[1]["name"], END_CALL);
    }

    #[test]
    fn bad_tools_are_named() {
        let ok = tool("lookup_order", empty_schema());
        assert!(validate(std::slice::from_ref(&ok), &[]).is_ok());
        assert_eq!(
            validate(&[ok.clone(), ok.clone()], &[]).unwrap_err().key,
            "tools.name"
        );
        assert_eq!(
            validate(&[tool("bad name", empty_schema())], &[])
                .unwrap_err()
                .key,
            "tools.name"
        );
        assert_eq!(
            validate(&[tool(END_CALL, empty_schema())], &[])
                .unwrap_err()
                .key,
            "tools.name"
        );
        assert_eq!(
            validate(&[], &["reboot".into()]).unwrap_err().key,
            "call.builtin_tools"
        );
        let mut no_url = ok;
        no_url.url = "ftp://x".into();
        assert_eq!(validate(&[no_url], &[]).unwrap_err().key, "tools.url");
    }
}
