//! One request, from the checks to the effect, in Twilio's order: authentication, the path
//! (account, `.json`), the test's injected failures, the form body, then update, create, fetch
//! or list on the call state. Returns the answer and records the request, its violations and
//! its call-log notices.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    calls::{self, Call, CallStatus},
    errors::RestError,
    http::{self, Request, Response},
    outbound,
    rules::{self, CallerIds, Findings, Form, Notice, UpdateAction},
    server::{Shared, State},
    CallEvent, RecordedRequest,
};
use crate::lock;

/// The versioned prefix every Calls path starts with.
const API_PREFIX: &str = "/2010-04-01/Accounts/";

/// The answer's format: `.json`, or XML for a path without the suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Xml,
}

/// A path under `/2010-04-01/Accounts/`.
#[derive(Debug)]
struct Route {
    account_sid: String,
    /// `None` for `…/Calls.json`.
    call_sid: Option<String>,
    format: Format,
}

/// Reads `/2010-04-01/Accounts/{AccountSid}/Calls[/{CallSid}](.json|.xml|)`.
fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix(API_PREFIX)?;
    let mut parts = rest.split('/');
    let account_sid = parts.next()?.to_owned();
    let calls = parts.next()?;
    let call = parts.next();
    if parts.next().is_some() || account_sid.is_empty() {
        return None;
    }
    let split = |segment: &str| -> Option<(String, Format)> {
        match segment.rsplit_once('.') {
            Some((name, "json")) => Some((name.to_owned(), Format::Json)),
            Some((name, "xml")) => Some((name.to_owned(), Format::Xml)),
            Some(_) => None,
            None => Some((segment.to_owned(), Format::Xml)),
        }
    };
    match call {
        None => {
            let (name, format) = split(calls)?;
            (name == "Calls").then_some(Route {
                account_sid,
                call_sid: None,
                format,
            })
        }
        Some(call) => {
            let (sid, format) = split(call)?;
            (calls == "Calls" && !sid.is_empty()).then_some(Route {
                account_sid,
                call_sid: Some(sid),
                format,
            })
        }
    }
}

/// What a request gets: a resource (status, JSON) or an error, in a format.
struct Outcome {
    format: Format,
    result: Result<(u16, Value), RestError>,
    /// Extra headers (`WWW-Authenticate`, `Retry-After`, …).
    headers: Vec<(String, String)>,
}

impl Outcome {
    fn error(format: Format, error: RestError) -> Outcome {
        let mut headers = Vec::new();
        if error.status == 401 {
            headers.push((
                "WWW-Authenticate".into(),
                "Basic realm=\"Twilio API\"".into(),
            ));
        }
        Outcome {
            format,
            result: Err(error),
            headers,
        }
    }

    fn ok(format: Format, status: u16, body: Value) -> Outcome {
        Outcome {
            format,
            result: Ok((status, body)),
            headers: Vec::new(),
        }
    }
}

/// Answers one request: records it, applies it, and says how long to hold the answer.
pub(crate) fn handle(
    shared: &Arc<Shared>,
    req: &Request,
    in_flight: usize,
) -> (Response, Duration) {
    let mut record = RecordedRequest {
        at: Instant::now(),
        method: req.method.clone(),
        path: req.target.clone(),
        call_sid: None,
        form: Vec::new(),
        auth_user: None,
        content_type: req.header("content-type").map(str::to_owned),
        raw_body: String::from_utf8_lossy(&req.body).into_owned(),
        status: 0,
        error_code: None,
    };
    let mut findings = Findings::default();
    let (outcome, call_for_notices) = process(shared, req, &mut record, in_flight, &mut findings);
    let (status, content_type, body) = match (&outcome.result, outcome.format) {
        (Ok((status, value)), Format::Json) => (
            *status,
            "application/json; charset=utf-8",
            value.to_string(),
        ),
        (Ok((status, value)), Format::Xml) => {
            let root = if record.call_sid.is_some() {
                "Call"
            } else {
                "Calls"
            };
            (
                *status,
                "application/xml; charset=utf-8",
                calls::to_xml(value, root),
            )
        }
        (Err(e), Format::Json) => (e.status, "application/json; charset=utf-8", e.to_json()),
        (Err(e), Format::Xml) => (e.status, "application/xml; charset=utf-8", e.to_xml()),
    };
    record.status = status;
    record.error_code = outcome.result.as_ref().err().map(|e| e.code);
    let mut headers = vec![("Twilio-Request-Id".to_owned(), calls::new_sid("RQ"))];
    headers.extend(outcome.headers);
    let answer = Response {
        status,
        content_type,
        headers,
        body,
        close: !req.keep_alive(),
    };
    {
        let mut st = lock(&shared.state);
        for message in findings.violations {
            st.violations
                .push(format!("{} {}: {message}", req.method, req.target));
        }
        if let Some(sid) = call_for_notices {
            for (code, message) in findings.notices {
                st.notices.push(Notice {
                    call_sid: sid.clone(),
                    code,
                    message,
                });
            }
        }
        st.requests.push(record);
    }
    shared.bump();
    let delay = lock(&shared.controls).delay;
    (answer, delay)
}

