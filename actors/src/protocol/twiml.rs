//! TwiML for the voice webhook, as specified in `reference/protocols.md` section A4.
//!
//! The answer to an incoming call is a bidirectional `<Connect><Stream>`: Twilio opens a
//! WebSocket to the bridge and keeps the call on it until the bridge closes the socket. Data
//! for the stream (caller number, call SID, tenant…) travels in `<Parameter>` elements, because
//! Twilio does not support query strings on the stream URL; it comes back in the `start`
//! message's `customParameters`.
//!
//! The documents sent to a live call through the REST API (`reference/twilio-rest.md` C, D,
//! E) are built here too: [`dial`] for a blind transfer, [`say_then_hangup`] for the fallback
//! goodbye. Those carry no URL at all, so error 15004 (a relative URL in REST TwiML) cannot
//! arise, and they must stay within [`MAX_REST_TWIML_CHARS`].

use std::borrow::Cow;

/// Twilio requires each `<Parameter>`'s name and value to be under this many characters
/// combined (section A4); [`connect_stream`] leaves out any parameter that is not.
pub const MAX_PARAMETER_CHARS: usize = 500;

/// The XML declaration and the opening elements, up to the start of the `url` value.
const HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url=""#;

/// Closes everything [`HEAD`] opened.
const TAIL: &str = "</Stream></Connect></Response>";

/// Returns the TwiML that connects the call to the Media Streams endpoint at `stream_url`
/// (a `wss://` URL without a query string), passing `params` as `<Parameter>` elements in the
/// given order.
///
/// The output has no whitespace between elements and no `track` attribute: `<Connect><Stream>`
/// only carries the inbound track, and any explicit value other than `inbound_track` is error
/// 31941. Every attribute value is escaped with [`xml_escape`].
///
/// A parameter whose name and value together have [`MAX_PARAMETER_CHARS`] characters or more
/// is skipped, since Twilio would reject the whole document; use [`parameter_fits`] beforehand
/// to log what will be left out.
pub fn connect_stream(stream_url: &str, params: &[(&str, &str)]) -> String {
    let mut twiml = String::with_capacity(HEAD.len() + stream_url.len() + TAIL.len() + 64);
    twiml.push_str(HEAD);
    twiml.push_str(&xml_escape(stream_url));
    twiml.push_str("\">");
    for &(name, value) in params.iter().filter(|(n, v)| parameter_fits(n, v)) {
        twiml.push_str("<Parameter name=\"");
        twiml.push_str(&xml_escape(name));
        twiml.push_str("\" value=\"");
        twiml.push_str(&xml_escape(value));
        twiml.push_str("\"/>");
    }
    twiml.push_str(TAIL);
    twiml
}

/// [`connect_stream`] followed by what Twilio does when the stream ends: `<Say>` the `say`
/// sentence (if not empty), then `<Dial>` the `dial` number or `sip:` URI (if not empty). Twilio
/// runs these when callbridge closes the media stream, or when the stream fails; a caller whose
/// assistant is lost hears an apology, or reaches a human, instead of silence and a hang-up.
pub fn connect_stream_then(
    stream_url: &str,
    params: &[(&str, &str)],
    say: &str,
    dial: &str,
) -> String {
    let mut twiml = connect_stream(stream_url, params);
    // invariant: `connect_stream` ends with `</Response>`.
    twiml.truncate(twiml.len() - "</Response>".len());
    if !say.trim().is_empty() {
        twiml.push_str("<Say>");
        twiml.push_str(&xml_escape(say.trim()));
        twiml.push_str("</Say>");
    }
    let dial = dial.trim();
    if let Some(sip) = dial.strip_prefix("sip:") {
        twiml.push_str("<Dial><Sip>sip:");
        twiml.push_str(&xml_escape(sip));
        twiml.push_str("</Sip></Dial>");
    } else if !dial.is_empty() {
        twiml.push_str("<Dial>");
        twiml.push_str(&xml_escape(dial));
        twiml.push_str("</Dial>");
    }
    twiml.push_str("</Response>");
    twiml
}

/// The fallback alone (`<Say>`, then `<Dial>`), for a call callbridge will not take (over
/// `server.max_calls`).
pub fn fallback_only(say: &str, dial: &str) -> String {
    connect_stream_then("", &[], say, dial).replacen(
        "<Connect><Stream url=\"\"></Stream></Connect>",
        "",
        1,
    )
}

