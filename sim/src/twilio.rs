//! The Twilio side of a Media Streams call, as the simulator plays it.
//!
//! [`Caller`] builds exactly what Twilio sends (`reference/protocols.md` A2): `connected` without
//! a `sequenceNumber`, then `start` with `"1"`, and every later message one higher; `chunk` and
//! `timestamp` are JSON strings; `mediaFormat` numbers are numbers. [`parse_service_message`]
//! reads what the service sends back (A3) as strictly as Twilio does: only `media`, `mark` and
//! `clear`, exactly their documented keys (no `sequenceNumber`, no `track`), and the `streamSid`
//! of this call. Pure code, no I/O, so the `call` and `load` commands share it.

use std::borrow::Cow;

use base64::prelude::*;
use callbridge_actors::protocol::signature;
use serde::Deserialize;

/// The account SID every simulated call belongs to.
pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000000";

/// The `User-Agent` Twilio's media-stream client sends on the upgrade.
pub const USER_AGENT: &str = "Twilio.TmeWs/1.0";

/// µ-law at 8 kHz: 8 bytes per millisecond.
pub const BYTES_PER_MS: usize = 8;

/// Twilio sends one 20 ms frame (160 bytes) per `media` message.
pub const FRAME_BYTES: usize = 160;

/// The inbound half of one simulated call: sequence numbers, chunk counter and media clock.
#[derive(Debug)]
pub struct Caller {
    stream_sid: String,
    call_sid: String,
    /// The last `sequenceNumber` used (`start` is 1).
    seq: u64,
    /// The last media `chunk` used (the first is 1).
    chunk: u64,
    /// Presentation time of the next media frame, ms since the stream started.
    timestamp_ms: u64,
}

impl Caller {
    /// A caller for the stream `stream_sid` of the call `call_sid`.
    pub fn new(stream_sid: impl Into<String>, call_sid: impl Into<String>) -> Caller {
        Caller {
            stream_sid: stream_sid.into(),
            call_sid: call_sid.into(),
            seq: 0,
            chunk: 0,
            timestamp_ms: 0,
        }
    }

    /// A stream SID (`MZ` + 32 hex digits) made from a number.
    pub fn stream_sid_for(n: u64) -> String {
        format!("MZ{n:032x}")
    }

    /// A call SID (`CA` + 32 hex digits) made from a number.
    pub fn call_sid_for(n: u64) -> String {
        format!("CA{n:032x}")
    }

    /// This call's `streamSid`.
    pub fn stream_sid(&self) -> &str {
        &self.stream_sid
    }

    /// This call's `callSid`.
    pub fn call_sid(&self) -> &str {
        &self.call_sid
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// `{"event":"connected","protocol":"Call","version":"1.0.0"}`: the only message without a
    /// sequence number.
    pub fn connected(&self) -> String {
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.to_owned()
    }

    /// The `start` message, with the `<Parameter>` pairs of the TwiML as `customParameters`.
    pub fn start(&mut self, custom_parameters: &[(String, String)]) -> String {
        let params: serde_json::Map<String, serde_json::Value> = custom_parameters
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let seq = self.next_seq();
        serde_json::json!({
            "event": "start",
            "sequenceNumber": seq.to_string(),
            "start": {
                "accountSid": ACCOUNT_SID,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": params,
            },
            "streamSid": self.stream_sid,
        })
        .to_string()
    }

    /// A `media` message carrying `audio` (raw µ-law). Advances `chunk` by one and the
    /// timestamp by the audio's duration.
    pub fn media(&mut self, audio: &[u8]) -> String {
        let payload = BASE64_STANDARD.encode(audio);
        self.media_b64(&payload, audio.len())
    }

    /// [`Caller::media`] for an already encoded payload of `bytes` µ-law bytes.
    pub fn media_b64(&mut self, payload: &str, bytes: usize) -> String {
        let seq = self.next_seq();
        self.chunk += 1;
        let timestamp = self.timestamp_ms;
        self.timestamp_ms += (bytes / BYTES_PER_MS) as u64;
        // Built by hand: this runs 50 times a second per simulated call, and the payload is
        // base64 (no characters that need escaping).
        format!(
            r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"inbound","chunk":"{}","timestamp":"{timestamp}","payload":"{payload}"}},"streamSid":"{}"}}"#,
            self.chunk, self.stream_sid
        )
    }

    /// The echo of a mark whose audio has played (or was cleared).
    pub fn mark(&mut self, name: &str) -> String {
        let seq = self.next_seq();
        serde_json::json!({
            "event": "mark",
            "sequenceNumber": seq.to_string(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        })
        .to_string()
    }

    /// A keypad digit (note Twilio's `inbound_track` spelling here).
    pub fn dtmf(&mut self, digit: char) -> String {
        let seq = self.next_seq();
        serde_json::json!({
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": seq.to_string(),
            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
        })
        .to_string()
    }

    /// `stop`: the caller hung up. Twilio closes the socket after it.
    pub fn stop(&mut self) -> String {
        let seq = self.next_seq();
        serde_json::json!({
            "event": "stop",
            "sequenceNumber": seq.to_string(),
            "stop": {"accountSid": ACCOUNT_SID, "callSid": self.call_sid},
            "streamSid": self.stream_sid,
        })
        .to_string()
    }
}

/// One message from the service, as Twilio accepts it.
#[derive(Debug, PartialEq, Eq)]
pub enum ServiceMessage<'a> {
    /// Audio to play: base64 µ-law, borrowed from the frame.
    Media { payload: &'a str },
    /// A label to echo once the audio before it has played.
    Mark { name: Cow<'a, str> },
    /// Drop all buffered audio and echo every pending mark.
    Clear,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "streamSid", borrow)]
    stream_sid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    media: Option<RawMedia<'a>>,
    #[serde(borrow)]
    mark: Option<RawMark<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMedia<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMark<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

