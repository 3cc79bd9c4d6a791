//! HTTP routes: the Twilio voice webhook, the Media Streams websocket, and inspection.
//!
//! | route | what |
//! |---|---|
//! | `POST /voice` | Twilio voice webhook → TwiML `<Connect><Stream>` |
//! | `GET /media-stream` | Twilio Media Streams websocket (one call per connection) |
//! | `GET /health` | liveness, upstream in use, live call count, ended calls by reason |
//! | `GET /ready` | 200 while new calls are taken, 503 while draining |
//! | `GET /calls` | every live call |
//! | `GET /calls/{call_sid}` | one live call with its transcript |
//! | `GET /calls/{call_sid}/events`, `GET /events` | live events (Server-Sent Events) of one call, of all |
//! | `GET /metrics` | Prometheus metrics |
//! | `POST /login`, `/logout` | the dashboard's sign-in: the admin token for a session cookie |
//! | `GET /` | the operator dashboard (static files; its data from the routes above) |

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use callbridge_actors::config::OpenAiApi;
use callbridge_actors::engine::PendingOutbound;
use callbridge_actors::messages::{CallControl, ControlRefused};
use callbridge_actors::protocol::{signature, twilio, twiml};
use callbridge_actors::registry::ControlCall;
use callbridge_actors::twilio_rest::CreateCall;
use callbridge_actors::{CallCount, EndedCalls, Engine, GetCall, ListCalls, UpstreamKind};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::settings::Settings;

/// Path of the Media Streams websocket, as the TwiML points Twilio at it.
pub const MEDIA_STREAM_PATH: &str = "/media-stream";

/// Shared by every worker.
pub struct AppState {
    pub engine: Engine,
    /// End-of-call reports, when `report.url` is set.
    pub reporter: Option<actix::Addr<callbridge_actors::report::Reporter>>,
    pub settings: Arc<Settings>,
    pub started: Instant,
    /// The dashboard's sign-ins (`POST /login`).
    pub sessions: crate::admin::Sessions,
}

/// An HTTP error with a JSON body; the message never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `X-Twilio-Signature` missing or wrong.
    #[error("invalid or missing X-Twilio-Signature")]
    BadSignature,
    /// `/calls` needs the admin token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// No admin token is set, and `/calls` then answers the local host only.
    #[error(
        "no admin token is set: /calls answers only the local host (set CALLBRIDGE_ADMIN_TOKEN)"
    )]
    LoopbackOnly,
    /// No live call with that SID.
    #[error("no live call {0}")]
    CallNotFound(String),
    /// A request whose content is not what Twilio sends.
    #[error("{0}")]
    BadRequest(&'static str),
    /// A transfer target `call.transfer_allow` does not allow.
    #[error("{0}")]
    Forbidden(String),
    /// The call cannot take the command now.
    #[error("{0}")]
    Conflict(String),
    /// What the command needs is not configured.
    #[error("{0}")]
    Unavailable(String),
    /// The registry did not answer.
    #[error("call registry unavailable")]
    RegistryUnavailable,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadSignature => StatusCode::FORBIDDEN,
            ApiError::Unauthorized | ApiError::LoopbackOnly => StatusCode::UNAUTHORIZED,
            ApiError::CallNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RegistryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(json!({"error": self.to_string()}))
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/voice", web::post().to(voice))
        .route(MEDIA_STREAM_PATH, web::get().to(media_stream))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/voice/status", web::post().to(outbound_status))
        .route("/calls", web::get().to(list_calls))
        .route("/calls", web::post().to(place_call))
        .route("/calls/{call_sid}", web::get().to(get_call))
        .route("/calls/{call_sid}/hangup", web::post().to(hangup))
        .route("/calls/{call_sid}/transfer", web::post().to(transfer))
        .route("/calls/{call_sid}/say", web::post().to(say))
        .route("/calls/{call_sid}/events", web::get().to(call_events))
        .route("/events", web::get().to(all_events))
        .route("/metrics", web::get().to(metrics))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout))
        .configure(crate::dashboard::configure);
}

