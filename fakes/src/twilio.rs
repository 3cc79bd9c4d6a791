//! The Twilio side of a Media Streams call, as the fakes play it (`reference/protocols.md` A).
//!
//! - [`Caller`] builds exactly what Twilio sends (A2): `connected` without a `sequenceNumber`,
//!   then `start` with `"1"`, and every later message one higher; `chunk` and `timestamp` are
//!   JSON strings; `mediaFormat` numbers are numbers.
//! - [`parse_service_message`] reads what the service sends back (A3) as strictly as Twilio
//!   does: only `media`, `mark` and `clear`, exactly their documented keys (no
//!   `sequenceNumber`, no `track`), and the `streamSid` of this stream; [`decode_payload`]
//!   checks a media payload (strict standard base64, raw µ-law without a file header).
//! - [`compute_signature`] signs a request as Twilio does (A5): HMAC-SHA1 keyed by the auth
//!   token over the URL and the sorted form parameters, base64.
//!
//! Pure code, no I/O.

use std::borrow::Cow;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha1::Sha1;

/// The account SID every simulated call belongs to.
pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000000";

/// The `User-Agent` Twilio's media-stream client sends on the upgrade.
pub const USER_AGENT: &str = "Twilio.TmeWs/1.0";

/// µ-law at 8 kHz: 8 bytes per millisecond.
pub const BYTES_PER_MS: usize = 8;

/// Twilio sends one 20 ms frame (160 bytes) per `media` message.
pub const FRAME_BYTES: usize = 160;

// ---------------------------------------------------------------------------------------------
// What Twilio sends (A2)

