//! The calls the fake knows and the Call resource it answers with (`twilio-rest.md` B): JSON
//! with every field of twilio-python's `CallInstance`, dates in RFC 2822, or the same fields in
//! Twilio's XML envelope. Pure code apart from the clock.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};
use sha1::{Digest as _, Sha1};
use time::{format_description::well_known::Rfc2822, OffsetDateTime};

use super::{errors::xml_text, rules::NewCall};

/// A call's `status` (B).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Queued,
    Ringing,
    InProgress,
    Completed,
    Busy,
    Failed,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    /// The wire spelling (`in-progress`, `no-answer`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Queued => "queued",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "in-progress",
            CallStatus::Completed => "completed",
            CallStatus::Busy => "busy",
            CallStatus::Failed => "failed",
            CallStatus::NoAnswer => "no-answer",
            CallStatus::Canceled => "canceled",
        }
    }

    /// Whether the call is over (no further status).
    pub fn is_ended(self) -> bool {
        !matches!(
            self,
            CallStatus::Queued | CallStatus::Ringing | CallStatus::InProgress
        )
    }
}

/// A call's `direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A call to one of the account's numbers (registered by the test).
    Inbound,
    /// A call created through the REST API.
    OutboundApi,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::OutboundApi => "outbound-api",
        }
    }
}

/// One call as the fake holds it. Created calls keep what the create asked for.
#[derive(Clone, Debug)]
pub struct Call {
    pub sid: String,
    pub from: String,
    pub to: String,
    pub direction: Direction,
    pub status: CallStatus,
    /// RFC 2822, as in the resource.
    pub date_created: String,
    pub date_updated: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    /// Seconds from answer to end, once ended.
    pub duration: Option<u64>,
    /// Every `Twiml` an update installed, in order (the last one is running).
    pub twiml_updates: Vec<String>,
    /// Every (`Url`, `Method`) an update installed, in order.
    pub url_updates: Vec<(String, String)>,
    /// The create's `Url`, `Method`, `Twiml`, `ApplicationSid`.
    pub url: Option<String>,
    pub method: String,
    pub twiml: Option<String>,
    pub application_sid: Option<String>,
    /// The create's `StatusCallback`, `StatusCallbackMethod`, `StatusCallbackEvent`s.
    pub status_callback: Option<String>,
    pub status_callback_method: String,
    pub status_callback_events: Vec<String>,
    /// The create's `Timeout` (60 when absent).
    pub timeout: u32,
    pub machine_detection: Option<String>,
    pub async_amd: bool,
    /// When it was answered, for `duration`.
    pub(crate) answered_at: Option<Instant>,
    /// The next status callback's `SequenceNumber`.
    pub(crate) callback_sequence: u32,
}

impl Call {
    /// An answered inbound call the test registered.
    pub(crate) fn live(sid: &str, from: &str, to: &str) -> Call {
        let now = now_rfc2822();
        let mut call = Call::blank(sid, from, to, Direction::Inbound, CallStatus::InProgress);
        call.start_time = Some(now);
        call.answered_at = Some(Instant::now());
        call
    }

    /// A call created through the API, `queued`.
    pub(crate) fn created(sid: &str, new: NewCall) -> Call {
        let mut call = Call::blank(
            sid,
            &new.from,
            &new.to,
            Direction::OutboundApi,
            CallStatus::Queued,
        );
        call.url = new.url;
        call.method = new.method;
        call.twiml = new.twiml.map(|(xml, _)| xml);
        call.application_sid = new.application_sid;
        call.status_callback = new.status_callback;
        call.status_callback_method = new.status_callback_method;
        call.status_callback_events = new.status_callback_events;
        call.timeout = new.timeout;
        call.machine_detection = new.machine_detection;
        call.async_amd = new.async_amd;
        call
    }

