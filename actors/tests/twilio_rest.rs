//! The Twilio REST client against the strict fake of Twilio's Calls API
//! (`callbridge_fakes::twilio_rest::FakeTwilioRest`), and the REST TwiML builders read back by
//! the fake's own TwiML parser. Every test that talks to the fake ends by asserting it saw no
//! protocol violation.

use std::time::{Duration, Instant};

use callbridge_actors::protocol::twiml::{self, MAX_REST_TWIML_CHARS};
use callbridge_actors::twilio_rest::{
    basic_auth, CreateCall, RestAuth, RestConfig, RestError, RetryPolicy, TwilioRest, UpdateOutcome,
};
use callbridge_fakes::twilio::ACCOUNT_SID;
use callbridge_fakes::twilio_rest::{
    Account, CallEvent, CallStatus, FakeTwilioRest, TEST_API_KEY_SECRET, TEST_API_KEY_SID,
    TEST_AUTH_TOKEN,
};
use callbridge_fakes::twiml::{DialNoun, Verb};

const CALL: &str = "CA0123456789abcdef0123456789abcdef";
const CALL_2: &str = "CAfedcba9876543210fedcba9876543210";
const CALLER: &str = "+14155550123";
const CALLED: &str = "+18005550199";
const AGENT: &str = "+15005550006";

fn token() -> RestAuth {
    RestAuth::AuthToken(TEST_AUTH_TOKEN.to_owned().into())
}

fn api_key() -> RestAuth {
    RestAuth::ApiKey {
        sid: TEST_API_KEY_SID.to_owned(),
        secret: TEST_API_KEY_SECRET.to_owned().into(),
    }
}

/// Short waits, so that retries cost milliseconds.
fn fast() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(80),
        max_retry_after: Duration::from_secs(5),
    }
}

fn client_with(fake: &FakeTwilioRest, auth: RestAuth, timeout: Duration) -> TwilioRest {
    TwilioRest::new(RestConfig {
        api_base: fake.base_url(),
        account_sid: ACCOUNT_SID.to_owned(),
        auth,
        timeout,
    })
    .with_retry(fast())
}

fn client(fake: &FakeTwilioRest) -> TwilioRest {
    client_with(fake, token(), Duration::from_secs(5))
}

/// Neither the error's `Display` nor its `Debug` holds a secret or a Basic header made of one.
fn assert_no_secret(error: &RestError) {
    let shown = format!("{error} / {error:?}");
    for secret in [
        TEST_AUTH_TOKEN.to_owned(),
        TEST_API_KEY_SECRET.to_owned(),
        basic_auth(ACCOUNT_SID, TEST_AUTH_TOKEN)[6..].to_owned(),
        basic_auth(TEST_API_KEY_SID, TEST_API_KEY_SECRET)[6..].to_owned(),
    ] {
        assert!(!shown.contains(&secret), "{shown}");
    }
}

fn outbound(from: &str) -> CreateCall {
    CreateCall {
        to: "+14155550142".into(),
        from: from.into(),
        url: "https://bridge.example.com/voice?cb=abc".into(),
        status_callback: Some("https://bridge.example.com/twilio/call-status".into()),
        status_callback_events: vec!["completed".into()],
        timeout_s: Some(30),
    }
}

/// A hang-up with the Account SID and auth token: one form-encoded `Status=completed` to the
/// call's `.json` path, and the call is completed.
#[actix_rt::test]
async fn hangs_up_with_the_auth_token() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);

    assert_eq!(client(&fake).hang_up(CALL).await, Ok(UpdateOutcome::Done));

    let updates = fake.updates_for(CALL);
    assert_eq!(updates.len(), 1);
    let request = &updates[0];
    assert_eq!(
        request.path,
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL}.json")
    );
    assert_eq!(request.auth_user.as_deref(), Some(ACCOUNT_SID));
    assert_eq!(request.raw_body, "Status=completed");
    assert!(request
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded")));
    assert_eq!(request.status, 200);
    assert_eq!(fake.call(CALL).unwrap().status, CallStatus::Completed);
    assert_eq!(fake.events(), [CallEvent::Completed { sid: CALL.into() }]);
    fake.assert_no_violations();
}

