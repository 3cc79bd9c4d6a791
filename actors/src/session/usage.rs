//! What a call used of the model and what it cost, by API: Realtime bills tokens (summed over
//! the call's responses), GPT-Live bills seconds of session (each session's latest cumulative
//! value, summed over the call's sessions). Prices come from `[prices]`; a model without a price
//! costs `null` with a note, never zero.

use serde::{Deserialize, Serialize};

use crate::config::OpenAiApi;

/// Tokens of Realtime responses (`response.done.response.usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    pub input_text: u64,
    pub input_audio: u64,
    /// Of the input tokens, those read from the cache (cheaper).
    pub cached_text: u64,
    pub cached_audio: u64,
    pub output_text: u64,
    pub output_audio: u64,
}

impl TokenUsage {
    /// Each count with its kind's name (the metrics' `kind` label).
    pub fn by_kind(&self) -> [(&'static str, u64); 6] {
        [
            ("input_text", self.input_text),
            ("input_audio", self.input_audio),
            ("cached_text", self.cached_text),
            ("cached_audio", self.cached_audio),
            ("output_text", self.output_text),
            ("output_audio", self.output_audio),
        ]
    }

    pub fn add(&mut self, other: &TokenUsage) {
        self.input_text += other.input_text;
        self.input_audio += other.input_audio;
        self.cached_text += other.cached_text;
        self.cached_audio += other.cached_audio;
        self.output_text += other.output_text;
        self.output_audio += other.output_audio;
    }
}

/// USD per million tokens of a Realtime model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrice {
    pub model: String,
    pub text_in: f64,
    pub text_in_cached: f64,
    pub audio_in: f64,
    pub audio_in_cached: f64,
    pub text_out: f64,
    pub audio_out: f64,
}

/// USD per minute of session of a GPT-Live model (billed per second).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinutePrice {
    pub model: String,
    pub per_minute: f64,
}

/// The `[prices]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prices {
    pub realtime: Vec<TokenPrice>,
    pub live: Vec<MinutePrice>,
}

impl Default for Prices {
    /// OpenAI's list prices as of 2026-11-30 (openai.com/api/pricing; gpt-live.md §11).
    fn default() -> Self {
        let realtime = |model: &str,
                        text_in,
                        text_in_cached,
                        audio_in,
                        audio_in_cached,
                        text_out,
                        audio_out| TokenPrice {
            model: model.into(),
            text_in,
            text_in_cached,
            audio_in,
            audio_in_cached,
            text_out,
            audio_out,
        };
        Prices {
            realtime: vec![
                realtime("gpt-realtime", 4.0, 0.40, 32.0, 0.40, 16.0, 64.0),
                realtime("gpt-realtime-mini", 0.60, 0.06, 10.0, 0.30, 2.40, 20.0),
            ],
            live: vec![
                MinutePrice {
                    model: "gpt-live-1".into(),
                    per_minute: 0.05,
                },
                MinutePrice {
                    model: "gpt-live-1.1".into(),
                    per_minute: 0.05,
                },
            ],
        }
    }
}

impl Prices {
    /// Negative or non-finite prices are a settings error: the message names the model.
    pub fn check(&self) -> Result<(), String> {
        let bad = |v: f64| !v.is_finite() || v < 0.0;
        for p in &self.realtime {
            if [
                p.text_in,
                p.text_in_cached,
                p.audio_in,
                p.audio_in_cached,
                p.text_out,
                p.audio_out,
            ]
            .into_iter()
            .any(bad)
            {
                return Err(format!(
                    "realtime price of {:?} is negative or not a number",
                    p.model
                ));
            }
        }
        for p in &self.live {
            if bad(p.per_minute) {
                return Err(format!(
                    "live price of {:?} is negative or not a number",
                    p.model
                ));
            }
        }
        Ok(())
    }
}

