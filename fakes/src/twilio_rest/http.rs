//! HTTP/1.1 as the fake speaks it, pure code with no I/O: one request read from the front of a
//! buffer (request line, headers, a `Content-Length` body; pipelining and keep-alive come from
//! reading the next one from the rest), one answer written, HTTP Basic credentials and form
//! bodies decoded.
//!
//! Hand-written rather than `hyper`: the fake needs a few dozen lines of HTTP and must judge
//! what it reads (a bare `%`, a chunked body, a missing `Host`), which a library would accept
//! or hide. `Transfer-Encoding` request bodies are refused with 411: awc and every Twilio
//! client send form bodies with a `Content-Length`.

use base64::{engine::general_purpose::STANDARD, Engine as _};

/// The request line and headers may take this much.
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// A body may take this much (a `Twiml` is at most 4000 characters; a create is a few hundred
/// bytes).
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// One request.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// The request target as sent (path and query).
    pub(crate) target: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub(crate) version: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    /// The first header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the connection stays open after the answer: HTTP/1.1 unless `Connection:
    /// close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub(crate) fn keep_alive(&self) -> bool {
        let connection = self.header("connection").map(str::to_ascii_lowercase);
        let has = |token: &str| {
            connection
                .as_deref()
                .is_some_and(|c| c.split(',').any(|t| t.trim() == token))
        };
        if self.version == "HTTP/1.0" {
            has("keep-alive")
        } else {
            !has("close")
        }
    }

    /// The path, without the query string.
    pub(crate) fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// What the front of a buffer holds.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A whole request, and how many bytes it took.
    Complete(Request, usize),
    /// Not yet a whole request. `expect_continue` when the head is complete and asks for
    /// `100 Continue` before its body.
    Incomplete { expect_continue: bool },
    /// Not HTTP the fake reads: answer `status` and close.
    Invalid { status: u16, why: String },
}

fn invalid(status: u16, why: impl Into<String>) -> Parsed {
    Parsed::Invalid {
        status,
        why: why.into(),
    }
}

