//! Reading TwiML as Twilio does (`reference/protocols.md` A4, `twilio-rest.md` C and E): a
//! strict XML parse with `quick-xml` (never the service's builder), into the verbs a bridge
//! uses.
//!
//! What Twilio would refuse is an error here: a document that is not well-formed XML, a root
//! other than `<Response>`, an unknown verb or noun, an attribute a verb does not have (Twilio's
//! schema check, 12200), a malformed attribute value (`answerOnBridge="yes"`, `timeout="0"`,
//! `method="PUT"`), `<Connect>` without exactly one `<Stream>`, a stream URL that is not an
//! absolute `wss://` (or, for tests on 127.0.0.1, `ws://`) URL or has a query string, a
//! `<Parameter>` without `name`/`value` or whose name and value together are 500 characters or
//! more, a `<Dial>` with nothing to dial, more than ten `<Number>`s, a `<Sip>` that is not alone
//! in its `<Dial>` or whose URI is not `sip:…` under 255 characters, a `<Redirect>` without a
//! URL.
//!
//! What depends on where the document came from is left to the caller: every URL the document
//! names is listed in [`Twiml::urls`], so the REST fake can require absolute ones (15004), and
//! phone numbers and caller IDs are returned as written, for the caller to judge against the
//! call and the account.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// A parsed TwiML document: its verbs in order, and every URL it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Twiml {
    pub verbs: Vec<Verb>,
    /// Every URL-valued attribute (`action`, `url`, `statusCallback`, …) and URL text
    /// (`<Redirect>`, `<Play>`), in document order.
    pub urls: Vec<UrlRef>,
}

/// A URL a TwiML document names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlRef {
    /// The element that carries it (`Dial`, `Number`, `Redirect`, …).
    pub element: String,
    /// The attribute, or `None` when it is the element's text.
    pub attribute: Option<String>,
    pub value: String,
}

/// The verbs a bridge answers with or sends through the REST API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `<Connect><Stream url>` with its `<Parameter>`s (in document order).
    Connect {
        stream_url: String,
        parameters: Vec<(String, String)>,
    },
    /// `<Say>`: its (unescaped) text and `voice`/`language` attributes.
    Say {
        text: String,
        voice: Option<String>,
        language: Option<String>,
    },
    /// `<Dial>` with its attributes and nouns.
    Dial(Dial),
    Hangup,
    /// `<Pause length>` (seconds, 1 when absent).
    Pause {
        length: u32,
    },
    /// `<Play>` and its URL (or `digits`).
    Play(String),
    /// `<Redirect method>` and its URL.
    Redirect {
        url: String,
        method: Option<String>,
    },
}

impl Verb {
    /// `<Say>` without attributes.
    pub fn say(text: &str) -> Verb {
        Verb::Say {
            text: text.to_owned(),
            voice: None,
            language: None,
        }
    }
}

/// A `<Dial>`: the attributes a bridge sets and what it dials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dial {
    pub caller_id: Option<String>,
    pub answer_on_bridge: Option<bool>,
    /// Ring time in seconds.
    pub timeout: Option<u32>,
    /// Maximum length of the bridged call in seconds.
    pub time_limit: Option<u32>,
    pub action: Option<String>,
    pub method: Option<String>,
    /// What is dialled, in document order (a bare `<Dial>+1…</Dial>` is one `Number`).
    pub nouns: Vec<DialNoun>,
}

impl Dial {
    /// The first thing dialled (a number, a `sip:` URI or a client name).
    pub fn target(&self) -> &str {
        match self.nouns.first() {
            Some(DialNoun::Number(s) | DialNoun::Sip(s) | DialNoun::Client(s)) => s,
            None => "",
        }
    }

    /// Whether this `<Dial>` calls a SIP URI (its caller ID rules differ).
    pub fn is_sip(&self) -> bool {
        self.nouns.iter().any(|n| matches!(n, DialNoun::Sip(_)))
    }
}

