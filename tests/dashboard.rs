//! The operator dashboard in a real browser: Debian's `chromium`, headless, driven over the
//! DevTools protocol (chromiumoxide), during a simulated call through the fake OpenAI Realtime
//! server and the fake Twilio REST API.
//!
//! What a person sees: the call appears within two seconds, a transcript line shows when the
//! fake model says it, the hang-up button ends the call through Twilio's REST API, and the
//! page logs no error or warning (console, uncaught exception, failed load) all along.
//!
//! Needs `chromium` (`.ci/run` installs it; `CHROMIUM=/path` picks another binary). Without it
//! the test fails, unless `CALLBRIDGE_SKIP_BROWSER=1`. Screenshots go to
//! `$CARGO_TARGET_DIR/screenshots/` (`target/screenshots/` by default); with
//! `CALLBRIDGE_UPDATE_SCREENSHOTS=1` they are copied to `docs/screenshots/` for the README.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use callbridge_fakes::twilio_rest::{Account, FakeTwilioRest};
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use futures_util::StreamExt;
use secrecy::SecretString;
use support::{openai_settings, spawn_app, FakeOpenAi, FakeTwilio, TestApp};

const SID: &str = "CA0d0a5b0a4d0000000000000000000001";
const CALLER: &str = "+14155550100";
const DIALLED: &str = "+14155550199";

/// The browser binary, or `None` when the test is to be skipped.
fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        });
        if found.is_some() {
            return found;
        }
    }
    if std::env::var("CALLBRIDGE_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("dashboard browser test skipped: no chromium and CALLBRIDGE_SKIP_BROWSER=1");
        return None;
    }
    panic!(
        "the dashboard's browser test needs Chromium: `apt-get install -y chromium` (.ci/run \
         does it), or CHROMIUM=/path/to/chrome, or CALLBRIDGE_SKIP_BROWSER=1 to skip it"
    );
}

/// A headless browser with one page, and every error or warning the page logged.
struct Headless {
    browser: Browser,
    page: Page,
    problems: Arc<Mutex<Vec<String>>>,
    _profile: TempDir,
}