/// The XML declaration every document starts with.
const DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// A `Twiml` parameter of the REST API may hold this many characters (error 32018,
/// `twilio-rest.md` H). The builders below do not truncate: the REST client counts the
/// characters of what it is given and refuses a longer document before sending it.
pub const MAX_REST_TWIML_CHARS: usize = 4000;

/// The blind transfer of `twilio-rest.md` E, sent to a live call with `Twiml=`: Twilio ends the
/// call's `<Connect><Stream>` and runs this instead.
///
/// `<Response>[<Say>say_first</Say>]<Dial [callerId="…"] answerOnBridge="true">…</Dial></Response>`
/// where the `<Dial>` holds `<Sip>target</Sip>` when `target` starts with `sip:` and
/// `<Number>target</Number>` otherwise. `target` should be E.164 (`+14155550100`) or a `sip:` URI
/// under 255 characters; it is trimmed and escaped, not otherwise checked (Twilio logs 13223 for
/// a number that is not E.164). `caller_id` must be one Twilio accepts (13214: the calling or
/// called number, or a number or verified caller ID of the account; for SIP, letters, digits and
/// `+-_.`); an empty one is left out, and the callee then sees the caller's own number.
///
/// With no `caller_id` and no `say_first` the output is the 147-character document of the
/// reference's transfer body (section C).
///
/// Nothing follows the `<Dial>`: when it ends the call ends. The reference's example plays an
/// apology after `</Dial>`, but without an `action` those verbs also run when the callee hangs
/// up after a conversation, so the caller would hear "nobody could take your call" after talking
/// to someone. No `timeout` either: Twilio's default ring time applies.
pub fn dial(target: &str, caller_id: Option<&str>, say_first: Option<&str>) -> String {
    let target = target.trim();
    let mut twiml = String::with_capacity(160 + target.len());
    twiml.push_str(DECLARATION);
    twiml.push_str("<Response>");
    push_say(&mut twiml, say_first.unwrap_or_default());
    twiml.push_str("<Dial");
    if let Some(caller_id) = caller_id.map(str::trim).filter(|c| !c.is_empty()) {
        twiml.push_str(" callerId=\"");
        twiml.push_str(&xml_escape(caller_id));
        twiml.push('"');
    }
    // The parent call stays unanswered until the callee answers: it matters for a call that was
    // not answered yet, and a mid-call transfer (already answered) is not hurt by it.
    twiml.push_str(" answerOnBridge=\"true\">");
    let noun = if target.starts_with("sip:") {
        "Sip"
    } else {
        "Number"
    };
    twiml.push('<');
    twiml.push_str(noun);
    twiml.push('>');
    twiml.push_str(&xml_escape(target));
    twiml.push_str("</");
    twiml.push_str(noun);
    twiml.push_str("></Dial></Response>");
    twiml
}

/// `<Response><Say>text</Say><Hangup/></Response>` (`<Say>` left out when `text` is blank):
/// the fallback goodbye of `twilio-rest.md` D, in Twilio's voice. The preferred goodbye is the
/// assistant's own audio followed by a REST hang-up (`Status=completed`); this is for when that
/// audio cannot be played.
pub fn say_then_hangup(text: &str) -> String {
    let mut twiml = String::with_capacity(80 + text.len());
    twiml.push_str(DECLARATION);
    twiml.push_str("<Response>");
    push_say(&mut twiml, text);
    twiml.push_str("<Hangup/></Response>");
    twiml
}

/// Appends `<Say>text</Say>` (trimmed, escaped) unless `text` is blank.
fn push_say(twiml: &mut String, text: &str) {
    let text = text.trim();
    if !text.is_empty() {
        twiml.push_str("<Say>");
        twiml.push_str(&xml_escape(text));
        twiml.push_str("</Say>");
    }
}

/// Whether [`connect_stream`] will include a `<Parameter>` with this name and value: their
/// combined length, in characters before escaping, must be under [`MAX_PARAMETER_CHARS`].
pub fn parameter_fits(name: &str, value: &str) -> bool {
    name.chars().count() + value.chars().count() < MAX_PARAMETER_CHARS
}