/// With an API key the Basic user is the key's SID and the path still names the account.
#[actix_rt::test]
async fn hangs_up_with_an_api_key() {
    let fake = FakeTwilioRest::start(Account::test_with_api_key()).await;
    fake.add_live_call(CALL, CALLER, CALLED);

    let rest = client_with(&fake, api_key(), Duration::from_secs(5));
    assert_eq!(rest.hang_up(CALL).await, Ok(UpdateOutcome::Done));

    let request = &fake.updates_for(CALL)[0];
    assert_eq!(request.auth_user.as_deref(), Some(TEST_API_KEY_SID));
    assert!(request
        .path
        .starts_with(&format!("/2010-04-01/Accounts/{ACCOUNT_SID}/")));
    assert_eq!(fake.call(CALL).unwrap().status, CallStatus::Completed);
    fake.assert_no_violations();
}

/// Refused credentials are 401/20003, not retried, and the error names no secret.
#[actix_rt::test]
async fn refused_credentials_are_20003() {
    // The fake's account has no API key: the client's key is refused.
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);

    let rest = client_with(&fake, api_key(), Duration::from_secs(5));
    let error = rest.hang_up(CALL).await.unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(401), Some(20003)));
    assert_no_secret(&error);
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.call(CALL).unwrap().status, CallStatus::InProgress);
    fake.assert_no_violations();
}

/// A transfer: the `<Dial>` document arrives whole (its `+`s as `+`), the fake's strict
/// parser reads the caller ID, `answerOnBridge` and the number, and nothing lands in the call
/// log (no 13214 caller ID, no 13223 number, no 15004 URL).
#[actix_rt::test]
async fn redirects_to_a_dial() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    let document = twiml::dial(AGENT, Some(CALLED), Some("Transferring you & yours now."));

    assert_eq!(
        client(&fake).redirect(CALL, &document).await,
        Ok(UpdateOutcome::Done)
    );

    let request = &fake.updates_for(CALL)[0];
    assert_eq!(request.form.len(), 1);
    assert_eq!(request.param("Twiml"), Some(document.as_str()));
    assert!(
        request.raw_body.contains("%2B15005550006"),
        "{}",
        request.raw_body
    );
    let CallEvent::Redirected { sid, twiml } = &fake.events()[0] else {
        panic!("{:?}", fake.events());
    };
    assert_eq!(sid, CALL);
    assert_eq!(twiml.verbs[0], Verb::say("Transferring you & yours now."));
    let dial = twiml.dial().unwrap();
    assert_eq!(dial.caller_id.as_deref(), Some(CALLED));
    assert_eq!(dial.answer_on_bridge, Some(true));
    assert_eq!(dial.nouns, [DialNoun::Number(AGENT.into())]);
    assert_eq!(twiml.verbs.len(), 2);
    assert_eq!(fake.call(CALL).unwrap().twiml_updates, [document]);
    assert!(fake.call_log().is_empty(), "{:?}", fake.call_log());
    fake.assert_no_violations();
}

/// A transfer to a SIP URI, with a SIP caller ID.
#[actix_rt::test]
async fn redirects_to_a_sip_dial() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    let document = twiml::dial("sip:agent@pbx.example.com", Some("bridge.desk_1"), None);

    assert_eq!(
        client(&fake).redirect(CALL, &document).await,
        Ok(UpdateOutcome::Done)
    );
    let CallEvent::Redirected { twiml, .. } = &fake.events()[0] else {
        panic!("{:?}", fake.events());
    };
    let dial = twiml.dial().unwrap();
    assert_eq!(
        dial.nouns,
        [DialNoun::Sip("sip:agent@pbx.example.com".into())]
    );
    assert_eq!(dial.caller_id.as_deref(), Some("bridge.desk_1"));
    assert!(fake.call_log().is_empty(), "{:?}", fake.call_log());
    fake.assert_no_violations();
}