/// The checks in Twilio's order, then the effect. Returns the outcome and the call SID the
/// request's call-log notices belong to.
fn process(
    shared: &Arc<Shared>,
    req: &Request,
    record: &mut RecordedRequest,
    in_flight: usize,
    findings: &mut Findings,
) -> (Outcome, Option<String>) {
    let path = req.path();
    // Known before anything is checked, so that refused requests show under their call too.
    record.call_sid = route(path).and_then(|r| r.call_sid);
    if req.version == "HTTP/1.1" && req.header("host").is_none() {
        findings.violation("no Host header (required in HTTP/1.1)");
    }
    // Authentication first: Twilio answers 401 before it looks at the path.
    let Some(header) = req.header("authorization") else {
        findings
            .violation("no Authorization header (HTTP Basic with the Account SID or an API key)");
        return (
            Outcome::error(Format::Json, RestError::authenticate()),
            None,
        );
    };
    let (user, password) = match http::basic_credentials(header) {
        Ok(pair) => pair,
        Err(why) => {
            findings.violation(why);
            return (
                Outcome::error(Format::Json, RestError::authenticate()),
                None,
            );
        }
    };
    record.auth_user = Some(user.clone());
    let account = &shared.account;
    if !account.accepts(&user, &password) {
        // Wrong credentials are a configuration a test may set up on purpose: no violation.
        return (
            Outcome::error(Format::Json, RestError::authenticate()),
            None,
        );
    }
    let Some(route) = route(path) else {
        findings.violation(format!(
            "no such resource: {path} (expected {API_PREFIX}{{AccountSid}}/Calls[/{{CallSid}}].json)"
        ));
        return (
            Outcome::error(Format::Json, RestError::not_found(path)),
            None,
        );
    };
    let format = route.format;
    if route.account_sid != account.account_sid {
        findings.violation(format!(
            "the path names account {} but the credentials are for {}",
            route.account_sid, account.account_sid
        ));
        return (Outcome::error(format, RestError::authenticate()), None);
    }
    if format == Format::Xml {
        findings.violation(format!("{path} does not end in .json: Twilio answers XML"));
    }
    if let Some(outcome) = injected(shared, format, in_flight) {
        return (outcome, None);
    }
    let form = if req.method == "POST" {
        form_of(req, findings)
    } else {
        Vec::new()
    };
    record.form = form.clone();
    let form = Form::new(&form);
    match (req.method.as_str(), route.call_sid) {
        ("GET", Some(sid)) => (fetch(shared, &sid, path, format, findings), Some(sid)),
        ("POST", Some(sid)) => (
            update(shared, &sid, path, format, &form, findings),
            Some(sid),
        ),
        ("POST", None) => create(shared, format, &form, findings),
        ("GET", None) => {
            let st = lock(&shared.state);
            let mut all: Vec<&Call> = st.calls.values().collect();
            all.sort_by(|a, b| a.sid.cmp(&b.sid));
            let list = calls::list_resource(&all, &account.account_sid);
            (Outcome::ok(format, 200, list), None)
        }
        (method, _) => {
            findings.violation(format!("{method} is not a method of {path}"));
            (
                Outcome::error(format, RestError::method_not_allowed(method)),
                None,
            )
        }
    }
}