/// One noun of a `<Dial>`, with its text as written (trimmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialNoun {
    Number(String),
    Sip(String),
    Client(String),
}

impl Twiml {
    /// The `<Connect><Stream>` of the document, if any: (stream URL, parameters).
    pub fn stream(&self) -> Option<(&str, &[(String, String)])> {
        self.verbs.iter().find_map(|verb| match verb {
            Verb::Connect {
                stream_url,
                parameters,
            } => Some((stream_url.as_str(), parameters.as_slice())),
            _ => None,
        })
    }

    /// The verbs after the `<Connect>` (what the caller gets when the stream closes), or all of
    /// them when there is no `<Connect>`.
    pub fn after_connect(&self) -> &[Verb] {
        match self
            .verbs
            .iter()
            .position(|v| matches!(v, Verb::Connect { .. }))
        {
            Some(i) => &self.verbs[i + 1..],
            None => &self.verbs,
        }
    }

    /// The first `<Dial>` of the document, if any.
    pub fn dial(&self) -> Option<&Dial> {
        self.verbs.iter().find_map(|verb| match verb {
            Verb::Dial(dial) => Some(dial),
            _ => None,
        })
    }
}

/// Twilio: "the combined length of each `<Parameter>` name and value attributes must be under
/// 500 characters".
pub const MAX_PARAMETER_CHARS: usize = 500;

/// `<Number>`s one `<Dial>` may ring at once.
pub const MAX_NUMBERS: usize = 10;

/// A `<Sip>` URI must be under this many characters.
pub const MAX_SIP_URI_CHARS: usize = 255;

// The attributes each element has (Twilio's TwiML reference); any other is refused. The lists
// are the documented ones a bridge could plausibly use, not every attribute Twilio knows.
const CONNECT_ATTRS: &[&str] = &["action", "method"];
const STREAM_ATTRS: &[&str] = &[
    "url",
    "name",
    "track",
    "statusCallback",
    "statusCallbackMethod",
];
const PARAMETER_ATTRS: &[&str] = &["name", "value"];
const SAY_ATTRS: &[&str] = &["voice", "language", "loop"];
const PLAY_ATTRS: &[&str] = &["loop", "digits"];
const PAUSE_ATTRS: &[&str] = &["length"];
const REDIRECT_ATTRS: &[&str] = &["method"];
const DIAL_ATTRS: &[&str] = &[
    "action",
    "answerOnBridge",
    "callerId",
    "hangupOnStar",
    "method",
    "record",
    "recordingStatusCallback",
    "recordingStatusCallbackEvent",
    "recordingStatusCallbackMethod",
    "recordingTrack",
    "referMethod",
    "referUrl",
    "ringTone",
    "sequential",
    "timeLimit",
    "timeout",
    "trim",
];
const NUMBER_ATTRS: &[&str] = &[
    "sendDigits",
    "url",
    "method",
    "statusCallback",
    "statusCallbackEvent",
    "statusCallbackMethod",
    "byoc",
];
const SIP_ATTRS: &[&str] = &[
    "username",
    "password",
    "url",
    "method",
    "statusCallback",
    "statusCallbackEvent",
    "statusCallbackMethod",
];
const CLIENT_ATTRS: &[&str] = &[
    "url",
    "method",
    "statusCallback",
    "statusCallbackEvent",
    "statusCallbackMethod",
];

/// Attributes whose value is a URL, on any element.
const URL_ATTRS: &[&str] = &[
    "action",
    "url",
    "statusCallback",
    "recordingStatusCallback",
    "referUrl",
];