/// The form parameters of a webhook Twilio signed: the signature covers the full URL Twilio
/// requested (query included) and the parameters.
fn signed_form(
    req: &HttpRequest,
    state: &AppState,
    body: &[u8],
) -> Result<Vec<(String, String)>, ApiError> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(req.path());
    check_signature(req, state, &http_url(req, state, path_and_query), &params)?;
    Ok(params)
}

/// Answers Twilio's voice webhook with TwiML that connects the call to our media stream.
async fn voice(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let params = signed_form(&req, &state, &body)?;

    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let call_sid = param("CallSid");
    if !twilio::is_safe_sid(call_sid) {
        // Twilio always sends one; without it there is no call to connect (or to log).
        log::warn!("/voice without a CallSid of Twilio's format: answering 400");
        return Err(ApiError::BadRequest("CallSid missing or not a Twilio SID"));
    }
    let fallback = &state.settings.fallback;
    let max_calls = state.settings.server.max_calls;
    let full = max_calls > 0 && state.engine.live_calls() >= max_calls;
    if full || state.engine.is_draining() {
        state
            .engine
            .metrics()
            .rejected_request(if full { "over_capacity" } else { "draining" });
        log::warn!(
            "[{call_sid}] incoming call refused ({}): answering with the fallback",
            if full {
                "server.max_calls calls live"
            } else {
                "draining for shutdown"
            }
        );
        return Ok(HttpResponse::Ok()
            .content_type("text/xml; charset=utf-8")
            .body(twiml::fallback_only(&fallback.say, &fallback.dial)));
    }
    // An outbound call placed by `POST /calls` comes back here when the callee answers.
    let nonce = query_param(&req, OUTBOUND_NONCE);
    let outbound = nonce.as_deref().map(|n| state.engine.outbound_answered(n));
    log::info!(
        "[{call_sid}] {} call: answering with <Connect><Stream>",
        if outbound.is_some() {
            "outbound"
        } else {
            "incoming"
        }
    );
    let token = state.engine.stream_token(call_sid);
    let mut params = vec![
        ("From", param("From")),
        ("To", param("To")),
        ("CallSid", call_sid),
    ];
    if let Some(token) = &token {
        params.push((signature::STREAM_TOKEN_PARAM, token));
    }
    let is_outbound = outbound.is_some();
    let pending = match outbound {
        Some(Some(pending)) => Some(pending),
        Some(None) => {
            log::warn!(
                "[{call_sid}] outbound call answered after its greeting and parameters expired"
            );
            None
        }
        None => None,
    };
    if is_outbound {
        params.push((DIRECTION_PARAM, "outbound"));
    }
    if let Some(pending) = &pending {
        if let Some(greeting) = &pending.greeting {
            params.push((GREETING_PARAM, greeting));
        }
        for (name, value) in &pending.params {
            params.push((name, value));
        }
    }
    let body = twiml::connect_stream_then(
        &stream_url(&req, &state),
        &params,
        &fallback.say,
        &fallback.dial,
    );
    Ok(HttpResponse::Ok()
        .content_type("text/xml; charset=utf-8")
        .body(body))
}