/// The test's injected failures, if one applies to this request.
fn injected(shared: &Shared, format: Format, in_flight: usize) -> Option<Outcome> {
    let mut controls = lock(&shared.controls);
    if let Some(error) = controls.fail_next.pop_front() {
        return Some(Outcome::error(format, error));
    }
    let limited = controls.rate_limit.is_some_and(|limit| in_flight > limit);
    if controls.fail_429 > 0 || limited {
        if !limited {
            controls.fail_429 -= 1;
        }
        let mut outcome = Outcome::error(format, RestError::too_many_requests());
        outcome
            .headers
            .push(("Twilio-Concurrent-Requests".into(), in_flight.to_string()));
        if let Some(secs) = controls.retry_after {
            outcome
                .headers
                .push(("Retry-After".into(), secs.to_string()));
        }
        return Some(outcome);
    }
    None
}

/// The form parameters of a POST. Twilio reads only form bodies: any other body leaves the
/// request without parameters.
fn form_of(req: &Request, findings: &mut Findings) -> Vec<(String, String)> {
    let content_type = req.header("content-type");
    let is_form = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    if !is_form {
        if !req.body.is_empty() || content_type.is_some() {
            findings.violation(format!(
                "body with Content-Type {content_type:?} is not read (Twilio takes \
                 application/x-www-form-urlencoded): the request has no parameters"
            ));
        }
        return Vec::new();
    }
    let (pairs, problems) = http::decode_form(&req.body);
    for problem in problems {
        findings.violation(format!("form body: {problem}"));
    }
    pairs
}

/// `GET …/Calls/{sid}.json`.
fn fetch(
    shared: &Shared,
    sid: &str,
    path: &str,
    format: Format,
    findings: &mut Findings,
) -> Outcome {
    let st = lock(&shared.state);
    match st.calls.get(sid) {
        Some(call) => Outcome::ok(format, 200, call.resource(&shared.account.account_sid)),
        None => {
            findings.violation(unknown_call(sid));
            Outcome::error(format, RestError::not_found(path))
        }
    }
}

fn unknown_call(sid: &str) -> String {
    format!(
        "no call {sid} (never registered with add_live_call nor created{})",
        if calls::is_call_sid(sid) {
            ""
        } else {
            "; not even a CA + 32 hex SID"
        }
    )
}