/// A call's usage so far, as `/calls` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CallUsage {
    pub api: &'static str,
    pub model: String,
    /// Realtime: tokens summed over the call's responses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    /// GPT-Live: seconds of session, summed over the call's sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// `null` when the model has no price (see `price_note`).
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_note: Option<String>,
    /// GPT-Live with tools: the tokens of the Responses model tool use is delegated to. Billed
    /// separately by OpenAI at that model's token prices, and not in `cost_usd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegated: Option<DelegatedUsage>,
}

/// Tokens of GPT-Live's delegated Responses backend, summed over its responses.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DelegatedUsage {
    pub model: String,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
}

/// Accumulates one call's usage.
#[derive(Debug, Clone)]
pub struct UsageMeter {
    api: OpenAiApi,
    model: String,
    tokens: TokenUsage,
    /// (session, its latest cumulative seconds).
    sessions: Vec<(u32, f64)>,
    delegated: Option<DelegatedUsage>,
}

impl UsageMeter {
    pub fn new(api: OpenAiApi, model: impl Into<String>) -> Self {
        UsageMeter {
            api,
            model: model.into(),
            tokens: TokenUsage::default(),
            sessions: Vec::new(),
            delegated: None,
        }
    }

    /// A delegated backend response's tokens (GPT-Live with tools): added.
    pub fn add_delegated(&mut self, model: &str, input: u64, cached: u64, output: u64) {
        let d = self.delegated.get_or_insert_with(|| DelegatedUsage {
            model: model.to_owned(),
            ..Default::default()
        });
        d.input_tokens += input;
        d.cached_tokens += cached;
        d.output_tokens += output;
    }

    /// A Realtime response's tokens: added.
    pub fn add_tokens(&mut self, tokens: &TokenUsage) {
        self.tokens.add(tokens);
    }

    /// A GPT-Live session's cumulative seconds: replaces that session's previous value (never
    /// added up), and never goes back.
    pub fn session_seconds(&mut self, session: u32, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        match self.sessions.iter_mut().find(|(s, _)| *s == session) {
            Some((_, latest)) => *latest = latest.max(seconds),
            None => self.sessions.push((session, seconds)),
        }
    }

