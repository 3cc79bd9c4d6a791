//! Twilio's side of the voice webhook: when a call comes in, Twilio POSTs the call's form
//! parameters to the configured URL, signed (A5), and runs the TwiML it gets back.
//!
//! A plain HTTP/1.1 client over a `TcpStream` (no TLS: tests and the simulator talk to
//! 127.0.0.1), the body form-encoded with `form_urlencoded`, the signature made by
//! [`crate::twilio::compute_signature`], the answer read with [`crate::twiml::parse`].

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::twilio::{compute_signature, USER_AGENT};
use crate::twiml::{self, Twiml};

/// How long a webhook may take before Twilio gives up (its default timeout is 15 s).
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// The parameters of Twilio's voice webhook for one incoming call.
#[derive(Clone, Debug)]
pub struct IncomingCall {
    pub account_sid: String,
    pub call_sid: String,
    pub from: String,
    pub to: String,
}

impl IncomingCall {
    pub fn new(call_sid: impl Into<String>, from: &str, to: &str) -> Self {
        IncomingCall {
            account_sid: "AC00000000000000000000000000000000".into(),
            call_sid: call_sid.into(),
            from: from.into(),
            to: to.into(),
        }
    }

    /// The form Twilio posts (a subset of its parameters, the ones a bridge reads).
    pub fn form(&self) -> Vec<(String, String)> {
        [
            ("AccountSid", self.account_sid.as_str()),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", &self.call_sid),
            ("CallStatus", "ringing"),
            ("Direction", "inbound"),
            ("From", &self.from),
            ("To", &self.to),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// How Twilio signs: with the auth token, over `signed_url` when the service sits behind a
/// proxy (else over the URL posted to).
#[derive(Clone, Debug, Default)]
pub struct Signing {
    pub auth_token: Option<String>,
    pub signed_url: Option<String>,
}

/// POSTs `call`'s webhook to `voice_url` (`http://HOST:PORT/voice`) as Twilio does, and parses
/// the TwiML strictly. An answer that is not 200 with an XML body is an error.
pub async fn answer_call(
    voice_url: &str,
    call: &IncomingCall,
    signing: &Signing,
) -> Result<Twiml, String> {
    let answer = post_form(voice_url, &call.form(), signing).await?;
    twiml_answer(voice_url, &answer)
}

/// The TwiML of a webhook's answer, read as Twilio reads it: a 200 with an XML content type
/// and a document [`twiml::parse`] accepts.
pub fn twiml_answer(url: &str, answer: &Answer) -> Result<Twiml, String> {
    if answer.status != 200 {
        return Err(format!(
            "{url} answered HTTP {}: {}",
            answer.status,
            crate::clip(&answer.body, 200)
        ));
    }
    let xml_type = answer
        .content_type
        .as_deref()
        .is_some_and(|t| t.starts_with("text/xml") || t.starts_with("application/xml"));
    if !xml_type {
        return Err(format!(
            "{url} answered Content-Type {:?}, not XML",
            answer.content_type
        ));
    }
    twiml::parse(&answer.body)
}

/// POSTs a form to `url`, signed as Twilio signs webhooks.
pub async fn post_form(
    url: &str,
    form: &[(String, String)],
    signing: &Signing,
) -> Result<Answer, String> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    let signature = signing
        .auth_token
        .as_deref()
        .map(|token| compute_signature(token, signing.signed_url.as_deref().unwrap_or(url), form));
    exchange("POST", url, Some(&body), signature.as_deref()).await
}

/// GETs `url` (its query string carries the parameters), signed as Twilio signs a GET webhook:
/// over the URL, query included, with no parameters appended (A5).
pub async fn get(url: &str, signing: &Signing) -> Result<Answer, String> {
    let signature = signing
        .auth_token
        .as_deref()
        .map(|token| compute_signature(token, signing.signed_url.as_deref().unwrap_or(url), &[]));
    exchange("GET", url, None, signature.as_deref()).await
}

/// One request on a fresh connection (`Connection: close`), the answer read to the end.
async fn exchange(
    method: &str,
    url: &str,
    form_body: Option<&str>,
    signature: Option<&str>,
) -> Result<Answer, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs (the fakes talk to 127.0.0.1)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n\
         Connection: close\r\n"
    );
    if let Some(body) = form_body {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if let Some(signature) = signature {
        request.push_str(&format!("X-Twilio-Signature: {signature}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(form_body.unwrap_or_default());
    let exchange = async {
        let mut stream = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {authority}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("cannot read from {authority}: {e}"))?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{url} did not answer within {TIMEOUT:?}"))??;
    parse_response(&raw)
}

/// Reads an HTTP/1.1 response (Content-Length, chunked, or to the end of the stream).
fn parse_response(raw: &[u8]) -> Result<Answer, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers in the answer")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_type = None;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_owned()),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.parse::<usize>().ok(),
            _ => {}
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Answer {
        status,
        content_type,
        body: String::from_utf8(body).map_err(|_| "body is not UTF-8")?,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without CRLF")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("chunk shorter than its size")?);
        rest = rest.get(size + 2..).ok_or("chunk without CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_answers() {
        let a = parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/xml\r\ncontent-length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "hello"));
        assert_eq!(a.content_type.as_deref(), Some("text/xml"));
        let a = parse_response(
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((a.status, a.body.as_str()), (403, "abcde"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
    }

    #[test]
    fn the_form_is_what_twilio_posts() {
        let call = IncomingCall::new("CA1", "+14155550100", "+14155550199");
        let form = call.form();
        assert!(form.contains(&("From".to_owned(), "+14155550100".to_owned())));
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .finish();
        assert!(body.contains("From=%2B14155550100"), "{body}");
    }
}
