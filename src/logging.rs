//! The process's logger: env_logger, filtered by `RUST_LOG` when set, else by `log.level`, in
//! one of two formats (`log.format`): `text` (env_logger's own lines, millisecond timestamps)
//! or `json`, one JSON object per line for a log pipeline:
//!
//! ```text
//! {"ts":"2026-12-01T21:50:15.123Z","level":"info","target":"callbridge_actors::call","call_sid":"CA0123…","message":"tool call lookup_order"}
//! ```
//!
//! A line about a call starts with the call's label, `[CA…]` (a Twilio Call SID: `CA` and 32 hex
//! digits); in JSON it becomes the `call_sid` field and leaves the message. Other labels
//! (`[conn-3]`, `[pending]`: a stream that has not named its call yet) stay in the message.

use std::io::Write as _;

use serde::Deserialize;
use time::OffsetDateTime;

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// env_logger's human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `call_sid` (for a call), `message`.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the logger: the filter from `RUST_LOG` when set, else `level`. Once per process.
pub fn init(level: &str, format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    match format {
        LogFormat::Text => {
            builder.format_timestamp_millis();
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let owned;
                let message = match record.args().as_str() {
                    Some(s) => s,
                    None => {
                        owned = record.args().to_string();
                        &owned
                    }
                };
                let line = json_line(
                    OffsetDateTime::now_utc(),
                    record.level(),
                    record.target(),
                    message,
                );
                writeln!(buf, "{line}")
            });
        }
    }
    builder.init();
}