/// Parses `xml` strictly. The error names what Twilio would have refused.
pub fn parse(xml: &str) -> Result<Twiml, String> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut twiml = Twiml::default();
    let mut root_seen = false;
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Decl(_) | Event::Comment(_) => {}
            Event::Start(e) if !root_seen => {
                if e.name().as_ref() != b"Response" {
                    return Err(format!("root element is <{}>, not <Response>", name(&e)));
                }
                check_attrs(&e, &[])?;
                root_seen = true;
                read_verbs(&mut reader, &mut twiml)?;
            }
            Event::Empty(e) if !root_seen => {
                if e.name().as_ref() != b"Response" {
                    return Err(format!("root element is <{}>, not <Response>", name(&e)));
                }
                check_attrs(&e, &[])?;
                root_seen = true;
            }
            Event::Eof => break,
            Event::Text(t) if root_seen => {
                return Err(format!(
                    "text after </Response>: {:?}",
                    String::from_utf8_lossy(&t)
                ))
            }
            other => return Err(format!("unexpected {other:?} outside <Response>")),
        }
    }
    if !root_seen {
        return Err("no <Response> element".into());
    }
    Ok(twiml)
}

fn name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

/// The attribute `key` of `e`, unescaped. Duplicate attributes are an XML error.
fn attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, String> {
    for a in e.attributes() {
        let a = a.map_err(|err| format!("bad attribute on <{}>: {err}", name(e)))?;
        if a.key.as_ref() == key.as_bytes() {
            let value = a
                .unescape_value()
                .map_err(|err| format!("bad attribute value on <{}>: {err}", name(e)))?;
            return Ok(Some(value.into_owned()));
        }
    }
    Ok(None)
}

/// Every attribute of `e` is one of `allowed` (names are case-sensitive, as in Twilio's
/// schema: `callerID` is not `callerId`).
fn check_attrs(e: &BytesStart<'_>, allowed: &[&str]) -> Result<(), String> {
    for a in e.attributes() {
        let a = a.map_err(|err| format!("bad attribute on <{}>: {err}", name(e)))?;
        let key = String::from_utf8_lossy(a.key.as_ref());
        if !allowed.contains(&key.as_ref()) {
            return Err(format!(
                "<{}> has no attribute `{key}` (schema validation, 12200)",
                name(e)
            ));
        }
    }
    Ok(())
}

/// Checks `e`'s attributes against `allowed` and lists its URL-valued ones in `twiml.urls`.
fn element_attrs(e: &BytesStart<'_>, allowed: &[&str], twiml: &mut Twiml) -> Result<(), String> {
    check_attrs(e, allowed)?;
    for key in URL_ATTRS.iter().filter(|k| allowed.contains(k)) {
        if let Some(value) = attr(e, key)? {
            twiml.urls.push(UrlRef {
                element: name(e),
                attribute: Some((*key).to_owned()),
                value,
            });
        }
    }
    Ok(())
}

/// `GET` or `POST`, the only methods TwiML attributes take.
fn method_attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, String> {
    match attr(e, key)? {
        Some(m) if m != "GET" && m != "POST" => {
            Err(format!("<{} {key}={m:?}>: only GET or POST", name(e)))
        }
        other => Ok(other),
    }
}

fn bool_attr(e: &BytesStart<'_>, key: &str) -> Result<Option<bool>, String> {
    match attr(e, key)?.as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(format!("<{} {key}={other:?}>: only true or false", name(e))),
    }
}

/// A whole number of at least `min` (digits only: no sign, no unit, no fraction).
fn int_attr(e: &BytesStart<'_>, key: &str, min: u32) -> Result<Option<u32>, String> {
    let Some(text) = attr(e, key)? else {
        return Ok(None);
    };
    match text.parse::<u32>() {
        Ok(n) if n >= min && text.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(format!(
            "<{} {key}={text:?}>: not a whole number of at least {min}",
            name(e)
        )),
    }
}