/// The fallback goodbye through the REST API: `<Say>` then `<Hangup/>`.
#[actix_rt::test]
async fn redirects_to_a_goodbye() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);

    let document = twiml::say_then_hangup("Goodbye.");
    assert_eq!(
        client(&fake).redirect(CALL, &document).await,
        Ok(UpdateOutcome::Done)
    );
    let CallEvent::Redirected { twiml, .. } = &fake.events()[0] else {
        panic!("{:?}", fake.events());
    };
    assert_eq!(twiml.verbs, [Verb::say("Goodbye."), Verb::Hangup]);
    fake.assert_no_violations();
}

/// The builders' output parses strictly, with hostile text kept as text.
#[test]
fn the_builders_parse_strictly() {
    let parsed = callbridge_fakes::twiml::parse(&twiml::dial(
        "+1</Number><Hangup/>",
        Some("\"><Hangup/>"),
        Some("<Say>no</Say> & 'quotes' \"too\"\n"),
    ))
    .unwrap();
    assert_eq!(parsed.verbs.len(), 2, "{parsed:?}");
    assert_eq!(
        parsed.verbs[0],
        Verb::say("<Say>no</Say> & 'quotes' \"too\"")
    );
    let dial = parsed.dial().unwrap();
    assert_eq!(dial.caller_id.as_deref(), Some("\"><Hangup/>"));
    assert_eq!(
        dial.nouns,
        [DialNoun::Number("+1</Number><Hangup/>".into())]
    );
    assert!(parsed.urls.is_empty());

    let sip = callbridge_fakes::twiml::parse(&twiml::dial("sip:a@b.example", None, None)).unwrap();
    assert_eq!(sip.verbs.len(), 1);
    assert_eq!(sip.dial().unwrap().caller_id, None);

    let bye = callbridge_fakes::twiml::parse(&twiml::say_then_hangup("Bye & <thanks>")).unwrap();
    assert_eq!(bye.verbs, [Verb::say("Bye & <thanks>"), Verb::Hangup]);
    let bare = callbridge_fakes::twiml::parse(&twiml::say_then_hangup(" ")).unwrap();
    assert_eq!(bare.verbs, [Verb::Hangup]);
}

/// The hang-up race: the caller hung up first. A hang-up then gets 20404 and a redirect 21220,
/// and both are `AlreadyEnded`, sent once.
#[actix_rt::test]
async fn an_ended_call_is_already_ended() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.caller_hangs_up(CALL);
    let rest = client(&fake);

    assert_eq!(rest.hang_up(CALL).await, Ok(UpdateOutcome::AlreadyEnded));
    let document = twiml::dial(AGENT, None, None);
    assert_eq!(
        rest.redirect(CALL, &document).await,
        Ok(UpdateOutcome::AlreadyEnded)
    );

    let codes: Vec<_> = fake
        .updates_for(CALL)
        .iter()
        .map(|r| (r.status, r.error_code))
        .collect();
    assert_eq!(codes, [(404, Some(20404)), (400, Some(21220))]);
    fake.assert_no_violations();
}

/// A 500 on a redirect is an error with Twilio's code, not retried (the TwiML may be running).
#[actix_rt::test]
async fn a_server_error_on_a_redirect_is_not_retried() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.set_fail_next(500, 20500, "Internal Server Error");

    let error = client(&fake)
        .redirect(CALL, &twiml::dial(AGENT, None, None))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        RestError::Twilio {
            status: 500,
            code: Some(20500),
            message: "Internal Server Error".into()
        }
    );
    assert_eq!(error.code(), Some(20500));
    assert_no_secret(&error);
    assert_eq!(fake.requests().len(), 1);
    fake.assert_no_violations();
}

/// A hang-up is idempotent: a 500 is retried, up to the bound.
#[actix_rt::test]
async fn a_server_error_on_a_hang_up_is_retried_up_to_the_bound() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.add_live_call(CALL_2, CALLER, CALLED);
    let rest = client(&fake);

    fake.set_fail_next(503, 20503, "Service Unavailable");
    assert_eq!(rest.hang_up(CALL).await, Ok(UpdateOutcome::Done));
    assert_eq!(fake.updates_for(CALL).len(), 2);

    for _ in 0..4 {
        fake.set_fail_next(500, 20500, "Internal Server Error");
    }
    let error = rest.hang_up(CALL_2).await.unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(500), Some(20500)));
    assert_eq!(fake.updates_for(CALL_2).len(), 4);
    assert_eq!(fake.call(CALL_2).unwrap().status, CallStatus::InProgress);
    fake.assert_no_violations();
}

