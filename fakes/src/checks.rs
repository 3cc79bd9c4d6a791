//! The JSON checks both OpenAI fakes judge client events with: key sets, types, enumerations.
//! Pure code. A failed check is a [`Reject`] carrying the `code`, `message` and `param` the
//! OpenAI APIs put in their `error` objects; each fake wraps it in its own protocol's `error`
//! event (Realtime: `error.event_id`; GPT-Live: `client_event_id` twice) and records a
//! violation.

use serde_json::{Map, Value};

/// A rejected client event: becomes an `error` event and a violation.
#[derive(Debug)]
pub(crate) struct Reject {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) param: Option<String>,
}

pub(crate) type Checked = Result<(), Reject>;

impl Reject {
    pub(crate) fn new(code: &str, message: String, param: Option<&str>) -> Reject {
        Reject {
            code: code.into(),
            message,
            param: param.map(str::to_owned),
        }
    }

    pub(crate) fn invalid_value(param: &str, message: String) -> Reject {
        Reject::new("invalid_value", message, Some(param))
    }
}

pub(crate) fn unknown(param: &str) -> Reject {
    Reject::new(
        "unknown_parameter",
        format!("Unknown parameter: '{param}'."),
        Some(param),
    )
}

pub(crate) fn missing(param: &str) -> Reject {
    Reject::new(
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
        Some(param),
    )
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn invalid_type(param: &str, expected: &str, got: &Value) -> Reject {
    Reject::new(
        "invalid_type",
        format!(
            "Invalid type for '{param}': expected {expected}, but got {}.",
            kind_of(got)
        ),
        (!param.is_empty()).then_some(param),
    )
}

/// `prefix.key`, or `key` at the top level.
pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Every key of `obj` is in `allowed`, else `unknown_parameter` for the first one that is not.
pub(crate) fn check_keys(obj: &Map<String, Value>, allowed: &[&str], prefix: &str) -> Checked {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(unknown(&join(prefix, k))),
        None => Ok(()),
    }
}

pub(crate) fn object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, Reject> {
    v.as_object()
        .ok_or_else(|| invalid_type(param, "an object", v))
}

pub(crate) fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, Reject> {
    v.as_str().ok_or_else(|| invalid_type(param, "a string", v))
}

pub(crate) fn boolean(v: &Value, param: &str) -> Checked {
    v.as_bool()
        .map(|_| ())
        .ok_or_else(|| invalid_type(param, "a boolean", v))
}

pub(crate) fn non_negative_int(v: &Value, param: &str) -> Checked {
    v.as_u64()
        .map(|_| ())
        .ok_or_else(|| invalid_type(param, "a non-negative integer", v))
}

/// A string among `allowed`, else `invalid_value` listing them (or `invalid_type`).
pub(crate) fn one_of(v: &Value, param: &str, allowed: &[&str]) -> Checked {
    let s = string(v, param)?;
    if allowed.contains(&s) {
        Ok(())
    } else {
        let list: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
        Err(Reject::invalid_value(
            param,
            format!(
                "Invalid value: '{s}'. Supported values are: {}.",
                list.join(", ")
            ),
        ))
    }
}