    fn blank(sid: &str, from: &str, to: &str, direction: Direction, status: CallStatus) -> Call {
        let now = now_rfc2822();
        Call {
            sid: sid.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            direction,
            status,
            date_created: now.clone(),
            date_updated: now,
            start_time: None,
            end_time: None,
            duration: None,
            twiml_updates: Vec::new(),
            url_updates: Vec::new(),
            url: None,
            method: "POST".into(),
            twiml: None,
            application_sid: None,
            status_callback: None,
            status_callback_method: "POST".into(),
            status_callback_events: Vec::new(),
            timeout: 60,
            machine_detection: None,
            async_amd: false,
            answered_at: None,
            callback_sequence: 0,
        }
    }

    /// Moves to `status`, keeping the times consistent (answer sets `start_time`, an end sets
    /// `end_time` and `duration`).
    pub(crate) fn set_status(&mut self, status: CallStatus) {
        let now = now_rfc2822();
        if status == CallStatus::InProgress && self.answered_at.is_none() {
            self.answered_at = Some(Instant::now());
            self.start_time = Some(now.clone());
        }
        if status.is_ended() && !self.status.is_ended() {
            self.end_time = Some(now.clone());
            self.duration = Some(self.answered_at.map_or(0, |t| t.elapsed().as_secs()));
        }
        self.status = status;
        self.date_updated = now;
    }

    /// `/2010-04-01/Accounts/{account}/Calls/{sid}`, without a suffix.
    fn base_uri(&self, account_sid: &str) -> String {
        format!("/2010-04-01/Accounts/{account_sid}/Calls/{}", self.sid)
    }

    /// The Call resource as JSON (B).
    pub(crate) fn resource(&self, account_sid: &str) -> Value {
        let base = self.base_uri(account_sid);
        let answered_by = match (&self.machine_detection, self.status) {
            (Some(_), CallStatus::InProgress | CallStatus::Completed) => json!("human"),
            _ => Value::Null,
        };
        json!({
            "sid": self.sid,
            "account_sid": account_sid,
            "parent_call_sid": null,
            "status": self.status.as_str(),
            "direction": self.direction.as_str(),
            "from": self.from,
            "to": self.to,
            "from_formatted": formatted(&self.from),
            "to_formatted": formatted(&self.to),
            "start_time": self.start_time,
            "end_time": self.end_time,
            "duration": self.duration.map(|d| d.to_string()),
            "date_created": self.date_created,
            "date_updated": self.date_updated,
            "answered_by": answered_by,
            "price": null,
            "price_unit": "USD",
            "api_version": "2010-04-01",
            "caller_name": null,
            "forwarded_from": null,
            "group_sid": null,
            "phone_number_sid": null,
            "queue_time": "0",
            "trunk_sid": null,
            "annotation": null,
            "stir_verstat": null,
            "uri": format!("{base}.json"),
            "subresource_uris": {
                "notifications": format!("{base}/Notifications.json"),
                "recordings": format!("{base}/Recordings.json"),
                "payments": format!("{base}/Payments.json"),
                "events": format!("{base}/Events.json"),
                "siprec": format!("{base}/Siprec.json"),
                "streams": format!("{base}/Streams.json"),
                "user_defined_message_subscriptions":
                    format!("{base}/UserDefinedMessageSubscriptions.json"),
                "user_defined_messages": format!("{base}/UserDefinedMessages.json"),
            },
        })
    }
}

/// A page of calls (`GET …/Calls.json`), all on one page.
pub(crate) fn list_resource(calls: &[&Call], account_sid: &str) -> Value {
    let uri = format!("/2010-04-01/Accounts/{account_sid}/Calls.json?PageSize=50&Page=0");
    json!({
        "calls": calls.iter().map(|c| c.resource(account_sid)).collect::<Vec<_>>(),
        "end": calls.len().saturating_sub(1),
        "first_page_uri": uri,
        "next_page_uri": null,
        "page": 0,
        "page_size": 50,
        "previous_page_uri": null,
        "start": 0,
        "uri": uri,
    })
}

/// `+14155550123` → `(415) 555-0123`; other numbers as they are.
fn formatted(number: &str) -> String {
    match number.strip_prefix("+1") {
        Some(d) if d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit()) => {
            format!("({}) {}-{}", &d[..3], &d[3..6], &d[6..])
        }
        _ => number.to_owned(),
    }
}

