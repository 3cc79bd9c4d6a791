//! What the Calls resource accepts (`twilio-rest.md` C, E, F, H), as pure checks on a decoded
//! form: parameter names, numbers, URLs, `Status`/`Twiml`/`Url`, and the TwiML a `Twiml`
//! parameter carries.
//!
//! A check ends in one of three ways, the one Twilio has: an error answer ([`RestError`]: the
//! request is refused), a call-log notice ([`Notice`]: Twilio accepts the request and the call
//! later logs the error, as 15004 and 13214 are), or nothing. Independently, anything a correct
//! client would not have sent is a violation, so a test sees it even where Twilio is silent
//! (an unknown parameter name is ignored by Twilio and is only a violation here).

use crate::twiml::{self, DialNoun, Twiml, Verb};

use super::errors::RestError;

/// `Twiml` may hold this many characters (32018).
pub const MAX_TWIML_CHARS: usize = 4000;

/// Parameters of an update (twilio-python `CallContext.update`).
pub(crate) const UPDATE_PARAMS: &[&str] = &[
    "Url",
    "Method",
    "Status",
    "FallbackUrl",
    "FallbackMethod",
    "StatusCallback",
    "StatusCallbackMethod",
    "Twiml",
    "TimeLimit",
];

/// Parameters of a create (twilio-python `CallList.create`).
pub(crate) const CREATE_PARAMS: &[&str] = &[
    "To",
    "From",
    "Url",
    "Twiml",
    "ApplicationSid",
    "Method",
    "FallbackUrl",
    "FallbackMethod",
    "StatusCallback",
    "StatusCallbackEvent",
    "StatusCallbackMethod",
    "SendDigits",
    "Timeout",
    "Record",
    "RecordingChannels",
    "RecordingStatusCallback",
    "RecordingStatusCallbackMethod",
    "SipAuthUsername",
    "SipAuthPassword",
    "MachineDetection",
    "MachineDetectionTimeout",
    "RecordingStatusCallbackEvent",
    "Trim",
    "CallerId",
    "MachineDetectionSpeechThreshold",
    "MachineDetectionSpeechEndThreshold",
    "MachineDetectionSilenceTimeout",
    "AsyncAmd",
    "AsyncAmdStatusCallback",
    "AsyncAmdStatusCallbackMethod",
    "Byoc",
    "CallReason",
    "CallToken",
    "RecordingTrack",
    "TimeLimit",
    "ClientNotificationUrl",
];

/// Parameters that are lists: the name repeated once per value.
const LIST_PARAMS: &[&str] = &["StatusCallbackEvent", "RecordingStatusCallbackEvent"];

/// The events a created call's `StatusCallback` can subscribe to.
pub(crate) const STATUS_CALLBACK_EVENTS: &[&str] =
    &["initiated", "ringing", "answered", "completed"];

/// `Timeout` of a create: at most this many seconds (Twilio caps larger values).
pub(crate) const MAX_TIMEOUT_SECS: u32 = 600;

/// An error Twilio logs on the call (its debugger) instead of refusing the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub call_sid: String,
    /// 15004 (relative URL in REST TwiML), 13214 (invalid `callerId`), 13223 (invalid number
    /// in `<Dial>`), 11200 (a webhook answered with an error).
    pub code: u32,
    pub message: String,
}

/// What the checks of one request found besides its answer.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub(crate) violations: Vec<String>,
    /// (code, message) of the call-log notices; the call SID is added by the caller.
    pub(crate) notices: Vec<(u32, String)>,
}

impl Findings {
    pub(crate) fn violation(&mut self, message: impl Into<String>) {
        self.violations.push(message.into());
    }

    /// A call-log notice, which is also a violation.
    fn notice(&mut self, code: u32, message: String) {
        self.violations
            .push(format!("{message} (call log: {code})"));
        self.notices.push((code, message));
    }

    /// A refusal that is also a violation: the client sent what it should not have.
    fn refuse(&mut self, error: RestError) -> RestError {
        self.violations.push(format!(
            "{} (answered {}/{})",
            error.message, error.status, error.code
        ));
        error
    }
}