/// Reads verbs until `</Response>`.
fn read_verbs(reader: &mut Reader<&[u8]>, twiml: &mut Twiml) -> Result<(), String> {
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::End(_) => return Ok(()), // quick-xml checks it is </Response>
            Event::Comment(_) => {}
            Event::Start(e) => {
                let verb = match e.name().as_ref() {
                    b"Connect" => {
                        element_attrs(&e, CONNECT_ATTRS, twiml)?;
                        method_attr(&e, "method")?;
                        read_connect(reader, twiml)?
                    }
                    b"Say" => {
                        element_attrs(&e, SAY_ATTRS, twiml)?;
                        int_attr(&e, "loop", 0)?;
                        Verb::Say {
                            voice: attr(&e, "voice")?,
                            language: attr(&e, "language")?,
                            text: read_text(reader, "Say")?,
                        }
                    }
                    b"Play" => {
                        element_attrs(&e, PLAY_ATTRS, twiml)?;
                        int_attr(&e, "loop", 0)?;
                        let url = read_text(reader, "Play")?;
                        push_text_url(twiml, "Play", &url)?;
                        Verb::Play(url)
                    }
                    b"Redirect" => {
                        element_attrs(&e, REDIRECT_ATTRS, twiml)?;
                        let method = method_attr(&e, "method")?;
                        let url = read_text(reader, "Redirect")?;
                        push_text_url(twiml, "Redirect", &url)?;
                        Verb::Redirect { url, method }
                    }
                    b"Dial" => {
                        element_attrs(&e, DIAL_ATTRS, twiml)?;
                        let mut dial = dial_attrs(&e)?;
                        dial.nouns = read_dial(reader, twiml)?;
                        Verb::Dial(dial)
                    }
                    b"Hangup" | b"Pause" => {
                        let verb = empty_verb(&e, twiml)?;
                        let noun = name(&e);
                        if !read_text(reader, &noun)?.is_empty() {
                            return Err(format!("<{noun}> takes no text"));
                        }
                        verb
                    }
                    _ => return Err(format!("unknown verb <{}>", name(&e))),
                };
                twiml.verbs.push(verb);
            }
            Event::Empty(e) => {
                let verb = match e.name().as_ref() {
                    b"Hangup" | b"Pause" => empty_verb(&e, twiml)?,
                    b"Play" => {
                        element_attrs(&e, PLAY_ATTRS, twiml)?;
                        int_attr(&e, "loop", 0)?;
                        let digits = attr(&e, "digits")?
                            .filter(|d| !d.is_empty())
                            .ok_or("<Play/> without a URL or digits")?;
                        Verb::Play(digits)
                    }
                    b"Connect" => return Err("<Connect/> without a <Stream>".into()),
                    b"Dial" => return Err("<Dial/> with nothing to dial".into()),
                    b"Redirect" => return Err("<Redirect/> without a URL".into()),
                    _ => return Err(format!("unknown or empty verb <{}/>", name(&e))),
                };
                twiml.verbs.push(verb);
            }
            Event::Text(t) => {
                return Err(format!(
                    "text directly in <Response>: {:?}",
                    String::from_utf8_lossy(&t)
                ))
            }
            Event::Eof => return Err("document ends inside <Response>".into()),
            other => return Err(format!("unexpected {other:?} in <Response>")),
        }
    }
}

/// `<Hangup>` or `<Pause>`, whose content is empty.
fn empty_verb(e: &BytesStart<'_>, twiml: &mut Twiml) -> Result<Verb, String> {
    if e.name().as_ref() == b"Hangup" {
        element_attrs(e, &[], twiml)?;
        return Ok(Verb::Hangup);
    }
    element_attrs(e, PAUSE_ATTRS, twiml)?;
    Ok(Verb::Pause {
        length: int_attr(e, "length", 1)?.unwrap_or(1),
    })
}

/// The URL text of `<Redirect>`/`<Play>`, which must be there.
fn push_text_url(twiml: &mut Twiml, element: &str, url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err(format!("<{element}> without a URL"));
    }
    twiml.urls.push(UrlRef {
        element: element.to_owned(),
        attribute: None,
        value: url.to_owned(),
    });
    Ok(())
}

