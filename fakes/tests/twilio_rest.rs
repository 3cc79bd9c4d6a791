//! The fake Twilio REST API over real sockets: authentication, the `.json` suffix, form
//! encoding, the update rules (mutual exclusion, TwiML limits, ended calls), creates and the
//! signed webhooks of created calls, keep-alive, and the knobs. The client is a plain HTTP/1.1
//! writer over a `TcpStream`, and signatures are checked with an HMAC computed here.

use std::time::{Duration, Instant};

use base64::prelude::*;
use callbridge_fakes::{
    twilio_rest::{Account, CallEvent, CallStatus, FakeTwilioRest, WebhookKind},
    twiml::{DialNoun, Verb},
};
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::Value;
use sha1::Sha1;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// A live inbound call: from the caller to the account's number.
const LIVE: &str = "CA0123456789abcdef0123456789abcdef";
const CALLER: &str = "+14155550123";
const OUR_NUMBER: &str = "+18005550199";

/// The transfer body of `twilio-rest.md` C, byte for byte.
const TRANSFER_BODY: &str = "Twiml=%3C%3Fxml+version%3D%221.0%22+encoding%3D%22UTF-8%22%3F%3E%3CResponse%3E%3CDial+callerId%3D%22%2B14155550123%22+answerOnBridge%3D%22true%22%3E%3CNumber%3E%2B15005550006%3C%2FNumber%3E%3C%2FDial%3E%3C%2FResponse%3E";

/// The create body of `twilio-rest.md` F, byte for byte.
const CREATE_BODY: &str = "To=%2B14155550142&From=%2B18005550100&Url=https%3A%2F%2Fbridge.example.com%2Fvoice%3Fcb%3Dabc&Method=POST&StatusCallback=https%3A%2F%2Fbridge.example.com%2Ftwilio%2Fcall-status&StatusCallbackEvent=initiated&StatusCallbackEvent=answered&StatusCallbackEvent=completed&Timeout=30";

const FORM: &str = "application/x-www-form-urlencoded";

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The Twilio error code of a JSON error body.
    fn code(&self) -> u64 {
        self.json()["code"].as_u64().expect("an error body")
    }
}

/// One connection, requests written by hand, answers read by `Content-Length`.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(fake: &FakeTwilioRest) -> Conn {
        Conn {
            stream: TcpStream::connect(fake.addr()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) -> Reply {
        self.stream.write_all(raw.as_bytes()).await.unwrap();
        timeout(Duration::from_secs(5), self.read_reply())
            .await
            .expect("an answer within 5 s")
            .expect("an answer, not a closed connection")
    }

    /// One answer, or `None` when the connection closed (or was reset) first.
    async fn read_reply(&mut self) -> Option<Reply> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .expect("every answer has a Content-Length");
        while self.buf.len() < head_end + 4 + length {
            self.fill().await?;
        }
        let body =
            String::from_utf8(self.buf[head_end + 4..head_end + 4 + length].to_vec()).unwrap();
        self.buf.drain(..head_end + 4 + length);
        Some(Reply {
            status,
            headers,
            body,
        })
    }

    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        BASE64_STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A request's text: `auth` is the whole `Authorization` value, `content_type` is sent when