/// A create: 201 with the new SID; the numbers keep their `+`, the URLs and the status callback
/// arrive as given.
#[actix_rt::test]
async fn creates_a_call() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");

    let created = client(&fake)
        .create_call(&outbound("+18005550100"))
        .await
        .unwrap();
    assert!(
        callbridge_fakes::twilio_rest::is_call_sid(&created.sid),
        "{created:?}"
    );
    assert_eq!(created.status, "queued");

    let calls = fake.created_calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.sid, created.sid);
    assert_eq!(
        (call.to.as_str(), call.from.as_str()),
        ("+14155550142", "+18005550100")
    );
    assert_eq!(
        call.url.as_deref(),
        Some("https://bridge.example.com/voice?cb=abc")
    );
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.status_callback.as_deref(),
        Some("https://bridge.example.com/twilio/call-status")
    );
    assert_eq!(call.status_callback_events, ["completed"]);
    assert_eq!(call.timeout, 30);
    let request = &fake.requests()[0];
    assert_eq!(
        request.path,
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json")
    );
    assert_eq!(request.status, 201);
    fake.assert_no_violations();
}

/// A `From` that is not the account's is 21210, and a bad `To` 21211; neither is retried.
#[actix_rt::test]
async fn a_refused_create_carries_the_code() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    let rest = client(&fake);

    let error = rest
        .create_call(&outbound("+18005550111"))
        .await
        .unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(400), Some(21210)));
    assert!(error.to_string().contains("21210"), "{error}");
    assert_no_secret(&error);

    let mut bad_to = outbound("+18005550100");
    bad_to.to = "12345".into();
    let error = rest.create_call(&bad_to).await.unwrap_err();
    assert_eq!(error.code(), Some(21211));

    assert_eq!(fake.requests().len(), 2);
    assert!(fake.created_calls().is_empty());
    fake.assert_no_violations();
}

/// Two 429s, then the create goes through: retried, and only one call is placed.
#[actix_rt::test]
async fn a_throttled_create_is_retried() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    fake.fail_with_429_times(2);

    let created = client(&fake)
        .create_call(&outbound("+18005550100"))
        .await
        .unwrap();
    let statuses: Vec<_> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 201]);
    assert_eq!(fake.created_calls().len(), 1);
    assert_eq!(fake.created_calls()[0].sid, created.sid);
    fake.assert_no_violations();
}

/// `Retry-After` is honoured: with a backoff of 20 ms, the retry still waits the second
/// Twilio asked for.
#[actix_rt::test]
async fn retry_after_is_honoured() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.fail_with_429_times(1);
    fake.set_retry_after(Some(1));

    assert_eq!(client(&fake).hang_up(CALL).await, Ok(UpdateOutcome::Done));
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    fake.assert_no_violations();
}

/// 429 forever: an error after the bound (1 + 3 attempts), and no call placed. A
/// `Retry-After` beyond the policy's limit ends the retries at once.
#[actix_rt::test]
async fn throttling_forever_ends_after_the_bound() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_number("+18005550100");
    fake.fail_with_429_times(u32::MAX);
    let rest = client(&fake);

    let error = rest
        .create_call(&outbound("+18005550100"))
        .await
        .unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(429), Some(20429)));
    assert_eq!(fake.requests().len(), 4);

    fake.set_retry_after(Some(60));
    let error = rest
        .create_call(&outbound("+18005550100"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(20429));
    assert_eq!(fake.requests().len(), 5);
    assert!(fake.created_calls().is_empty());
    fake.assert_no_violations();
}