/// The inbound half of one call: sequence numbers, chunk counter and media clock.
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

    /// Gives the call its ids once they are known: a caller that connects and sends (or
    /// not) before it sends `start`, as the tests' fake does, learns them from the test.
    /// Sequence numbers, chunks and the clock go on.
    pub fn set_ids(&mut self, stream_sid: impl Into<String>, call_sid: impl Into<String>) {
        self.stream_sid = stream_sid.into();
        self.call_sid = call_sid.into();
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
        let payload = STANDARD.encode(audio);
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

    /// Advances the media clock without sending (a lost or late packet).
    pub fn skip_ms(&mut self, ms: u64) {
        self.timestamp_ms += ms;
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
    pub fn dtmf(&mut self, digit: impl std::fmt::Display) -> String {
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

// ---------------------------------------------------------------------------------------------
// What the service may send (A3)

/// One message from the service, as Twilio accepts it.
#[derive(Debug, PartialEq, Eq)]
pub enum ServiceMessage<'a> {
    /// Audio to play: base64 µ-law (borrowed from the frame unless it had JSON escapes).
    Media { payload: Cow<'a, str> },
    /// A label to echo once the audio before it has played.
    Mark { name: Cow<'a, str> },
    /// Drop all buffered audio and echo every pending mark.
    Clear,
}

// Every key is optional here so that a missing one gets its own message below; unknown keys
// (`sequenceNumber`, `track`, anything else) are refused by serde.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "streamSid", borrow, default, deserialize_with = "present")]
    stream_sid: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    media: Option<RawMedia<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    mark: Option<RawMark<'a>>,
}

/// A key that is present must hold a value: `"mark": null` is an extra key, not an absent one
/// (a plain `Option` would take `null` for absence).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
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

/// Reads one text frame from the service. An `Err` is what Twilio reports as warning 31951
/// "Invalid Message" (and then drops the frame): not JSON, an unknown event, a missing or extra
/// key (at the top or inside `media`/`mark`, so `sequenceNumber` and `track` are refused), a
/// non-string value, an empty payload, or another stream's `streamSid`.
pub fn parse_service_message<'a>(
    text: &'a str,
    stream_sid: &str,
) -> Result<ServiceMessage<'a>, String> {
    let raw: RawMessage<'a> =
        serde_json::from_str(text).map_err(|e| format!("not a valid Twilio message: {e}"))?;
    match raw.stream_sid.as_deref() {
        Some(sid) if sid == stream_sid => {}
        Some(other) => {
            return Err(format!(
                "streamSid {other:?} is not this stream's {stream_sid:?}"
            ))
        }
        None => return Err("missing key `streamSid`".into()),
    }
    match (raw.event.as_ref(), raw.media, raw.mark) {
        ("media", Some(media), None) if media.payload.is_empty() => {
            Err("media.payload is empty".into())
        }
        ("media", Some(media), None) => Ok(ServiceMessage::Media {
            payload: media.payload,
        }),
        ("mark", None, Some(mark)) => Ok(ServiceMessage::Mark { name: mark.name }),
        ("clear", None, None) => Ok(ServiceMessage::Clear),
        ("media", None, _) => Err("missing key `media`".into()),
        ("mark", _, None) => Err("missing key `mark`".into()),
        ("media" | "mark" | "clear", _, _) => Err(format!("`{}` with the wrong keys", raw.event)),
        (other, _, _) => Err(format!(
            "unknown outbound event `{other}` (only media, mark, clear)"
        )),
    }
}

/// Decodes a `media.payload` into `out` (cleared first): strict standard base64 (canonical
/// padding, no trailing bits, so `"AB=="` is refused) of raw µ-law, which cannot start with a
/// WAV (`RIFF`) or AU (`.snd`) header ("cause the media to be streamed incorrectly", A3).
pub fn decode_payload(payload: &str, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    STANDARD
        .decode_vec(payload, out)
        .map_err(|e| format!("media.payload is not valid base64 ({e})"))?;
    if out.starts_with(b"RIFF") || out.starts_with(b".snd") {
        return Err("media.payload carries a WAV/AU file header (raw µ-law only)".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Request signing (A5)

/// `X-Twilio-Signature` for a request to `url` with the form parameters `params` (none for a
/// GET such as the stream upgrade): base64 of HMAC-SHA1, keyed by the auth token, over `url`
/// followed by `name + value` for every parameter, sorted by name and then value (code-point
/// order, repeated names kept).
pub fn compute_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    // invariant: HMAC takes a key of any length.
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC accepts any key length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    STANDARD.encode(mac.finalize().into_bytes())
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
    compute_signature(auth_token, signed_url, &[])
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
        c.skip_ms(40);
        let m2: Value = serde_json::from_str(&c.media(&[0xFF; 160])).unwrap();
        assert_eq!(m1["sequenceNumber"], "2");
        assert_eq!(m1["media"]["chunk"], "1");
        assert_eq!(m1["media"]["timestamp"], "0");
        assert_eq!(m2["media"]["chunk"], "2");
        assert_eq!(m2["media"]["timestamp"], "60");
        assert_eq!(m2["media"]["payload"].as_str().unwrap().len(), 216);
        let stop: Value = serde_json::from_str(&c.stop()).unwrap();
        assert_eq!(stop["sequenceNumber"], "4");
        assert_eq!(stop["stop"]["callSid"], "CA1");
    }

    /// The documented outbound shapes for this stream are accepted.
    #[test]
    fn valid_service_messages_pass() {
        let sid = "MZ1";
        assert_eq!(
            parse_service_message(
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//8="}}"#,
                sid
            ),
            Ok(ServiceMessage::Media {
                payload: "//8=".into()
            })
        );
        // A JSON escape is still the same payload (Twilio parses JSON, not bytes).
        assert_eq!(
            parse_service_message(
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"\/\/8="}}"#,
                sid
            ),
            Ok(ServiceMessage::Media {
                payload: "//8=".into()
            })
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
    }

    /// One message per rule of A3, each refused.
    #[test]
    fn invalid_service_messages_are_refused() {
        let sid = "MZ1";
        for (rule, bad) in [
            (
                "another stream",
                r#"{"event":"media","streamSid":"MZ2","media":{"payload":"//8="}}"#,
            ),
            (
                "no streamSid",
                r#"{"event":"media","media":{"payload":"//8="}}"#,
            ),
            (
                "sequenceNumber",
                r#"{"event":"media","streamSid":"MZ1","sequenceNumber":"1","media":{"payload":"//8="}}"#,
            ),
            (
                "track",
                r#"{"event":"media","streamSid":"MZ1","media":{"track":"outbound","payload":"//8="}}"#,
            ),
            (
                "top-level track",
                r#"{"event":"media","streamSid":"MZ1","track":"outbound","media":{"payload":"//8="}}"#,
            ),
            (
                "clear with a mark",
                r#"{"event":"clear","streamSid":"MZ1","mark":{"name":"x"}}"#,
            ),
            ("mark without mark", r#"{"event":"mark","streamSid":"MZ1"}"#),
            (
                "media with a null mark",
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//8="},"mark":null}"#,
            ),
            ("null streamSid", r#"{"event":"clear","streamSid":null}"#),
            (
                "media without media",
                r#"{"event":"media","streamSid":"MZ1"}"#,
            ),
            (
                "media without payload",
                r#"{"event":"media","streamSid":"MZ1","media":{}}"#,
            ),
            (
                "empty payload",
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":""}}"#,
            ),
            (
                "numeric mark name",
                r#"{"event":"mark","streamSid":"MZ1","mark":{"name":7}}"#,
            ),
            (
                "extra mark key",
                r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"x","at":1}}"#,
            ),
            ("unknown event", r#"{"event":"hangup","streamSid":"MZ1"}"#),
            ("event not a string", r#"{"event":1,"streamSid":"MZ1"}"#),
            ("no event", r#"{"streamSid":"MZ1"}"#),
            ("not an object", r#"["clear"]"#),
            ("not json", r#"not json"#),
        ] {
            assert!(
                parse_service_message(bad, sid).is_err(),
                "{rule}: accepted {bad}"
            );
        }
    }

    /// Payloads are strict base64 of raw µ-law.
    #[test]
    fn payloads_are_checked() {
        let mut out = Vec::new();
        assert_eq!(decode_payload("//8=", &mut out), Ok(()));
        assert_eq!(out, [0xFF, 0xFF]);
        for bad in [
            "AB==",
            "//8",
            "//8=\n",
            "ab!=",
            "UklGRiQAAABXQVZF",
            "LnNuZAAAABg=",
        ] {
            assert!(decode_payload(bad, &mut out).is_err(), "accepted {bad}");
        }
    }

    /// The vectors of protocols.md A5.
    #[test]
    fn signature_vectors() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        for (url, want) in [
            (url, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            (
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                "kvajT1Ptam85bY51eRf/AJRuM3w=",
            ),
            (
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
            ),
            (
                "http://mycompany.com:80/myapp.php?foo=1&bar=2",
                "0ZXoZLH/DfblKGATFgpif+LLRf4=",
            ),
        ] {
            assert_eq!(compute_signature("12345", url, &params), want, "{url}");
        }
        let repeated: Vec<(String, String)> = [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(
            compute_signature("12345", url, &repeated),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        let body_url = format!(
            "{url}&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
        );
        assert_eq!(
            compute_signature("12345", &body_url, &[]),
            "a9nBmqA0ju/hNViExpshrM61xv4="
        );
        assert_eq!(
            upgrade_signature("12345", "wss://example.com/media"),
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        );
        assert_eq!(
            upgrade_signature("12345", "wss://example.com:443/media"),
            "zyyJQiPZXIGCLy3HYdHEfry0yDg="
        );
    }

    /// The upgrade is signed over the `wss://` form of the URL.
    #[test]
    fn signs_the_wss_url() {
        assert_eq!(
            signed_stream_url("ws://127.0.0.1:8080/media-stream"),
            "wss://127.0.0.1:8080/media-stream"
        );
        assert_eq!(signed_stream_url("wss://x.example/m"), "wss://x.example/m");
    }
}