/// Reads one text frame from the service. An `Err` is what Twilio would report as warning
/// 31951 "Invalid Message" (and then drop the frame).
pub fn parse_service_message<'a>(
    text: &'a str,
    stream_sid: &str,
) -> Result<ServiceMessage<'a>, String> {
    let raw: RawMessage<'a> =
        serde_json::from_str(text).map_err(|e| format!("not a valid Twilio message: {e}"))?;
    match raw.stream_sid.as_deref() {
        Some(sid) if sid == stream_sid => {}
        Some(other) => return Err(format!("streamSid {other} is not this stream's")),
        None => return Err("missing streamSid".into()),
    }
    match (raw.event.as_ref(), raw.media, raw.mark) {
        ("media", Some(media), None) => match media.payload {
            // Base64 never needs JSON escapes, so a valid payload is always borrowed.
            Cow::Borrowed(payload) if !payload.is_empty() => Ok(ServiceMessage::Media { payload }),
            _ => Err("media.payload is empty or not plain base64".into()),
        },
        ("mark", None, Some(mark)) => Ok(ServiceMessage::Mark { name: mark.name }),
        ("clear", None, None) => Ok(ServiceMessage::Clear),
        ("media" | "mark" | "clear", _, _) => Err(format!("`{}` with the wrong keys", raw.event)),
        (other, _, _) => Err(format!("unknown event `{other}`")),
    }
}

/// The URL Twilio signs for a stream connection: the `wss://` URL it was given in the TwiML.
/// For a local `ws://` URL that is the same URL with `wss`, which is what callbridge rebuilds
/// from the `Host` header when `server.public_url` is empty.
pub fn signed_stream_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ws") => format!("wss://{rest}"),
        _ => url.to_owned(),
    }
}

/// `X-Twilio-Signature` for the upgrade to `signed_url` (no form parameters on a GET).
pub fn upgrade_signature(auth_token: &str, signed_url: &str) -> String {
    signature::compute(auth_token, signed_url, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The inbound messages carry string-typed numbers, count from 1 and advance the clock.
    #[test]
    fn inbound_messages_are_shaped_like_twilios() {
        let mut c = Caller::new("MZ1", "CA1");
        let connected: Value = serde_json::from_str(&c.connected()).unwrap();
        assert!(connected.get("sequenceNumber").is_none());
        let start: Value = serde_json::from_str(&c.start(&[("a".into(), "b".into())])).unwrap();
        assert_eq!(start["sequenceNumber"], "1");
        assert_eq!(start["start"]["mediaFormat"]["sampleRate"], 8000);
        assert_eq!(start["start"]["customParameters"]["a"], "b");
        let m1: Value = serde_json::from_str(&c.media(&[0xFF; 160])).unwrap();
        let m2: Value = serde_json::from_str(&c.media(&[0xFF; 160])).unwrap();
        assert_eq!(m1["sequenceNumber"], "2");
        assert_eq!(m1["media"]["chunk"], "1");
        assert_eq!(m1["media"]["timestamp"], "0");
        assert_eq!(m2["media"]["chunk"], "2");
        assert_eq!(m2["media"]["timestamp"], "20");
        assert_eq!(m2["media"]["payload"].as_str().unwrap().len(), 216);
        let stop: Value = serde_json::from_str(&c.stop()).unwrap();
        assert_eq!(stop["sequenceNumber"], "4");
        assert_eq!(stop["stop"]["callSid"], "CA1");
    }

    /// Only the documented outbound shapes for this stream are accepted.
    #[test]
    fn service_messages_are_read_strictly() {
        let sid = "MZ1";
        assert_eq!(
            parse_service_message(
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//8="}}"#,
                sid
            ),
            Ok(ServiceMessage::Media { payload: "//8=" })
        );
        assert_eq!(
            parse_service_message(
                r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"x"}}"#,
                sid
            ),
            Ok(ServiceMessage::Mark { name: "x".into() })
        );
        assert_eq!(
            parse_service_message(r#"{"event":"clear","streamSid":"MZ1"}"#, sid),
            Ok(ServiceMessage::Clear)
        );
        for bad in [
            r#"{"event":"media","streamSid":"MZ2","media":{"payload":"//8="}}"#,
            r#"{"event":"media","media":{"payload":"//8="}}"#,
            r#"{"event":"media","streamSid":"MZ1","sequenceNumber":"1","media":{"payload":"//8="}}"#,
            r#"{"event":"media","streamSid":"MZ1","media":{"track":"outbound","payload":"//8="}}"#,
            r#"{"event":"clear","streamSid":"MZ1","mark":{"name":"x"}}"#,
            r#"{"event":"hangup","streamSid":"MZ1"}"#,
            r#"not json"#,
        ] {
            assert!(parse_service_message(bad, sid).is_err(), "accepted {bad}");
        }
    }

    /// The upgrade is signed over the `wss://` form of the URL.
    #[test]
    fn signs_the_wss_url() {
        assert_eq!(
            signed_stream_url("ws://127.0.0.1:8080/media-stream"),
            "wss://127.0.0.1:8080/media-stream"
        );
        assert_eq!(signed_stream_url("wss://x.example/m"), "wss://x.example/m");
        let sig = upgrade_signature("token", "wss://x.example/m");
        assert_eq!(sig, signature::compute("token", "wss://x.example/m", &[]));
    }
}