/// A decoded form body.
#[derive(Clone, Debug, Default)]
pub(crate) struct Form<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Form<'a> {
    pub(crate) fn new(pairs: &'a [(String, String)]) -> Form<'a> {
        Form { pairs }
    }

    /// The first value of `name` (names are case-sensitive).
    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<&'a str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Unknown names (a case mismatch included: `status` is not `Status`), and a single-valued
    /// name given twice, are violations. Twilio ignores an unknown name and keeps one value of
    /// a repeated one, so neither is refused.
    pub(crate) fn check_names(&self, known: &[&str], findings: &mut Findings) {
        for (i, (name, _)) in self.pairs.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                let hint = known
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(name))
                    .map(|k| format!(" (names are case-sensitive: `{k}`)"))
                    .unwrap_or_default();
                findings.violation(format!(
                    "unknown parameter `{name}`{hint}: Twilio ignores it"
                ));
            } else if !LIST_PARAMS.contains(&name.as_str())
                && self.pairs[..i].iter().any(|(k, _)| k == name)
            {
                findings.violation(format!("parameter `{name}` given more than once"));
            }
        }
    }
}

/// `+` then 7 to 15 digits, the first not 0.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// An absolute `http://` or `https://` URL with a host and no whitespace.
pub fn is_absolute_http_url(s: &str) -> bool {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(rest) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            !host.is_empty() && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// When `value` is a number whose `+` was sent unencoded (and so decoded to a space), says so.
pub(crate) fn plus_as_space(param: &str, value: &str) -> Option<String> {
    let digits = value.strip_prefix(' ')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| {
        format!("{param} is {value:?}: a `+` sent unencoded decodes to a space (encode it as %2B)")
    })
}

/// A `sip:` URI as the REST API takes it for `To`: under 255 characters, no whitespace.
fn is_sip_uri(s: &str) -> bool {
    s.len() > "sip:".len()
        && s.starts_with("sip:")
        && s.chars().count() < twiml::MAX_SIP_URI_CHARS
        && !s.chars().any(char::is_whitespace)
}

/// `client:name`.
fn is_client(s: &str) -> bool {
    s.strip_prefix("client:")
        .is_some_and(|n| !n.is_empty() && !n.chars().any(char::is_whitespace))
}

/// `GET` or `POST` in `param`, else a refusal.
fn check_method(form: &Form<'_>, param: &str, findings: &mut Findings) -> Result<(), RestError> {
    match form.get(param) {
        Some(m) if m != "GET" && m != "POST" => Err(findings.refuse(RestError::invalid_parameter(
            format!("{param} must be GET or POST, not {m:?}"),
        ))),
        _ => Ok(()),
    }
}

/// An absolute http(s) URL in `param` when present, else a refusal (21205).
fn check_url(
    form: &Form<'_>,
    param: &str,
    findings: &mut Findings,
) -> Result<Option<String>, RestError> {
    match form.get(param) {
        Some(url) if !is_absolute_http_url(url) => {
            Err(findings.refuse(RestError::invalid_url(param, url)))
        }
        other => Ok(other.map(str::to_owned)),
    }
}

/// A whole number of seconds of at least 1 in `param` when present.
fn check_seconds(
    form: &Form<'_>,
    param: &str,
    findings: &mut Findings,
) -> Result<Option<u32>, RestError> {
    let Some(text) = form.get(param) else {
        return Ok(None);
    };
    match text.parse::<u32>() {
        Ok(n) if n >= 1 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(findings.refuse(RestError::invalid_parameter(format!(
            "{param} must be a whole number of seconds, not {text:?}"
        )))),
    }
}

/// The numbers a `<Dial callerId>` on this call may use (E.164 ones; 13214 rules, E): the
/// calling number, the called number, the account's numbers and verified caller IDs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallerIds<'a> {
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) numbers: &'a [String],
}

impl CallerIds<'_> {
    fn allows(&self, id: &str) -> bool {
        id == self.from || id == self.to || self.numbers.iter().any(|n| n == id)
    }
}

