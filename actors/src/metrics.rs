//! Prometheus metrics for one application: what `GET /metrics` serves.
//!
//! One [`Metrics`] value per application (no global registry: tests run several apps in one
//! process), shared as `Arc<Metrics>`. [`Metrics::render`] writes the Prometheus text exposition
//! format, version 0.0.4 (prometheus-client's `prometheus_text` encoder); the route must send it
//! with `Content-Type:` [`CONTENT_TYPE`] (`text/plain; version=0.0.4; charset=utf-8`).
//!
//! Nothing here runs per audio frame. The legs already count frames and drops in each call's
//! [`CallCounters`]; [`Metrics::call_started`] puts the call's counters in a live set and
//! [`Metrics::call_ended`] takes them out and folds their final values into process totals under
//! the same lock. A scrape reads `folded totals + the sum over live calls` under that lock too, so
//! `callbridge_frames_total` and `callbridge_dropped_frames_total` never decrease and a call is
//! never counted twice nor lost between the two. `callbridge_active_calls` is the live set's size
//! per api, read at scrape. The lock is taken at call start, call end and scrape only.
//!
//! Label values that come from peers or from the model (OpenAI error codes, tool names, end
//! reasons, failure classes, restart reasons, models) go through a [`BoundedLabel`]: a value is
//! kept only if it is at most [`MAX_LABEL_LEN`] bytes of `[a-z0-9_.-]` and the family has seen
//! fewer than its cap of distinct values; otherwise it is counted as [`OTHER`]. Never pass a call
//! SID or a phone number.
//!
//! Every family is in the text from start-up: a labelled family with no series yet still has its
//! `# HELP` / `# TYPE` lines (prometheus-client leaves such a family out; `Shown` puts it back);
//! unlabelled counters and histograms show 0, and
//! `callbridge_active_calls{api}`, `callbridge_frames_total{direction}` and
//! `callbridge_dropped_frames_total{queue}` show 0 for every api, direction and queue.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::messages::CallCounters;

/// The `Content-Type` the `/metrics` route must send with [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The label value for anything not kept as itself (bad value, or past the family's cap).
pub const OTHER: &str = "other";
/// The longest label value kept, in bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Distinct values kept per peer-supplied label (not counting [`OTHER`]).
pub const DEFAULT_LABEL_CAP: usize = 64;
/// Distinct models kept (each is multiplied by apis and token kinds).
pub const MODEL_LABEL_CAP: usize = 16;

/// `callbridge_active_calls{api}`: the AI legs.
pub const APIS: [&str; 3] = ["realtime", "live", "echo"];
/// `callbridge_model_tokens_total{kind}`.
pub const TOKEN_KINDS: [&str; 6] = [
    "input_text",
    "input_audio",
    "cached_text",
    "cached_audio",
    "output_text",
    "output_audio",
];
/// `callbridge_frames_total{direction}`: `in` caller frames to the AI, `out` assistant frames
/// to Twilio.
pub const DIRECTIONS: [&str; 2] = ["in", "out"];
/// `callbridge_dropped_frames_total{queue}`.
pub const QUEUES: [&str; 6] = [
    "pre_start",
    "upstream_not_ready",
    "interrupted",
    "twilio_backpressure",
    "openai_backpressure",
    "malformed",
];

/// Whether `value` may be a label value as itself: 1..=[`MAX_LABEL_LEN`] bytes of
/// `[a-z0-9_.-]`.
pub fn is_bounded_label_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LABEL_LEN
        && value
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// The values one label of one family may take: well-formed values, first come first kept, up
/// to a cap; everything else is [`OTHER`]. Called on rare events only (a lock and a set look-up).
#[derive(Debug)]
pub struct BoundedLabel {
    cap: usize,
    seen: Mutex<HashSet<String>>,
}