/// The JSON resource in the 2010-04-01 XML envelope: `snake_case` keys become `PascalCase`
/// elements, `null` an empty element.
pub(crate) fn to_xml(value: &Value, root: &str) -> String {
    let mut out = String::from("<?xml version='1.0' encoding='UTF-8'?>\n<TwilioResponse>");
    write_xml(&mut out, root, value);
    out.push_str("</TwilioResponse>");
    out
}

fn write_xml(out: &mut String, tag: &str, value: &Value) {
    match value {
        Value::Null => out.push_str(&format!("<{tag}/>")),
        Value::Object(map) => {
            out.push_str(&format!("<{tag}>"));
            write_fields(out, map);
            out.push_str(&format!("</{tag}>"));
        }
        Value::Array(items) => {
            out.push_str(&format!("<{tag}>"));
            for item in items {
                write_xml(out, "Call", item);
            }
            out.push_str(&format!("</{tag}>"));
        }
        Value::String(s) => out.push_str(&format!("<{tag}>{}</{tag}>", xml_text(s))),
        other => out.push_str(&format!("<{tag}>{other}</{tag}>")),
    }
}

fn write_fields(out: &mut String, map: &Map<String, Value>) {
    for (key, value) in map {
        write_xml(out, &pascal_case(key), value);
    }
}

fn pascal_case(key: &str) -> String {
    key.split('_')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// Now, as Twilio writes dates: `Tue, 31 Aug 2010 20:36:29 +0000`.
pub(crate) fn now_rfc2822() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc2822)
        // invariant: a UTC date between 1900 and 9999 always formats in RFC 2822.
        .expect("the current UTC time formats as RFC 2822")
}

/// A new SID: `prefix` and 32 lowercase hex digits, unique in this process.
pub(crate) fn new_sid(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha1::digest(format!("{prefix}:{n}:{nanos}:{}", std::process::id()));
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// `CA` and 32 hex digits.
pub fn is_call_sid(s: &str) -> bool {
    s.strip_prefix("CA")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_are_unique_and_shaped() {
        let a = new_sid("CA");
        let b = new_sid("CA");
        assert!(is_call_sid(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_call_sid("CA123"));
    }

    /// The resource carries the fields of B, dates in RFC 2822.
    #[test]
    fn resource_fields() {
        let mut call = Call::live("CA1", "+14155550123", "+18005550199");
        let v = call.resource("AC1");
        assert_eq!(v["status"], "in-progress");
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["from_formatted"], "(415) 555-0123");
        assert_eq!(v["uri"], "/2010-04-01/Accounts/AC1/Calls/CA1.json");
        assert!(v["end_time"].is_null());
        // `Tue, 31 Aug 2010 20:36:29 +0000`
        let start = v["start_time"].as_str().unwrap();
        let parts: Vec<&str> = start.split(' ').collect();
        assert_eq!(parts.len(), 6, "{start}");
        assert!(parts[0].len() == 4 && parts[0].ends_with(','), "{start}");
        assert_eq!(parts[1].len(), 2, "{start}");
        assert_eq!((parts[2].len(), parts[3].len()), (3, 4), "{start}");
        assert_eq!((parts[4].len(), parts[5]), (8, "+0000"), "{start}");
        call.set_status(CallStatus::Completed);
        let v = call.resource("AC1");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["duration"], "0");
        assert!(v["end_time"].is_string());
    }

    #[test]
    fn xml_envelope() {
        let call = Call::live("CA1", "+14155550123", "+18005550199");
        let xml = to_xml(&call.resource("AC1"), "Call");
        assert!(xml.starts_with("<?xml version='1.0' encoding='UTF-8'?>\n<TwilioResponse><Call>"));
        assert!(xml.contains("<Sid>CA1</Sid>"), "{xml}");
        assert!(xml.contains("<ParentCallSid/>"), "{xml}");
        assert!(xml.contains("<SubresourceUris><Events>"), "{xml}");
    }
}
