//! Twilio request signing (`X-Twilio-Signature`), as specified in `reference/protocols.md`
//! section A5.
//!
//! Twilio signs every webhook (voice webhook, stream status callback) and the Media Streams
//! WebSocket upgrade with HMAC-SHA1 keyed by the account's auth token. The signed string is the
//! URL Twilio requested followed by the form parameters, sorted; the upgrade is a GET with no
//! body, so there it is the URL alone, in its `wss://` form (see [`stream_url`]).
//!
//! The URL must be the one Twilio was configured with, rebuilt from the service's configured
//! public base URL, never from `Host` / `X-Forwarded-*` headers, which a caller controls.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// Computes the `X-Twilio-Signature` value for a request to `url` carrying the form
/// parameters `params`.
///
/// The signed string is `url` followed, for each parameter name in code-point order
/// (case-sensitive) and for each of that name's values in code-point order, by `name + value`
/// with no separators. Repeated names are kept (`Digits=5678&Digits=1234` signs
/// `Digits1234Digits5678`). For GET requests and JSON bodies pass no parameters (JSON bodies
/// are covered by the `bodySHA256` query parameter, which is part of `url`).
pub fn compute(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    STANDARD.encode(signed_mac(auth_token, url, params).finalize().into_bytes())
}

/// Checks `signature_header` (the raw `X-Twilio-Signature` value) against a request to `url`
/// carrying `params`.
///
/// Like twilio-python's `RequestValidator.validate`, this accepts a signature made over the URL
/// as given, over the URL with the scheme's default port added (`:443` for https/wss, `:80`
/// for http/ws) when it has none, and over the URL with that default port removed when it has
/// it, because Twilio's back end is not consistent about writing the port. A non-default port
/// is never added or removed.
///
/// The comparison is constant-time (`Mac::verify_slice` on the decoded header), and every URL
/// form is checked whatever the outcome of the others. A header that is not valid base64, or
/// not 20 bytes long, is simply a mismatch.
///
/// For JSON-body requests this proves the URL (and so its `bodySHA256` query parameter) came
/// from Twilio; checking that the body hashes to `bodySHA256` is the caller's job.
pub fn validate(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature_header: &str,
) -> bool {
    let Ok(expected) = STANDARD.decode(signature_header.trim()) else {
        return false;
    };
    url_forms(url).iter().fold(false, |matched, form| {
        // `|` rather than `||`: no short-circuit, so timing does not say which form matched.
        matched
            | signed_mac(auth_token, form, params)
                .verify_slice(&expected)
                .is_ok()
    })
}

/// Builds the `wss://` / `ws://` URL of the Media Streams endpoint from the configured public
/// base URL, for both the TwiML `<Stream url>` and the upgrade's signature check.
///
/// Behind a TLS-terminating proxy the service sees `https`/`http`, but Twilio signs the URL it
/// connected to, which it was given as `wss://…`; so `https` maps to `wss` and `http` to `ws`
/// (case-insensitively). A base that is already `wss://` or `ws://` is kept; one with no scheme
/// is taken as a host and gets `wss://`, the only scheme Twilio accepts for streams. A trailing
/// `/` on the base and a missing leading `/` on `path` are both tolerated.
pub fn stream_url(public_base: &str, path: &str) -> String {
    let base = public_base.trim_end_matches('/');
    let (scheme, rest) = match base.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => ("wss", rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => ("ws", rest),
        Some((scheme, rest)) => (scheme, rest),
        None => ("wss", base),
    };
    let separator = if path.is_empty() || path.starts_with('/') {
        ""
    } else {
        "/"
    };
    format!("{scheme}://{rest}{separator}{path}")
}

/// The `<Parameter>` name under which `/voice` hands each call's stream token to its stream.
pub const STREAM_TOKEN_PARAM: &str = "callbridgeToken";

/// What the stream token signs, before the call SID: keeps the token from ever equalling a
/// Twilio signature made with the same key (a signed URL starts with a scheme, never with this).
const STREAM_TOKEN_DOMAIN: &[u8] = b"callbridge stream token v1\n";

