//! `Engine`: what every call needs from the process (the registry, the settings, the upstream
//! choice and its key), and the entry point the HTTP shell calls for each media stream.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::SecretString;

use crate::call::CallActor;
use crate::config::{CallConfig, ConfigError, OpenAiConfig, UpstreamKind};
use crate::registry::CallRegistry;
use crate::report::SubmitReport;
use crate::session::restart::Breaker;
use crate::session::usage::{CallUsage, Prices};
use crate::twilio_stream;

/// Cheap to clone: one per HTTP worker, shared by every call.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Addr<CallRegistry>,
    /// Permanent OpenAI failures across calls (see [`Breaker`]).
    breaker: Mutex<Breaker>,
    openai: Arc<OpenAiConfig>,
    call: CallConfig,
    upstream: UpstreamKind,
    api_key: Option<SecretString>,
    /// The Twilio auth token, when signatures are checked: keys the per-call stream tokens.
    stream_key: Option<Arc<SecretString>>,
    /// `call.hold_audio`, read at start-up, in 20 ms payloads.
    hold_audio: Option<Arc<[bytes::Bytes]>>,
    next_instance: AtomicU64,
    /// Media streams open now (a call's actor from start to stop), for `server.max_calls`.
    live: AtomicUsize,
    /// Call actors alive (an ended call may still wait for its last usage, then reports).
    actors: AtomicUsize,
    /// The process is draining (SIGTERM): no new calls.
    draining: AtomicBool,
    prices: Prices,
    /// Where end-of-call reports go, when `report.url` is set (set once at start-up).
    reporter: std::sync::OnceLock<Recipient<SubmitReport>>,
    /// Outbound calls placed and not yet answered: their greeting and parameters, by nonce.
    outbound: Mutex<std::collections::HashMap<String, PendingOutbound>>,
    /// Twilio's REST API, when the account is configured (set once at start-up).
    rest: std::sync::OnceLock<crate::twilio_rest::TwilioRest>,
    /// Live events of every call (`/events`, `/calls/{sid}/events`).
    events: Arc<crate::events::EventHub>,
    /// Prometheus metrics (`/metrics`).
    metrics: Arc<crate::metrics::Metrics>,
    /// Signs tool calls (`CALLBRIDGE_TOOLS_SECRET`; set once at start-up).
    tools_secret: std::sync::OnceLock<SecretString>,
    /// What ended calls used, since start.
    usage_totals: Mutex<UsageTotals>,
}

/// An outbound call placed through Twilio, waiting for the callee to answer (Twilio fetches
/// `/voice` only then).
#[derive(Debug, Clone)]
pub struct PendingOutbound {
    pub greeting: Option<String>,
    pub params: Vec<(String, String)>,
    pub placed: Instant,
}

/// Outbound calls waiting for an answer, at most (older ones are forgotten first).
pub const MAX_PENDING_OUTBOUND: usize = 1_000;
/// An outbound call not answered within this long is forgotten (Twilio rings for at most 600 s).
pub const PENDING_OUTBOUND_TTL: Duration = Duration::from_secs(15 * 60);

/// Usage of the calls ended since start, for `/health`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UsageTotals {
    pub calls: u64,
    pub minutes: f64,
    pub tokens: u64,
    /// Summed over the calls whose model has a price.
    pub cost_usd: f64,
    /// Calls whose model has no price in `[prices]` (their cost is not in `cost_usd`).
    pub calls_without_price: u64,
}

/// Where calls report what they do, beside the registry: the live event hub and the metrics.
pub struct Observers {
    pub events: Arc<crate::events::EventHub>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Default for Observers {
    /// The documented defaults (`events.replay_max` 100, `events.subscriber_queue` 256).
    fn default() -> Self {
        Observers {
            events: Arc::new(crate::events::EventHub::new(100, 256)),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }
}

impl Engine {
    /// Checks the settings and that OpenAI mode has a key.
    // One call site (the shell's start-up), each argument a section of the settings.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Addr<CallRegistry>,
        openai: OpenAiConfig,
        call: CallConfig,
        upstream: UpstreamKind,
        api_key: Option<SecretString>,
        stream_key: Option<SecretString>,
        prices: Prices,
        observers: Observers,
    ) -> Result<Self, ConfigError> {
        prices
            .check()
            .map_err(|problem| ConfigError::new("prices", problem))?;
        openai.validate()?;
        call.validate()?;
        let hold_audio = call.load_hold_audio()?;
        if upstream == UpstreamKind::OpenAi && api_key.is_none() {
            return Err(ConfigError::new(
                "upstream",
                "is \"openai\" but OPENAI_API_KEY is not set",
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                breaker: Mutex::new(Breaker::new(
                    openai.breaker_failures,
                    Duration::from_secs(openai.breaker_cooldown_s),
                )),
                openai: Arc::new(openai),
                call,
                upstream,
                api_key,
                stream_key: stream_key.map(Arc::new),
                hold_audio,
                next_instance: AtomicU64::new(1),
                live: AtomicUsize::new(0),
                actors: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                prices,
                reporter: std::sync::OnceLock::new(),
                rest: std::sync::OnceLock::new(),
                tools_secret: std::sync::OnceLock::new(),
                outbound: Mutex::new(std::collections::HashMap::new()),
                usage_totals: Mutex::new(UsageTotals::default()),
                events: observers.events,
                metrics: observers.metrics,
            }),
        })
    }

    pub fn registry(&self) -> &Addr<CallRegistry> {
        &self.inner.registry
    }

    /// Live events (Server-Sent Events).
    pub fn events(&self) -> &Arc<crate::events::EventHub> {
        &self.inner.events
    }