/// `POST …/Calls/{sid}.json` (C).
fn update(
    shared: &Arc<Shared>,
    sid: &str,
    path: &str,
    format: Format,
    form: &Form<'_>,
    findings: &mut Findings,
) -> Outcome {
    let mut st = lock(&shared.state);
    let numbers = st.numbers.clone();
    let Some(call) = st.calls.get(sid) else {
        findings.violation(unknown_call(sid));
        return Outcome::error(format, RestError::not_found(path));
    };
    let (from, to, status) = (call.from.clone(), call.to.clone(), call.status);
    let ids = CallerIds {
        from: &from,
        to: &to,
        numbers: &numbers,
    };
    let action = match rules::check_update(form, ids, findings) {
        Ok(action) => action,
        Err(error) => return Outcome::error(format, error),
    };
    let unanswered = matches!(status, CallStatus::Queued | CallStatus::Ringing);
    let mut callback = false;
    let event = match action {
        // The hang-up race (D): the far side hung up first. Normal, not a violation.
        UpdateAction::Complete | UpdateAction::Cancel if status.is_ended() => {
            return Outcome::error(format, RestError::not_found(path))
        }
        UpdateAction::Twiml(..) | UpdateAction::Url { .. } if status != CallStatus::InProgress => {
            return Outcome::error(format, RestError::not_in_progress())
        }
        UpdateAction::Cancel if !unanswered => {
            findings.violation(
                "Status=canceled does nothing to an answered call (hang up with \
                 Status=completed)",
            );
            None
        }
        // A call that was never answered ends `canceled` either way (it is not charged).
        UpdateAction::Complete | UpdateAction::Cancel if unanswered => {
            set_status(&mut st, sid, CallStatus::Canceled, &mut callback);
            Some(CallEvent::Canceled { sid: sid.into() })
        }
        UpdateAction::Complete | UpdateAction::Cancel => {
            set_status(&mut st, sid, CallStatus::Completed, &mut callback);
            Some(CallEvent::Completed { sid: sid.into() })
        }
        UpdateAction::Twiml(xml, twiml) => {
            if let Some(call) = st.calls.get_mut(sid) {
                call.twiml_updates.push(xml);
                call.date_updated = calls::now_rfc2822();
            }
            Some(CallEvent::Redirected {
                sid: sid.into(),
                twiml,
            })
        }
        UpdateAction::Url { url, method } => {
            if let Some(call) = st.calls.get_mut(sid) {
                call.url_updates.push((url.clone(), method.clone()));
                call.date_updated = calls::now_rfc2822();
            }
            Some(CallEvent::RedirectedToUrl {
                sid: sid.into(),
                url,
                method,
            })
        }
        UpdateAction::Nothing => {
            findings.violation("an update with none of Status, Twiml, Url changes nothing");
            None
        }
    };
    let resource = st
        .calls
        .get(sid)
        .map(|c| c.resource(&shared.account.account_sid));
    if let Some(event) = event {
        shared.emit(&mut st, event);
    }
    drop(st);
    if callback {
        tokio::spawn(outbound::status_callback(shared.clone(), sid.to_owned()));
    }
    match resource {
        Some(resource) => Outcome::ok(format, 200, resource),
        None => Outcome::error(format, RestError::not_found(path)),
    }
}

/// Ends `sid` with `status`; `callback` is set when the call has a status callback to post.
fn set_status(st: &mut State, sid: &str, status: CallStatus, callback: &mut bool) {
    if let Some(call) = st.calls.get_mut(sid) {
        call.set_status(status);
        *callback = call.status_callback.is_some();
    }
}

/// `POST …/Calls.json` (F).
fn create(
    shared: &Shared,
    format: Format,
    form: &Form<'_>,
    findings: &mut Findings,
) -> (Outcome, Option<String>) {
    let mut st = lock(&shared.state);
    let numbers = st.numbers.clone();
    let new = match rules::check_create(form, &numbers, findings) {
        Ok(new) => new,
        Err(error) => return (Outcome::error(format, error), None),
    };
    let sid = calls::new_sid("CA");
    let call = Call::created(&sid, new);
    let resource = call.resource(&shared.account.account_sid);
    let event = CallEvent::Created {
        sid: sid.clone(),
        from: call.from.clone(),
        to: call.to.clone(),
    };
    st.calls.insert(sid.clone(), call);
    st.created.push(sid.clone());
    shared.emit(&mut st, event);
    (Outcome::ok(format, 201, resource), Some(sid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = route("/2010-04-01/Accounts/AC1/Calls/CA1.json").unwrap();
        assert_eq!(
            (r.account_sid.as_str(), r.call_sid.as_deref(), r.format),
            ("AC1", Some("CA1"), Format::Json)
        );
        let r = route("/2010-04-01/Accounts/AC1/Calls.json").unwrap();
        assert_eq!((r.call_sid, r.format), (None, Format::Json));
        assert_eq!(
            route("/2010-04-01/Accounts/AC1/Calls/CA1").unwrap().format,
            Format::Xml
        );
        assert_eq!(
            route("/2010-04-01/Accounts/AC1/Calls").unwrap().format,
            Format::Xml
        );
        for bad in [
            "/2010-04-01/Accounts/AC1/Calls/CA1.csv",
            "/2010-04-01/Accounts/AC1/Calls/CA1/Recordings.json",
            "/2010-04-01/Accounts/AC1/Messages.json",
            "/2010-04-01/Accounts//Calls.json",
            "/2010-04-01/Accounts/AC1/Calls/.json",
            "/2010-04-01/Accounts/AC1/Calls/CA1.json/",
            "/v1/Calls.json",
            "/2010-04-01/Accounts/AC1/calls/CA1.json",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
    }
}