/// Reads one request from the front of `buf`.
pub(crate) fn parse_request(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return invalid(431, format!("no end of headers in {MAX_HEAD} bytes"));
        }
        return Parsed::Incomplete {
            expect_continue: false,
        };
    };
    if head_end > MAX_HEAD {
        return invalid(431, format!("headers over {MAX_HEAD} bytes"));
    }
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return invalid(400, "request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return invalid(400, format!("bad request line {request_line:?}"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return invalid(505, format!("unsupported version {version:?}"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return invalid(400, format!("bad method {method:?}"));
    }
    if !target.starts_with('/') {
        return invalid(400, format!("request target {target:?} is not a path"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return invalid(400, format!("bad header line {line:?}"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return invalid(400, format!("bad header name {name:?}"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let mut request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return invalid(
            411,
            "Transfer-Encoding request bodies are not read: send Content-Length",
        );
    }
    let lengths: Vec<&str> = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    let length = match lengths[..] {
        [] => 0,
        [one] => match one.parse::<usize>() {
            Ok(n) if one.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return invalid(400, format!("bad Content-Length {one:?}")),
        },
        _ => return invalid(400, "more than one Content-Length"),
    };
    if length > MAX_BODY {
        return invalid(413, format!("body of {length} bytes (at most {MAX_BODY})"));
    }
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        let expect_continue = request
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
        return Parsed::Incomplete { expect_continue };
    }
    request.body = buf[body_start..body_start + length].to_vec();
    Parsed::Complete(request, body_start + length)
}

/// One answer.
#[derive(Clone, Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
    /// `Connection: close`, and the fake closes after writing.
    pub(crate) close: bool,
}

impl Response {
    /// The bytes on the wire.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The (user, password) of an `Authorization: Basic …` header, decoded with the strict standard
/// base64 engine.
pub(crate) fn basic_credentials(header: &str) -> Result<(String, String), String> {
    let (scheme, encoded) = header
        .split_once(' ')
        .ok_or_else(|| format!("Authorization {header:?} has no scheme"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(format!("Authorization scheme {scheme:?}, not Basic"));
    }
    let raw = STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("Basic credentials are not valid base64 ({e})"))?;
    let text = String::from_utf8(raw).map_err(|_| "Basic credentials are not UTF-8")?;
    let (user, password) = text
        .split_once(':')
        .ok_or("Basic credentials without a `:`")?;
    Ok((user.to_owned(), password.to_owned()))
}

/// Decodes an `application/x-www-form-urlencoded` body into its pairs, and lists beside them
/// what a correct encoder never writes: a `%` not followed by two hex digits, bytes that are not
/// UTF-8 once decoded, a pair without `=`.
pub(crate) fn decode_form(raw: &[u8]) -> (Vec<(String, String)>, Vec<String>) {
    let mut problems = Vec::new();
    let mut i = 0;
    while let Some(offset) = raw[i..].iter().position(|&b| b == b'%') {
        let at = i + offset;
        let ok = raw.len() >= at + 3
            && raw[at + 1].is_ascii_hexdigit()
            && raw[at + 2].is_ascii_hexdigit();
        if !ok {
            problems.push(format!(
                "a `%` at byte {at} is not followed by two hex digits"
            ));
            break;
        }
        i = at + 3;
    }
    for pair in raw.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        if !pair.contains(&b'=') {
            problems.push(format!(
                "pair {:?} has no `=`",
                String::from_utf8_lossy(pair)
            ));
        }
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs
        .iter()
        .any(|(k, v)| k.contains('\u{FFFD}') || v.contains('\u{FFFD}'))
    {
        problems.push("a parameter is not UTF-8 once decoded".into());
    }
    (pairs, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &[u8]) -> (Request, usize) {
        match parse_request(raw) {
            Parsed::Complete(r, n) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    /// Requests are read one at a time from the front, bodies by `Content-Length`.
    #[test]
    fn reads_pipelined_requests() {
        let raw = b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nhost: h\r\nConnection: close\r\n\r\n";
        let (first, used) = complete(raw);
        assert_eq!((first.method.as_str(), first.path()), ("POST", "/a"));
        assert_eq!(first.target, "/a?x=1");
        assert_eq!(first.body, b"abc");
        assert!(first.keep_alive());
        let (second, used2) = complete(&raw[used..]);
        assert_eq!(second.header("HOST"), Some("h"));
        assert!(!second.keep_alive());
        assert_eq!(used + used2, raw.len());
    }

    #[test]
    fn waits_for_the_whole_body() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab";
        assert!(matches!(
            parse_request(raw),
            Parsed::Incomplete {
                expect_continue: true
            }
        ));
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Le"),
            Parsed::Incomplete {
                expect_continue: false
            }
        ));
        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!complete(old).0.keep_alive());
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        for (raw, status) in [
            (
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                411,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/2\r\n\r\n", 505),
            (b"GET  / HTTP/1.1\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        ] {
            match parse_request(raw) {
                Parsed::Invalid { status: s, .. } => {
                    assert_eq!(s, status, "{}", String::from_utf8_lossy(raw))
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(raw)),
            }
        }
    }

    /// The Basic-auth vector of `twilio-rest.md` A.
    #[test]
    fn decodes_the_basic_vector() {
        let header = "Basic QUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYTowMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZg==";
        assert_eq!(
            basic_credentials(header).unwrap(),
            (
                "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
                "0123456789abcdef0123456789abcdef".to_owned()
            )
        );
        assert!(basic_credentials("Bearer abc").is_err());
        assert!(basic_credentials("Basic !!!").is_err());
        assert!(basic_credentials(&format!("Basic {}", STANDARD.encode("nocolon"))).is_err());
    }

    /// `%2B` is a plus, a bare `+` a space; malformed escapes are reported.
    #[test]
    fn decodes_forms() {
        let (pairs, problems) = decode_form(b"To=%2B14155550142&From=+18005550100&S=a+b");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(pairs[0], ("To".into(), "+14155550142".into()));
        assert_eq!(pairs[1], ("From".into(), " 18005550100".into()));
        assert_eq!(pairs[2], ("S".into(), "a b".into()));
        let (_, problems) = decode_form(b"A=%zz&B");
        assert_eq!(problems.len(), 2, "{problems:?}");
        let (_, problems) = decode_form(b"A=%FF");
        assert!(problems[0].contains("UTF-8"), "{problems:?}");
    }

    #[test]
    fn writes_answers() {
        let r = Response {
            status: 404,
            content_type: "application/json",
            headers: vec![("Twilio-Request-Id".into(), "RQ1".into())],
            body: "{}".into(),
            close: true,
        };
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Twilio-Request-Id: RQ1\r\nConnection: close\r\n\r\n{}"
        );
    }
}