/// The text content of an element up to its end tag, unescaped; no child elements.
fn read_text(reader: &mut Reader<&[u8]>, verb: &str) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Text(t) => text.push_str(
                &t.unescape()
                    .map_err(|e| format!("bad text in <{verb}>: {e}"))?,
            ),
            Event::CData(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Event::End(_) => return Ok(text),
            Event::Comment(_) => {}
            other => return Err(format!("unexpected {other:?} in <{verb}>")),
        }
    }
}

/// The attributes of `<Dial>` a bridge sets, checked.
fn dial_attrs(e: &BytesStart<'_>) -> Result<Dial, String> {
    bool_attr(e, "hangupOnStar")?;
    method_attr(e, "referMethod")?;
    method_attr(e, "recordingStatusCallbackMethod")?;
    Ok(Dial {
        caller_id: attr(e, "callerId")?,
        answer_on_bridge: bool_attr(e, "answerOnBridge")?,
        timeout: int_attr(e, "timeout", 1)?,
        time_limit: int_attr(e, "timeLimit", 1)?,
        action: attr(e, "action")?,
        method: method_attr(e, "method")?,
        nouns: Vec::new(),
    })
}

/// `<Dial>`'s nouns: its text (one number), or `<Number>`s (up to ten), one `<Sip>` alone, or
/// `<Client>`s.
fn read_dial(reader: &mut Reader<&[u8]>, twiml: &mut Twiml) -> Result<Vec<DialNoun>, String> {
    let mut text = String::new();
    let mut nouns = Vec::new();
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Text(t) => text.push_str(
                &t.unescape()
                    .map_err(|e| format!("bad text in <Dial>: {e}"))?,
            ),
            Event::Start(e) => {
                let noun = name(&e);
                let allowed = match e.name().as_ref() {
                    b"Number" => NUMBER_ATTRS,
                    b"Sip" => SIP_ATTRS,
                    b"Client" => CLIENT_ATTRS,
                    _ => return Err(format!("unknown noun <{noun}> in <Dial>")),
                };
                element_attrs(&e, allowed, twiml)?;
                method_attr(&e, "method")?;
                method_attr(&e, "statusCallbackMethod")?;
                let value = read_text(reader, &noun)?.trim().to_owned();
                if value.is_empty() {
                    return Err(format!("empty <{noun}> in <Dial>"));
                }
                nouns.push(match e.name().as_ref() {
                    b"Number" => DialNoun::Number(value),
                    b"Sip" => DialNoun::Sip(value),
                    _ => DialNoun::Client(value),
                });
            }
            Event::Empty(e) => return Err(format!("empty <{}/> in <Dial>", name(&e))),
            Event::End(_) => break,
            Event::Comment(_) => {}
            other => return Err(format!("unexpected {other:?} in <Dial>")),
        }
    }
    let text = text.trim();
    match (text.is_empty(), nouns.is_empty()) {
        (true, true) => return Err("<Dial> with nothing to dial".into()),
        (false, false) => return Err("<Dial> mixes text and nouns".into()),
        (false, true) => nouns.push(DialNoun::Number(text.to_owned())),
        (true, false) => {}
    }
    let numbers = nouns
        .iter()
        .filter(|n| matches!(n, DialNoun::Number(_)))
        .count();
    if numbers > MAX_NUMBERS {
        return Err(format!(
            "<Dial> with {numbers} <Number>s (at most {MAX_NUMBERS})"
        ));
    }
    let sips: Vec<&str> = nouns
        .iter()
        .filter_map(|n| match n {
            DialNoun::Sip(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    if !sips.is_empty() && nouns.len() > 1 {
        return Err("a <Sip> must be the only noun of its <Dial>".into());
    }
    if let Some(uri) = sips.first() {
        if !uri.starts_with("sip:") || uri.len() <= "sip:".len() {
            return Err(format!("<Sip>{uri}</Sip> is not a sip: URI"));
        }
        if uri.chars().count() >= MAX_SIP_URI_CHARS {
            return Err(format!(
                "<Sip> URI of {} characters (must be under {MAX_SIP_URI_CHARS})",
                uri.chars().count()
            ));
        }
    }
    Ok(nouns)
}

/// `<Connect>`: exactly one `<Stream url>` with `<Parameter>`s.
fn read_connect(reader: &mut Reader<&[u8]>, twiml: &mut Twiml) -> Result<Verb, String> {
    let mut stream: Option<Verb> = None;
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() != b"Stream" => {
                return Err(format!("unexpected <{}> in <Connect>", name(&e)))
            }
            Event::Start(e) => {
                if stream.is_some() {
                    return Err("more than one <Stream> in <Connect>".into());
                }
                let url = stream_url(&e, twiml)?;
                let parameters = read_parameters(reader)?;
                stream = Some(Verb::Connect {
                    stream_url: url,
                    parameters,
                });
            }
            Event::Empty(e) => {
                if stream.is_some() {
                    return Err("more than one <Stream> in <Connect>".into());
                }
                stream = Some(Verb::Connect {
                    stream_url: stream_url(&e, twiml)?,
                    parameters: Vec::new(),
                });
            }
            Event::End(_) => break,
            Event::Comment(_) => {}
            other => return Err(format!("unexpected {other:?} in <Connect>")),
        }
    }
    stream.ok_or_else(|| "<Connect> without a <Stream>".to_owned())
}