    /// Prometheus metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// The process-wide breaker, for a call to consult and report to.
    pub fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // A panic while holding it cannot leave it inconsistent: every method is one update.
        self.inner
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends every call's end-of-call report to `reporter` from now on (set once, at start-up).
    pub fn set_reporter(&self, reporter: Recipient<SubmitReport>) {
        let _ = self.inner.reporter.set(reporter);
    }

    /// Keeps an outbound call's greeting and parameters until its `/voice` (bounded, expiring).
    pub fn outbound_placed(&self, nonce: String, pending: PendingOutbound) {
        let mut map = self
            .inner
            .outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| p.placed.elapsed() < PENDING_OUTBOUND_TTL);
        if map.len() >= MAX_PENDING_OUTBOUND {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, p)| p.placed)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
                log::warn!("{MAX_PENDING_OUTBOUND} outbound calls waiting for an answer: the oldest is forgotten");
            }
        }
        map.insert(nonce, pending);
    }

    /// Takes an outbound call's greeting and parameters (its `/voice`, or its end).
    pub fn outbound_answered(&self, nonce: &str) -> Option<PendingOutbound> {
        let mut map = self
            .inner
            .outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(nonce)
            .filter(|p| p.placed.elapsed() < PENDING_OUTBOUND_TTL)
    }

    /// Outbound calls waiting for an answer.
    pub fn outbound_pending(&self) -> usize {
        self.inner
            .outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Hang-ups and transfers go through `rest` from now on (set once, at start-up).
    pub fn set_rest(&self, rest: crate::twilio_rest::TwilioRest) {
        let _ = self.inner.rest.set(rest);
    }

    /// Tool calls are signed with `secret` from now on (set once, at start-up).
    pub fn set_tools_secret(&self, secret: SecretString) {
        let _ = self.inner.tools_secret.set(secret);
    }

    pub(crate) fn tools_secret(&self) -> Option<SecretString> {
        self.inner.tools_secret.get().cloned()
    }

    pub fn rest(&self) -> Option<&crate::twilio_rest::TwilioRest> {
        self.inner.rest.get()
    }

    pub(crate) fn reporter(&self) -> Option<&Recipient<SubmitReport>> {
        self.inner.reporter.get()
    }

    pub fn prices(&self) -> &Prices {
        &self.inner.prices
    }

    /// Adds an ended call's usage to the totals.
    pub fn record_usage(&self, usage: &CallUsage) {
        let mut totals = self
            .inner
            .usage_totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        totals.calls += 1;
        totals.minutes += usage.seconds.unwrap_or(0.0) / 60.0;
        if let Some(t) = &usage.tokens {
            totals.tokens += t.input_text + t.input_audio + t.output_text + t.output_audio;
        }
        match usage.cost_usd {
            Some(usd) => totals.cost_usd += usd,
            None => totals.calls_without_price += 1,
        }
    }

    /// Usage of the calls ended since start.
    pub fn usage_totals(&self) -> UsageTotals {
        self.inner
            .usage_totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// From now on, take no new calls (a deploy is stopping this process).
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Media streams open now.
    pub fn live_calls(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    pub(crate) fn call_opened(&self) {
        self.inner.live.fetch_add(1, Ordering::Relaxed);
        self.inner.actors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn call_actor_stopped(&self) {
        self.inner.actors.fetch_sub(1, Ordering::Relaxed);
    }

    /// Calls that ended for the caller but are still finishing (a GPT-Live session's final
    /// usage, the end-of-call line and report).
    pub fn calls_finishing(&self) -> usize {
        self.inner
            .actors
            .load(Ordering::Relaxed)
            .saturating_sub(self.live_calls())
    }

    pub(crate) fn call_closed(&self) {
        self.inner.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Why new calls get the fallback without an OpenAI attempt, while the breaker is open.
    pub fn degraded(&self) -> Option<String> {
        self.breaker().open_reason(Instant::now())
    }

    pub fn upstream(&self) -> UpstreamKind {
        self.inner.upstream
    }

    pub fn openai_config(&self) -> &OpenAiConfig {
        &self.inner.openai
    }

    pub fn openai_config_arc(&self) -> Arc<OpenAiConfig> {
        self.inner.openai.clone()
    }

    pub fn call_config(&self) -> &CallConfig {
        &self.inner.call
    }

    pub(crate) fn api_key(&self) -> Option<SecretString> {
        self.inner.api_key.clone()
    }

    /// The stream token `/voice` hands to `call_sid`'s stream, when signatures are checked.
    pub fn stream_token(&self, call_sid: &str) -> Option<String> {
        use secrecy::ExposeSecret as _;
        let key = self.inner.stream_key.as_ref()?;
        Some(crate::protocol::signature::stream_token(
            key.expose_secret(),
            call_sid,
        ))
    }

    /// Upgrades a `GET /media-stream` to the Twilio websocket and starts its call.
    pub fn accept_media_stream(
        &self,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<HttpResponse, actix_web::Error> {
        let instance = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let engine = self.clone();
        // Marks (and the playback budget they measure) are only needed where a barge-in can
        // truncate: with OpenAI, not with the echo.
        let track_marks = self.inner.upstream == UpstreamKind::OpenAi;
        twilio_stream::accept(
            req,
            payload,
            &self.inner.call,
            twilio_stream::StreamOptions {
                track_marks,
                stream_key: self.inner.stream_key.clone(),
                hold_audio: self.inner.hold_audio.clone(),
                metrics: Some(self.inner.metrics.clone()),
            },
            |twilio, counters| CallActor::new(engine, instance, twilio, counters),
        )
    }
}