/// Escapes `s` for use inside a double- or single-quoted XML attribute value.
///
/// `&`, `<`, `>`, `"` and `'` become entity references. Tab, line feed and carriage return
/// become character references, because a parser would otherwise normalise them to spaces in an
/// attribute value. Characters that XML 1.0 forbids outright (other C0 controls, U+FFFE,
/// U+FFFF) cannot be written even as references, so they become U+FFFD rather than making the
/// whole document invalid. Returns `s` itself, without allocating, when nothing needs escaping.
pub fn xml_escape(s: &str) -> Cow<'_, str> {
    let Some(first) = s.find(needs_escape) else {
        return Cow::Borrowed(s);
    };
    let mut escaped = String::with_capacity(s.len() + 16);
    escaped.push_str(&s[..first]);
    for c in s[first..].chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\t' => escaped.push_str("&#9;"),
            '\n' => escaped.push_str("&#10;"),
            '\r' => escaped.push_str("&#13;"),
            c if is_forbidden_in_xml(c) => escaped.push(char::REPLACEMENT_CHARACTER),
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// Whether [`xml_escape`] would change `c`.
fn needs_escape(c: char) -> bool {
    matches!(c, '&' | '<' | '>' | '"' | '\'' | '\t' | '\n' | '\r') || is_forbidden_in_xml(c)
}