/// Connections reset by the API: a hang-up tries 1 + 3 times, a redirect once; a port nobody
/// listens on fails a create at once. `Network` each time, with no secret.
#[actix_rt::test]
async fn an_unreachable_api_is_a_network_error() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.set_refuse_connections(true);
    let rest = client(&fake);

    let error = rest.hang_up(CALL).await.unwrap_err();
    assert!(matches!(error, RestError::Network(_)), "{error:?}");
    assert_no_secret(&error);
    assert_eq!(fake.connection_count(), 4);
    let error = rest
        .redirect(CALL, &twiml::dial(AGENT, None, None))
        .await
        .unwrap_err();
    assert!(matches!(error, RestError::Network(_)), "{error:?}");
    assert_eq!(fake.connection_count(), 5);
    assert!(fake.requests().is_empty());
    assert_eq!(fake.call(CALL).unwrap().status, CallStatus::InProgress);
    fake.assert_no_violations();

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let rest = TwilioRest::new(RestConfig {
        api_base: format!("http://{closed}"),
        account_sid: ACCOUNT_SID.to_owned(),
        auth: token(),
        timeout: Duration::from_secs(2),
    });
    let error = rest
        .create_call(&outbound("+18005550100"))
        .await
        .unwrap_err();
    assert!(matches!(error, RestError::Network(_)), "{error:?}");
    assert_no_secret(&error);
}

/// An API slower than the deadline: `Timeout` at the deadline, not retried, although the fake
/// applied the hang-up (as Twilio may have).
#[actix_rt::test]
async fn a_slow_api_times_out() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.set_delay(Duration::from_secs(2));

    let rest = client_with(&fake, token(), Duration::from_millis(300));
    let started = Instant::now();
    let result = rest.hang_up(CALL).await;
    let took = started.elapsed();
    assert_eq!(result, Err(RestError::Timeout));
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.call(CALL).unwrap().status, CallStatus::Completed);
    fake.assert_no_violations();
}

/// TwiML over 4000 characters is refused before any request; exactly 4000 characters (not
/// bytes) are sent.
#[actix_rt::test]
async fn over_long_twiml_is_never_sent() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    let rest = client(&fake);

    let short = twiml::dial(AGENT, None, Some("x")).chars().count();
    let exact = twiml::dial(
        AGENT,
        None,
        Some(&"é".repeat(MAX_REST_TWIML_CHARS - short + 1)),
    );
    assert_eq!(exact.chars().count(), MAX_REST_TWIML_CHARS);
    let over = twiml::dial(
        AGENT,
        None,
        Some(&"é".repeat(MAX_REST_TWIML_CHARS - short + 2)),
    );

    let error = rest.redirect(CALL, &over).await.unwrap_err();
    assert_eq!(error, RestError::TwimlTooLong(MAX_REST_TWIML_CHARS + 1));
    assert!(fake.requests().is_empty());

    assert_eq!(rest.redirect(CALL, &exact).await, Ok(UpdateOutcome::Done));
    assert_eq!(fake.requests().len(), 1);
    fake.assert_no_violations();
}

/// A malformed call SID never reaches the path.
#[actix_rt::test]
async fn a_malformed_call_sid_is_refused_locally() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    let error = client(&fake).hang_up("CA1/../../Calls").await.unwrap_err();
    assert!(matches!(error, RestError::InvalidCallSid(_)), "{error:?}");
    assert!(fake.requests().is_empty());
    fake.assert_no_violations();
}

/// Requests reuse one keep-alive connection, and a connection the API dropped while idle is
/// replaced without an error.
#[actix_rt::test]
async fn connections_are_reused_and_replaced() {
    let fake = FakeTwilioRest::start(Account::test()).await;
    fake.add_live_call(CALL, CALLER, CALLED);
    fake.add_live_call(CALL_2, CALLER, CALLED);
    let rest = client(&fake);

    let document = twiml::dial(AGENT, None, None);
    assert_eq!(
        rest.redirect(CALL, &document).await,
        Ok(UpdateOutcome::Done)
    );
    assert_eq!(rest.hang_up(CALL).await, Ok(UpdateOutcome::Done));
    assert_eq!(fake.connection_count(), 1);

    fake.drop_connections();
    // The abort takes effect when the runtime next polls the fake's connection task; then the
    // socket closes and the client's pool sees it at its next check. A real API closes idle
    // connections long before they are reused; this is that, not a race on a busy one.
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    // A redirect, which is never retried on a network error: the pool itself must not hand
    // out the closed connection.
    assert_eq!(
        rest.redirect(CALL_2, &document).await,
        Ok(UpdateOutcome::Done)
    );
    assert_eq!(fake.connection_count(), 2);
    fake.assert_no_violations();
}
