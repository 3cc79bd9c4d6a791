//! THE fake of a service that callbridge POSTs JSON to: the end-of-call report receiver (and
//! the tool servers of the tools to come). It records every request, checks the signature
//! (`X-Callbridge-Signature: sha256=<hex HMAC-SHA256 of the body>`, keyed by the shared secret)
//! with its own HMAC, and answers what the test scripts: a status, a body, a delay.
//!
//! Violations (a test ends with [`FakeReceiver::assert_no_violations`]): a request that is not
//! `POST` with `Content-Type: application/json`, a body that is not JSON, a missing or wrong
//! signature when a secret is set, a signature when none is.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::twilio_rest::http::{parse_request, Parsed, Response};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub raw: Vec<u8>,
    /// The status the fake answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn ok(body: &str) -> Self {
        Answer {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn status(status: u16) -> Self {
        Answer {
            status,
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    violations: Vec<String>,
    /// Answers for the next requests, in order; then `default`.
    script: VecDeque<Answer>,
    default: Option<Answer>,
}

/// The receiver, on 127.0.0.1.
#[derive(Clone)]
pub struct FakeReceiver {
    addr: SocketAddr,
    secret: Option<String>,
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `sha256=<hex>` of `body` keyed by `secret`, computed here (not with the service's code).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl FakeReceiver {
    /// Starts on 127.0.0.1:0; with `secret`, every request must be signed with it.
    pub async fn start(secret: Option<&str>) -> FakeReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let fake = FakeReceiver {
            addr: listener.local_addr().expect("addr"),
            secret: secret.map(str::to_owned),
            state: Arc::default(),
        };
        let served = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(served.clone().connection(stream));
            }
        });
        fake
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The answer to the next request (queued after those already scripted).
    pub fn answer_next(&self, answer: Answer) {
        lock(&self.state).script.push_back(answer);
    }

    /// The answer once the script is spent (default: 200 `{}`).
    pub fn answer_always(&self, answer: Answer) {
        lock(&self.state).default = Some(answer);
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }

    /// Waits until `n` requests came; panics after `timeout`.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "FakeReceiver: {} of {n} requests within {timeout:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(v.is_empty(), "FakeReceiver violations: {v:#?}");
    }

    /// The checks of one request; violations in words.
    fn judge(&self, method: &str, headers: &[(String, String)], raw: &[u8]) -> Vec<String> {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let mut problems = Vec::new();
        if method != "POST" {
            problems.push(format!("{method} instead of POST"));
        }
        if !header("content-type").is_some_and(|t| t.starts_with("application/json")) {
            problems.push(format!("Content-Type {:?}", header("content-type")));
        }
        if serde_json::from_slice::<Value>(raw).is_err() {
            problems.push("the body is not JSON".into());
        }
        let given = header("x-callbridge-signature");
        match (&self.secret, given) {
            (Some(secret), Some(given)) if given != sign(secret, raw) => {
                problems.push(format!("wrong signature {given:?}"))
            }
            (Some(_), None) => problems.push("no X-Callbridge-Signature".into()),
            (None, Some(given)) => {
                problems.push(format!("a signature without a secret: {given:?}"))
            }
            _ => {}
        }
        problems
    }

    async fn connection(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 8192];
        loop {
            let request = loop {
                match parse_request(&buf) {
                    Parsed::Complete(request, used) => {
                        buf.drain(..used);
                        break request;
                    }
                    Parsed::Incomplete { .. } => {}
                    Parsed::Invalid { status, why } => {
                        lock(&self.state)
                            .violations
                            .push(format!("unreadable HTTP request: {why}"));
                        let _ = stream
                            .write_all(
                                &Response {
                                    status,
                                    content_type: "text/plain",
                                    headers: Vec::new(),
                                    body: why,
                                    close: true,
                                }
                                .to_bytes(),
                            )
                            .await;
                        return;
                    }
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let problems = self.judge(&request.method, &request.headers, &request.body);
            let answer = {
                let mut st = lock(&self.state);
                let answer = st
                    .script
                    .pop_front()
                    .or_else(|| st.default.clone())
                    .unwrap_or_else(|| Answer::ok("{}"));
                for p in problems {
                    st.violations.push(format!("{}: {p}", request.target));
                }
                st.received.push(Received {
                    at: Instant::now(),
                    path: request.target.clone(),
                    headers: request.headers.clone(),
                    body: serde_json::from_slice(&request.body).unwrap_or(Value::Null),
                    raw: request.body.clone(),
                    status: answer.status,
                });
                answer
            };
            if !answer.delay.is_zero() {
                tokio::time::sleep(answer.delay).await;
            }
            let keep_alive = request.keep_alive();
            let response = Response {
                status: answer.status,
                content_type: "application/json",
                headers: Vec::new(),
                body: answer.body,
                close: !keep_alive,
            };
            if stream.write_all(&response.to_bytes()).await.is_err() || !keep_alive {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2, with the `sha256=` prefix.
    #[test]
    fn signs_with_hmac_sha256() {
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn judges_and_records() {
        let fake = FakeReceiver::start(Some("s3cret")).await;
        fake.answer_next(Answer::status(500));
        let body = br#"{"a":1}"#;
        for signature in [sign("s3cret", body), sign("other", body)] {
            let mut stream = TcpStream::connect(fake.addr).await.unwrap();
            let req = format!(
                "POST /r HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Callbridge-Signature: {signature}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(req.as_bytes()).await.unwrap();
            stream.write_all(body).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
        }
        let got = fake.received();
        assert_eq!(got[0].status, 500);
        assert_eq!(got[1].status, 200);
        assert_eq!(got[0].body["a"], 1);
        let v = fake.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("wrong signature"));
    }
}