fn stream_url(e: &BytesStart<'_>, twiml: &mut Twiml) -> Result<String, String> {
    check_attrs(e, STREAM_ATTRS)?;
    method_attr(e, "statusCallbackMethod")?;
    if let Some(callback) = attr(e, "statusCallback")? {
        twiml.urls.push(UrlRef {
            element: "Stream".into(),
            attribute: Some("statusCallback".into()),
            value: callback,
        });
    }
    let url = attr(e, "url")?.ok_or("<Stream> without a url")?;
    if !(url.starts_with("wss://") || url.starts_with("ws://")) {
        return Err(format!("<Stream url> {url:?} is not a wss:// URL"));
    }
    if url.contains('?') {
        return Err(format!(
            "<Stream url> {url:?} has a query string (Twilio does not support one)"
        ));
    }
    if let Some(track) = attr(e, "track")? {
        if track != "inbound_track" {
            return Err(format!(
                "<Connect><Stream track={track:?}>: only inbound_track (error 31941)"
            ));
        }
    }
    Ok(url)
}

fn read_parameters(reader: &mut Reader<&[u8]>) -> Result<Vec<(String, String)>, String> {
    let mut parameters = Vec::new();
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Empty(e) if e.name().as_ref() == b"Parameter" => {
                check_attrs(&e, PARAMETER_ATTRS)?;
                let name = attr(&e, "name")?.ok_or("<Parameter> without a name")?;
                let value = attr(&e, "value")?.ok_or("<Parameter> without a value")?;
                let chars = name.chars().count() + value.chars().count();
                if chars >= MAX_PARAMETER_CHARS {
                    return Err(format!(
                        "<Parameter name={name:?}>: name and value are {chars} characters (must \
                         be under {MAX_PARAMETER_CHARS})"
                    ));
                }
                parameters.push((name, value));
            }
            Event::Start(e) | Event::Empty(e) => {
                return Err(format!("unexpected <{}> in <Stream>", name(&e)))
            }
            Event::End(_) => return Ok(parameters),
            Event::Comment(_) => {}
            other => return Err(format!("unexpected {other:?} in <Stream>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_connect_with_parameters_and_a_fallback() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://b.example/media-stream"><Parameter name="From" value="+1 &lt;x&gt;"/><Parameter name="t" value="a&amp;b"/></Stream></Connect><Say>Sorry &amp; goodbye</Say><Dial callerId="+14155550100"><Number>+15005550006</Number></Dial></Response>"#;
        let twiml = parse(xml).unwrap();
        let (url, params) = twiml.stream().unwrap();
        assert_eq!(url, "wss://b.example/media-stream");
        assert_eq!(
            params,
            &[
                ("From".to_owned(), "+1 <x>".to_owned()),
                ("t".to_owned(), "a&b".to_owned())
            ]
        );
        assert_eq!(
            twiml.after_connect(),
            &[
                Verb::say("Sorry & goodbye"),
                Verb::Dial(Dial {
                    caller_id: Some("+14155550100".into()),
                    nouns: vec![DialNoun::Number("+15005550006".into())],
                    ..Dial::default()
                })
            ]
        );
    }

    #[test]
    fn refuses_what_twilio_refuses() {
        for (xml, why) in [
            ("<Response><Say>unclosed</Response>", "well-formed"),
            ("<Responses/>", "not <Response>"),
            ("<Response><Speak>x</Speak></Response>", "unknown verb"),
            (
                "<Response><Connect></Connect></Response>",
                "without a <Stream>",
            ),
            (
                r#"<Response><Connect><Stream url="https://x/m"/></Connect></Response>"#,
                "not a wss",
            ),
            (
                r#"<Response><Connect><Stream url="wss://x/m?a=1"/></Connect></Response>"#,
                "query string",
            ),
            (
                r#"<Response><Connect><Stream url="wss://x/m"><Parameter name="a"/></Stream></Connect></Response>"#,
                "without a value",
            ),
            (
                r#"<Response><Connect><Stream url="wss://x/m"/><Stream url="wss://x/n"/></Connect></Response>"#,
                "more than one",
            ),
            ("<Response><Dial></Dial></Response>", "nothing to dial"),
            ("<Response>text</Response>", "text directly"),
            ("<Response><Say>a &bogus; b</Say></Response>", "entity"),
            ("<Response><Say>a & b</Say></Response>", ""),
        ] {
            let err = parse(xml).expect_err(xml);
            assert!(err.contains(why), "{xml}: {err}");
        }
        let long = "v".repeat(MAX_PARAMETER_CHARS - 1);
        let xml = format!(
            r#"<Response><Connect><Stream url="wss://x/m"><Parameter name="a" value="{long}"/></Stream></Connect></Response>"#
        );
        assert!(parse(&xml).unwrap_err().contains("under 500"));
    }

    #[test]
    fn reads_a_fallback_only_answer() {
        let twiml = parse("<Response><Say>Busy.</Say><Hangup/></Response>").unwrap();
        assert!(twiml.stream().is_none());
        assert_eq!(twiml.after_connect(), &[Verb::say("Busy."), Verb::Hangup]);
    }

    /// The verbs and attributes a transfer or goodbye sent through the REST API uses.
    #[test]
    fn reads_rest_verbs_with_their_attributes() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Say voice="Polly.Joanna" language="en-US">One moment.</Say><Pause length="2"/><Dial callerId="+14155550123" answerOnBridge="true" timeout="30" timeLimit="600" action="https://b.example/after-dial" method="POST"><Number>+15005550006</Number><Number sendDigits="1">+15005550007</Number></Dial><Redirect method="POST">https://b.example/next</Redirect><Hangup/></Response>"#;
        let twiml = parse(xml).unwrap();
        assert_eq!(
            twiml.verbs,
            vec![
                Verb::Say {
                    text: "One moment.".into(),
                    voice: Some("Polly.Joanna".into()),
                    language: Some("en-US".into()),
                },
                Verb::Pause { length: 2 },
                Verb::Dial(Dial {
                    caller_id: Some("+14155550123".into()),
                    answer_on_bridge: Some(true),
                    timeout: Some(30),
                    time_limit: Some(600),
                    action: Some("https://b.example/after-dial".into()),
                    method: Some("POST".into()),
                    nouns: vec![
                        DialNoun::Number("+15005550006".into()),
                        DialNoun::Number("+15005550007".into()),
                    ],
                }),
                Verb::Redirect {
                    url: "https://b.example/next".into(),
                    method: Some("POST".into()),
                },
                Verb::Hangup,
            ]
        );
        let urls: Vec<(&str, Option<&str>, &str)> = twiml
            .urls
            .iter()
            .map(|u| (u.element.as_str(), u.attribute.as_deref(), u.value.as_str()))
            .collect();
        assert_eq!(
            urls,
            [
                ("Dial", Some("action"), "https://b.example/after-dial"),
                ("Redirect", None, "https://b.example/next"),
            ]
        );
        let sip = parse(r#"<Response><Dial><Sip username="u" password="p">sip:agent@pbx.example.com</Sip></Dial></Response>"#).unwrap();
        let dial = sip.dial().unwrap();
        assert!(dial.is_sip());
        assert_eq!(dial.target(), "sip:agent@pbx.example.com");
        assert_eq!(
            parse("<Response><Pause/><Hangup></Hangup></Response>")
                .unwrap()
                .verbs,
            [Verb::Pause { length: 1 }, Verb::Hangup]
        );
    }

    /// Attribute names and values, noun counts and the SIP rules are checked.
    #[test]
    fn refuses_bad_attributes_and_nouns() {
        let eleven: String = (0..11)
            .map(|i| format!("<Number>+1500555000{i}</Number>"))
            .collect();
        let long_sip = format!("<Sip>sip:{}@x.example</Sip>", "a".repeat(250));
        for (xml, why) in [
            (
                r#"<Response><Dial callerID="+1">+15005550006</Dial></Response>"#.to_owned(),
                "no attribute `callerID`",
            ),
            (
                r#"<Response><Dial answerOnBridge="yes">+15005550006</Dial></Response>"#.to_owned(),
                "true or false",
            ),
            (
                r#"<Response><Dial timeout="0">+15005550006</Dial></Response>"#.to_owned(),
                "at least 1",
            ),
            (
                r#"<Response><Dial timeout="30s">+15005550006</Dial></Response>"#.to_owned(),
                "whole number",
            ),
            (
                r#"<Response><Dial method="PUT">+15005550006</Dial></Response>"#.to_owned(),
                "GET or POST",
            ),
            (
                r#"<Response><Pause length="-1"/></Response>"#.to_owned(),
                "whole number",
            ),
            (
                r#"<Response><Say colour="red">x</Say></Response>"#.to_owned(),
                "no attribute `colour`",
            ),
            (
                r#"<Response><Hangup reason="x"/></Response>"#.to_owned(),
                "no attribute",
            ),
            (
                "<Response><Hangup>now</Hangup></Response>".to_owned(),
                "takes no text",
            ),
            (
                "<Response><Redirect></Redirect></Response>".to_owned(),
                "without a URL",
            ),
            (
                "<Response><Redirect/></Response>".to_owned(),
                "without a URL",
            ),
            (
                "<Response><Play/></Response>".to_owned(),
                "without a URL or digits",
            ),
            (
                format!("<Response><Dial>{eleven}</Dial></Response>"),
                "11 <Number>s",
            ),
            (
                "<Response><Dial><Sip>sip:a@b</Sip><Number>+15005550006</Number></Dial></Response>"
                    .to_owned(),
                "only noun",
            ),
            (
                "<Response><Dial><Sip>agent@pbx</Sip></Dial></Response>".to_owned(),
                "not a sip: URI",
            ),
            (
                format!("<Response><Dial>{long_sip}</Dial></Response>"),
                "under 255",
            ),
            (
                "<Response><Dial>+1<Number>+15005550006</Number></Dial></Response>".to_owned(),
                "mixes",
            ),
            (
                "<Response><Dial><Number></Number></Dial></Response>".to_owned(),
                "empty <Number>",
            ),
            (
                "<Response><Dial><Conference>x</Conference></Dial></Response>".to_owned(),
                "unknown noun",
            ),
            (
                r#"<Response><Connect><Stream url="wss://x/m" bogus="1"/></Connect></Response>"#
                    .to_owned(),
                "no attribute `bogus`",
            ),
        ] {
            let err = parse(&xml).expect_err(&xml);
            assert!(err.contains(why), "{xml}: {err}");
        }
    }
}