    pub fn seconds(&self) -> f64 {
        // Folded from +0.0: an empty float sum is -0.0, which would show as `-0.0` in `/calls`.
        self.sessions.iter().fold(0.0, |total, (_, s)| total + s)
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn tokens(&self) -> TokenUsage {
        self.tokens
    }

    /// The usage with its cost at `prices`.
    pub fn report(&self, prices: &Prices) -> CallUsage {
        let mut usage = CallUsage {
            api: self.api.as_str(),
            model: self.model.clone(),
            delegated: self.delegated.clone(),
            ..Default::default()
        };
        match self.api {
            OpenAiApi::Realtime => {
                let t = self.tokens;
                usage.tokens = Some(t);
                match prices.realtime.iter().find(|p| p.model == self.model) {
                    Some(p) => {
                        let per = |n: u64, price: f64| n as f64 * price / 1_000_000.0;
                        let cost = per(t.input_text.saturating_sub(t.cached_text), p.text_in)
                            + per(t.cached_text, p.text_in_cached)
                            + per(t.input_audio.saturating_sub(t.cached_audio), p.audio_in)
                            + per(t.cached_audio, p.audio_in_cached)
                            + per(t.output_text, p.text_out)
                            + per(t.output_audio, p.audio_out);
                        usage.cost_usd = Some(round_usd(cost));
                    }
                    None => usage.price_note = Some(no_price(&self.model, "realtime")),
                }
            }
            OpenAiApi::Live => {
                let seconds = self.seconds();
                usage.seconds = Some((seconds * 10.0).round() / 10.0);
                match prices.live.iter().find(|p| p.model == self.model) {
                    Some(p) => usage.cost_usd = Some(round_usd(seconds * p.per_minute / 60.0)),
                    None => usage.price_note = Some(no_price(&self.model, "live")),
                }
            }
        }
        usage
    }
}

fn no_price(model: &str, table: &str) -> String {
    format!("no price for model {model:?} in [prices] {table}: cost unknown")
}

/// To a millionth of a dollar.
fn round_usd(usd: f64) -> f64 {
    (usd * 1_000_000.0).round() / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegated_tokens_are_added_up_and_kept_out_of_the_cost() {
        let mut meter = UsageMeter::new(OpenAiApi::Live, "gpt-live-1");
        meter.session_seconds(0, 60.0);
        meter.add_delegated("gpt-5.5", 812, 512, 64);
        meter.add_delegated("gpt-5.5", 100, 0, 10);
        let report = meter.report(&Prices::default());
        assert_eq!(report.cost_usd, Some(0.05), "the session's minute only");
        let d = report.delegated.unwrap();
        assert_eq!(
            (
                d.model.as_str(),
                d.input_tokens,
                d.cached_tokens,
                d.output_tokens
            ),
            ("gpt-5.5", 912, 512, 74)
        );
        assert!(UsageMeter::new(OpenAiApi::Live, "gpt-live-1")
            .report(&Prices::default())
            .delegated
            .is_none());
    }

    #[test]
    fn live_seconds_are_replaced_within_a_session_and_summed_across_sessions() {
        let mut meter = UsageMeter::new(OpenAiApi::Live, "gpt-live-1");
        meter.session_seconds(0, 10.0);
        meter.session_seconds(0, 37.5); // cumulative: replaces
        meter.session_seconds(0, 30.0); // never goes back
        meter.session_seconds(1, 22.5); // a second session (restart): adds
        assert_eq!(meter.seconds(), 60.0);
        let report = meter.report(&Prices::default());
        assert_eq!(report.seconds, Some(60.0));
        assert_eq!(report.cost_usd, Some(0.05), "one minute at $0.05");
        assert_eq!(report.tokens, None);
    }

    #[test]
    fn realtime_tokens_are_summed_and_priced_with_the_cache_discount() {
        let mut meter = UsageMeter::new(OpenAiApi::Realtime, "gpt-realtime");
        let response = TokenUsage {
            input_text: 1_000,
            input_audio: 500_000,
            cached_text: 0,
            cached_audio: 100_000,
            output_text: 250_000,
            output_audio: 250_000,
        };
        meter.add_tokens(&response);
        meter.add_tokens(&response);
        let report = meter.report(&Prices::default());
        assert_eq!(report.tokens.unwrap().input_audio, 1_000_000);
        // 2k text in at $4/M, 800k audio at $32/M, 200k cached audio at $0.40/M,
        // 500k text out at $16/M, 500k audio out at $64/M.
        let want = 0.008 + 25.6 + 0.08 + 8.0 + 32.0;
        assert!((report.cost_usd.unwrap() - want).abs() < 1e-6, "{report:?}");
    }

    #[test]
    fn no_session_yet_is_zero_not_minus_zero() {
        let report = UsageMeter::new(OpenAiApi::Live, "gpt-live-1").report(&Prices::default());
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("-0"), "{json}");
    }

    #[test]
    fn an_unknown_model_costs_null_and_says_so() {
        let meter = UsageMeter::new(OpenAiApi::Live, "gpt-live-9");
        let report = meter.report(&Prices::default());
        assert_eq!(report.cost_usd, None);
        assert!(report.price_note.unwrap().contains("gpt-live-9"));
        let json = serde_json::to_value(
            UsageMeter::new(OpenAiApi::Realtime, "x").report(&Prices::default()),
        )
        .unwrap();
        assert!(json["cost_usd"].is_null());
    }

    #[test]
    fn bad_prices_are_refused() {
        let mut prices = Prices::default();
        assert!(prices.check().is_ok());
        prices.live[0].per_minute = -1.0;
        assert!(prices.check().unwrap_err().contains("gpt-live-1"));
    }
}
