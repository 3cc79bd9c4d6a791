//! Reading TwiML as Twilio does (`reference/protocols.md` A4, `twilio-rest.md`): a strict XML
//! parse with `quick-xml` (never the service's builder), into the verbs a bridge uses.
//!
//! What Twilio would refuse is an error here: a document that is not well-formed XML, a root
//! other than `<Response>`, an unknown verb, `<Connect>` without exactly one `<Stream>`, a
//! stream URL that is not an absolute `wss://` (or, for tests on 127.0.0.1, `ws://`) URL or has
//! a query string, a `<Parameter>` without `name`/`value` or whose name and value together are
//! 500 characters or more, a `<Dial>` with nothing to dial.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// A parsed TwiML document: its verbs in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Twiml {
    pub verbs: Vec<Verb>,
}

/// The verbs a bridge answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `<Connect><Stream url>` with its `<Parameter>`s (in document order).
    Connect {
        stream_url: String,
        parameters: Vec<(String, String)>,
    },
    /// `<Say>` and its (unescaped) text.
    Say(String),
    /// `<Dial>`: its `callerId` attribute and the target (the text, or a `<Number>`/`<Sip>`).
    Dial {
        caller_id: Option<String>,
        target: String,
    },
    Hangup,
    Pause,
    /// `<Play>` and its URL (or `digits`).
    Play(String),
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
}

/// Twilio: "the combined length of each `<Parameter>` name and value attributes must be under
/// 500 characters".
pub const MAX_PARAMETER_CHARS: usize = 500;

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
                root_seen = true;
                read_verbs(&mut reader, &mut twiml)?;
            }
            Event::Empty(e) if !root_seen => {
                if e.name().as_ref() != b"Response" {
                    return Err(format!("root element is <{}>, not <Response>", name(&e)));
                }
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
                    b"Connect" => read_connect(reader)?,
                    b"Say" => Verb::Say(read_text(reader, "Say")?),
                    b"Play" => Verb::Play(read_text(reader, "Play")?),
                    b"Dial" => {
                        let caller_id = attr(&e, "callerId")?;
                        let target = read_dial(reader)?;
                        Verb::Dial { caller_id, target }
                    }
                    _ => return Err(format!("unknown verb <{}>", name(&e))),
                };
                twiml.verbs.push(verb);
            }
            Event::Empty(e) => {
                let verb = match e.name().as_ref() {
                    b"Hangup" => Verb::Hangup,
                    b"Pause" => Verb::Pause,
                    b"Play" => Verb::Play(attr(&e, "digits")?.unwrap_or_default()),
                    b"Connect" => return Err("<Connect/> without a <Stream>".into()),
                    b"Dial" => return Err("<Dial/> with nothing to dial".into()),
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

/// `<Dial>`'s target: its text, or one `<Number>`/`<Sip>`/`<Client>` child.
fn read_dial(reader: &mut Reader<&[u8]>) -> Result<String, String> {
    let mut target = String::new();
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("not well-formed XML: {e}"))?
        {
            Event::Text(t) => target.push_str(
                &t.unescape()
                    .map_err(|e| format!("bad text in <Dial>: {e}"))?,
            ),
            Event::Start(e) if matches!(e.name().as_ref(), b"Number" | b"Sip" | b"Client") => {
                let noun = name(&e);
                target.push_str(&read_text(reader, &noun)?);
            }
            Event::Start(e) => return Err(format!("unknown noun <{}> in <Dial>", name(&e))),
            Event::End(_) => break,
            other => return Err(format!("unexpected {other:?} in <Dial>")),
        }
    }
    let target = target.trim().to_owned();
    if target.is_empty() {
        return Err("<Dial> with nothing to dial".into());
    }
    Ok(target)
}

/// `<Connect>`: exactly one `<Stream url>` with `<Parameter>`s.
fn read_connect(reader: &mut Reader<&[u8]>) -> Result<Verb, String> {
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
                let url = stream_url(&e)?;
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
                    stream_url: stream_url(&e)?,
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

fn stream_url(e: &BytesStart<'_>) -> Result<String, String> {
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
                Verb::Say("Sorry & goodbye".into()),
                Verb::Dial {
                    caller_id: Some("+14155550100".into()),
                    target: "+15005550006".into()
                }
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
        assert_eq!(
            twiml.after_connect(),
            &[Verb::Say("Busy.".into()), Verb::Hangup]
        );
    }
}
