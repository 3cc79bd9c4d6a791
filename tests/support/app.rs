//! The real service, started in-process on 127.0.0.1 port 0 for a test.

use std::time::Duration;

use actix_web::dev::ServerHandle;
use callbridge::settings::UpstreamMode;
use callbridge::{Application, Settings};
use secrecy::SecretString;
use serde_json::Value;

use super::FakeOpenAi;

/// The OpenAI key the tests hand the service; it must never show up in a response.
pub const TEST_OPENAI_KEY: &str = "sk-test-callbridge-e2e-0123456789";

/// A running service.
pub struct TestApp {
    pub port: u16,
    handle: ServerHandle,
    drain: callbridge::Drain,
    served: std::rc::Rc<std::cell::Cell<bool>>,
}

/// Settings for a test: port 0, one worker, fast restarts, echo upstream.
pub fn test_settings() -> Settings {
    let mut s = Settings::default();
    s.server.port = 0;
    s.server.workers = 1;
    s.server.drain_timeout_s = 1;
    s.upstream = UpstreamMode::Echo;
    s.openai.restart_backoff_ms = 20;
    s.openai.restart_backoff_max_ms = 100;
    s.openai.connect_timeout_ms = 2_000;
    s.call.dtmf_response_delay_ms = 100;
    // A mark after every chunk, so that tests can reason chunk by chunk; the default's
    // coalescing has its own test.
    s.call.mark_interval_ms = 0;
    s
}

/// Settings for a service whose OpenAI leg goes to `fake`.
pub fn openai_settings(fake: &FakeOpenAi) -> Settings {
    let mut s = test_settings();
    s.upstream = UpstreamMode::OpenAi;
    // No Twilio token in most tests: signature checks off, explicitly, as the service demands.
    s.twilio.validate_signatures = Some(false);
    s.openai.url = fake.url();
    s.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    s
}

/// Settings for a service whose calls use GPT-Live at `fake`.
pub fn live_settings(fake: &callbridge_fakes::live::FakeLive) -> Settings {
    let mut s = test_settings();
    s.upstream = UpstreamMode::OpenAi;
    s.twilio.validate_signatures = Some(false);
    s.openai.api = callbridge_actors::config::OpenAiApi::Live;
    s.openai.live_url = fake.url();
    s.openai.live_model = "gpt-live-1".into();
    s.secrets.openai_api_key = Some(SecretString::from(TEST_OPENAI_KEY));
    s
}

/// Builds and starts the service; it stops when the test's runtime ends.
pub async fn spawn_app(settings: Settings) -> TestApp {
    let _ = env_logger_init();
    let app = Application::build(settings)
        .await
        .expect("the service starts");
    let port = app.port();
    let handle = app.handle();
    let drain = app.drain();
    let served = std::rc::Rc::new(std::cell::Cell::new(false));
    let done = served.clone();
    actix_web::rt::spawn(async move {
        let _ = app.serve().await;
        done.set(true);
    });
    TestApp {
        port,
        handle,
        drain,
        served,
    }
}

fn env_logger_init() -> Result<(), ()> {
    // Logs show with `cargo test -- --nocapture` and RUST_LOG=debug; quiet otherwise.
    let _ = env_logger::builder().is_test(true).try_init();
    Ok(())
}

impl TestApp {
    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/media-stream", self.port)
    }

    /// Twilio's voice webhook for an incoming call `call_sid`: POST `/voice` (signed with
    /// `signing`), the TwiML read strictly by the fake. Panics if it is not a 200 with TwiML.
    pub async fn answer_call(
        &self,
        call_sid: &str,
        signing: &callbridge_fakes::webhook::Signing,
    ) -> callbridge_fakes::twiml::Twiml {
        let call =
            callbridge_fakes::webhook::IncomingCall::new(call_sid, "+14155550100", "+14155550199");
        callbridge_fakes::webhook::answer_call(&self.http("/voice"), &call, signing)
            .await
            .unwrap_or_else(|e| panic!("/voice for {call_sid}: {e}"))
    }

    /// GET `path`, returning the status and the JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        self.get_json_with(path, &[]).await
    }

    pub async fn get_json_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = awc::Client::default()
            .get(self.http(path))
            .timeout(Duration::from_secs(5));
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        let mut res = req.send().await.expect("GET answered");
        let body = res.body().await.expect("a body");
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (res.status().as_u16(), json)
    }

    /// The live call `call_sid` as `/calls/{sid}` shows it (panics if absent).
    pub async fn call(&self, call_sid: &str) -> Value {
        let (status, body) = self.get_json(&format!("/calls/{call_sid}")).await;
        assert_eq!(status, 200, "/calls/{call_sid}: {body}");
        body
    }

    /// Waits until `/calls/{sid}` satisfies `check`.
    pub async fn wait_call(
        &self,
        call_sid: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) = self.get_json(&format!("/calls/{call_sid}")).await;
            if status == 200 && check(&body) {
                return body;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {call_sid}: {what}; last: {status} {body}");
            }
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `/calls` lists `n` calls.
    pub async fn wait_call_count(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, body) = self.get_json("/calls").await;
            if body["count"] == n {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {n} live calls; last: {body}");
            }
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many calls ended with `reason` so far (`/health`'s `calls_ended`).
    pub async fn ended(&self, reason: &str) -> u64 {
        let (_, health) = self.get_json("/health").await;
        health["calls_ended"][reason].as_u64().unwrap_or(0)
    }

    /// Waits until a call ended with `reason`; panics after `timeout`.
    pub async fn wait_ended(&self, reason: &str, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.ended(reason).await == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no call ended with {reason} within {timeout:?}: {:?}",
                self.get_json("/health").await.1
            );
            actix_web::rt::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Starts a drain, as SIGTERM does.
    pub fn start_drain(&self) {
        self.drain.start();
    }

    /// Whether the server has stopped (after a drain or a stop).
    pub fn has_stopped(&self) -> bool {
        self.served.get()
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