/// The per-call stream token: HMAC-SHA1 of the call SID, keyed by the auth token, in base64.
///
/// `/voice` (a request Twilio signed) puts it in the TwiML as a `<Parameter>`; Twilio hands it
/// back in the stream's `start.customParameters`. A stream whose `start` does not carry the
/// token of its own `callSid` did not come from that TwiML: an upgrade signature replayed from
/// an earlier call opens a socket, but gets no audio to OpenAI.
pub fn stream_token(auth_token: &str, call_sid: &str) -> String {
    STANDARD.encode(
        stream_token_mac(auth_token, call_sid)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `token` is the stream token of `call_sid`. Constant-time in the token's content;
/// a token that is not base64 or not 20 bytes is a mismatch.
pub fn stream_token_valid(auth_token: &str, call_sid: &str, token: &str) -> bool {
    let Ok(given) = STANDARD.decode(token) else {
        return false;
    };
    stream_token_mac(auth_token, call_sid)
        .verify_slice(&given)
        .is_ok()
}

fn stream_token_mac(auth_token: &str, call_sid: &str) -> HmacSha1 {
    // invariant: HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    let mut mac =
        HmacSha1::new_from_slice(auth_token.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(STREAM_TOKEN_DOMAIN);
    mac.update(call_sid.as_bytes());
    mac
}

/// An HMAC over the signed string, ready to finalize or verify.
fn signed_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> HmacSha1 {
    // invariant: HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    let mut mac =
        HmacSha1::new_from_slice(auth_token.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(url.as_bytes());
    // Sorting (name, value) pairs orders by name, then by value within a name, which is what
    // Twilio's "each name sorted, each of its values sorted" means. `str` ordering compares
    // UTF-8 bytes, which is code-point order, the same as Python's `sorted`.
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort_unstable();
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The forms of `url` whose signature [`validate`] accepts: as given, then (if the authority
/// can be read) with the scheme's default port added or removed. Unknown schemes and
/// unreadable URLs only get the form as given.
fn url_forms(url: &str) -> Vec<String> {
    let mut forms = vec![url.to_owned()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return forms;
    };
    let default_port: u16 =
        if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
            443
        } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
            80
        } else {
            return forms;
        };
    // The authority runs to the first '/', '?' or '#'; userinfo (before the last '@') is kept.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let (userinfo, host_port) = authority.split_at(host_start);
    // A ':' after the last ']' separates the port; inside brackets it belongs to an IPv6 host.
    let port_colon = host_port
        .rfind(':')
        .filter(|&colon| !host_port[colon..].contains(']'));
    match port_colon {
        None => forms.push(format!(
            "{scheme}://{userinfo}{host_port}:{default_port}{tail}"
        )),
        Some(colon) => {
            let port = &host_port[colon + 1..];
            let is_default = port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().ok() == Some(default_port);
            if is_default {
                let host = &host_port[..colon];
                forms.push(format!("{scheme}://{userinfo}{host}{tail}"));
            }
        }
    }
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const URL_443: &str = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
    const URL_HTTP: &str = "http://mycompany.com/myapp.php?foo=1&bar=2";
    const URL_HTTP_80: &str = "http://mycompany.com:80/myapp.php?foo=1&bar=2";
    const URL_HTTP_1234: &str = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
    const SIG: &str = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    const SIG_443: &str = "kvajT1Ptam85bY51eRf/AJRuM3w=";
    const SIG_HTTP_1234: &str = "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=";
    const SIG_HTTP_80: &str = "0ZXoZLH/DfblKGATFgpif+LLRf4=";

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// The voice-webhook parameters of twilio-python's test suite, deliberately out of order.
    fn params() -> Vec<(String, String)> {
        pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ])
    }

    /// The main A5 vector, and the exact string it signs.
    #[test]
    fn computes_twilio_python_vector() {
        assert_eq!(compute(TOKEN, URL, &params()), SIG);
        let signed = "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDE\
                      Caller+14158675309Digits1234From+14158675309To+18005551212";
        assert_eq!(compute(TOKEN, signed, &[]), SIG);
        assert!(validate(TOKEN, URL, &params(), SIG));
    }

    /// The port vectors: https with :443, http with :1234 and with :80.
    #[test]
    fn computes_port_vectors() {
        assert_eq!(compute(TOKEN, URL_443, &params()), SIG_443);
        assert_eq!(compute(TOKEN, URL_HTTP_1234, &params()), SIG_HTTP_1234);
        assert_eq!(compute(TOKEN, URL_HTTP_80, &params()), SIG_HTTP_80);
    }

    /// A signature over the URL with or without the default port validates against either form.
    #[test]
    fn validate_accepts_default_port_added_or_removed() {
        // Twilio signed without the port; we see it with the port, and vice versa.
        assert!(validate(TOKEN, URL_443, &params(), SIG));
        assert!(validate(TOKEN, URL, &params(), SIG_443));
        assert!(validate(TOKEN, URL_443, &params(), SIG_443));
        // The same for http and :80.
        assert!(validate(TOKEN, URL_HTTP, &params(), SIG_HTTP_80));
        assert!(validate(TOKEN, URL_HTTP_80, &params(), SIG_HTTP_80));
        // A non-default port is only accepted exactly as given.
        assert!(validate(TOKEN, URL_HTTP_1234, &params(), SIG_HTTP_1234));
        assert!(!validate(TOKEN, URL_HTTP, &params(), SIG_HTTP_1234));
        // The scheme is signed: the https signature is not valid for the http URL.
        assert!(!validate(TOKEN, URL_HTTP, &params(), SIG));
    }

    /// Repeated names sign every value, values sorted within the name.
    #[test]
    fn repeated_keys_sign_every_value_sorted() {
        let repeated = pairs(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        let expected = "IK+Dwps556ElfBT0I3Rgjkr1wJU=";
        assert_eq!(compute(TOKEN, URL, &repeated), expected);
        let signed = format!("{URL}Digits1234Digits5678SidCA123SidAccountAC123");
        assert_eq!(compute(TOKEN, &signed, &[]), expected);
        assert!(validate(TOKEN, URL, &repeated, expected));
    }

    /// A JSON-body request signs the URL carrying `bodySHA256`, with no parameters.
    #[test]
    fn body_sha256_vector() {
        let url = format!(
            "{URL}&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
        );
        assert_eq!(compute(TOKEN, &url, &[]), "a9nBmqA0ju/hNViExpshrM61xv4=");
        assert!(validate(TOKEN, &url, &[], "a9nBmqA0ju/hNViExpshrM61xv4="));
    }

    /// The WebSocket upgrade vectors: wss URL with and without :443, each accepted for the other.
    #[test]
    fn websocket_vectors() {
        let plain = "wss://example.com/media";
        let with_port = "wss://example.com:443/media";
        assert_eq!(compute(TOKEN, plain, &[]), "7PR3qMkpDyEJtMrVOY/LDyNq8J8=");
        assert_eq!(
            compute(TOKEN, with_port, &[]),
            "zyyJQiPZXIGCLy3HYdHEfry0yDg="
        );
        assert!(validate(TOKEN, plain, &[], "zyyJQiPZXIGCLy3HYdHEfry0yDg="));
        assert!(validate(
            TOKEN,
            with_port,
            &[],
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        ));
        // The https form of the same URL is a different signed string.
        assert!(!validate(
            TOKEN,
            "https://example.com/media",
            &[],
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        ));
        // The proxy sees https; the configured base maps to the URL Twilio signed.
        let rebuilt = stream_url("https://example.com/", "/media");
        assert!(validate(
            TOKEN,
            &rebuilt,
            &[],
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        ));
    }

    /// The wrong auth token never validates.
    #[test]
    fn rejects_wrong_token() {
        assert!(!validate("54321", URL, &params(), SIG));
        assert!(!validate("", URL, &params(), SIG));
    }

    /// Changing, adding or dropping any parameter, or the URL, breaks the signature.
    #[test]
    fn rejects_tampering() {
        let mut changed = params();
        changed[1].1 = "9999".to_owned();
        assert!(!validate(TOKEN, URL, &changed, SIG));

        let mut added = params();
        added.push(("Extra".to_owned(), String::new()));
        assert!(!validate(TOKEN, URL, &added, SIG));

        assert!(!validate(TOKEN, URL, &params()[1..], SIG));

        // Names are case-sensitive.
        let mut renamed = params();
        renamed[1].0 = "digits".to_owned();
        assert!(!validate(TOKEN, URL, &renamed, SIG));

        assert!(!validate(
            TOKEN,
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &params(),
            SIG
        ));
    }

    /// Malformed headers are a mismatch, never a panic.
    #[test]
    fn rejects_garbage_headers() {
        for header in [
            "",
            "not base64 at all!",
            "RSOYDt4T1cUTdK1PDd93/VVr8B8",   // missing padding
            "RSOYDt4T1cUTdK1PDd93/VVr8B8==", // too much padding
            "RSOYDt4T1cUTdK1PDd93/VVr",      // valid base64, too short
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", // right length, wrong bytes
            "ü€",
        ] {
            assert!(!validate(TOKEN, URL, &params(), header), "{header:?}");
        }
        // Surrounding whitespace from a sloppy proxy is tolerated.
        assert!(validate(
            TOKEN,
            URL,
            &params(),
            " RSOYDt4T1cUTdK1PDd93/VVr8B8= "
        ));
    }

    /// URLs that cannot be split into scheme and authority only validate as given.
    #[test]
    fn odd_urls_do_not_panic() {
        for url in [
            "",
            "example.com/media",
            "wss://",
            "wss://:",
            "ftp://host:21/x",
            "ws://[::1]",
        ] {
            let signature = compute(TOKEN, url, &[]);
            assert!(validate(TOKEN, url, &[], &signature), "{url:?}");
        }
        assert_eq!(
            url_forms("wss://[::1]:443/media"),
            ["wss://[::1]:443/media", "wss://[::1]/media"]
        );
        assert_eq!(
            url_forms("https://user:pw@host?x=1"),
            ["https://user:pw@host?x=1", "https://user:pw@host:443?x=1"]
        );
        assert_eq!(url_forms("wss://host:8443/m"), ["wss://host:8443/m"]);
        assert_eq!(url_forms("WS://host"), ["WS://host", "WS://host:80"]);
    }

    /// The stream URL maps http(s) to ws(s) and joins base and path with exactly one '/'.
    #[test]
    fn stream_url_forms() {
        let expected = "wss://bridge.example.com/media-stream";
        for base in [
            "https://bridge.example.com",
            "https://bridge.example.com/",
            "wss://bridge.example.com",
            "HTTPS://bridge.example.com",
            "bridge.example.com",
        ] {
            assert_eq!(stream_url(base, "/media-stream"), expected, "{base}");
        }
        assert_eq!(
            stream_url("https://bridge.example.com", "media-stream"),
            expected
        );
        assert_eq!(
            stream_url("http://localhost:8080", "/media-stream"),
            "ws://localhost:8080/media-stream"
        );
        assert_eq!(
            stream_url("ws://localhost:8080/", "/m"),
            "ws://localhost:8080/m"
        );
        assert_eq!(
            stream_url("https://example.com/bridge/", "/media"),
            "wss://example.com/bridge/media"
        );
    }

    /// Vectors computed with Python's `hmac` (not with this module).
    #[test]
    fn stream_tokens() {
        let a = "CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let b = "CAbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        assert_eq!(stream_token(TOKEN, a), "U4LIoZmLl3wIYW5X8raHjRrNCX8=");
        assert_eq!(stream_token(TOKEN, b), "4TnsbcHRGLM5+wQLYPDZCcs7pZ8=");
        assert!(stream_token_valid(TOKEN, a, "U4LIoZmLl3wIYW5X8raHjRrNCX8="));
        // Another call's token, another key, a cut or padded token, garbage: all refused.
        assert!(!stream_token_valid(
            TOKEN,
            a,
            "4TnsbcHRGLM5+wQLYPDZCcs7pZ8="
        ));
        assert!(!stream_token_valid(
            "54321",
            a,
            "U4LIoZmLl3wIYW5X8raHjRrNCX8="
        ));
        assert!(!stream_token_valid(TOKEN, a, "U4LIoZmLl3wIYW5X8raHjRrN"));
        assert!(!stream_token_valid(
            TOKEN,
            a,
            "U4LIoZmLl3wIYW5X8raHjRrNCX8=AAAA"
        ));
        assert!(!stream_token_valid(TOKEN, a, ""));
        assert!(!stream_token_valid(TOKEN, a, "not base64!"));
        // Never a Twilio signature made with the same key over the SID as a "URL".
        assert_ne!(stream_token(TOKEN, a), compute(TOKEN, a, &[]));
    }
}