/// The Twilio Media Streams websocket.
async fn media_stream(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    // The upgrade is a GET with no body: Twilio signs the wss:// URL alone.
    check_signature(&req, &state, &stream_url(&req, &state), &[])?;
    let max_calls = state.settings.server.max_calls;
    if max_calls > 0 && state.engine.live_calls() >= max_calls {
        state.engine.metrics().rejected_request("over_capacity");
        log::warn!("media stream refused: {max_calls} calls live (server.max_calls)");
        return Ok(HttpResponse::ServiceUnavailable()
            .json(json!({"error": "too many live calls (server.max_calls)"})));
    }
    if state.engine.is_draining() {
        state.engine.metrics().rejected_request("draining");
        return Ok(
            HttpResponse::ServiceUnavailable().json(json!({"error": "draining for shutdown"}))
        );
    }
    state.engine.accept_media_stream(&req, payload)
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let live_calls = state
        .engine
        .registry()
        .send(CallCount)
        .await
        .unwrap_or_default();
    let calls_ended = state
        .engine
        .registry()
        .send(EndedCalls)
        .await
        .unwrap_or_default();
    let upstream = state.engine.upstream();
    let degraded = state.engine.degraded();
    let mut body = json!({
        "status": if degraded.is_some() { "degraded" } else { "healthy" },
        "upstream": upstream.as_str(),
        "upstream_mode": state.settings.upstream.as_str(),
        "live_calls": live_calls,
        "media_streams": state.engine.live_calls(),
        "max_calls": state.settings.server.max_calls,
        "outbound_pending": state.engine.outbound_pending(),
        "calls_ended": calls_ended,
        "draining": state.engine.is_draining(),
        "breaker": if degraded.is_some() { "open" } else { "closed" },
        "event_subscribers": state.engine.events().subscribers(),
        "event_subscribers_dropped": state.engine.events().dropped_subscribers(),
        "uptime_s": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    if upstream == UpstreamKind::Echo {
        body["warning"] = json!(echo_warning(&state.settings));
    } else {
        let openai = state.engine.openai_config();
        body["api"] = json!(openai.api.as_str());
        body["model"] = json!(match openai.api {
            OpenAiApi::Realtime => &openai.model,
            OpenAiApi::Live => &openai.live_model,
        });
        // Calls ended since start: how many, minutes of GPT-Live session, tokens, cost.
        let mut totals = json!(state.engine.usage_totals());
        totals["minutes"] =
            json!((totals["minutes"].as_f64().unwrap_or(0.0) * 100.0).round() / 100.0);
        totals["cost_usd"] =
            json!((totals["cost_usd"].as_f64().unwrap_or(0.0) * 1e6).round() / 1e6);
        body["usage"] = totals;
    }
    if let Some(reporter) = &state.reporter {
        let stats = reporter
            .send(callbridge_actors::report::GetReportStats)
            .await
            .unwrap_or_default();
        body["reports"] = json!(stats);
    }
    if let Some(warning) = state.settings.unchecked_warning() {
        body["security_warning"] = json!(warning);
    }
    if let Some(reason) = degraded {
        body["reason"] = json!(format!(
            "OpenAI is not tried for new calls (they get the fallback): repeated permanent failures, the last: {reason}"
        ));
    }
    HttpResponse::Ok().json(body)
}

/// For load balancers: 200 while new calls are taken, 503 from the first moment of a drain.
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.engine.is_draining() {
        HttpResponse::ServiceUnavailable().json(json!({"ready": false, "draining": true}))
    } else {
        HttpResponse::Ok().json(json!({"ready": true}))
    }
}

async fn list_calls(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let calls = state
        .engine
        .registry()
        .send(ListCalls)
        .await
        .map_err(|_| ApiError::RegistryUnavailable)?;
    Ok(HttpResponse::Ok().json(json!({"count": calls.len(), "calls": calls})))
}

async fn get_call(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let call_sid = path.into_inner();
    let call = state
        .engine
        .registry()
        .send(GetCall {
            call_sid: call_sid.clone(),
        })
        .await
        .map_err(|_| ApiError::RegistryUnavailable)?;
    match call {
        Some(call) => Ok(HttpResponse::Ok().json(call)),
        None => Err(ApiError::CallNotFound(call_sid)),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HangupBody {
    #[serde(default)]
    goodbye: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: String,
    #[serde(default)]
    announce: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SayBody {
    text: String,
}

/// Words sent to the model in one command, at most (they become instructions).
const MAX_WORDS_CHARS: usize = 2_000;

/// Reads a JSON body (an empty one as `{}`), with a JSON 400 for anything else.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|_| {
        ApiError::BadRequest("the body must be a JSON object with the documented fields")
    })
}

fn check_words(words: Option<&str>) -> Result<(), ApiError> {
    if words.is_some_and(|w| w.chars().count() > MAX_WORDS_CHARS) {
        return Err(ApiError::BadRequest("text over 2000 characters"));
    }
    Ok(())
}

/// Sends `command` to the live call `call_sid`: 202 when it took it.
async fn control(
    state: &AppState,
    call_sid: String,
    command: CallControl,
) -> Result<HttpResponse, ApiError> {
    let answer = state
        .engine
        .registry()
        .send(ControlCall {
            call_sid: call_sid.clone(),
            command,
        })
        .await
        .map_err(|_| ApiError::RegistryUnavailable)?;
    match answer {
        None => Err(ApiError::CallNotFound(call_sid)),
        Some(Ok(())) => {
            Ok(HttpResponse::Accepted().json(json!({"accepted": true, "call_sid": call_sid})))
        }
        Some(Err(refused @ ControlRefused::NoRest)) => {
            Err(ApiError::Unavailable(refused.to_string()))
        }
        Some(Err(refused)) => Err(ApiError::Conflict(refused.to_string())),
    }
}

/// `POST /calls/{sid}/hangup {"goodbye": "…"}`: say the goodbye (if any), let it play, then end
/// the call through Twilio.
async fn hangup(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let body: HangupBody = json_body(&body)?;
    check_words(body.goodbye.as_deref())?;
    control(
        &state,
        path.into_inner(),
        CallControl::Hangup {
            goodbye: body.goodbye,
        },
    )
    .await
}

/// `POST /calls/{sid}/transfer {"to": "+1…" | "sip:…", "announce": "…"}`: only to targets
/// `call.transfer_allow` allows (403 otherwise, and no request to Twilio).
async fn transfer(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let body: TransferBody = json_body(&body)?;
    check_words(body.announce.as_deref())?;
    let to = body.to.trim().to_owned();
    let number = is_e164(&to);
    let sip = to.starts_with("sip:")
        && to.len() < 255
        && to[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@.-_+:;=".contains(&b));
    if !(number || sip) {
        return Err(ApiError::BadRequest(
            "`to` must be an E.164 number (+14155550100) or a sip: URI",
        ));
    }
    let call = state.engine.call_config();
    if call.transfer_allow.is_empty() {
        return Err(ApiError::Forbidden(
            "transfers are disabled: list the allowed targets in call.transfer_allow".into(),
        ));
    }
    if !call.transfer_allowed(&to) {
        log::warn!("transfer refused: the target is not allowed by call.transfer_allow");
        return Err(ApiError::Forbidden(
            "the target is not allowed by call.transfer_allow".into(),
        ));
    }
    control(
        &state,
        path.into_inner(),
        CallControl::Transfer {
            to,
            announce: body.announce,
        },
    )
    .await
}

/// `POST /calls/{sid}/say {"text": "…"}`: the assistant says these words as its next turn.
async fn say(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let body: SayBody = json_body(&body)?;
    if body.text.trim().is_empty() {
        return Err(ApiError::BadRequest("`text` must not be empty"));
    }
    check_words(Some(&body.text))?;
    control(
        &state,
        path.into_inner(),
        CallControl::Say { text: body.text },
    )
    .await
}

/// The query parameter that ties an outbound call's `/voice` to what `POST /calls` asked for.
const OUTBOUND_NONCE: &str = "cbOutbound";
/// `<Parameter>`s callbridge adds for outbound calls (read back at `start`).
const DIRECTION_PARAM: &str = "callbridgeDirection";
const GREETING_PARAM: &str = "callbridgeGreeting";
/// `params` of an outbound call, at most.
const MAX_PARAMS: usize = 20;

fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn is_e164(number: &str) -> bool {
    number.len() >= 8
        && number.len() <= 16
        && number.starts_with('+')
        && number[1..].bytes().all(|b| b.is_ascii_digit())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceBody {
    to: String,
    from: String,
    #[serde(default)]
    greeting: Option<String>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
}

/// `POST /calls {"to", "from", "greeting", "params"}`: places an outbound call whose TwiML URL
/// is this service's `/voice`, so it flows like an inbound one once answered.
async fn place_call(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let body: PlaceBody = json_body(&body)?;
    let (to, from) = (body.to.trim().to_owned(), body.from.trim().to_owned());
    if !(is_e164(&to) || to.starts_with("sip:")) || !is_e164(&from) {
        return Err(ApiError::BadRequest(
            "`to` must be an E.164 number or a sip: URI, `from` an E.164 number of the account",
        ));
    }
    check_words(body.greeting.as_deref())?;
    if body.params.len() > MAX_PARAMS {
        return Err(ApiError::BadRequest("at most 20 params"));
    }
    let mut params = Vec::new();
    for (name, value) in &body.params {
        let value = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => value.to_string(),
            _ => {
                return Err(ApiError::BadRequest(
                    "params values must be strings, numbers or booleans",
                ))
            }
        };
        let reserved =
            ["From", "To", "CallSid"].contains(&name.as_str()) || name.starts_with("callbridge");
        if reserved || !twilio::is_safe_sid(name) || !twiml::parameter_fits(name, &value) {
            return Err(ApiError::BadRequest(
                "params names are letters, digits, _ and - (not From, To, CallSid or callbridge…), name and value under 500 characters",
            ));
        }
        params.push((name.clone(), value));
    }
    let Some(rest) = state.engine.rest().cloned() else {
        return Err(ApiError::Unavailable(ControlRefused::NoRest.to_string()));
    };
    let nonce = crate::admin::random_hex(16).map_err(|e| {
        log::error!("no randomness for an outbound call's nonce: {e}");
        ApiError::Unavailable("cannot place a call now".into())
    })?;
    let base = public_base(&req, &state);
    // Kept before the request: Twilio may fetch /voice as soon as the callee answers.
    state.engine.outbound_placed(
        nonce.clone(),
        PendingOutbound {
            greeting: body.greeting.filter(|g| !g.trim().is_empty()),
            params,
            placed: Instant::now(),
        },
    );
    let call = CreateCall {
        to,
        from,
        url: format!("{base}/voice?{OUTBOUND_NONCE}={nonce}"),
        status_callback: Some(format!("{base}/voice/status?{OUTBOUND_NONCE}={nonce}")),
        status_callback_events: vec!["completed".into()],
        timeout_s: None,
    };
    match rest.create_call(&call).await {
        Ok(created) => {
            log::info!(
                "[{}] outbound call placed ({})",
                created.sid,
                created.status
            );
            Ok(HttpResponse::Created().json(json!({"call_sid": created.sid})))
        }
        Err(e) => {
            state.engine.outbound_answered(&nonce);
            log::warn!("outbound call refused by Twilio: {e}");
            Ok(HttpResponse::BadGateway().json(json!({
                "error": e.to_string(),
                "code": e.code(),
            })))
        }
    }
}

/// Twilio's status callback of an outbound call: a call that ended unanswered (busy, no
/// answer, failed, canceled) lets go of its greeting and parameters.
async fn outbound_status(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let params = signed_form(&req, &state, &body)?;
    let status = params
        .iter()
        .find(|(k, _)| k == "CallStatus")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if let Some(nonce) = query_param(&req, OUTBOUND_NONCE) {
        if state.engine.outbound_answered(&nonce).is_some() {
            log::info!(
                "outbound call ended unanswered ({status:?}): its greeting and params are dropped"
            );
        }
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The warning shown at start-up and in `/health` when calls go to the echo assistant.
pub fn echo_warning(settings: &Settings) -> &'static str {
    if settings.upstream == crate::settings::UpstreamMode::Echo {
        "upstream is \"echo\": callers hear their own voice (telephony test mode)"
    } else {
        "OPENAI_API_KEY is not set: upstream \"auto\" fell back to the ECHO assistant; callers hear their own voice, not an AI"
    }
}

/// The public base URL (`server.public_url`) or, without one, what the request says.
fn public_base(req: &HttpRequest, state: &AppState) -> String {
    let configured = state.settings.server.public_url.trim();
    if configured.is_empty() {
        let info = req.connection_info();
        format!("{}://{}", info.scheme(), info.host())
    } else {
        configured.trim_end_matches('/').to_string()
    }
}

fn http_url(req: &HttpRequest, state: &AppState, path_and_query: &str) -> String {
    format!("{}{}", public_base(req, state), path_and_query)
}

/// The `wss://` URL of the media stream. Twilio only connects to `wss`; without a configured
/// public URL the host of the webhook request is used, which is what a tunnel forwards.
fn stream_url(req: &HttpRequest, state: &AppState) -> String {
    if state.settings.server.public_url.trim().is_empty() {
        let host = req.connection_info().host().to_string();
        format!("wss://{host}{MEDIA_STREAM_PATH}")
    } else {
        signature::stream_url(&public_base(req, state), MEDIA_STREAM_PATH)
    }
}

fn check_signature(
    req: &HttpRequest,
    state: &AppState,
    url: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let Some(token) = &state.settings.secrets.twilio_auth_token else {
        return Ok(());
    };
    if state.settings.twilio.validate_signatures == Some(false) {
        return Ok(());
    }
    let header = req
        .headers()
        .get("X-Twilio-Signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if signature::validate(token.expose_secret(), url, params, header) {
        Ok(())
    } else {
        log::warn!(
            "rejected {} {}: invalid or missing X-Twilio-Signature (signed URL expected: {url})",
            req.method(),
            req.path()
        );
        state.engine.metrics().rejected_request("bad_signature");
        Err(ApiError::BadSignature)
    }
}

/// `GET /metrics`: Prometheus text format, behind the admin auth.
async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    Ok(HttpResponse::Ok()
        .content_type(callbridge_actors::metrics::CONTENT_TYPE)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(state.engine.metrics().render()))
}

fn last_event_id(req: &HttpRequest) -> Option<u64> {
    callbridge_actors::events::parse_last_event_id(
        req.headers()
            .get("Last-Event-ID")
            .and_then(|v| v.to_str().ok()),
    )
}

fn event_stream(subscription: callbridge_actors::events::Subscription) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(subscription)
}

/// `GET /calls/{call_sid}/events`: one call's live events (SSE); a replay of its recent ones
/// first; ends after `ended`. 404 for a call never seen (or long forgotten).
async fn call_events(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    let call_sid = path.into_inner();
    match state
        .engine
        .events()
        .subscribe_call(&call_sid, last_event_id(&req))
    {
        Some(subscription) => Ok(event_stream(subscription)),
        None => Err(ApiError::CallNotFound(call_sid)),
    }
}

/// `GET /events`: every call's live events (SSE).
async fn all_events(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_admin(&req, &state)?;
    Ok(event_stream(
        state.engine.events().subscribe_all(last_event_id(&req)),
    ))
}

/// The admin token for a session cookie (the dashboard signs in once; the token is then kept
/// neither in the page nor in a URL). 204 with the cookie, 401 for a wrong token, 400 when no
/// admin token is set (the dashboard then needs no sign-in, from this host).
async fn login(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    #[derive(serde::Deserialize)]
    struct Login {
        token: String,
    }
    let Some(token) = state.settings.secrets.admin_token.as_ref() else {
        return Err(ApiError::BadRequest(
            "no admin token is set: nothing to sign in with (the dashboard answers this host only)",
        ));
    };
    let login: Login = json_body(&body)?;
    if !constant_time_eq(login.token.as_bytes(), token.expose_secret().as_bytes()) {
        log::warn!("dashboard sign-in refused: wrong token");
        return Err(ApiError::Unauthorized);
    }
    let id = state.sessions.create().map_err(|e| {
        log::error!("no randomness for a session id: {e}");
        ApiError::Unavailable("cannot create a session now".into())
    })?;
    let secure = req.connection_info().scheme() == "https"
        || state.settings.server.public_url.starts_with("https://");
    Ok(HttpResponse::NoContent()
        .insert_header((header::SET_COOKIE, crate::admin::set_cookie(&id, secure)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish())
}

async fn logout(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(id) = crate::admin::session_cookie(req.headers()) {
        state.sessions.remove(id);
    }
    HttpResponse::NoContent()
        .insert_header((header::SET_COOKIE, crate::admin::clear_cookie()))
        .finish()
}

fn check_admin(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    // The dashboard's session cookie stands for the token.
    if state.settings.secrets.admin_token.is_some() {
        if let Some(id) = crate::admin::session_cookie(req.headers()) {
            if state.sessions.valid(id) {
                return Ok(());
            }
        }
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // A request relayed by a proxy on this host comes from a loopback peer but not from this
    // host: with forwarding headers, the peer does not count as local.
    let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| req.headers().contains_key(*h));
    let access = admin_access(
        req.peer_addr().map(|a| a.ip()).filter(|_| !forwarded),
        state
            .settings
            .secrets
            .admin_token
            .as_ref()
            .map(|t| t.expose_secret()),
        given,
    );
    if access.is_err() {
        state.engine.metrics().rejected_request("unauthorized");
    }
    access
}

/// Who may read `/calls` (phone numbers, transcripts): with an admin token, whoever presents
/// it; without one, the local host only.
fn admin_access(
    peer: Option<std::net::IpAddr>,
    token: Option<&str>,
    given: Option<&str>,
) -> Result<(), ApiError> {
    match token {
        Some(token) => {
            if constant_time_eq(given.unwrap_or("").as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err(ApiError::Unauthorized)
            }
        }
        None if peer.is_some_and(|ip| ip.is_loopback()) => Ok(()),
        None => Err(ApiError::LoopbackOnly),
    }
}

/// Compares in time that depends on neither input's content nor length: both are hashed with
/// a key drawn at start-up, and the digests (always 20 bytes) are compared in full.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use hmac::{KeyInit, Mac};
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut key = [0u8; 32];
        for chunk in key.chunks_mut(8) {
            let bits = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            chunk.copy_from_slice(&bits.to_le_bytes());
        }
        key
    });
    let digest = |data: &[u8]| {
        // invariant: HMAC accepts a key of any length.
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
        mac.update(data);
        mac.finalize().into_bytes()
    };
    let (da, db) = (digest(a), digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Any other path: a JSON 404.
pub async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": "not found"}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn without_a_token_only_the_local_host_reads_calls() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let local6: IpAddr = "::1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(admin_access(Some(local), None, None).is_ok());
        assert!(admin_access(Some(local6), None, None).is_ok());
        assert!(matches!(
            admin_access(Some(remote), None, Some("anything")),
            Err(ApiError::LoopbackOnly)
        ));
        assert!(matches!(
            admin_access(None, None, None),
            Err(ApiError::LoopbackOnly)
        ));
    }

    #[test]
    fn with_a_token_anyone_with_it_reads_calls_and_no_one_without() {
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(admin_access(Some(remote), Some("s3cret-token"), Some("s3cret-token")).is_ok());
        for wrong in [
            None,
            Some(""),
            Some("s3cret"),
            Some("s3cret-token-and-more"),
            Some("x"),
        ] {
            assert!(
                matches!(
                    admin_access(Some(local), Some("s3cret-token"), wrong),
                    Err(ApiError::Unauthorized)
                ),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn the_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