/// A fresh profile directory per test, removed after.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Headless {
    async fn launch(executable: &Path) -> Headless {
        let profile = std::env::temp_dir().join(format!(
            "callbridge-dashboard-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let config = BrowserConfig::builder()
            .chrome_executable(executable)
            .user_data_dir(&profile)
            .no_sandbox() // CI runs as root
            .new_headless_mode()
            .window_size(1200, 760)
            .viewport(chromiumoxide::handler::viewport::Viewport {
                width: 1200,
                height: 760,
                ..Default::default()
            })
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .launch_timeout(Duration::from_secs(30))
            .build()
            .expect("a browser configuration");
        let (browser, mut handler) = Browser::launch(config)
            .await
            .unwrap_or_else(|e| panic!("chromium at {} did not start: {e}", executable.display()));
        actix_web::rt::spawn(async move { while handler.next().await.is_some() {} });
        let page = browser
            .new_page("about:blank")
            .await
            .expect("a browser tab");
        let problems = Arc::new(Mutex::new(Vec::new()));

        let mut console = page
            .event_listener::<EventConsoleApiCalled>()
            .await
            .unwrap();
        let seen = problems.clone();
        actix_web::rt::spawn(async move {
            while let Some(ev) = console.next().await {
                if matches!(
                    ev.r#type,
                    ConsoleApiCalledType::Error
                        | ConsoleApiCalledType::Warning
                        | ConsoleApiCalledType::Assert
                ) {
                    let args: Vec<String> = ev
                        .args
                        .iter()
                        .map(|a| {
                            a.value
                                .as_ref()
                                .map(|v| v.to_string())
                                .or_else(|| a.description.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    seen.lock().unwrap().push(format!(
                        "console.{:?}: {}",
                        ev.r#type,
                        args.join(" ")
                    ));
                }
            }
        });
        let mut exceptions = page.event_listener::<EventExceptionThrown>().await.unwrap();
        let seen = problems.clone();
        actix_web::rt::spawn(async move {
            while let Some(ev) = exceptions.next().await {
                let d = &ev.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|e| e.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                seen.lock().unwrap().push(format!(
                    "uncaught exception at {}:{}: {what}",
                    d.url.clone().unwrap_or_default(),
                    d.line_number
                ));
            }
        });
        let mut log = page.event_listener::<EventEntryAdded>().await.unwrap();
        let seen = problems.clone();
        actix_web::rt::spawn(async move {
            while let Some(ev) = log.next().await {
                let e = &ev.entry;
                if matches!(e.level, LogEntryLevel::Error | LogEntryLevel::Warning) {
                    seen.lock().unwrap().push(format!(
                        "log {:?} ({:?}): {} {}",
                        e.level,
                        e.source,
                        e.text,
                        e.url.clone().unwrap_or_default()
                    ));
                }
            }
        });
        page.enable_runtime().await.expect("Runtime.enable");
        page.enable_log().await.expect("Log.enable");
        Headless {
            browser,
            page,
            problems,
            _profile: TempDir(profile),
        }
    }

    async fn open(&self, url: &str) {
        self.page.goto(url).await.expect("the page loads");
    }

    /// Evaluates `js` in the page.
    async fn eval<T: serde::de::DeserializeOwned>(&self, js: &str) -> T {
        self.page
            .evaluate(js)
            .await
            .unwrap_or_else(|e| panic!("evaluating `{js}`: {e}"))
            .into_value()
            .unwrap_or_else(|e| panic!("the value of `{js}`: {e}"))
    }

    /// Waits until `js` is true in the page; panics naming `what` after `timeout`.
    async fn wait_for(&self, what: &str, timeout: Duration, js: &str) -> Duration {
        let start = Instant::now();
        loop {
            if self.eval::<bool>(js).await {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                let body: String = self.eval("document.body.innerText").await;
                panic!(
                    "the page did not show {what} within {timeout:?}; it shows:\n{body}\n\
                     errors so far: {:?}",
                    self.problems()
                );
            }
            sleep(Duration::from_millis(25)).await;
        }
    }

    async fn click(&self, selector: &str) {
        self.page
            .find_element(selector)
            .await
            .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {selector}: {e}"));
    }

    async fn screenshot(&self, name: &str) {
        let png = self
            .page
            .screenshot(
                ScreenshotParams::builder()
                    .format(CaptureScreenshotFormat::Png)
                    .build(),
            )
            .await
            .expect("a screenshot");
        save_screenshot(name, &png);
    }

    fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
    }
}

/// `target/screenshots/NAME.png` (under `CARGO_TARGET_DIR` when set); also
/// `docs/screenshots/NAME.png` with `CALLBRIDGE_UPDATE_SCREENSHOTS=1`.
fn save_screenshot(name: &str, png: &[u8]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    if std::env::var("CALLBRIDGE_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = root.join("docs/screenshots");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join(format!("{name}.png")), png).unwrap();
    }
}

/// Whether the service streams `/events` (the page falls back to polling `/calls` without).
async fn has_event_stream(app: &TestApp) -> bool {
    let res = awc::Client::default()
        .get(app.http("/events"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    matches!(res, Ok(r) if r.status() == 200
        && r.headers().get("content-type").and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream")))
}

/// A JS string literal for `s` (selectors and texts in evaluated snippets).
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[actix_web::test]
async fn the_dashboard_follows_a_call_and_hangs_it_up() {
    let Some(chromium) = chromium() else { return };
    let account = Account::test();
    let rest = FakeTwilioRest::start(account.clone()).await;
    rest.add_live_call(SID, CALLER, DIALLED);
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.twilio.api_base = rest.base_url();
    settings.secrets.twilio_account_sid = Some(account.account_sid.clone());
    settings.secrets.twilio_auth_token = Some(SecretString::from(account.auth_token.clone()));
    // No admin token: the page is used from this host, as `/calls` is.
    let app = spawn_app(settings).await;

    let browser = Headless::launch(&chromium).await;
    browser.open(&app.http("/")).await;
    browser
        .wait_for(
            "the live list and the health bar",
            Duration::from_secs(5),
            "!document.getElementById('main').hidden \
             && document.getElementById('health-status').textContent === 'healthy'",
        )
        .await;
    let title: String = browser.eval("document.title").await;
    assert_eq!(title, "callbridge");
    // The icon a browser asks for is there (a 404 would be a console error).
    let icon: u16 = browser
        .eval("fetch('/favicon.ico').then(r => r.ok ? r.status : 0)")
        .await;
    assert_eq!(icon, 200);

    // A call: Twilio's stream starts, the AI session opens.
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller
        .start_call("MZdash", SID, &[("From", CALLER), ("To", DIALLED)])
        .await;
    let row = format!("#calls [data-call-sid={}]", js(SID));
    let took = browser
        .wait_for(
            "the new call in the list",
            Duration::from_secs(2),
            &format!("document.querySelector({}) !== null", js(&row)),
        )
        .await;
    eprintln!("the call showed after {took:?}");
    session.recv_event("session.update").await;
    browser
        .wait_for(
            "the call as active",
            Duration::from_secs(5),
            &format!(
                "document.querySelector({})?.dataset.state === 'active'",
                js(&row)
            ),
        )
        .await;
    let shown: String = browser
        .eval(&format!("document.querySelector({}).textContent", js(&row)))
        .await;
    assert!(shown.contains(CALLER), "the row shows the caller: {shown}");

    // Open it: transcript and events.
    browser.click(&row).await;
    browser
        .wait_for(
            "the call's detail",
            Duration::from_secs(2),
            &format!(
                "!document.getElementById('detail').hidden \
                 && document.getElementById('detail-sid').textContent === {}",
                js(SID)
            ),
        )
        .await;

    // The fake model hears the caller and answers: both lines show.
    session.caller_transcript("item_u1", "Where is my order?");
    session.start_response("resp_1", "item_1");
    session.audio_delta_bytes("resp_1", "item_1", &[0x55; 320]);
    session.finish_response("resp_1", "item_1", "It ships tomorrow morning.");
    let line = |text: &str| {
        format!(
            "[...document.querySelectorAll('#transcript li')].some(li => li.textContent.includes({}))",
            js(text)
        )
    };
    browser
        .wait_for(
            "the caller's transcript line",
            Duration::from_secs(3),
            &line("Where is my order?"),
        )
        .await;
    browser
        .wait_for(
            "the assistant's transcript line",
            Duration::from_secs(3),
            &line("It ships tomorrow morning."),
        )
        .await;
    browser.screenshot("dashboard-call").await;

    // Hang up, from the page: the button, then its confirm (no goodbye).
    browser.click("[data-action=\"hangup\"]").await;
    browser
        .wait_for(
            "the hang-up form",
            Duration::from_secs(2),
            "!document.querySelector('[data-form=\"hangup\"]').hidden",
        )
        .await;
    browser.click("[data-confirm=\"hangup\"]").await;
    tokio::time::timeout(Duration::from_secs(5), rest.on_stream_end(SID))
        .await
        .expect("the page's hang-up reached Twilio's REST API");
    let updates = rest.updates_for(SID);
    assert_eq!(updates.len(), 1, "one REST update");
    assert_eq!(updates[0].param("Status"), Some("completed"));
    browser
        .wait_for(
            "the hang-up accepted",
            Duration::from_secs(2),
            "document.getElementById('action-result').dataset.result === 'accepted'",
        )
        .await;
    // Twilio then stops the stream, and the call ends.
    caller.hang_up().await;
    app.wait_ended("hung_up", Duration::from_secs(3)).await;
    browser
        .wait_for(
            "the call shown as ended",
            Duration::from_secs(3),
            &format!(
                "(document.querySelector({0}) === null) \
                 || document.querySelector({0}).dataset.state === 'ended'",
                js(&row)
            ),
        )
        .await;
    browser.screenshot("dashboard-ended").await;
    browser
        .wait_for(
            "the call gone from the list",
            Duration::from_secs(10),
            &format!("document.querySelector({}) === null", js(&row)),
        )
        .await;

    let problems = browser.problems();
    let events = has_event_stream(&app).await;
    browser.close().await;
    rest.assert_no_violations();
    caller.assert_no_violations();
    assert!(
        events,
        "the service has no `GET /events` (text/event-stream): the page followed the call by \
         polling `/calls`; the live stream is part of the dashboard's contract. Page errors: \
         {problems:#?}"
    );
    assert!(
        problems.is_empty(),
        "the page logged errors or warnings: {problems:#?}"
    );
}

/// With an admin token the page asks for it once, trades it for the session cookie
/// (`POST /login`), and from then on reads the calls with the cookie alone: the token is in no
/// URL, no storage, and `document.cookie` cannot read the session (HttpOnly).
#[actix_web::test]
async fn the_dashboard_asks_for_the_admin_token_once() {
    let Some(chromium) = chromium() else { return };
    const TOKEN: &str = "dashboard-test-admin-token-0123456789";
    let fake = FakeOpenAi::start().await;
    let mut settings = openai_settings(&fake);
    settings.secrets.admin_token = Some(SecretString::from(TOKEN));
    let app = spawn_app(settings).await;

    let browser = Headless::launch(&chromium).await;
    browser.open(&app.http("/")).await;
    browser
        .wait_for(
            "the token form",
            Duration::from_secs(5),
            "!document.getElementById('login').hidden",
        )
        .await;
    browser.screenshot("dashboard-login").await;

    // A wrong token first: an error, the form stays.
    browser.click("#login-token").await;
    browser
        .page
        .find_element("#login-token")
        .await
        .unwrap()
        .type_str("not-the-token")
        .await
        .unwrap();
    browser.click("[data-action=\"login\"]").await;
    browser
        .wait_for(
            "the wrong token refused",
            Duration::from_secs(3),
            "document.getElementById('login-error').textContent !== ''",
        )
        .await;

    browser.click("#login-token").await;
    browser
        .page
        .find_element("#login-token")
        .await
        .unwrap()
        .type_str(TOKEN)
        .await
        .unwrap();
    browser.click("[data-action=\"login\"]").await;
    browser
        .wait_for(
            "the live list after signing in",
            Duration::from_secs(5),
            "!document.getElementById('main').hidden && document.getElementById('login').hidden",
        )
        .await;

    let href: String = browser.eval("location.href").await;
    assert!(!href.contains(TOKEN), "the token is in the URL: {href}");
    let cookie: String = browser.eval("document.cookie").await;
    assert!(
        !cookie.contains("callbridge_session"),
        "the session cookie is readable from script: {cookie}"
    );
    let stored: String = browser
        .eval("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
        .await;
    assert!(!stored.contains(TOKEN), "the token is in web storage");
    let input: String = browser
        .eval("document.getElementById('login-token').value")
        .await;
    assert!(input.is_empty(), "the token stays in the form");

    // The cookie opens the data: a call shows.
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let _session = fake.next_session().await;
    caller.start_call("MZlogin", SID, &[]).await;
    browser
        .wait_for(
            "the call, read with the session cookie",
            Duration::from_secs(3),
            &format!(
                "document.querySelector({}) !== null",
                js(&format!("#calls [data-call-sid={}]", js(SID)))
            ),
        )
        .await;

    // The page's own 401s (before signing in, and the wrong token) are how it learns to ask:
    // the browser logs them as failed loads. Nothing else may be logged.
    let problems: Vec<String> = browser
        .problems()
        .into_iter()
        .filter(|p| !p.contains("401"))
        .collect();
    browser.close().await;
    caller.hang_up().await;
    assert!(
        problems.is_empty(),
        "the page logged errors or warnings: {problems:#?}"
    );
}
