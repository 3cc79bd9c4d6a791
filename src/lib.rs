//! callbridge's HTTP shell: settings, routes, start-up and shutdown. The call engine (actors,
//! messages, protocols) is the `callbridge-actors` crate in `actors/`.

pub mod routes;
pub mod settings;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use actix::Actor;
use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use callbridge_actors::{CallRegistry, Engine, UpstreamKind};

pub use settings::Settings;

/// A built, bound service: `port()` is known before it runs (tests bind port 0).
pub struct Application {
    port: u16,
    server: Server,
    upstream: UpstreamKind,
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
        let engine = Engine::new(
            registry,
            settings.openai.clone(),
            settings.call.clone(),
            upstream,
            settings.secrets.openai_api_key.clone(),
        )?;
        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} (server.host / server.port)",
                    settings.server.host, settings.server.port
                )
            })?;
        let port = listener.local_addr()?.port();
        let workers = settings.server.workers;
        let shutdown_timeout = settings.server.shutdown_timeout_s;
        let state = web::Data::new(routes::AppState {
            engine,
            settings: Arc::new(settings),
            started: Instant::now(),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(routes::configure)
                .default_service(web::to(routes::not_found))
        })
        .shutdown_timeout(shutdown_timeout)
        // Audio goes out in small frames every 20 ms: Nagle's algorithm would hold a frame
        // back while the previous one is unacknowledged (actix-http leaves it on by default).
        .tcp_nodelay(true);
        if workers > 0 {
            server = server.workers(workers);
        }
        let server = server.listen(listener)?.run();
        Ok(Self {
            port,
            server,
            upstream,
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

    /// Serves until the process is told to stop (SIGINT/SIGTERM) or the handle stops it.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
