//! `callbridge [--config PATH]`: serves the Twilio ⇄ OpenAI Realtime bridge.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use callbridge::routes::echo_warning;
use callbridge::{Application, Settings};
use callbridge_actors::UpstreamKind;

const USAGE: &str = "usage: callbridge [--config PATH]\n\n\
Settings come from PATH (default: ./settings.toml if present), then CALLBRIDGE__SECTION__KEY\n\
environment variables; secrets from OPENAI_API_KEY, TWILIO_AUTH_TOKEN, CALLBRIDGE_ADMIN_TOKEN.";

fn main() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let config_path = match parse_args(std::env::args().skip(1)) {
        Ok(path) => path,
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let settings = match Settings::load(config_path.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("callbridge: cannot start: {e}");
            std::process::exit(2);
        }
    };
    callbridge::logging::init(&settings.log.level, settings.log.format);

    actix_web::rt::System::new().block_on(async move {
        let host = settings.server.host.clone();
        let echo_note = echo_warning(&settings);
        let unchecked = settings.unchecked_warning();
        let app = Application::build(settings)
            .await
            .context("callbridge cannot start")?;
        if app.upstream() == UpstreamKind::Echo {
            log::warn!("{echo_note}");
        }
        if let Some(warning) = unchecked {
            log::warn!("{warning}");
        }
        log::info!(
            "callbridge ready on http://{host}:{} (upstream {}) in {} ms",
            app.port(),
            app.upstream().as_str(),
            t0.elapsed().as_millis()
        );
        app.run_until_stopped().await.context("server failed")
    })
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<PathBuf>, String> {
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                let value = args.next().ok_or("--config needs a path")?;
                path = Some(PathBuf::from(value));
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(path)
}