impl BoundedLabel {
    /// Keeps the first `cap` distinct well-formed values.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Keeps exactly `values` (a closed set); anything else is [`OTHER`].
    pub fn closed(values: &[&str]) -> Self {
        Self {
            cap: values.len(),
            seen: Mutex::new(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    /// The label value to use for `raw`: `raw` itself or [`OTHER`].
    pub fn get(&self, raw: &str) -> String {
        if !is_bounded_label_value(raw) {
            return OTHER.to_owned();
        }
        let mut seen = lock(&self.seen);
        if seen.contains(raw) {
            return raw.to_owned();
        }
        if raw == OTHER {
            return OTHER.to_owned();
        }
        if seen.len() < self.cap {
            seen.insert(raw.to_owned());
            raw.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    /// Distinct values kept so far (not counting [`OTHER`]).
    pub fn len(&self) -> usize {
        lock(&self.seen).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A poisoned lock still holds consistent data here (no code panics while holding one).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];
type L3 = [(&'static str, String); 3];
type HistogramFamily = Family<L1, Histogram, fn() -> Histogram>;

// Histogram buckets, seconds.
/// From the caller's turn (or the call's start) to the first assistant audio.
const TIME_TO_FIRST_AUDIO_BUCKETS: [f64; 12] = [
    0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0,
];
/// From the caller starting to speak over the assistant to the assistant's audio stopping.
const BARGEIN_LATENCY_BUCKETS: [f64; 11] =
    [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0];
/// How far played audio lags what was sent to Twilio.
const PLAYBACK_LAG_BUCKETS: [f64; 11] =
    [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
/// A whole call.
const CALL_DURATION_BUCKETS: [f64; 13] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// One tool call, request to answer.
const TOOL_CALL_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

fn tool_call_histogram() -> Histogram {
    Histogram::new(TOOL_CALL_BUCKETS)
}

// Indexes into a call's sampled frame counters (`Sample`).
const IN: usize = 0;
const OUT: usize = 1;
const DROPPED: usize = 2; // QUEUES[i] is at DROPPED + i
type Sample = [u64; 2 + QUEUES.len()];

fn sample(c: &CallCounters) -> Sample {
    let get = CallCounters::get;
    [
        get(&c.frames_in),
        get(&c.frames_out),
        get(&c.dropped_pre_start),
        get(&c.dropped_upstream_not_ready),
        get(&c.dropped_interrupted),
        get(&c.dropped_twilio_backpressure),
        get(&c.dropped_openai_backpressure),
        get(&c.malformed_frames),
    ]
}

fn add_into(total: &mut Sample, s: &Sample) {
    for (t, v) in total.iter_mut().zip(s) {
        *t = t.saturating_add(*v);
    }
}

struct LiveCall {
    api: String,
    counters: Arc<CallCounters>,
}

/// The calls in progress and what ended calls counted. Touched at call start, call end and
/// scrape only.
struct Live {
    next_id: u64,
    calls: HashMap<u64, LiveCall>,
    /// Final counts of ended calls.
    folded: Sample,
    /// Live calls per api (the three [`APIS`] always present).
    active: BTreeMap<String, i64>,
}

impl Live {
    fn new() -> Self {
        Self {
            next_id: 0,
            calls: HashMap::new(),
            folded: Sample::default(),
            active: APIS.iter().map(|api| ((*api).to_owned(), 0)).collect(),
        }
    }

    fn totals(&self) -> Sample {
        let mut totals = self.folded;
        for call in self.calls.values() {
            add_into(&mut totals, &sample(&call.counters));
        }
        totals
    }
}

/// Exports the live set at scrape: active calls, frames and dropped frames.
struct LiveCollector(Arc<Mutex<Live>>);

impl fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveCollector").finish_non_exhaustive()
    }
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (totals, active) = {
            let live = lock(&self.0);
            (live.totals(), live.active.clone())
        };
        {
            let mut family = encoder.encode_descriptor(
                "callbridge_active_calls",
                "Calls in progress, by AI api.",
                None,
                MetricType::Gauge,
            )?;
            for (api, n) in &active {
                let labels = [("api", api.as_str())];
                ConstGauge::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "callbridge_frames",
                "Audio frames moved: in = caller frames handed to the AI, out = assistant frames written to Twilio.",
                None,
                MetricType::Counter,
            )?;
            for (direction, index) in [("in", IN), ("out", OUT)] {
                let labels = [("direction", direction)];
                ConstCounter::new(totals[index]).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "callbridge_dropped_frames",
            "Audio frames dropped, by the queue or check that dropped them.",
            None,
            MetricType::Counter,
        )?;
        for (i, queue) in QUEUES.iter().enumerate() {
            let labels = [("queue", *queue)];
            ConstCounter::new(totals[DROPPED + i]).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A labelled family whose `# HELP` / `# TYPE` are written even before its first series:
/// prometheus-client's registry leaves out a family with no series, and every family must be
/// in the text from start-up. (A family with metadata and no samples is valid exposition text.)
#[derive(Debug)]
struct Shown<M>(M);

impl<M: EncodeMetric> EncodeMetric for Shown<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// What ending a call needs; shared by [`Metrics`] and its [`CallTicket`]s.
struct CallEnds {
    live: Arc<Mutex<Live>>,
    calls: Family<L1, Counter>,
    end_reasons: BoundedLabel,
    call_duration: Histogram,
}

impl CallEnds {
    fn end(&self, id: u64, end_reason: &str, duration: Duration) {
        {
            let mut live = lock(&self.live);
            if let Some(call) = live.calls.remove(&id) {
                let last = sample(&call.counters);
                add_into(&mut live.folded, &last);
                if let Some(n) = live.active.get_mut(&call.api) {
                    *n -= 1;
                }
            }
        }
        let reason = self.end_reasons.get(end_reason);
        self.calls.get_or_create(&[("end_reason", reason)]).inc();
        self.call_duration.observe(duration.as_secs_f64());
    }
}

/// A call's place in the live set, from [`Metrics::call_started`] to [`Metrics::call_ended`].
///
/// Dropped without `call_ended` (an actor stopped without its end path, or panicked), it ends
/// the call anyway: the counters are folded into the totals, the call counts in
/// `callbridge_calls_total{end_reason="other"}` and its duration is the ticket's age.
#[must_use = "a CallTicket dropped at once ends the call in the metrics"]
pub struct CallTicket {
    id: u64,
    started: Instant,
    ends: Arc<CallEnds>,
    ended: bool,
}

impl CallTicket {
    fn end(mut self, end_reason: &str, duration: Duration) {
        self.ended = true;
        self.ends.end(self.id, end_reason, duration);
    }
}

impl fmt::Debug for CallTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallTicket")
            .field("id", &self.id)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Drop for CallTicket {
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            self.ends.end(self.id, OTHER, self.started.elapsed());
        }
    }
}

/// The application's metrics. `Send + Sync`; share it as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    ends: Arc<CallEnds>,

    apis: BoundedLabel,
    barge_ins: Counter,
    upstream_restarts: Family<L1, Counter>,
    restart_reasons: BoundedLabel,
    upstream_failures: Family<L1, Counter>,
    failure_classes: BoundedLabel,
    openai_errors: Family<L1, Counter>,
    openai_codes: BoundedLabel,
    rejected_requests: Family<L1, Counter>,
    rejected_reasons: BoundedLabel,
    tool_calls: Family<L2, Counter>,
    tool_call_seconds: HistogramFamily,
    tools: BoundedLabel,
    tool_outcomes: BoundedLabel,

    time_to_first_audio: Histogram,
    bargein_latency: Histogram,
    playback_lag: Histogram,

    model_tokens: Family<L3, Counter>,
    model_seconds: Family<L2, Counter<f64>>,
    cost_usd: Family<L2, Counter<f64>>,
    models: BoundedLabel,
    token_kinds: BoundedLabel,

    subscribers_dropped: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let live = Arc::new(Mutex::new(Live::new()));
        registry.register_collector(Box::new(LiveCollector(Arc::clone(&live))));

        let ends = Arc::new(CallEnds {
            live,
            calls: Family::default(),
            end_reasons: BoundedLabel::new(DEFAULT_LABEL_CAP),
            call_duration: Histogram::new(CALL_DURATION_BUCKETS),
        });
        registry.register(
            "callbridge_calls",
            "Calls ended, by end reason",
            Shown(ends.calls.clone()),
        );
        registry.register(
            "callbridge_call_duration_seconds",
            "Call duration, seconds",
            ends.call_duration.clone(),
        );

        let metrics = Self {
            registry,
            ends,
            apis: BoundedLabel::closed(&APIS),
            barge_ins: Counter::default(),
            upstream_restarts: Family::default(),
            restart_reasons: BoundedLabel::new(DEFAULT_LABEL_CAP),
            upstream_failures: Family::default(),
            failure_classes: BoundedLabel::new(DEFAULT_LABEL_CAP),
            openai_errors: Family::default(),
            openai_codes: BoundedLabel::new(DEFAULT_LABEL_CAP),
            rejected_requests: Family::default(),
            rejected_reasons: BoundedLabel::new(DEFAULT_LABEL_CAP),
            tool_calls: Family::default(),
            tool_call_seconds: Family::new_with_constructor(tool_call_histogram as fn() -> _),
            tools: BoundedLabel::new(DEFAULT_LABEL_CAP),
            tool_outcomes: BoundedLabel::new(DEFAULT_LABEL_CAP),
            time_to_first_audio: Histogram::new(TIME_TO_FIRST_AUDIO_BUCKETS),
            bargein_latency: Histogram::new(BARGEIN_LATENCY_BUCKETS),
            playback_lag: Histogram::new(PLAYBACK_LAG_BUCKETS),
            model_tokens: Family::default(),
            model_seconds: Family::default(),
            cost_usd: Family::default(),
            models: BoundedLabel::new(MODEL_LABEL_CAP),
            token_kinds: BoundedLabel::closed(&TOKEN_KINDS),
            subscribers_dropped: Counter::default(),
        };
        metrics.register_rest()
    }

    fn register_rest(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "callbridge_barge_ins",
            "Barge-ins: the caller spoke over the assistant and its audio was cut",
            self.barge_ins.clone(),
        );
        r.register(
            "callbridge_upstream_restarts",
            "AI leg restarts, by reason",
            Shown(self.upstream_restarts.clone()),
        );
        r.register(
            "callbridge_upstream_failures",
            "AI leg failures, by class",
            Shown(self.upstream_failures.clone()),
        );
        r.register(
            "callbridge_openai_errors",
            "Error events from OpenAI, by code",
            Shown(self.openai_errors.clone()),
        );
        r.register(
            "callbridge_rejected_requests",
            "HTTP and WebSocket requests refused, by reason",
            Shown(self.rejected_requests.clone()),
        );
        r.register(
            "callbridge_tool_calls",
            "Tool calls from the model, by tool and outcome",
            Shown(self.tool_calls.clone()),
        );
        r.register(
            "callbridge_time_to_first_audio_seconds",
            "Time to the assistant's first audio, seconds",
            self.time_to_first_audio.clone(),
        );
        r.register(
            "callbridge_bargein_latency_seconds",
            "Barge-in latency: caller speech detected to assistant audio cut, seconds",
            self.bargein_latency.clone(),
        );
        r.register(
            "callbridge_playback_lag_seconds",
            "Assistant audio sent to Twilio and not yet played, seconds",
            self.playback_lag.clone(),
        );
        r.register(
            "callbridge_tool_call_seconds",
            "Tool call duration by tool, seconds",
            Shown(self.tool_call_seconds.clone()),
        );
        r.register(
            "callbridge_model_tokens",
            "Model tokens billed, by api, model and kind",
            Shown(self.model_tokens.clone()),
        );
        r.register(
            "callbridge_model_seconds",
            "Model session time billed, by api and model, seconds",
            Shown(self.model_seconds.clone()),
        );
        r.register(
            "callbridge_cost_usd",
            "Estimated model cost, by api and model, US dollars",
            Shown(self.cost_usd.clone()),
        );
        r.register(
            "callbridge_event_subscribers_dropped",
            "Live event stream subscribers cut off for not keeping up",
            self.subscribers_dropped.clone(),
        );
        self
    }

    /// The text for `GET /metrics`, to be sent with `Content-Type:` [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A call began on `api` (`realtime`, `live` or `echo`; anything else counts as `other`):
    /// its counters join the live set. End it with [`Metrics::call_ended`] (dropping the ticket
    /// ends it too, see [`CallTicket`]).
    pub fn call_started(&self, api: &str, counters: Arc<CallCounters>) -> CallTicket {
        let api = self.apis.get(api);
        let id = {
            let mut live = lock(&self.ends.live);
            let id = live.next_id;
            live.next_id += 1;
            *live.active.entry(api.clone()).or_insert(0) += 1;
            live.calls.insert(id, LiveCall { api, counters });
            id
        };
        CallTicket {
            id,
            started: Instant::now(),
            ends: Arc::clone(&self.ends),
            ended: false,
        }
    }

    /// A call ended: its counters leave the live set and their final values join the totals (in
    /// one step, so no scrape sees them twice or not at all); counts the call under
    /// `end_reason` (bounded) and observes its duration.
    pub fn call_ended(&self, ticket: CallTicket, end_reason: &str, duration: Duration) {
        debug_assert!(
            Arc::ptr_eq(&ticket.ends, &self.ends),
            "a CallTicket ended on another Metrics"
        );
        ticket.end(end_reason, duration);
    }

    /// Calls in progress on `api` (what `callbridge_active_calls{api}` shows).
    pub fn active_calls(&self, api: &str) -> i64 {
        let api = self.apis.get(api);
        lock(&self.ends.live).active.get(&api).copied().unwrap_or(0)
    }

    /// A barge-in cut the assistant's audio `latency` after the caller started speaking.
    pub fn barge_in(&self, latency: Duration) {
        self.barge_ins.inc();
        self.bargein_latency.observe(latency.as_secs_f64());
    }

    pub fn first_audio(&self, latency: Duration) {
        self.time_to_first_audio.observe(latency.as_secs_f64());
    }

    pub fn playback_lag(&self, lag: Duration) {
        self.playback_lag.observe(lag.as_secs_f64());
    }

    pub fn upstream_restart(&self, reason: &str) {
        let reason = self.restart_reasons.get(reason);
        self.upstream_restarts
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn upstream_failure(&self, class: &str) {
        let class = self.failure_classes.get(class);
        self.upstream_failures
            .get_or_create(&[("class", class)])
            .inc();
    }

    pub fn openai_error(&self, code: &str) {
        let code = self.openai_codes.get(code);
        self.openai_errors.get_or_create(&[("code", code)]).inc();
    }

    pub fn rejected_request(&self, reason: &str) {
        let reason = self.rejected_reasons.get(reason);
        self.rejected_requests
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A tool call the model asked for finished with `outcome` after `took`.
    pub fn tool_call(&self, tool: &str, outcome: &str, took: Duration) {
        let tool = self.tools.get(tool);
        let outcome = self.tool_outcomes.get(outcome);
        self.tool_call_seconds
            .get_or_create(&[("tool", tool.clone())])
            .observe(took.as_secs_f64());
        self.tool_calls
            .get_or_create(&[("tool", tool), ("outcome", outcome)])
            .inc();
    }

    /// `n` tokens of `kind` (one of [`TOKEN_KINDS`], else `other`).
    pub fn tokens(&self, api: &str, model: &str, kind: &str, n: u64) {
        let labels = [
            ("api", self.apis.get(api)),
            ("model", self.models.get(model)),
            ("kind", self.token_kinds.get(kind)),
        ];
        self.model_tokens.get_or_create(&labels).inc_by(n);
    }

    /// Billed session time; ignored unless finite and positive.
    pub fn model_seconds(&self, api: &str, model: &str, secs: f64) {
        if secs.is_finite() && secs > 0.0 {
            let labels = [
                ("api", self.apis.get(api)),
                ("model", self.models.get(model)),
            ];
            self.model_seconds.get_or_create(&labels).inc_by(secs);
        }
    }

    /// Estimated cost; ignored unless finite and positive.
    pub fn cost_usd(&self, api: &str, model: &str, usd: f64) {
        if usd.is_finite() && usd > 0.0 {
            let labels = [
                ("api", self.apis.get(api)),
                ("model", self.models.get(model)),
            ];
            self.cost_usd.get_or_create(&labels).inc_by(usd);
        }
    }

    /// A live event stream subscriber was cut off for not keeping up.
    pub fn subscriber_dropped(&self) {
        self.subscribers_dropped.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const FAMILIES: [(&str, &str); 19] = [
        ("callbridge_active_calls", "gauge"),
        ("callbridge_calls_total", "counter"),
        ("callbridge_frames_total", "counter"),
        ("callbridge_dropped_frames_total", "counter"),
        ("callbridge_barge_ins_total", "counter"),
        ("callbridge_upstream_restarts_total", "counter"),
        ("callbridge_upstream_failures_total", "counter"),
        ("callbridge_openai_errors_total", "counter"),
        ("callbridge_rejected_requests_total", "counter"),
        ("callbridge_tool_calls_total", "counter"),
        ("callbridge_time_to_first_audio_seconds", "histogram"),
        ("callbridge_bargein_latency_seconds", "histogram"),
        ("callbridge_playback_lag_seconds", "histogram"),
        ("callbridge_call_duration_seconds", "histogram"),
        ("callbridge_tool_call_seconds", "histogram"),
        ("callbridge_model_tokens_total", "counter"),
        ("callbridge_model_seconds_total", "counter"),
        ("callbridge_cost_usd_total", "counter"),
        ("callbridge_event_subscribers_dropped_total", "counter"),
    ];

    #[derive(Debug)]
    struct Line {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    #[derive(Debug, Default)]
    struct Parsed {
        /// Family name (as in `# TYPE`) → type.
        types: BTreeMap<String, String>,
        samples: Vec<Line>,
    }

    impl Parsed {
        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            self.samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.len() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.value)
        }

        fn series(&self, name: &str) -> Vec<&Line> {
            self.samples.iter().filter(|s| s.name == name).collect()
        }
    }

    fn is_name(s: &str) -> bool {
        let mut bytes = s.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }

    /// `k="v",...}` → the labels and what follows the `}`.
    fn parse_labels<'a>(mut rest: &'a str, line: &str) -> (BTreeMap<String, String>, &'a str) {
        let mut labels = BTreeMap::new();
        loop {
            let eq = rest.find('=').unwrap_or_else(|| panic!("no `=` in {line}"));
            let key = &rest[..eq];
            assert!(is_name(key), "label key {key:?} in {line}");
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("unquoted value in {line}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => panic!("unclosed label value in {line}"),
                }
            };
            assert!(
                labels.insert(key.to_owned(), value).is_none(),
                "label {key} twice in {line}"
            );
            rest = &rest[close + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if let Some(r) = rest.strip_prefix('}') {
                return (labels, r);
            } else {
                panic!("bad label separator in {line}");
            }
        }
    }

    /// A strict reader of the Prometheus 0.0.4 text `render` writes: `# HELP` / `# TYPE`
    /// comments and `name{k="v",...} value` lines, nothing else; every name starts with
    /// `callbridge_`; every sample's family has a `# TYPE` line before it; histogram buckets
    /// carry `le`.
    fn parse(text: &str) -> Parsed {
        let mut parsed = Parsed::default();
        assert!(text.ends_with('\n'), "text must end with a newline");
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(name.starts_with("callbridge_") && is_name(name), "{line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let [name, kind] = parts[..] else {
                    panic!("{line}")
                };
                assert!(name.starts_with("callbridge_") && is_name(name), "{line}");
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                assert!(
                    parsed.types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");

            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("no value: {line}"));
            let name = &line[..name_end];
            assert!(name.starts_with("callbridge_") && is_name(name), "{line}");
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(body) => parse_labels(body, line),
                None => (BTreeMap::new(), &line[name_end..]),
            };
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space before the value: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("value {v:?} in {line}")),
            };
            assert!(value >= 0.0, "negative value: {line}");
            match parsed.types.get(name).map(String::as_str) {
                Some("counter" | "gauge") => {}
                _ => {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .unwrap_or_else(|| panic!("{name} has no # TYPE"));
                    assert_eq!(
                        parsed.types.get(base).map(String::as_str),
                        Some("histogram"),
                        "{name} has no # TYPE"
                    );
                    if name.ends_with("_bucket") {
                        assert!(labels.contains_key("le"), "bucket without le: {line}");
                    }
                }
            }
            parsed.samples.push(Line {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        parsed
    }

    fn scrape(metrics: &Metrics) -> Parsed {
        parse(&metrics.render())
    }

    fn add(counter: &AtomicU64, n: u64) {
        CallCounters::add(counter, n);
    }

    #[test]
    fn metrics_is_send_sync_and_ticket_is_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Metrics>();
        send_sync::<Arc<Metrics>>();
        send::<CallTicket>();
    }

    #[test]
    fn every_family_is_in_the_text_at_start_up() {
        let metrics = Metrics::new();
        let text = metrics.render();
        let p = parse(&text);
        let expected: BTreeMap<String, String> = FAMILIES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        assert_eq!(p.types, expected, "{text}");
        for (name, _) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
        for api in APIS {
            assert_eq!(
                p.value("callbridge_active_calls", &[("api", api)]),
                Some(0.0)
            );
        }
        for direction in DIRECTIONS {
            let labels = [("direction", direction)];
            assert_eq!(p.value("callbridge_frames_total", &labels), Some(0.0));
        }
        for queue in QUEUES {
            let labels = [("queue", queue)];
            assert_eq!(
                p.value("callbridge_dropped_frames_total", &labels),
                Some(0.0)
            );
        }
        for name in [
            "callbridge_barge_ins_total",
            "callbridge_event_subscribers_dropped_total",
            "callbridge_time_to_first_audio_seconds_count",
            "callbridge_bargein_latency_seconds_count",
            "callbridge_playback_lag_seconds_count",
            "callbridge_call_duration_seconds_count",
        ] {
            assert_eq!(p.value(name, &[]), Some(0.0), "{name}");
        }
    }

    #[test]
    fn frames_are_monotonic_across_call_end() {
        let metrics = Metrics::new();
        let (a, b) = (
            Arc::new(CallCounters::default()),
            Arc::new(CallCounters::default()),
        );
        let ticket_a = metrics.call_started("realtime", Arc::clone(&a));
        let ticket_b = metrics.call_started("live", Arc::clone(&b));
        assert_eq!(metrics.active_calls("realtime"), 1);
        assert_eq!(metrics.active_calls("live"), 1);

        add(&a.frames_in, 10);
        add(&a.frames_out, 7);
        add(&a.dropped_interrupted, 3);
        add(&a.malformed_frames, 1);
        add(&b.frames_in, 5);
        let frames_in = |p: &Parsed| p.value("callbridge_frames_total", &[("direction", "in")]);
        let dropped = |p: &Parsed, q| p.value("callbridge_dropped_frames_total", &[("queue", q)]);

        let first = scrape(&metrics);
        assert_eq!(frames_in(&first), Some(15.0));
        assert_eq!(
            first.value("callbridge_active_calls", &[("api", "realtime")]),
            Some(1.0)
        );

        // More audio, then the call ends: its last counts join the totals once.
        add(&a.frames_in, 2);
        metrics.call_ended(ticket_a, "caller_hangup", Duration::from_secs(42));
        let second = scrape(&metrics);
        assert_eq!(frames_in(&second), Some(17.0));
        assert_eq!(
            second.value("callbridge_frames_total", &[("direction", "out")]),
            Some(7.0)
        );
        assert_eq!(dropped(&second, "interrupted"), Some(3.0));
        assert_eq!(dropped(&second, "malformed"), Some(1.0));
        assert_eq!(metrics.active_calls("realtime"), 0);
        assert_eq!(
            second.value("callbridge_calls_total", &[("end_reason", "caller_hangup")]),
            Some(1.0)
        );
        assert_eq!(
            second.value("callbridge_call_duration_seconds_sum", &[]),
            Some(42.0)
        );

        // A late increment on an ended call is not counted; the live call still is.
        add(&a.frames_in, 100);
        add(&b.frames_in, 1);
        let third = scrape(&metrics);
        assert_eq!(frames_in(&third), Some(18.0));

        drop(ticket_b); // ended without call_ended: folded, counted as `other`
        let fourth = scrape(&metrics);
        assert_eq!(frames_in(&fourth), Some(18.0));
        assert_eq!(metrics.active_calls("live"), 0);
        assert_eq!(
            fourth.value("callbridge_calls_total", &[("end_reason", "other")]),
            Some(1.0)
        );
        assert_eq!(
            fourth.value("callbridge_call_duration_seconds_count", &[]),
            Some(2.0)
        );

        for (earlier, later) in [(&first, &second), (&second, &third), (&third, &fourth)] {
            for s in earlier
                .samples
                .iter()
                .filter(|s| s.name.ends_with("_total"))
            {
                let labels: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let after = later.value(&s.name, &labels).expect("series kept");
                assert!(after >= s.value, "{} {:?} decreased", s.name, s.labels);
            }
        }
    }

    #[test]
    fn unknown_api_counts_as_other() {
        let metrics = Metrics::new();
        let ticket = metrics.call_started("+15551234567", Arc::default());
        assert_eq!(metrics.active_calls("other"), 1);
        let p = scrape(&metrics);
        assert_eq!(
            p.value("callbridge_active_calls", &[("api", "other")]),
            Some(1.0)
        );
        assert!(!metrics.render().contains("1555"));
        metrics.call_ended(ticket, "done", Duration::ZERO);
        assert_eq!(metrics.active_calls("other"), 0);
    }

    #[test]
    fn label_values_are_checked() {
        for ok in [
            "rate_limit_exceeded",
            "a",
            "v1.2-x_y",
            &"a".repeat(MAX_LABEL_LEN),
        ] {
            assert!(is_bounded_label_value(ok), "{ok}");
        }
        for bad in [
            "",
            "Invalid",
            "has space",
            "quote\"",
            "new\nline",
            "CA0123456789abcdef",
            "+15551234567",
            "é",
            &"a".repeat(MAX_LABEL_LEN + 1),
        ] {
            assert!(!is_bounded_label_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn bounded_label_caps_distinct_values() {
        let label = BoundedLabel::new(3);
        assert_eq!(label.get("a"), "a");
        assert_eq!(label.get("Bad Value"), OTHER);
        assert_eq!(label.get("b"), "b");
        assert_eq!(label.get("other"), OTHER);
        assert_eq!(label.get("c"), "c");
        assert_eq!(label.get("d"), OTHER); // past the cap
        assert_eq!(label.get("a"), "a"); // kept values stay
        assert_eq!(label.len(), 3);

        let closed = BoundedLabel::closed(&APIS);
        assert_eq!(closed.get("echo"), "echo");
        assert_eq!(closed.get("gpt"), OTHER);
        assert_eq!(closed.len(), APIS.len());
    }

    #[test]
    fn peer_codes_are_capped_in_the_text() {
        let metrics = Metrics::new();
        for i in 0..101 {
            metrics.openai_error(&format!("code_{i}"));
        }
        metrics.openai_error("Not A Code");
        let p = scrape(&metrics);
        let series = p.series("callbridge_openai_errors_total");
        assert_eq!(series.len(), DEFAULT_LABEL_CAP + 1);
        assert_eq!(
            p.value("callbridge_openai_errors_total", &[("code", OTHER)]),
            Some((101 - DEFAULT_LABEL_CAP + 1) as f64)
        );
        let total: f64 = series.iter().map(|s| s.value).sum();
        assert_eq!(total, 102.0);
    }

    #[test]
    fn histograms_have_buckets() {
        let metrics = Metrics::new();
        metrics.barge_in(Duration::from_millis(120));
        metrics.first_audio(Duration::from_millis(800));
        metrics.playback_lag(Duration::from_millis(300));
        metrics.tool_call("get_weather", "ok", Duration::from_millis(450));
        let text = metrics.render();
        let p = parse(&text);
        for family in [
            "callbridge_time_to_first_audio_seconds",
            "callbridge_bargein_latency_seconds",
            "callbridge_playback_lag_seconds",
            "callbridge_call_duration_seconds",
            "callbridge_tool_call_seconds",
        ] {
            let buckets = p.series(&format!("{family}_bucket"));
            assert!(buckets.len() > 5, "{family}: {text}");
            assert!(buckets.iter().any(|b| b.labels["le"] == "+Inf"), "{family}");
            // Cumulative.
            for pair in buckets.windows(2) {
                assert!(pair[0].value <= pair[1].value, "{family}");
            }
        }
        assert_eq!(p.value("callbridge_barge_ins_total", &[]), Some(1.0));
        assert_eq!(
            p.value(
                "callbridge_bargein_latency_seconds_bucket",
                &[("le", "0.15")]
            ),
            Some(1.0)
        );
        assert_eq!(
            p.value(
                "callbridge_bargein_latency_seconds_bucket",
                &[("le", "0.1")]
            ),
            Some(0.0)
        );
        assert_eq!(
            p.value(
                "callbridge_tool_call_seconds_count",
                &[("tool", "get_weather")]
            ),
            Some(1.0)
        );
        assert_eq!(
            p.value(
                "callbridge_tool_calls_total",
                &[("tool", "get_weather"), ("outcome", "ok")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn usage_and_simple_counters() {
        let metrics = Metrics::new();
        metrics.tokens("realtime", "gpt-realtime", "input_audio", 120);
        metrics.tokens("realtime", "gpt-realtime", "input_audio", 30);
        metrics.tokens("realtime", "gpt-realtime", "sideways", 1);
        metrics.model_seconds("live", "gpt-live", 12.5);
        metrics.model_seconds("live", "gpt-live", f64::NAN);
        metrics.cost_usd("realtime", "gpt-realtime", 0.25);
        metrics.cost_usd("realtime", "gpt-realtime", -1.0);
        metrics.upstream_restart("socket_closed");
        metrics.upstream_failure("timeout");
        metrics.rejected_request("bad_signature");
        metrics.subscriber_dropped();
        let p = scrape(&metrics);
        let model = |api, kind| {
            p.value(
                "callbridge_model_tokens_total",
                &[("api", api), ("model", "gpt-realtime"), ("kind", kind)],
            )
        };
        assert_eq!(model("realtime", "input_audio"), Some(150.0));
        assert_eq!(model("realtime", OTHER), Some(1.0));
        let api_model = |api, model| [("api", api), ("model", model)];
        assert_eq!(
            p.value(
                "callbridge_model_seconds_total",
                &api_model("live", "gpt-live")
            ),
            Some(12.5)
        );
        assert_eq!(
            p.value(
                "callbridge_cost_usd_total",
                &api_model("realtime", "gpt-realtime")
            ),
            Some(0.25)
        );
        assert_eq!(
            p.value(
                "callbridge_upstream_restarts_total",
                &[("reason", "socket_closed")]
            ),
            Some(1.0)
        );
        assert_eq!(
            p.value(
                "callbridge_upstream_failures_total",
                &[("class", "timeout")]
            ),
            Some(1.0)
        );
        assert_eq!(
            p.value(
                "callbridge_rejected_requests_total",
                &[("reason", "bad_signature")]
            ),
            Some(1.0)
        );
        assert_eq!(
            p.value("callbridge_event_subscribers_dropped_total", &[]),
            Some(1.0)
        );
    }

    #[test]
    fn apps_do_not_share_metrics() {
        let (one, two) = (Metrics::new(), Metrics::new());
        let counters = Arc::new(CallCounters::default());
        add(&counters.frames_out, 9);
        let ticket = one.call_started("echo", counters);
        one.subscriber_dropped();
        let p = scrape(&two);
        assert_eq!(
            p.value("callbridge_frames_total", &[("direction", "out")]),
            Some(0.0)
        );
        assert_eq!(
            p.value("callbridge_event_subscribers_dropped_total", &[]),
            Some(0.0)
        );
        assert_eq!(two.active_calls("echo"), 0);
        one.call_ended(ticket, "done", Duration::from_secs(1));
    }
}