/// Judges a `Twiml` parameter: over 4000 characters (32018) or unreadable (12100) is refused;
/// a relative URL (15004), an invalid `callerId` (13214) or a `<Number>` that is not E.164
/// (13223) is a call-log notice.
pub(crate) fn judge_twiml(
    xml: &str,
    ids: CallerIds<'_>,
    findings: &mut Findings,
) -> Result<Twiml, RestError> {
    let chars = xml.chars().count();
    if chars > MAX_TWIML_CHARS {
        return Err(findings.refuse(RestError::twiml_too_long(chars)));
    }
    let twiml = twiml::parse(xml).map_err(|why| findings.refuse(RestError::invalid_twiml(&why)))?;
    for url in &twiml.urls {
        // The stream URL itself (wss://) is checked by the parser and not listed here.
        if !is_absolute_http_url(&url.value) {
            let place = match &url.attribute {
                Some(a) => format!("<{} {a}>", url.element),
                None => format!("<{}>", url.element),
            };
            findings.notice(
                15004,
                format!(
                    "{place} {:?} is not an absolute URL: TwiML sent through the REST API must \
                     use absolute URLs",
                    url.value
                ),
            );
        }
    }
    for verb in &twiml.verbs {
        let Verb::Dial(dial) = verb else { continue };
        for noun in &dial.nouns {
            if let DialNoun::Number(number) = noun {
                if !is_e164(number) {
                    let hint = if number.bytes().all(|b| b.is_ascii_digit()) {
                        " (a `+` sent unencoded arrives as a space)"
                    } else {
                        ""
                    };
                    findings.notice(
                        13223,
                        format!("<Dial> number {number:?} is not in E.164 (+ and digits){hint}"),
                    );
                }
            }
        }
        let Some(caller_id) = &dial.caller_id else {
            continue;
        };
        if dial.is_sip() {
            let ok = !caller_id.is_empty()
                && caller_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-_.".contains(c));
            if !ok {
                findings.notice(
                    13214,
                    format!("<Dial callerId={caller_id:?}> for SIP: only letters, digits and +-_."),
                );
            }
        } else if !is_e164(caller_id) || !ids.allows(caller_id) {
            let why = if caller_id.starts_with(' ') {
                " (a `+` that arrived as a space?)"
            } else if !is_e164(caller_id) {
                " (not E.164)"
            } else {
                ""
            };
            findings.notice(
                13214,
                format!(
                    "<Dial callerId={caller_id:?}>{why}: not the calling number {:?}, the \
                     called number {:?}, nor a number or verified caller ID of the account",
                    ids.from, ids.to
                ),
            );
        }
    }
    Ok(twiml)
}

/// What an update asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum UpdateAction {
    /// `Status=completed`.
    Complete,
    /// `Status=canceled`.
    Cancel,
    /// `Twiml=…`: the document as sent, and as read.
    Twiml(String, Twiml),
    /// `Url=…` with its `Method`.
    Url { url: String, method: String },
    /// None of `Status`, `Twiml`, `Url`.
    Nothing,
}