/// One log line as a JSON object (no newline): `ts` (RFC 3339, UTC, milliseconds), `level`
/// (lower case), `target`, `call_sid` when the message starts with a call's `[CA…]` label
/// (then stripped from `message`), and `message`.
pub fn json_line(ts: OffsetDateTime, level: log::Level, target: &str, message: &str) -> String {
    let (call_sid, message) = split_call_label(message);
    let mut line = String::with_capacity(96 + target.len() + message.len());
    line.push_str(r#"{"ts":""#);
    line.push_str(&timestamp(ts));
    line.push_str(r#"","level":""#);
    line.push_str(level_name(level));
    line.push_str(r#"","target":"#);
    push_json_string(&mut line, target);
    if let Some(sid) = call_sid {
        // `CA` and hex digits: nothing to escape.
        line.push_str(r#","call_sid":""#);
        line.push_str(sid);
        line.push('"');
    }
    line.push_str(r#","message":"#);
    push_json_string(&mut line, message);
    line.push('}');
    line
}

/// `2026-12-01T21:50:15.123Z`: RFC 3339 in UTC, to the millisecond.
fn timestamp(ts: OffsetDateTime) -> String {
    let ts = ts.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second(),
        ts.millisecond()
    )
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// A leading `[CA` + 32 hex + `]` label: the SID, and the message after it (and after one
/// space). Anything else: no SID, the message unchanged.
fn split_call_label(message: &str) -> (Option<&str>, &str) {
    const LABEL: usize = 1 + 34 + 1;
    let bytes = message.as_bytes();
    let well_formed = bytes.len() >= LABEL
        && bytes[0] == b'['
        && bytes[1..3] == *b"CA"
        && bytes[3..35].iter().all(u8::is_ascii_hexdigit)
        && bytes[35] == b']';
    if !well_formed {
        return (None, message);
    }
    let rest = &message[LABEL..];
    (
        Some(&message[1..35]),
        rest.strip_prefix(' ').unwrap_or(rest),
    )
}

/// `s` as a JSON string (quotes, backslashes and control characters escaped).
fn push_json_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serializing a `str` cannot fail.
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const SID: &str = "CA0123456789abcdef0123456789abcdef";

    fn at() -> OffsetDateTime {
        // 2026-12-01T21:50:15.123456789Z
        OffsetDateTime::from_unix_timestamp_nanos(1_796_161_815_123_456_789).unwrap()
    }

    fn parse(line: &str) -> Value {
        assert!(!line.contains('\n'), "one line: {line:?}");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    #[test]
    fn a_line_is_one_json_object_with_the_fields() {
        let line = json_line(at(), log::Level::Info, "callbridge", "callbridge ready");
        assert_eq!(
            line,
            r#"{"ts":"2026-12-01T21:50:15.123Z","level":"info","target":"callbridge","message":"callbridge ready"}"#
        );
        let v = parse(&line);
        assert!(v.get("call_sid").is_none());
    }

    #[test]
    fn the_timestamp_is_utc_to_the_millisecond() {
        let offset = time::UtcOffset::from_hms(2, 0, 0).unwrap();
        let line = json_line(at().to_offset(offset), log::Level::Info, "t", "m");
        assert_eq!(parse(&line)["ts"], "2026-12-01T21:50:15.123Z");
        let epoch = json_line(OffsetDateTime::UNIX_EPOCH, log::Level::Info, "t", "m");
        assert_eq!(parse(&epoch)["ts"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn levels_are_lower_case() {
        for (level, name) in [
            (log::Level::Error, "error"),
            (log::Level::Warn, "warn"),
            (log::Level::Info, "info"),
            (log::Level::Debug, "debug"),
            (log::Level::Trace, "trace"),
        ] {
            assert_eq!(parse(&json_line(at(), level, "t", "m"))["level"], name);
        }
    }

    #[test]
    fn quotes_newlines_and_control_characters_are_escaped() {
        let message = "said \"hi\"\nthen\r\ta \\ back\u{0}\u{1b}[31m\u{7f} é 📞";
        let target = "weird\"target\n";
        let line = json_line(at(), log::Level::Warn, target, message);
        let v = parse(&line);
        assert_eq!(v["message"], message);
        assert_eq!(v["target"], target);
        assert!(
            line.contains(r#"\u0000"#) && line.contains(r#"\u001b"#),
            "{line}"
        );
    }

    #[test]
    fn a_call_label_becomes_call_sid() {
        let v = parse(&json_line(
            at(),
            log::Level::Info,
            "callbridge_actors::call",
            &format!("[{SID}] tool call lookup_order"),
        ));
        assert_eq!(v["call_sid"], SID);
        assert_eq!(v["message"], "tool call lookup_order");
        // Upper-case hex is hex too; a label alone leaves an empty message.
        let upper = format!("CA{}", "ABCDEF0123456789".repeat(2));
        let v = parse(&json_line(
            at(),
            log::Level::Info,
            "t",
            &format!("[{upper}]"),
        ));
        assert_eq!(v["call_sid"], upper.as_str());
        assert_eq!(v["message"], "");
        // Only a leading label counts.
        let v = parse(&json_line(
            at(),
            log::Level::Info,
            "t",
            &format!("x [{SID}] y"),
        ));
        assert!(v.get("call_sid").is_none());
    }

    #[test]
    fn other_labels_stay_in_the_message() {
        for message in [
            "[conn-3] stream opened",
            "[pending] no start yet",
            // Not a well-formed Call SID: too short, too long, not hex, another prefix.
            "[CA0123] short",
            &format!("[{SID}0] long"),
            "[CA0123456789abcdef0123456789abcdeg] not hex",
            "[AC0123456789abcdef0123456789abcdef] an account",
            "[CA0123456789abcdef0123456789abcdef",
            "",
            "[",
        ] {
            let v = parse(&json_line(at(), log::Level::Debug, "t", message));
            assert!(v.get("call_sid").is_none(), "{message}");
            assert_eq!(v["message"], message);
        }
    }

    #[test]
    fn a_multibyte_message_after_a_label_is_cut_at_a_char_boundary() {
        let v = parse(&json_line(
            at(),
            log::Level::Info,
            "t",
            &format!("[{SID}]é"),
        ));
        assert_eq!(v["call_sid"], SID);
        assert_eq!(v["message"], "é");
        // A non-ASCII character where the label would be: no panic, no SID.
        let v = parse(&json_line(
            at(),
            log::Level::Info,
            "t",
            "[CA0123456789abcdef0123456789abcdéf] x",
        ));
        assert!(v.get("call_sid").is_none());
    }

    #[test]
    fn the_format_reads_lower_case() {
        #[derive(Deserialize)]
        struct S {
            format: LogFormat,
        }
        let s: S = serde_json::from_str(r#"{"format":"json"}"#).unwrap();
        assert_eq!(s.format, LogFormat::Json);
        let s: S = serde_json::from_str(r#"{"format":"text"}"#).unwrap();
        assert_eq!(s.format, LogFormat::Text);
        assert!(serde_json::from_str::<S>(r#"{"format":"JSON"}"#).is_err());
        assert_eq!(LogFormat::default(), LogFormat::Text);
        assert_eq!(LogFormat::Json.as_str(), "json");
    }
}