/// given, the body always with its length.
fn raw_request(
    method: &str,
    path: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: &str,
) -> String {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: api.twilio.test\r\n");
    if let Some(auth) = auth {
        raw.push_str(&format!("Authorization: {auth}\r\n"));
    }
    if let Some(ct) = content_type {
        raw.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    raw
}

/// One request on a new connection, authenticated as the fake's account.
async fn send(fake: &FakeTwilioRest, method: &str, path: &str, body: &str) -> Reply {
    let account = fake.account();
    let auth = basic(&account.account_sid, &account.auth_token);
    let ct = (method == "POST").then_some(FORM);
    Conn::open(fake)
        .await
        .send(&raw_request(method, path, Some(&auth), ct, body))
        .await
}

fn call_path(fake: &FakeTwilioRest, sid: &str) -> String {
    format!(
        "/2010-04-01/Accounts/{}/Calls/{sid}.json",
        fake.account().account_sid
    )
}

fn calls_path(fake: &FakeTwilioRest) -> String {
    format!(
        "/2010-04-01/Accounts/{}/Calls.json",
        fake.account().account_sid
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A fake with the live call `LIVE` from `CALLER` to `OUR_NUMBER`.
async fn fake_with_live_call(account: Account) -> FakeTwilioRest {
    let fake = FakeTwilioRest::start(account).await;
    fake.add_live_call(LIVE, CALLER, OUR_NUMBER);
    fake
}

/// Twilio's signature, computed here independently: base64 HMAC-SHA1 over the URL and the
/// sorted `name + value` pairs.
fn expected_signature(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in &sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    BASE64_STANDARD.encode(mac.finalize().into_bytes())
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the service's webhook routes

/// One request the stand-in received.
#[derive(Debug)]
struct Received {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn query(&self) -> Vec<(String, String)> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Accepts one connection on `listener`, reads one request and answers 200 with `body`.
async fn serve_one(listener: &TcpListener, content_type: &str, body: &str) -> Received {
    let (mut stream, _) = timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("a webhook within 5 s")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "webhook connection closed before its headers");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let request_line: Vec<&str> = lines.next().unwrap().split(' ').collect();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
    while buf.len() < head_end + 4 + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "webhook connection closed before its body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await.unwrap();
    Received {
        method: request_line[0].to_owned(),
        target: request_line[1].to_owned(),
        headers,
        body: String::from_utf8(buf[head_end + 4..head_end + 4 + length].to_vec()).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication and the path

/// Both Basic pairs are accepted (the reference's header vector verbatim); a wrong pair is
/// 401/20003 without a violation, a missing header or another account's path is 401 and a
/// violation.
#[tokio::test]
async fn basic_auth_with_either_pair() {
    let account = Account::new(
        "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "0123456789abcdef0123456789abcdef",
    )
    .with_api_key("SKbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "key-secret");
    let fake = fake_with_live_call(account).await;
    let path = call_path(&fake, LIVE);
    let vector = "Basic QUNhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYTowMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZg==";
    let key = basic("SKbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "key-secret");
    for auth in [vector, key.as_str()] {
        let reply = Conn::open(&fake)
            .await
            .send(&raw_request("GET", &path, Some(auth), None, ""))
            .await;
        assert_eq!(reply.status, 200, "{auth}: {}", reply.body);
        assert_eq!(reply.json()["sid"], LIVE);
        assert_eq!(reply.json()["status"], "in-progress");
        assert!(reply
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
    }
    let users: Vec<Option<String>> = fake.requests().into_iter().map(|r| r.auth_user).collect();
    assert_eq!(
        users,
        [
            Some("ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned()),
            Some("SKbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".to_owned())
        ]
    );
    fake.assert_no_violations();

    let wrong = basic("ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "not-the-token");
    let key_as_token = basic("ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "key-secret");
    for auth in [wrong.as_str(), key_as_token.as_str()] {
        let reply = Conn::open(&fake)
            .await
            .send(&raw_request("GET", &path, Some(auth), None, ""))
            .await;
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.json(),
            serde_json::json!({"code": 20003, "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401})
        );
        assert!(reply.header("www-authenticate").is_some());
    }
    fake.assert_no_violations();

    let missing = Conn::open(&fake)
        .await
        .send(&raw_request("GET", &path, None, None, ""))
        .await;
    assert_eq!((missing.status, missing.code()), (401, 20003));
    let other_account = "/2010-04-01/Accounts/ACcccccccccccccccccccccccccccccccc/Calls.json";
    let reply = Conn::open(&fake)
        .await
        .send(&raw_request("GET", other_account, Some(vector), None, ""))
        .await;
    assert_eq!((reply.status, reply.code()), (401, 20003));
    let violations = fake.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(
        violations[0].contains("no Authorization header"),
        "{violations:?}"
    );
    assert!(
        violations[1].contains("names account ACccc"),
        "{violations:?}"
    );
}

/// Without `.json` the same request is served in XML, as Twilio does, and is a violation; an
/// unknown path is 404/20404 and a violation.
#[tokio::test]
async fn the_json_suffix_is_required() {
    let fake = fake_with_live_call(Account::test()).await;
    let bare = call_path(&fake, LIVE).trim_end_matches(".json").to_owned();
    let reply = send(&fake, "GET", &bare, "").await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("application/xml"));
    assert!(reply.body.starts_with("<?xml"), "{}", reply.body);
    assert!(reply.body.contains("<Call><AccountSid>"), "{}", reply.body);
    assert!(
        reply.body.contains(&format!("<Sid>{LIVE}</Sid>")),
        "{}",
        reply.body
    );
    // The XML error shape too.
    let reply = send(&fake, "POST", &bare, "Status=finished").await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.body.contains("<RestException><Code>20001</Code>"),
        "{}",
        reply.body
    );
    let violations = fake.violations();
    assert!(
        violations[0].contains("does not end in .json"),
        "{violations:?}"
    );

    let fake = FakeTwilioRest::start(Account::test()).await;
    let messages = format!(
        "/2010-04-01/Accounts/{}/Messages.json",
        fake.account().account_sid
    );
    let reply = send(&fake, "POST", &messages, "To=%2B1").await;
    assert_eq!((reply.status, reply.code()), (404, 20404));
    assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
}

// ---------------------------------------------------------------------------------------------
// Updates

/// The reference's transfer body redirects the live call: 200, still `in-progress`, the
/// document recorded, and a `Redirected` event carrying the `<Dial>` as read.
#[tokio::test]
async fn the_transfer_vector_redirects_a_live_call() {
    let fake = fake_with_live_call(Account::test()).await;
    let stream_end = tokio::spawn(fake.on_stream_end(LIVE));
    let reply = send(&fake, "POST", &call_path(&fake, LIVE), TRANSFER_BODY).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let resource = reply.json();
    assert_eq!(resource["status"], "in-progress");
    assert_eq!(resource["direction"], "inbound");
    assert_eq!(resource["from"], CALLER);
    let event = timeout(Duration::from_secs(5), stream_end)
        .await
        .unwrap()
        .unwrap();
    let CallEvent::Redirected { sid, twiml } = event else {
        panic!("{event:?}")
    };
    assert_eq!(sid, LIVE);
    let Some(Verb::Dial(dial)) = twiml.verbs.first() else {
        panic!("{twiml:?}")
    };
    assert_eq!(dial.caller_id.as_deref(), Some(CALLER));
    assert_eq!(dial.answer_on_bridge, Some(true));
    assert_eq!(dial.nouns, [DialNoun::Number("+15005550006".into())]);
    let call = fake.call(LIVE).unwrap();
    assert_eq!(call.status, CallStatus::InProgress);
    assert_eq!(call.twiml_updates.len(), 1);
    assert_eq!(call.twiml_updates[0].chars().count(), 147);
    let updates = fake.updates_for(LIVE);
    assert_eq!(updates.len(), 1);
    assert!(updates[0]
        .param("Twiml")
        .unwrap()
        .starts_with("<?xml version=\"1.0\""));
    assert!(fake.call_log().is_empty(), "{:?}", fake.call_log());

    // The redirected call's next stream ends with the next event.
    let second_end = tokio::spawn(fake.on_nth_stream_end(LIVE, 1));
    assert_eq!(
        send(&fake, "POST", &call_path(&fake, LIVE), "Status=completed")
            .await
            .status,
        200
    );
    assert_eq!(
        timeout(Duration::from_secs(5), second_end)
            .await
            .unwrap()
            .unwrap(),
        CallEvent::Completed { sid: LIVE.into() }
    );
    fake.assert_no_violations();
    // A refused request still shows under its call.
    let raw = raw_request(
        "POST",
        &call_path(&fake, LIVE),
        Some(&basic("ACx", "y")),
        Some(FORM),
        "Status=completed",
    );
    assert_eq!(Conn::open(&fake).await.send(&raw).await.status, 401);
    let updates = fake.updates_for(LIVE);
    assert_eq!(
        updates.iter().map(|u| u.status).collect::<Vec<_>>(),
        [200, 200, 401]
    );
    assert_eq!(updates[2].auth_user.as_deref(), Some("ACx"));
}

/// `Status=completed` ends the call once; after it (or after the caller hung up first) the
/// hang-up is 404/20404 and a redirect 400/21220, without violations: that race is normal. An
/// unknown SID is 404 and a violation.
#[tokio::test]
async fn ended_calls_answer_20404_and_21220() {
    let fake = fake_with_live_call(Account::test()).await;
    let path = call_path(&fake, LIVE);
    let mut events = fake.subscribe();
    let reply = send(&fake, "POST", &path, "Status=completed").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "completed");
    assert!(reply.json()["end_time"].is_string());
    assert_eq!(
        events.recv().await.unwrap(),
        CallEvent::Completed { sid: LIVE.into() }
    );
    let again = send(&fake, "POST", &path, "Status=completed").await;
    assert_eq!((again.status, again.code()), (404, 20404));
    assert_eq!(
        again.json()["message"],
        format!("The requested resource {path} was not found")
    );
    let redirect = send(
        &fake,
        "POST",
        &path,
        &form(&[("Twiml", "<Response><Hangup/></Response>")]),
    )
    .await;
    assert_eq!((redirect.status, redirect.code()), (400, 21220));
    let fetched = send(&fake, "GET", &path, "").await;
    assert_eq!(fetched.json()["status"], "completed");
    fake.assert_no_violations();

    // The caller hangs up first: the service's hang-up loses the race.
    let other = "CAffffffffffffffffffffffffffffffff";
    fake.add_live_call(other, CALLER, OUR_NUMBER);
    fake.caller_hangs_up(other);
    let late = send(&fake, "POST", &call_path(&fake, other), "Status=completed").await;
    assert_eq!((late.status, late.code()), (404, 20404));
    fake.assert_no_violations();

    let unknown = send(
        &fake,
        "POST",
        &call_path(&fake, "CA00000000000000000000000000000000"),
        "Status=completed",
    )
    .await;
    assert_eq!((unknown.status, unknown.code()), (404, 20404));
    assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
}

/// `Status`, `Twiml` and `Url` are mutually exclusive; `canceled` does nothing to an answered
/// call; each is refused or flagged and leaves the call as it was.
#[tokio::test]
async fn one_of_status_twiml_url() {
    let fake = fake_with_live_call(Account::test()).await;
    let path = call_path(&fake, LIVE);
    for body in [
        form(&[
            ("Status", "completed"),
            ("Twiml", "<Response><Hangup/></Response>"),
        ]),
        form(&[
            ("Twiml", "<Response><Hangup/></Response>"),
            ("Url", "https://b.example/t"),
        ]),
        form(&[("Status", "completed"), ("Url", "https://b.example/t")]),
    ] {
        let reply = send(&fake, "POST", &path, &body).await;
        assert_eq!((reply.status, reply.code()), (400, 20001), "{body}");
        assert!(reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("mutually exclusive"));
    }
    let cancel = send(&fake, "POST", &path, "Status=canceled").await;
    assert_eq!(cancel.status, 200);
    assert_eq!(cancel.json()["status"], "in-progress");
    assert_eq!(fake.call(LIVE).unwrap().status, CallStatus::InProgress);
    assert!(fake.events().is_empty(), "{:?}", fake.events());
    let violations = fake.violations();
    assert_eq!(violations.len(), 4, "{violations:?}");
    assert!(
        violations[3].contains("canceled does nothing"),
        "{violations:?}"
    );

    // A `Url` update is the other redirect.
    let reply = send(
        &fake,
        "POST",
        &path,
        &form(&[("Url", "https://b.example/t?x=1"), ("Method", "GET")]),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        fake.wait_event(|e| matches!(e, CallEvent::RedirectedToUrl { .. }))
            .await,
        CallEvent::RedirectedToUrl {
            sid: LIVE.into(),
            url: "https://b.example/t?x=1".into(),
            method: "GET".into()
        }
    );
}

/// `Twiml`: 4000 characters pass and 4001 are 400/32018; a document Twilio cannot read is
/// 400/12100; a relative URL is accepted and logged on the call (15004), a violation either way.
#[tokio::test]
async fn twiml_limits_and_urls() {
    let fake = fake_with_live_call(Account::test()).await;
    let path = call_path(&fake, LIVE);
    let wrapper = "<Response><Say></Say></Response>".len();
    let exact = format!(
        "<Response><Say>{}</Say></Response>",
        "a".repeat(4000 - wrapper)
    );
    assert_eq!(exact.len(), 4000);
    let reply = send(&fake, "POST", &path, &form(&[("Twiml", &exact)])).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    fake.assert_no_violations();

    let over = format!(
        "<Response><Say>{}</Say></Response>",
        "a".repeat(4001 - wrapper)
    );
    let reply = send(&fake, "POST", &path, &form(&[("Twiml", &over)])).await;
    assert_eq!((reply.status, reply.code()), (400, 32018));
    let bad = send(
        &fake,
        "POST",
        &path,
        &form(&[("Twiml", "<Response><Dial>+15005550006</Response>")]),
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, 12100));
    let verb = send(
        &fake,
        "POST",
        &path,
        &form(&[("Twiml", "<Response><Speak>hi</Speak></Response>")]),
    )
    .await;
    assert_eq!((verb.status, verb.code()), (400, 12100));
    assert_eq!(fake.violations().len(), 3, "{:?}", fake.violations());

    let relative = r#"<Response><Dial action="/after-dial" callerId="+14155550123"><Number>+15005550006</Number></Dial></Response>"#;
    let reply = send(&fake, "POST", &path, &form(&[("Twiml", relative)])).await;
    assert_eq!(reply.status, 200);
    let log = fake.call_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].code, log[0].call_sid.as_str()), (15004, LIVE));
    assert!(log[0].message.contains("/after-dial"), "{log:?}");
    assert_eq!(fake.violations().len(), 4, "{:?}", fake.violations());
    assert_eq!(fake.call(LIVE).unwrap().twiml_updates.len(), 2);
}

/// A caller ID that is not the call's numbers nor the account's is logged (13214); one that
/// lost its `+` to form encoding too.
#[tokio::test]
async fn dial_caller_ids_are_checked() {
    let fake = fake_with_live_call(Account::test()).await;
    fake.add_number("+18005550100");
    let path = call_path(&fake, LIVE);
    for caller_id in [CALLER, OUR_NUMBER, "+18005550100"] {
        let twiml =
            format!(r#"<Response><Dial callerId="{caller_id}">+15005550006</Dial></Response>"#);
        assert_eq!(
            send(&fake, "POST", &path, &form(&[("Twiml", &twiml)]))
                .await
                .status,
            200
        );
    }
    fake.assert_no_violations();
    // `callerId="+1…"` sent with a bare `+` in the body: the form decodes it to a space.
    let body = "Twiml=%3CResponse%3E%3CDial+callerId%3D%22+14155550123%22%3E%2B15005550006%3C%2FDial%3E%3C%2FResponse%3E";
    assert_eq!(send(&fake, "POST", &path, body).await.status, 200);
    let log = fake.call_log();
    assert_eq!(log.iter().map(|n| n.code).collect::<Vec<_>>(), [13214]);
    assert!(log[0].message.contains("arrived as a space"), "{log:?}");
}

/// A JSON body is not read: the update has no parameters, changes nothing, and both facts are
/// violations. Names are case-sensitive.
#[tokio::test]
async fn only_form_bodies_with_pascal_case_names() {
    let fake = fake_with_live_call(Account::test()).await;
    let account = fake.account().clone();
    let path = call_path(&fake, LIVE);
    let raw = raw_request(
        "POST",
        &path,
        Some(&basic(&account.account_sid, &account.auth_token)),
        Some("application/json"),
        r#"{"Status":"completed"}"#,
    );
    let reply = Conn::open(&fake).await.send(&raw).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["status"], "in-progress");
    let violations = fake.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("is not read"), "{violations:?}");
    assert!(violations[1].contains("changes nothing"), "{violations:?}");

    let reply = send(&fake, "POST", &path, "status=completed").await;
    assert_eq!(reply.json()["status"], "in-progress");
    assert!(fake.violations()[2].contains("unknown parameter `status`"));
    assert_eq!(fake.call(LIVE).unwrap().status, CallStatus::InProgress);
    assert!(fake.events().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Creates and their webhooks

/// The reference's create body: 201, `queued`, `outbound-api`, a new `CA` + 32 hex SID, the
/// subscription recorded.
#[tokio::test]
async fn the_create_vector_queues_a_call() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    let reply = send(&fake, "POST", &calls_path(&fake), CREATE_BODY).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let resource = reply.json();
    let sid = resource["sid"].as_str().unwrap().to_owned();
    assert!(callbridge_fakes::twilio_rest::is_call_sid(&sid), "{sid}");
    assert_eq!(resource["status"], "queued");
    assert_eq!(resource["direction"], "outbound-api");
    assert_eq!(resource["to"], "+14155550142");
    assert_eq!(resource["from"], "+18005550100");
    assert_eq!(resource["uri"], call_path(&fake, &sid));
    let created = fake.created_calls();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].url.as_deref(),
        Some("https://bridge.example.com/voice?cb=abc")
    );
    assert_eq!(
        created[0].status_callback_events,
        ["initiated", "answered", "completed"]
    );
    assert_eq!(created[0].timeout, 30);
    assert_eq!(
        fake.events(),
        [CallEvent::Created {
            sid,
            from: "+18005550100".into(),
            to: "+14155550142".into()
        }]
    );
    fake.assert_no_violations();
}

/// `To` and `From` are judged: a bare `+` (21211, a violation naming the encoding), an invalid
/// number (21211), a `From` the account does not own (21210), a `From` that is not a number
/// (21212), no `Url` (21205); a `sip:` target is allowed.
#[tokio::test]
async fn create_checks_numbers() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    let path = calls_path(&fake);
    let url = "Url=https%3A%2F%2Fb.example%2Fvoice";
    for (body, code) in [
        (format!("To=+14155550142&From=%2B18005550100&{url}"), 21211),
        (format!("To=%2B1415&From=%2B18005550100&{url}"), 21211),
        (
            format!("To=%2B14155550142&From=%2B18005550111&{url}"),
            21210,
        ),
        (format!("To=%2B14155550142&From=Acme&{url}"), 21212),
        ("To=%2B14155550142&From=%2B18005550100".to_owned(), 21205),
        (format!("From=%2B18005550100&{url}"), 21201),
    ] {
        let reply = send(&fake, "POST", &path, &body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (400, code),
            "{body}: {}",
            reply.body
        );
    }
    let violations = fake.violations();
    assert!(violations[0].contains("encode it as %2B"), "{violations:?}");
    assert_eq!(violations.len(), 3, "{violations:?}");
    let sip = send(
        &fake,
        "POST",
        &path,
        &format!("To=sip%3Aagent%40pbx.example.com&From=%2B18005550100&{url}"),
    )
    .await;
    assert_eq!(sip.status, 201, "{}", sip.body);
    assert_eq!(fake.created_calls().len(), 1);
}

/// A created call, answered and ended by the test: Twilio requests its `Url` (signed over the
/// exact URL with its query, `Direction=outbound-api`), the TwiML comes back read, and the end
/// posts a signed status callback with the final status.
#[tokio::test]
async fn created_calls_are_answered_and_completed_with_signed_webhooks() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", service.local_addr().unwrap());
    let voice_url = format!("{base}/voice?cb=abc");
    let status_url = format!("{base}/twilio/call-status");
    let body = form(&[
        ("To", "+14155550142"),
        ("From", "+18005550100"),
        ("Url", &voice_url),
        ("StatusCallback", &status_url),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
    ]);
    let reply = send(&fake, "POST", &calls_path(&fake), &body).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let sid = reply.json()["sid"].as_str().unwrap().to_owned();
    let token = fake.account().auth_token.clone();

    let twiml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://b.example/media-stream"><Parameter name="cb" value="abc"/></Stream></Connect></Response>"#;
    // The voice request, then the `answered` callback.
    let (answered, (voice, answered_cb)) = tokio::join!(fake.answer_created_call(&sid), async {
        let voice = serve_one(&service, "text/xml", twiml).await;
        (voice, serve_one(&service, "text/plain", "").await)
    });
    let answered = answered.unwrap();
    assert_eq!(
        answered.stream().unwrap().1,
        [("cb".to_owned(), "abc".to_owned())]
    );
    assert_eq!(
        (voice.method.as_str(), voice.target.as_str()),
        ("POST", "/voice?cb=abc")
    );
    let params = voice.form();
    assert_eq!(get(&params, "Direction"), Some("outbound-api"));
    assert_eq!(get(&params, "CallStatus"), Some("in-progress"));
    assert_eq!(get(&params, "CallSid"), Some(sid.as_str()));
    assert_eq!(get(&params, "From"), Some("+18005550100"));
    assert_eq!(get(&params, "To"), Some("+14155550142"));
    assert_eq!(
        voice.header("x-twilio-signature"),
        Some(expected_signature(&token, &voice_url, &params).as_str())
    );
    assert_eq!(get(&answered_cb.form(), "CallStatus"), Some("in-progress"));
    assert_eq!(fake.call(&sid).unwrap().status, CallStatus::InProgress);

    let (done, status) = tokio::join!(
        fake.complete_created_call(&sid, CallStatus::Completed),
        serve_one(&service, "text/plain", ""),
    );
    assert_eq!(done.unwrap().unwrap().status, 200);
    assert_eq!(status.target, "/twilio/call-status");
    let params = status.form();
    assert_eq!(get(&params, "CallStatus"), Some("completed"));
    assert_eq!(get(&params, "CallSid"), Some(sid.as_str()));
    assert_eq!(
        get(&params, "AccountSid"),
        Some(fake.account().account_sid.as_str())
    );
    assert_eq!(get(&params, "Direction"), Some("outbound-api"));
    assert_eq!(get(&params, "SequenceNumber"), Some("1"));
    assert!(get(&params, "CallDuration").is_some());
    assert_eq!(
        status.header("x-twilio-signature"),
        Some(expected_signature(&token, &status_url, &params).as_str())
    );
    let kinds: Vec<WebhookKind> = fake.webhooks().iter().map(|w| w.kind).collect();
    assert_eq!(
        kinds,
        [
            WebhookKind::Voice,
            WebhookKind::StatusCallback,
            WebhookKind::StatusCallback
        ]
    );
    assert!(fake.events().contains(&CallEvent::Ended {
        sid: sid.clone(),
        status: CallStatus::Completed
    }));
    fake.assert_no_violations();
}

/// A call nobody answers reaches only its status callback: with `StatusCallbackMethod=GET`
/// the parameters ride in the query and the signature covers that full URL; a public URL is
/// delivered to the webhook host and still signed as given.
#[tokio::test]
async fn an_unanswered_call_gets_a_get_status_callback() {
    let fake = FakeTwilioRest::start(Account::test_with_api_key()).await;
    fake.add_number("+18005550100");
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    fake.set_webhook_host(Some(&service.local_addr().unwrap().to_string()));
    let status_url = "https://bridge.example.com/twilio/call-status?leg=out";
    let body = form(&[
        ("To", "+14155550142"),
        ("From", "+18005550100"),
        ("Twiml", "<Response><Say>Hello.</Say></Response>"),
        ("StatusCallback", status_url),
        ("StatusCallbackMethod", "GET"),
    ]);
    let account = fake.account().clone();
    let (key, secret) = account.api_key.clone().unwrap();
    let raw = raw_request(
        "POST",
        &calls_path(&fake),
        Some(&basic(&key, &secret)),
        Some(FORM),
        &body,
    );
    let reply = Conn::open(&fake).await.send(&raw).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let sid = reply.json()["sid"].as_str().unwrap().to_owned();
    // Not subscribed to `initiated`/`ringing`: ringing sends nothing.
    fake.ring_created_call(&sid).await.unwrap();
    assert!(fake.webhooks().is_empty());

    let (done, status) = tokio::join!(
        fake.complete_created_call(&sid, CallStatus::Busy),
        serve_one(&service, "text/plain", ""),
    );
    assert_eq!(done.unwrap().unwrap().status, 200);
    assert_eq!(status.method, "GET");
    assert!(
        status.target.starts_with("/twilio/call-status?leg=out&"),
        "{}",
        status.target
    );
    let params = status.query();
    assert_eq!(get(&params, "CallStatus"), Some("busy"));
    assert_eq!(get(&params, "CallDuration"), Some("0"));
    let signed = format!("https://bridge.example.com{}", status.target);
    assert_eq!(
        status.header("x-twilio-signature"),
        Some(expected_signature(&account.auth_token, &signed, &[]).as_str())
    );
    // A `completed` after `busy` is refused: the call is over.
    assert!(fake
        .complete_created_call(&sid, CallStatus::Completed)
        .await
        .is_err());
    let again = send(&fake, "POST", &call_path(&fake, &sid), "Status=completed").await;
    assert_eq!(again.code(), 20404);
    fake.assert_no_violations();
}

// ---------------------------------------------------------------------------------------------
// The connection and the knobs

/// Two requests on one keep-alive connection are both answered on it; `Connection: close`
/// ends it after the answer.
#[tokio::test]
async fn keep_alive_serves_several_requests() {
    let fake = fake_with_live_call(Account::test()).await;
    let account = fake.account().clone();
    let auth = basic(&account.account_sid, &account.auth_token);
    let path = call_path(&fake, LIVE);
    let mut conn = Conn::open(&fake).await;
    let first = conn
        .send(&raw_request("GET", &path, Some(&auth), None, ""))
        .await;
    let second = conn
        .send(&raw_request(
            "POST",
            &path,
            Some(&auth),
            Some(FORM),
            "Status=completed",
        ))
        .await;
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(second.json()["status"], "completed");
    assert!(first.header("twilio-request-id").unwrap().starts_with("RQ"));
    let close = raw_request("GET", &path, Some(&auth), None, "")
        .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    let third = conn.send(&close).await;
    assert_eq!(third.header("connection"), Some("close"));
    assert!(
        conn.read_reply().await.is_none(),
        "the connection stays open"
    );
    assert_eq!(fake.connection_count(), 1);
    assert_eq!(fake.wait_requests(3).await.len(), 3);
    fake.assert_no_violations();
}

/// Injected failures: one scripted error, 429/20429 a number of times then success, a slow
/// answer whose update is applied at once, the concurrency limit, refused connections.
#[tokio::test]
async fn knobs_inject_failures() {
    let fake = fake_with_live_call(Account::test()).await;
    let path = call_path(&fake, LIVE);

    fake.set_fail_next(500, 20500, "Internal Server Error");
    let failed = send(&fake, "GET", &path, "").await;
    assert_eq!((failed.status, failed.code()), (500, 20500));
    assert_eq!(send(&fake, "GET", &path, "").await.status, 200);

    fake.fail_with_429_times(2);
    fake.set_retry_after(Some(1));
    for _ in 0..2 {
        let limited = send(&fake, "POST", &path, "Status=completed").await;
        assert_eq!((limited.status, limited.code()), (429, 20429));
        assert_eq!(limited.header("retry-after"), Some("1"));
    }
    assert_eq!(
        fake.call(LIVE).unwrap().status,
        CallStatus::InProgress,
        "a 429 is not processed"
    );

    // Slow: the hang-up is applied before the answer leaves.
    fake.set_delay(Duration::from_millis(300));
    fake.set_rate_limit(Some(1));
    let started = Instant::now();
    let slow = send(&fake, "POST", &path, "Status=completed");
    let second = async {
        fake.wait_requests(5).await;
        let mut events = fake.events();
        assert_eq!(
            events.pop(),
            Some(CallEvent::Completed { sid: LIVE.into() })
        );
        // One request is in flight: another one is over the limit.
        send(&fake, "GET", &path, "").await
    };
    let (slow, second) = tokio::join!(slow, second);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(slow.status, 200);
    assert_eq!((second.status, second.code()), (429, 20429));
    fake.set_delay(Duration::ZERO);
    fake.set_rate_limit(None);

    fake.set_refuse_connections(true);
    let account = fake.account().clone();
    let mut conn = Conn::open(&fake).await;
    let raw = raw_request(
        "GET",
        &path,
        Some(&basic(&account.account_sid, &account.auth_token)),
        None,
        "",
    );
    // The write may fail or succeed: the connection is reset either way, without an answer.
    let _ = conn.stream.write_all(raw.as_bytes()).await;
    assert!(conn.read_reply().await.is_none());
    fake.set_refuse_connections(false);
    assert_eq!(send(&fake, "GET", &path, "").await.status, 200);
    fake.assert_no_violations();
}
