//! callbridge's HTTP shell: settings, routes, start-up and shutdown. The call engine (actors,
//! messages, protocols) is the `callbridge-actors` crate in `actors/`.

pub mod admin;
pub mod dashboard;
pub mod logging;
pub mod routes;
pub mod settings;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use callbridge_actors::report::{FlushReports, GetReportStats, Reporter};
use callbridge_actors::twilio_rest::{RestConfig, TwilioRest};
use callbridge_actors::{CallRegistry, Engine, UpstreamKind};

pub use settings::Settings;

/// A built, bound service: `port()` is known before it runs (tests bind port 0).
pub struct Application {
    port: u16,
    server: Server,
    upstream: UpstreamKind,
    drain: Drain,
}

/// Drains the service for a deploy: no new calls, live calls go on until they end or the
/// timeout, then the server stops. SIGTERM/SIGINT start it; tests call [`Drain::start`].
#[derive(Clone)]
pub struct Drain {
    engine: Engine,
    handle: actix_web::dev::ServerHandle,
    timeout: Duration,
    reporter: Option<Addr<Reporter>>,
}

impl Drain {
    /// Tries the end-of-call reports still queued, within what is left of the drain's time.
    async fn send_reports(&self, started: Instant) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        // Calls that ended but still wait for a GPT-Live session's final usage report then.
        let grace = started + self.timeout;
        while self.engine.calls_finishing() > 0 && Instant::now() < grace {
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
        reporter.do_send(FlushReports);
        loop {
            let stats = reporter.send(GetReportStats).await.unwrap_or_default();
            if stats.queued == 0 {
                return;
            }
            if Instant::now() >= grace {
                log::warn!(
                    "drain: {} end-of-call reports still queued at the timeout: not sent",
                    stats.queued
                );
                return;
            }
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts draining (once) and stops the server when the calls are gone or time is up.
    pub fn start(&self) {
        if self.engine.is_draining() {
            return;
        }
        self.engine.start_draining();
        let drain = self.clone();
        actix_web::rt::spawn(async move {
            let started = Instant::now();
            log::info!(
                "draining: /ready answers 503, new calls get the fallback; {} calls live, {} s to finish",
                drain.engine.live_calls(),
                drain.timeout.as_secs()
            );
            let mut last_log = Instant::now();
            loop {
                let live = drain.engine.live_calls();
                if live == 0 {
                    drain.send_reports(started).await;
                    log::info!("drained: no call left; stopping");
                    drain.handle.stop(true).await;
                    return;
                }
                let left = drain.timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    log::warn!(
                        "drain timeout: closing {live} live calls (their callers get the fallback); stopping"
                    );
                    drain.handle.stop(false).await;
                    return;
                }
                if last_log.elapsed() >= Duration::from_secs(1) {
                    log::info!("draining: {live} calls left, {} s left", left.as_secs());
                    last_log = Instant::now();
                }
                actix_web::rt::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}

impl Application {
    /// Binds the listener and wires the engine. Must run inside an actix system (the registry is
    /// an actor on the current arbiter; calls run on the HTTP workers' arbiters).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate().context("invalid settings")?;
        // One TLS crypto provider per process, before any awc client exists: awc chooses none
        // and panics at the first connection without one. A second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let upstream = settings.resolve_upstream()?;
        let registry = CallRegistry::default().start();
        // The model's tools travel with the OpenAI settings (the session declares them).
        let mut openai = settings.openai.clone();
        openai.tools = settings.tools.clone();
        openai.builtin_tools = settings.call.builtin_tools.clone();
        let metrics = Arc::new(callbridge_actors::metrics::Metrics::new());
        let dropped = metrics.clone();
        let events = Arc::new(
            callbridge_actors::events::EventHub::new(
                settings.events.replay_max,
                settings.events.subscriber_queue,
            )
            .on_subscriber_dropped(move || dropped.subscriber_dropped()),
        );
        let engine = Engine::new(
            registry,
            openai,
            settings.call.clone(),
            upstream,
            settings.secrets.openai_api_key.clone(),
            // The stream token is part of signature validation: on exactly when it is.
            settings
                .checks_signatures()
                .then(|| settings.secrets.twilio_auth_token.clone())
                .flatten(),
            settings.prices.clone(),
            callbridge_actors::engine::Observers { events, metrics },
        )?;
        let reporter = (!settings.report.url.trim().is_empty()).then(|| {
            Reporter::new(
                settings.report.clone(),
                settings.secrets.tools_secret.clone(),
            )
            .start()
        });
        if let Some(reporter) = &reporter {
            engine.set_reporter(reporter.clone().recipient());
        }
        if let Some(secret) = &settings.secrets.tools_secret {
            engine.set_tools_secret(secret.clone());
        }
        if let (Some(account_sid), Some(auth)) = (
            settings.secrets.twilio_account_sid.clone(),
            settings.secrets.twilio_rest_auth(),
        ) {
            engine.set_rest(TwilioRest::new(RestConfig {
                api_base: settings.twilio.api_base.trim_end_matches('/').to_owned(),
                account_sid,
                auth,
                timeout: Duration::from_millis(settings.twilio.api_timeout_ms),
            }));
        }
        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} (server.host / server.port)",
                    settings.server.host, settings.server.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let workers = settings.server.workers;
        let drain_timeout = Duration::from_secs(settings.server.drain_timeout_s);
        let state = web::Data::new(routes::AppState {
            engine: engine.clone(),
            reporter: reporter.clone(),
            settings: Arc::new(settings),
            started: Instant::now(),
            sessions: admin::Sessions::default(),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(routes::configure)
                .default_service(web::to(routes::not_found))
        })
        // The drain decides when calls are closed; the server's own grace period only covers
        // the last moments, and its signal handling is ours (SIGTERM starts the drain).
        .shutdown_timeout(1)
        .disable_signals()
        // Audio goes out in small frames every 20 ms: Nagle's algorithm would hold a frame
        // back while the previous one is unacknowledged (actix-http leaves it on by default).
        .tcp_nodelay(true);
        if workers > 0 {
            server = server.workers(workers);
        }
        let server = server.listen(listener)?.run();
        let drain = Drain {
            engine,
            handle: server.handle(),
            timeout: drain_timeout,
            reporter,
        };
        Ok(Self {
            port,
            server,
            upstream,
            drain,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn upstream(&self) -> UpstreamKind {
        self.upstream
    }

    /// A handle to stop the server (graceful) from elsewhere.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// The drain of this service (for tests; SIGTERM/SIGINT start it in `run_until_stopped`).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Serves until a drain ends (SIGTERM/SIGINT start one) or the handle stops it.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let drain = self.drain.clone();
        actix_web::rt::spawn(async move {
            wait_for_signal().await;
            drain.start();
        });
        self.serve().await
    }

    /// Serves until a drain ends or the handle stops it, without taking over the process's
    /// signals (tests: a test binary must still die on Ctrl-C).
    pub async fn serve(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use actix_web::rt::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::warn!("cannot listen for SIGTERM/SIGINT: no drain on signals");
            return std::future::pending().await;
        };
        first_of(term.recv(), int.recv()).await;
    }
    #[cfg(not(unix))]
    {
        let _ = actix_web::rt::signal::ctrl_c().await;
    }
}

/// Waits for whichever of two futures finishes first.
async fn first_of<A: std::future::Future, B: std::future::Future>(a: A, b: B) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}
