//! The operator dashboard at `/`: one page, its script, its style sheet and its icon, all
//! compiled into the binary (plain HTML, CSS and JavaScript; nothing from a CDN, no build step).
//!
//! These four files are public: they hold no data. The page reads everything from the admin
//! endpoints (`/calls`, `/calls/{sid}`, `/health`, `/events`) and on a 401 asks for the admin
//! token once, which `POST /login` trades for an HttpOnly, SameSite=Strict session cookie: the
//! token never goes into a URL or the browser's storage.
//!
//! The strict `Content-Security-Policy` (`default-src 'self'`, no inline script or style) means
//! the page runs only the script served here, and talks only to this server.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// The page's policy: its own files and its own server only; no inline code, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'; object-src 'none'";

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");
const FAVICON: &[u8] = include_bytes!("dashboard/favicon.ico");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/dashboard.js", web::get().to(script))
        .route("/dashboard.css", web::get().to(style))
        .route("/favicon.ico", web::get().to(favicon));
}

fn asset(content_type: &'static str, body: &'static [u8]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .body(web::Bytes::from_static(body))
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML.as_bytes())
}

async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS.as_bytes())
}

async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", DASHBOARD_CSS.as_bytes())
}

async fn favicon() -> HttpResponse {
    asset("image/x-icon", FAVICON)
}