/// Characters outside XML 1.0's `Char` production that a Rust `char` can hold (it can never be
/// a surrogate). DEL and the C1 controls are allowed, so they pass through.
fn is_forbidden_in_xml(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_follows_the_stream_escaped() {
        let twiml = connect_stream_then(
            "wss://b.example.com/media-stream",
            &[],
            "Sorry <we're> down & out.",
            "+14155550100",
        );
        assert_eq!(
            twiml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect>\
             <Stream url=\"wss://b.example.com/media-stream\"></Stream></Connect>\
             <Say>Sorry &lt;we&apos;re&gt; down &amp; out.</Say><Dial>+14155550100</Dial></Response>"
        );
        let sip = connect_stream_then("wss://b/m", &[], "", "sip:desk@example.com");
        assert!(sip.ends_with("</Connect><Dial><Sip>sip:desk@example.com</Sip></Dial></Response>"));
        let none = connect_stream_then("wss://b/m", &[], " ", "");
        assert_eq!(none, connect_stream("wss://b/m", &[]));
        assert_eq!(
            fallback_only("Busy & sorry.", "+14155550100"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>Busy &amp; sorry.</Say>\
             <Dial>+14155550100</Dial></Response>"
        );
    }

    /// The exact document for a typical call, byte for byte.
    #[test]
    fn exact_output() {
        let twiml = connect_stream(
            "wss://bridge.example.com/media-stream",
            &[("callSid", "CA123"), ("from", "+14155550100")],
        );
        assert_eq!(
            twiml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect>"#,
                r#"<Stream url="wss://bridge.example.com/media-stream">"#,
                r#"<Parameter name="callSid" value="CA123"/>"#,
                r#"<Parameter name="from" value="+14155550100"/>"#,
                r#"</Stream></Connect></Response>"#,
            )
        );
    }

    /// With no parameters the stream element is still written with an end tag.
    #[test]
    fn no_parameters() {
        assert_eq!(
            connect_stream("wss://h/m", &[]),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect>"#,
                r#"<Stream url="wss://h/m"></Stream></Connect></Response>"#,
            )
        );
    }

    /// Markup characters in the URL, names and values cannot break out of the attribute.
    #[test]
    fn escapes_url_and_parameters() {
        let twiml = connect_stream(
            "wss://h/m?a=1&b=<2>",
            &[("From", "+1 <script>"), ("o'k", "say \"hi\" & 'bye'")],
        );
        assert!(twiml.contains(r#"<Stream url="wss://h/m?a=1&amp;b=&lt;2&gt;">"#));
        assert!(twiml.contains(r#"<Parameter name="From" value="+1 &lt;script&gt;"/>"#));
        assert!(twiml.contains(
            r#"<Parameter name="o&apos;k" value="say &quot;hi&quot; &amp; &apos;bye&apos;"/>"#
        ));
        assert!(!twiml.contains("<script>"));
    }

    /// Only strings that need escaping allocate; the rest are borrowed unchanged.
    #[test]
    fn xml_escape_borrows_when_clean() {
        assert!(matches!(
            xml_escape("wss://h/m"),
            Cow::Borrowed("wss://h/m")
        ));
        assert!(matches!(xml_escape(""), Cow::Borrowed("")));
        assert!(matches!(xml_escape("Zoë ☎"), Cow::Borrowed("Zoë ☎")));
        assert_eq!(xml_escape("&<>\"'"), "&amp;&lt;&gt;&quot;&apos;");
        assert_eq!(xml_escape("a&amp;b"), "a&amp;amp;b");
    }

    /// Whitespace controls survive as character references; forbidden controls become U+FFFD.
    #[test]
    fn xml_escape_controls() {
        assert_eq!(xml_escape("a\tb\nc\rd"), "a&#9;b&#10;c&#13;d");
        assert_eq!(xml_escape("x\u{0}y\u{1B}z"), "x\u{FFFD}y\u{FFFD}z");
        assert_eq!(xml_escape("\u{FFFF}"), "\u{FFFD}");
        assert!(matches!(xml_escape("\u{7F}\u{85}"), Cow::Borrowed(_)));
    }

    /// The document never carries a `track` attribute.
    #[test]
    fn never_sets_track() {
        let twiml = connect_stream("wss://h/m", &[("track", "both_tracks")]);
        assert!(!twiml.contains("track="));
    }

    /// A parameter of 500 characters or more (name + value, unescaped) is skipped; 499 is kept,
    /// and the parameters around a skipped one are unaffected.
    #[test]
    fn skips_oversized_parameters() {
        let fits = "v".repeat(MAX_PARAMETER_CHARS - 1 - "name".len());
        let too_long = "v".repeat(MAX_PARAMETER_CHARS - "name".len());
        assert!(parameter_fits("name", &fits));
        assert!(!parameter_fits("name", &too_long));

        let twiml = connect_stream(
            "wss://h/m",
            &[("a", "1"), ("name", &too_long), ("name", &fits), ("b", "2")],
        );
        assert!(!twiml.contains(&too_long));
        assert_eq!(twiml.matches("<Parameter ").count(), 3);
        assert!(twiml.contains(&format!(r#"<Parameter name="name" value="{fits}"/>"#)));
        assert!(twiml.contains(r#"<Parameter name="a" value="1"/><Parameter name="name""#));
        assert!(twiml.ends_with(r#"<Parameter name="b" value="2"/></Stream></Connect></Response>"#));

        // Characters are counted, not bytes: 495 two-byte characters plus "name" fit.
        let wide = "é".repeat(MAX_PARAMETER_CHARS - 1 - "name".len());
        assert!(parameter_fits("name", &wide));
        // Escaping does not count against the limit: 495 '&' (2475 bytes once escaped) fit.
        let amps = "&".repeat(MAX_PARAMETER_CHARS - 1 - "name".len());
        assert!(connect_stream("wss://h/m", &[("name", &amps)]).contains("&amp;&amp;"));
    }

    /// The transfer document of `twilio-rest.md` C, byte for byte (147 characters).
    #[test]
    fn dial_is_the_reference_transfer() {
        let twiml = dial("+15005550006", Some("+14155550123"), None);
        assert_eq!(
            twiml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Dial callerId="+14155550123" answerOnBridge="true">"#,
                r#"<Number>+15005550006</Number></Dial></Response>"#,
            )
        );
        assert_eq!(twiml.chars().count(), 147);
    }

    /// `sip:` targets become `<Sip>`; a blank caller ID or announcement is left out; text,
    /// targets and caller IDs are escaped.
    #[test]
    fn dial_variants() {
        assert_eq!(
            dial(" sip:agent@pbx.example.com ", Some(""), Some("  ")),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Dial answerOnBridge="true"><Sip>sip:agent@pbx.example.com</Sip></Dial>"#,
                r#"</Response>"#,
            )
        );
        assert_eq!(
            dial(
                "+15005550006",
                Some("bridge.desk_1"),
                Some("One moment & <hold>.")
            ),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Say>One moment &amp; &lt;hold&gt;.</Say>"#,
                r#"<Dial callerId="bridge.desk_1" answerOnBridge="true">"#,
                r#"<Number>+15005550006</Number></Dial></Response>"#,
            )
        );
        let hostile = dial("+1</Number><Hangup/>", Some("\"><Hangup/>"), None);
        assert!(!hostile.contains("<Hangup/>"), "{hostile}");
        assert!(
            hostile.contains(r#"callerId="&quot;&gt;&lt;Hangup/&gt;""#),
            "{hostile}"
        );
    }

    #[test]
    fn say_then_hangup_exact() {
        assert_eq!(
            say_then_hangup("Goodbye. It's been a pleasure."),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Say>Goodbye. It&apos;s been a pleasure.</Say><Hangup/></Response>"#,
            )
        );
        assert_eq!(
            say_then_hangup(""),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>"#
        );
    }
}
