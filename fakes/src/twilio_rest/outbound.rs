//! What Twilio sends back to the service for a created call (`twilio-rest.md` F, I): the voice
//! webhook when the callee answers (the call's `Url`, with `Direction=outbound-api`), and the
//! status callbacks (`StatusCallback`, the events it subscribed to, and always the final
//! status). Both are signed with the auth token over the exact URL (A5): a `POST` over the URL
//! and its sorted form parameters, a `GET` over the URL with the parameters in its query.
//!
//! The test plays the callee: [`FakeTwilioRest::ring_created_call`],
//! [`FakeTwilioRest::answer_created_call`], [`FakeTwilioRest::complete_created_call`].

use std::sync::Arc;

use super::{
    calls::{self, Call, CallStatus, Direction},
    server::Shared,
    CallEvent, FakeTwilioRest, SentWebhook, WebhookKind,
};
use crate::{
    lock,
    twilio::compute_signature,
    twiml::{self, Twiml},
    webhook::{self, Answer, Signing},
};

/// The parameters every call webhook carries.
fn call_params(call: &Call, account_sid: &str, call_status: &str) -> Vec<(String, String)> {
    [
        ("AccountSid", account_sid),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", &call.sid),
        ("CallStatus", call_status),
        ("Called", &call.to),
        ("Caller", &call.from),
        ("Direction", call.direction.as_str()),
        ("From", &call.from),
        ("To", &call.to),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A status callback's form for `call_status` (`initiated`, `ringing`, `in-progress`, or a
/// final status), with the call's next sequence number.
fn status_params(call: &mut Call, account_sid: &str, call_status: &str) -> Vec<(String, String)> {
    let mut params = call_params(call, account_sid, call_status);
    params.push(("CallbackSource".into(), "call-progress-events".into()));
    params.push(("SequenceNumber".into(), call.callback_sequence.to_string()));
    params.push(("Timestamp".into(), calls::now_rfc2822()));
    call.callback_sequence += 1;
    if call.status.is_ended() {
        let seconds = call.duration.unwrap_or(0);
        params.push(("CallDuration".into(), seconds.to_string()));
        if call.status == CallStatus::Completed {
            // `Duration` is in whole minutes, rounded up.
            params.push(("Duration".into(), seconds.div_ceil(60).max(1).to_string()));
        }
    }
    params
}

/// `url` with `params` appended to its query string.
fn with_query(url: &str, params: &[(String, String)]) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// Where a webhook to `url` goes: `url` itself, or its path and query on `host`.
fn delivery(url: &str, host: Option<&str>) -> Result<String, String> {
    let Some(host) = host else {
        return Ok(url.to_owned());
    };
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{url} is not an absolute URL"))?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    Ok(format!("http://{host}{path}"))
}

/// Sends one signed webhook for `call_sid` and records it. An answer that is not 2xx (or none)
/// is what Twilio logs as 11200, and a violation: the fake signs correctly.
async fn send(
    shared: &Arc<Shared>,
    call_sid: &str,
    kind: WebhookKind,
    url: &str,
    method: &str,
    params: Vec<(String, String)>,
) -> Result<Answer, String> {
    let token = shared.account.auth_token.clone();
    let (signed_url, form) = if method == "GET" {
        (with_query(url, &params), Vec::new())
    } else {
        (url.to_owned(), params.clone())
    };
    let signature = compute_signature(&token, &signed_url, &form);
    let signing = Signing {
        auth_token: Some(token),
        signed_url: Some(signed_url.clone()),
    };
    let target = delivery(&signed_url, shared.webhook_host().as_deref());
    let result = match &target {
        Ok(target) if method == "GET" => webhook::get(target, &signing).await,
        Ok(target) => webhook::post_form(target, &form, &signing).await,
        Err(why) => Err(why.clone()),
    };
    let status = result.as_ref().map(|a| a.status).map_err(Clone::clone);
    if !matches!(status, Ok(200..=299)) {
        let what = match &status {
            Ok(code) => format!("answered HTTP {code}"),
            Err(why) => why.clone(),
        };
        let message = format!("{kind:?} {method} {signed_url}: {what}");
        let mut st = lock(&shared.state);
        shared.notice(&mut st, call_sid, 11200, message.clone());
        shared.violate(
            &mut st,
            format!("[webhook] {message} (a correctly signed Twilio webhook was refused)"),
        );
    }
    shared.record_webhook(SentWebhook {
        call_sid: call_sid.to_owned(),
        kind,
        method: method.to_owned(),
        url: signed_url,
        delivered_to: target.unwrap_or_default(),
        params,
        signature,
        result: status,
    });
    result
}

/// Posts `call_sid`'s status callback for its current status, if it has a `StatusCallback`
/// (`Ok(None)` when it has none).
pub(crate) async fn status_callback(
    shared: Arc<Shared>,
    call_sid: String,
) -> Result<Option<Answer>, String> {
    let prepared = {
        let mut st = lock(&shared.state);
        let call = st
            .calls
            .get_mut(&call_sid)
            .ok_or_else(|| format!("no call {call_sid}"))?;
        let status = call.status.as_str();
        call.status_callback.clone().map(|url| {
            let method = call.status_callback_method.clone();
            (
                url,
                method,
                status_params(call, &shared.account.account_sid, status),
            )
        })
    };
    let Some((url, method, params)) = prepared else {
        return Ok(None);
    };
    send(
        &shared,
        &call_sid,
        WebhookKind::StatusCallback,
        &url,
        &method,
        params,
    )
    .await
    .map(Some)
}

/// Posts the progress callback for `event` (`initiated`, `ringing`, `answered`) if the call
/// subscribed to it.
async fn progress_callback(
    shared: &Arc<Shared>,
    call_sid: &str,
    event: &str,
    call_status: &str,
) -> Result<(), String> {
    let prepared = {
        let mut st = lock(&shared.state);
        let call = st
            .calls
            .get_mut(call_sid)
            .ok_or_else(|| format!("no call {call_sid}"))?;
        match &call.status_callback {
            Some(url) if call.status_callback_events.iter().any(|e| e == event) => {
                let (url, method) = (url.clone(), call.status_callback_method.clone());
                Some((
                    url,
                    method,
                    status_params(call, &shared.account.account_sid, call_status),
                ))
            }
            _ => None,
        }
    };
    if let Some((url, method, params)) = prepared {
        send(
            shared,
            call_sid,
            WebhookKind::StatusCallback,
            &url,
            &method,
            params,
        )
        .await?;
    }
    Ok(())
}

impl FakeTwilioRest {
    /// The created call `call_sid` starts ringing: `queued` → `ringing`, with the `initiated`
    /// and `ringing` status callbacks if the call subscribed to them.
    pub async fn ring_created_call(&self, call_sid: &str) -> Result<(), String> {
        let shared = self.shared().clone();
        {
            let mut st = lock(&shared.state);
            let call = created_call(&mut st.calls, call_sid)?;
            if call.status != CallStatus::Queued {
                return Err(format!(
                    "{call_sid} is {}, not queued",
                    call.status.as_str()
                ));
            }
            call.set_status(CallStatus::Ringing);
        }
        progress_callback(&shared, call_sid, "initiated", "initiated").await?;
        progress_callback(&shared, call_sid, "ringing", "ringing").await
    }

    /// The callee answers the created call `call_sid`: it becomes `in-progress`, Twilio requests
    /// its `Url` (signed, `Direction=outbound-api`, `CallStatus=in-progress`; a `GET` carries
    /// the parameters in the query) and runs the TwiML it gets, returned here read strictly so
    /// the test can open the media stream with its `<Parameter>`s. A call created with `Twiml`
    /// returns that document without a request. Then the `answered` status callback, if the
    /// call subscribed to it.
    pub async fn answer_created_call(&self, call_sid: &str) -> Result<Twiml, String> {
        let shared = self.shared().clone();
        let call = {
            let mut st = lock(&shared.state);
            let call = created_call(&mut st.calls, call_sid)?;
            if !matches!(call.status, CallStatus::Queued | CallStatus::Ringing) {
                return Err(format!(
                    "{call_sid} is {}: only a queued or ringing call can be answered",
                    call.status.as_str()
                ));
            }
            call.set_status(CallStatus::InProgress);
            let snapshot = call.clone();
            shared.emit(
                &mut st,
                CallEvent::Answered {
                    sid: call_sid.to_owned(),
                },
            );
            snapshot
        };
        let twiml = match (&call.twiml, &call.url) {
            (Some(xml), _) => twiml::parse(xml)?,
            (None, Some(url)) => {
                let mut params = call_params(&call, &shared.account.account_sid, "in-progress");
                if call.machine_detection.is_some() && !call.async_amd {
                    params.push(("AnsweredBy".into(), "human".into()));
                }
                let answer = send(
                    &shared,
                    call_sid,
                    WebhookKind::Voice,
                    url,
                    &call.method,
                    params,
                )
                .await?;
                webhook::twiml_answer(url, &answer)?
            }
            (None, None) => {
                return Err(format!(
                    "{call_sid} was created with an ApplicationSid: the fake has no application \
                     to fetch TwiML from"
                ))
            }
        };
        progress_callback(&shared, call_sid, "answered", "in-progress").await?;
        Ok(twiml)
    }

    /// The created call `call_sid` ends with `status` on the far side: `completed` after an
    /// answer; `busy`, `no-answer`, `failed` or `canceled` before one. Twilio then posts the
    /// status callback (always, for a final status) when the call has a `StatusCallback`: its
    /// answer is returned (`None` without one). Its media stream ends too
    /// ([`CallEvent::Ended`]).
    pub async fn complete_created_call(
        &self,
        call_sid: &str,
        status: CallStatus,
    ) -> Result<Option<Answer>, String> {
        let shared = self.shared().clone();
        {
            let mut st = lock(&shared.state);
            let call = created_call(&mut st.calls, call_sid)?;
            let answered = call.status == CallStatus::InProgress;
            let allowed = match status {
                CallStatus::Completed => answered,
                CallStatus::Busy
                | CallStatus::NoAnswer
                | CallStatus::Failed
                | CallStatus::Canceled => {
                    matches!(call.status, CallStatus::Queued | CallStatus::Ringing)
                }
                _ => false,
            };
            if !allowed {
                return Err(format!(
                    "{call_sid} is {}: it cannot end {}",
                    call.status.as_str(),
                    status.as_str()
                ));
            }
            call.set_status(status);
            shared.emit(
                &mut st,
                CallEvent::Ended {
                    sid: call_sid.to_owned(),
                    status,
                },
            );
        }
        status_callback(shared, call_sid.to_owned()).await
    }
}

/// The created (outbound-api) call `call_sid`.
fn created_call<'a>(
    calls: &'a mut std::collections::HashMap<String, Call>,
    call_sid: &str,
) -> Result<&'a mut Call, String> {
    match calls.get_mut(call_sid) {
        Some(call) if call.direction == Direction::OutboundApi => Ok(call),
        Some(_) => Err(format!("{call_sid} is an inbound call, not a created one")),
        None => Err(format!("no call {call_sid}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_keeps_path_and_query() {
        assert_eq!(
            delivery(
                "https://bridge.example.com/voice?cb=abc",
                Some("127.0.0.1:9")
            )
            .unwrap(),
            "http://127.0.0.1:9/voice?cb=abc"
        );
        assert_eq!(
            delivery("http://127.0.0.1:1/s", None).unwrap(),
            "http://127.0.0.1:1/s"
        );
        assert_eq!(
            delivery("https://h.example", Some("127.0.0.1:9")).unwrap(),
            "http://127.0.0.1:9/"
        );
    }

    #[test]
    fn get_parameters_go_in_the_query() {
        let params = vec![("To".to_owned(), "+1415".to_owned())];
        assert_eq!(with_query("https://h/v", &params), "https://h/v?To=%2B1415");
        assert_eq!(
            with_query("https://h/v?cb=1", &params),
            "https://h/v?cb=1&To=%2B1415"
        );
    }
}