/// Checks an update's parameters (C). The state checks (20404, 21220) are the caller's.
pub(crate) fn check_update(
    form: &Form<'_>,
    ids: CallerIds<'_>,
    findings: &mut Findings,
) -> Result<UpdateAction, RestError> {
    form.check_names(UPDATE_PARAMS, findings);
    let status = form.get("Status");
    let twiml = form.get("Twiml");
    let url = form.get("Url");
    let given: Vec<&str> = [("Status", status), ("Twiml", twiml), ("Url", url)]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(n, _)| *n)
        .collect();
    if given.len() > 1 {
        return Err(findings.refuse(RestError::invalid_parameter(format!(
            "{} are mutually exclusive: send one of Status, Twiml, Url per request",
            given.join(" and ")
        ))));
    }
    check_method(form, "Method", findings)?;
    check_method(form, "FallbackMethod", findings)?;
    check_method(form, "StatusCallbackMethod", findings)?;
    check_url(form, "FallbackUrl", findings)?;
    check_url(form, "StatusCallback", findings)?;
    check_seconds(form, "TimeLimit", findings)?;
    if form.get("Method").is_some() && url.is_none() {
        findings.violation("Method without Url: it only applies to Url");
    }
    if let Some(status) = status {
        return match status {
            "completed" => Ok(UpdateAction::Complete),
            "canceled" => Ok(UpdateAction::Cancel),
            other => Err(findings.refuse(RestError::invalid_parameter(format!(
                "Status must be completed or canceled, not {other:?}"
            )))),
        };
    }
    if let Some(xml) = twiml {
        let parsed = judge_twiml(xml, ids, findings)?;
        return Ok(UpdateAction::Twiml(xml.to_owned(), parsed));
    }
    if let Some(url) = check_url(form, "Url", findings)? {
        let method = form.get("Method").unwrap_or("POST").to_owned();
        return Ok(UpdateAction::Url { url, method });
    }
    Ok(UpdateAction::Nothing)
}

/// A create that passed the checks.
#[derive(Clone, Debug)]
pub(crate) struct NewCall {
    pub(crate) to: String,
    pub(crate) from: String,
    pub(crate) url: Option<String>,
    pub(crate) method: String,
    pub(crate) twiml: Option<(String, Twiml)>,
    pub(crate) application_sid: Option<String>,
    pub(crate) status_callback: Option<String>,
    pub(crate) status_callback_method: String,
    pub(crate) status_callback_events: Vec<String>,
    pub(crate) timeout: u32,
    pub(crate) machine_detection: Option<String>,
    pub(crate) async_amd: bool,
}

