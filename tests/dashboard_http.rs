//! The dashboard's files over HTTP, without a browser: the page, its script, its style sheet and
//! its icon are served from the binary with the right types, no caching and a strict CSP; they
//! hold no data (so they need no token), and the script writes server data only as text.

mod support;

use std::time::Duration;

use secrecy::SecretString;
use support::{spawn_app, test_settings};

async fn get(url: &str) -> (u16, actix_web::http::header::HeaderMap, Vec<u8>) {
    let mut res = awc::Client::default()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("GET answered");
    let body = res.body().await.expect("a body").to_vec();
    let mut headers = actix_web::http::header::HeaderMap::new();
    for (k, v) in res.headers() {
        headers.append(k.clone(), v.clone());
    }
    (res.status().as_u16(), headers, body)
}

fn header<'a>(headers: &'a actix_web::http::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[actix_web::test]
async fn the_dashboard_files_are_served_with_their_types_and_a_strict_csp() {
    // With an admin token set: the files are public, the data is not.
    let mut settings = test_settings();
    settings.secrets.admin_token = Some(SecretString::from("dashboard-http-test-token-0123"));
    let app = spawn_app(settings).await;
    for (path, content_type) in [
        ("/", "text/html"),
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
        ("/favicon.ico", "image/x-icon"),
    ] {
        let (status, headers, body) = get(&app.http(path)).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            header(&headers, "content-type").starts_with(content_type),
            "{path}: {}",
            header(&headers, "content-type")
        );
        assert_eq!(header(&headers, "cache-control"), "no-store", "{path}");
        let csp = header(&headers, "content-security-policy");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{path}: {csp}"
        );
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert!(!body.is_empty(), "{path}");
    }
    // The data stays behind the token.
    let (status, _, _) = get(&app.http("/calls")).await;
    assert_eq!(status, 401);
}

#[actix_web::test]
async fn the_page_has_no_inline_code_and_the_hooks_tests_use() {
    let app = spawn_app(test_settings()).await;
    let (_, _, html) = get(&app.http("/")).await;
    let html = String::from_utf8(html).unwrap();
    // CSP `default-src 'self'` would block inline code: there is none.
    assert!(html.contains(r#"<script src="/dashboard.js" defer></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "one external script");
    assert!(!html.contains("<style"), "no inline style element");
    assert!(!html.contains(" style="), "no inline style attribute");
    assert!(!html.contains(" onclick="), "no inline handlers");
    assert!(html.contains(r#"<link rel="icon" href="/favicon.ico""#));
    for action in ["hangup", "transfer", "say"] {
        assert!(
            html.contains(&format!(r#"data-action="{action}""#)),
            "a {action} button"
        );
    }
}

#[actix_web::test]
async fn the_script_writes_server_data_as_text_only() {
    let app = spawn_app(test_settings()).await;
    let (_, _, js) = get(&app.http("/dashboard.js")).await;
    let js = String::from_utf8(js).unwrap();
    for banned in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "localStorage",
        "sessionStorage",
        "prompt(",
    ] {
        assert!(!js.contains(banned), "dashboard.js uses {banned}");
    }
    assert!(js.contains("textContent"));
    // The rows carry the hooks scripts and tests select on.
    assert!(js.contains("callSid: sid"), "rows carry data-call-sid");
    assert!(js.contains(r#"new EventSource("/events")"#));
    assert!(js.contains(r#"credentials: "same-origin""#));
}

#[actix_web::test]
async fn the_icon_is_a_real_ico() {
    let app = spawn_app(test_settings()).await;
    let (status, _, ico) = get(&app.http("/favicon.ico")).await;
    assert_eq!(status, 200);
    // ICONDIR: reserved 0, type 1 (icon), at least one image; each entry points inside the file.
    assert_eq!(&ico[..4], &[0, 0, 1, 0]);
    let count = u16::from_le_bytes([ico[4], ico[5]]) as usize;
    assert!(count >= 1);
    for i in 0..count {
        let entry = &ico[6 + 16 * i..6 + 16 * (i + 1)];
        let size = u32::from_le_bytes(entry[8..12].try_into().unwrap()) as usize;
        let offset = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as usize;
        assert!(offset + size <= ico.len(), "image {i} inside the file");
    }
}