/// Checks a create's parameters (F) against the account's numbers.
pub(crate) fn check_create(
    form: &Form<'_>,
    numbers: &[String],
    findings: &mut Findings,
) -> Result<NewCall, RestError> {
    form.check_names(CREATE_PARAMS, findings);
    let to = form
        .get("To")
        .ok_or_else(|| findings.refuse(RestError::missing_to()))?;
    let from = form
        .get("From")
        .ok_or_else(|| findings.refuse(RestError::missing_from()))?;
    if let Some(why) = plus_as_space("To", to) {
        findings.violation(why);
        return Err(RestError::invalid_to(to));
    }
    let to_is_phone = is_e164(to);
    if !to_is_phone && !is_sip_uri(to) && !is_client(to) {
        // An operator's typo is not the service's fault: an error, not a violation.
        return Err(RestError::invalid_to(to));
    }
    if let Some(why) = plus_as_space("From", from) {
        findings.violation(why);
        return Err(RestError::invalid_from(from));
    }
    if to_is_phone && !is_e164(from) {
        return Err(RestError::invalid_from(from));
    }
    if from.is_empty() || from.chars().any(char::is_whitespace) {
        return Err(RestError::invalid_from(from));
    }
    if is_e164(from) && !numbers.iter().any(|n| n == from) {
        return Err(RestError::unverified_from(from));
    }
    if let Some(why) = form
        .get("CallerId")
        .and_then(|id| plus_as_space("CallerId", id))
    {
        findings.violation(why);
    }
    let url = form.get("Url");
    let twiml = form.get("Twiml");
    let application_sid = form.get("ApplicationSid");
    let given: Vec<&str> = [
        ("Url", url),
        ("Twiml", twiml),
        ("ApplicationSid", application_sid),
    ]
    .iter()
    .filter(|(_, v)| v.is_some())
    .map(|(n, _)| *n)
    .collect();
    match given.len() {
        0 => return Err(findings.refuse(RestError::url_required())),
        1 => {}
        _ => {
            return Err(findings.refuse(RestError::invalid_parameter(format!(
                "{} are mutually exclusive: give one of Url, Twiml, ApplicationSid",
                given.join(" and ")
            ))))
        }
    }
    let url = check_url(form, "Url", findings)?;
    let twiml = match twiml {
        Some(xml) => {
            let ids = CallerIds { from, to, numbers };
            Some((xml.to_owned(), judge_twiml(xml, ids, findings)?))
        }
        None => None,
    };
    check_method(form, "Method", findings)?;
    check_method(form, "FallbackMethod", findings)?;
    check_method(form, "StatusCallbackMethod", findings)?;
    check_method(form, "AsyncAmdStatusCallbackMethod", findings)?;
    check_url(form, "FallbackUrl", findings)?;
    let status_callback = check_url(form, "StatusCallback", findings)?;
    check_url(form, "AsyncAmdStatusCallback", findings)?;
    check_seconds(form, "TimeLimit", findings)?;
    check_seconds(form, "MachineDetectionTimeout", findings)?;
    let events: Vec<String> = form
        .all("StatusCallbackEvent")
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(bad) = events
        .iter()
        .find(|e| !STATUS_CALLBACK_EVENTS.contains(&e.as_str()))
    {
        return Err(findings.refuse(RestError::invalid_parameter(format!(
            "StatusCallbackEvent {bad:?} is not one of initiated, ringing, answered, completed \
             (repeat the parameter for several)"
        ))));
    }
    if !events.is_empty() && status_callback.is_none() {
        findings.violation("StatusCallbackEvent without StatusCallback: no event will be sent");
    }
    if form.get("Method").is_some() && url.is_none() {
        findings.violation("Method without Url: it only applies to Url");
    }
    let timeout = match check_seconds(form, "Timeout", findings)? {
        Some(t) if t > MAX_TIMEOUT_SECS => {
            findings.violation(format!(
                "Timeout={t}: at most {MAX_TIMEOUT_SECS} (Twilio caps it)"
            ));
            MAX_TIMEOUT_SECS
        }
        Some(t) => t,
        None => 60,
    };
    let machine_detection = form.get("MachineDetection").map(str::to_owned);
    if let Some(md) = &machine_detection {
        if md != "Enable" && md != "DetectMessageEnd" {
            return Err(findings.refuse(RestError::invalid_parameter(format!(
                "MachineDetection must be Enable or DetectMessageEnd, not {md:?}"
            ))));
        }
    }
    let async_amd = match form.get("AsyncAmd") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(findings.refuse(RestError::invalid_parameter(format!(
                "AsyncAmd must be true or false, not {other:?}"
            ))))
        }
    };
    Ok(NewCall {
        to: to.to_owned(),
        from: from.to_owned(),
        url,
        method: form.get("Method").unwrap_or("POST").to_owned(),
        twiml,
        application_sid: application_sid.map(str::to_owned),
        status_callback,
        status_callback_method: form
            .get("StatusCallbackMethod")
            .unwrap_or("POST")
            .to_owned(),
        status_callback_events: events,
        timeout,
        machine_detection,
        async_amd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const IDS: CallerIds<'static> = CallerIds {
        from: "+14155550123",
        to: "+18005550199",
        numbers: &[],
    };

    #[test]
    fn numbers_and_urls() {
        assert!(is_e164("+14155550142"));
        for bad in [
            "14155550142",
            "+",
            "+0123456789",
            "+1415555014212345",
            " 14155550142",
            "+1 415",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
        assert!(is_absolute_http_url("https://b.example/voice?cb=abc"));
        assert!(is_absolute_http_url("http://127.0.0.1:8080/x"));
        for bad in [
            "/voice",
            "voice",
            "https://",
            "ftp://x/y",
            "https://a b/c",
            "wss://x/m",
        ] {
            assert!(!is_absolute_http_url(bad), "{bad}");
        }
        assert!(plus_as_space("To", " 14155550142").is_some());
        assert!(plus_as_space("To", "+14155550142").is_none());
    }

    /// The transfer body of `twilio-rest.md` C, decoded, is a clean transfer.
    #[test]
    fn the_transfer_vector_is_accepted() {
        let raw = "Twiml=%3C%3Fxml+version%3D%221.0%22+encoding%3D%22UTF-8%22%3F%3E%3CResponse%3E%3CDial+callerId%3D%22%2B14155550123%22+answerOnBridge%3D%22true%22%3E%3CNumber%3E%2B15005550006%3C%2FNumber%3E%3C%2FDial%3E%3C%2FResponse%3E";
        let (decoded, problems) = super::super::http::decode_form(raw.as_bytes());
        assert!(problems.is_empty());
        assert_eq!(decoded[0].1.chars().count(), 147);
        let mut findings = Findings::default();
        let action = check_update(&Form::new(&decoded), IDS, &mut findings).unwrap();
        assert!(findings.violations.is_empty(), "{:?}", findings.violations);
        let UpdateAction::Twiml(_, twiml) = action else {
            panic!("{action:?}")
        };
        let dial = twiml.dial().unwrap();
        assert_eq!(dial.caller_id.as_deref(), Some("+14155550123"));
        assert_eq!(dial.answer_on_bridge, Some(true));
        assert_eq!(dial.target(), "+15005550006");
    }

    #[test]
    fn update_refusals() {
        for (form, code) in [
            (
                vec![("Status", "completed"), ("Twiml", "<Response/>")],
                20001,
            ),
            (
                vec![("Twiml", "<Response/>"), ("Url", "https://x/y")],
                20001,
            ),
            (vec![("Status", "Completed")], 20001),
            (vec![("Status", "completed"), ("TimeLimit", "0")], 20001),
            (vec![("Url", "/relative")], 21205),
            (vec![("Url", "https://x/y"), ("Method", "PUT")], 20001),
            (vec![("Twiml", "<Response><Say>x</Response>")], 12100),
        ] {
            let mut findings = Findings::default();
            let err = check_update(&Form::new(&pairs(&form)), IDS, &mut findings).unwrap_err();
            assert_eq!(err.code, code, "{form:?}: {err:?}");
            assert!(!findings.violations.is_empty(), "{form:?}");
        }
        let long = format!("<Response><Say>{}</Say></Response>", "a".repeat(4000));
        let mut findings = Findings::default();
        let err = check_update(&Form::new(&pairs(&[("Twiml", &long)])), IDS, &mut findings);
        assert_eq!(err.unwrap_err().code, 32018);
    }

    /// Exactly 4000 characters (not bytes) pass.
    #[test]
    fn the_limit_counts_characters() {
        let wrapper = "<Response><Say></Say></Response>".len();
        let text = "é".repeat(MAX_TWIML_CHARS - wrapper);
        let xml = format!("<Response><Say>{text}</Say></Response>");
        assert_eq!(xml.chars().count(), MAX_TWIML_CHARS);
        assert!(xml.len() > MAX_TWIML_CHARS);
        let mut findings = Findings::default();
        assert!(judge_twiml(&xml, IDS, &mut findings).is_ok());
    }

    #[test]
    fn call_log_notices() {
        for (xml, code) in [
            (
                r#"<Response><Dial action="/after">+15005550006</Dial></Response>"#,
                15004,
            ),
            ("<Response><Redirect>next</Redirect></Response>", 15004),
            (
                r#"<Response><Dial callerId="+19995550000">+15005550006</Dial></Response>"#,
                13214,
            ),
            (
                r#"<Response><Dial callerId=" 14155550123">+15005550006</Dial></Response>"#,
                13214,
            ),
            (
                r#"<Response><Dial><Sip>sip:a@b</Sip></Dial><Dial callerId="a b"><Sip>sip:a@b</Sip></Dial></Response>"#,
                13214,
            ),
            ("<Response><Dial>15005550006</Dial></Response>", 13223),
        ] {
            let mut findings = Findings::default();
            judge_twiml(xml, IDS, &mut findings).unwrap();
            assert_eq!(
                findings.notices.iter().map(|n| n.0).collect::<Vec<_>>(),
                [code],
                "{xml}"
            );
            assert_eq!(findings.violations.len(), 1, "{xml}");
        }
        let mut findings = Findings::default();
        let ok = r#"<Response><Dial callerId="+18005550199"><Number>+15005550006</Number></Dial><Dial callerId="bridge.desk_1"><Sip>sip:a@b</Sip></Dial></Response>"#;
        judge_twiml(ok, IDS, &mut findings).unwrap();
        assert!(findings.violations.is_empty(), "{:?}", findings.violations);
    }

    #[test]
    fn unknown_and_repeated_names() {
        let mut findings = Findings::default();
        let form = pairs(&[
            ("status", "completed"),
            ("TimeLimit", "5"),
            ("TimeLimit", "6"),
        ]);
        assert_eq!(
            check_update(&Form::new(&form), IDS, &mut findings).unwrap(),
            UpdateAction::Nothing
        );
        assert_eq!(findings.violations.len(), 2, "{:?}", findings.violations);
        assert!(findings.violations[0].contains("`Status`"));
    }

    /// The create body of `twilio-rest.md` F.
    #[test]
    fn the_create_vector_is_accepted() {
        let raw = "To=%2B14155550142&From=%2B18005550100&Url=https%3A%2F%2Fbridge.example.com%2Fvoice%3Fcb%3Dabc&Method=POST&StatusCallback=https%3A%2F%2Fbridge.example.com%2Ftwilio%2Fcall-status&StatusCallbackEvent=initiated&StatusCallbackEvent=answered&StatusCallbackEvent=completed&Timeout=30";
        let (decoded, _) = super::super::http::decode_form(raw.as_bytes());
        let mut findings = Findings::default();
        let numbers = ["+18005550100".to_owned()];
        let call = check_create(&Form::new(&decoded), &numbers, &mut findings).unwrap();
        assert!(findings.violations.is_empty(), "{:?}", findings.violations);
        assert_eq!(
            call.url.as_deref(),
            Some("https://bridge.example.com/voice?cb=abc")
        );
        assert_eq!(
            call.status_callback_events,
            ["initiated", "answered", "completed"]
        );
        assert_eq!(call.timeout, 30);
    }

    #[test]
    fn create_refusals() {
        let numbers = ["+18005550100".to_owned()];
        let url = ("Url", "https://b.example/voice");
        for (form, code, violation) in [
            (vec![("From", "+18005550100"), url], 21201, true),
            (vec![("To", "+14155550142"), url], 21213, true),
            (
                vec![("To", " 14155550142"), ("From", "+18005550100"), url],
                21211,
                true,
            ),
            (
                vec![("To", "12345"), ("From", "+18005550100"), url],
                21211,
                false,
            ),
            (
                vec![("To", "+14155550142"), ("From", " 18005550100"), url],
                21212,
                true,
            ),
            (
                vec![("To", "+14155550142"), ("From", "Acme"), url],
                21212,
                false,
            ),
            (
                vec![("To", "+14155550142"), ("From", "+18005550111"), url],
                21210,
                false,
            ),
            (
                vec![("To", "+14155550142"), ("From", "+18005550100")],
                21205,
                true,
            ),
            (
                vec![
                    ("To", "+14155550142"),
                    ("From", "+18005550100"),
                    ("Url", "/voice"),
                ],
                21205,
                true,
            ),
            (
                vec![
                    ("To", "+14155550142"),
                    ("From", "+18005550100"),
                    url,
                    ("Twiml", "<Response/>"),
                ],
                20001,
                true,
            ),
            (
                vec![
                    ("To", "+14155550142"),
                    ("From", "+18005550100"),
                    url,
                    ("StatusCallbackEvent", "initiated answered"),
                ],
                20001,
                true,
            ),
        ] {
            let mut findings = Findings::default();
            let err = check_create(&Form::new(&pairs(&form)), &numbers, &mut findings).unwrap_err();
            assert_eq!(err.code, code, "{form:?}: {err:?}");
            assert_eq!(
                !findings.violations.is_empty(),
                violation,
                "{form:?}: {:?}",
                findings.violations
            );
        }
        let mut findings = Findings::default();
        let sip = pairs(&[
            ("To", "sip:agent@pbx.example.com"),
            ("From", "+18005550100"),
            url,
        ]);
        assert!(check_create(&Form::new(&sip), &numbers, &mut findings).is_ok());
    }
}
