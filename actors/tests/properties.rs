//! Property tests: peer input and sequences of events that no hand-written case covers.
//! Arbitrary bytes and structured mutations never panic, never grow a bound, and checks agree
//! with an independent decoder. Bounded (proptest's default case count), part of the normal
//! test command.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;

use callbridge_actors::messages::ClearOutcome;
use callbridge_actors::protocol::{base64_audio_len, openai, signature, twilio, twiml};
use callbridge_actors::session::inbound::{Inbound, InboundConfig, JITTER_ALLOWANCE_MS};
use callbridge_actors::session::playback::{
    Chunk, Playback, PlaybackConfig, Wire, MAX_PENDING_MARKS,
};
use callbridge_actors::session::turns::{Action, Event, Turns, TurnsConfig, MAX_HELD_DIGITS};

/// Twilio-shaped JSON with its fields mutated: the parser must answer, never panic.
fn twilio_like() -> impl Strategy<Value = String> {
    let event = prop_oneof![
        Just("media"),
        Just("start"),
        Just("mark"),
        Just("dtmf"),
        Just("stop"),
        Just("connected"),
        Just("nope"),
    ];
    (event, ".{0,40}", ".{0,40}", any::<i64>()).prop_map(|(event, a, b, n)| {
        serde_json::json!({
            "event": event,
            "streamSid": a,
            "media": {"payload": b, "timestamp": n.to_string(), "track": a},
            "start": {"streamSid": a, "callSid": b, "customParameters": {"k": n}},
            "mark": {"name": b},
            "dtmf": {"digit": a},
        })
        .to_string()
    })
}

proptest! {
    #[test]
    fn the_twilio_parser_never_panics(text in ".{0,300}") {
        let _ = twilio::parse(&text);
    }

    #[test]
    fn the_twilio_parser_never_panics_on_twilio_shaped_input(text in twilio_like()) {
        let _ = twilio::parse(&text);
    }

    #[test]
    fn the_openai_parser_never_panics(text in ".{0,300}") {
        let _ = openai::parse_server_event(&text);
    }

    #[test]
    fn base64_check_agrees_with_the_strict_decoder(text in "[A-Za-z0-9+/=]{0,24}") {
        let strict = base64::engine::general_purpose::STANDARD.decode(&text);
        match base64_audio_len(&text) {
            Some(n) => prop_assert_eq!(strict.map(|d| d.len()).ok(), Some(n)),
            // The check also refuses the empty payload, which decodes to nothing.
            None => prop_assert!(strict.is_err() || text.is_empty()),
        }
    }

    #[test]
    fn twiml_escapes_whatever_it_is_given(say in ".{0,60}", dial in ".{0,30}", value in ".{0,60}") {
        let doc = twiml::connect_stream_then("wss://b.example.com/m", &[("p", value.as_str())], &say, &dial);
        prop_assert!(doc.starts_with("<?xml"));
        prop_assert!(doc.ends_with("</Response>"));
        // Every '<' opens one of our elements: nothing from the input became markup.
        for tag in doc.match_indices('<').map(|(i, _)| &doc[i..]) {
            prop_assert!(
                ["<?xml", "<Response", "</Response", "<Connect", "</Connect", "<Stream",
                 "</Stream", "<Parameter", "<Say", "</Say", "<Dial", "</Dial", "<Sip", "</Sip"]
                    .iter()
                    .any(|t| tag.starts_with(t)),
                "{}", doc
            );
        }
    }

    #[test]
    fn inbound_never_forwards_audio_faster_than_real_time(
        steps in proptest::collection::vec((0u64..5_000, 0u64..100), 1..200),
        routed_at in 0usize..200,
    ) {
        let mut inbound = Inbound::new(InboundConfig { hold_bytes: 16_000, fill_gaps_max_ms: 1_000 });
        let mut out = Vec::new();
        let (mut ts, mut now, mut forwarded_ms) = (0u64, 0u64, 0u64);
        for (n, (ts_step, real_step)) in steps.iter().enumerate() {
            if n == routed_at {
                inbound.set_routed(true, &mut out);
            }
            ts = ts.saturating_add(*ts_step);
            now += real_step;
            inbound.on_media(Bytes::from_static(b"AAAA"), 160, Some(ts), now, &mut out);
            forwarded_ms += out.drain(..).map(|(_, b)| u64::from(b) / 8).sum::<u64>();
            prop_assert!(inbound.held_bytes() <= 16_000);
        }
        prop_assert!(forwarded_ms <= now + JITTER_ALLOWANCE_MS + 20 * steps.len() as u64);
    }

    #[test]
    fn playback_keeps_its_bounds_whatever_happens(
        ops in proptest::collection::vec((0u8..6, 1u32..2_000, 0u8..3), 1..400),
    ) {
        let mut p = Playback::new(PlaybackConfig {
            pre_start_bytes: 8_000,
            track_marks: true,
            mark_interval_bytes: 800,
            budget_bytes: 16_000,
            queue_bytes: 24_000,
        });
        let mut sent_marks: Vec<String> = Vec::new();
        for (op, bytes, resp) in ops {
            match op {
                0 | 1 => p.push(Chunk {
                    response_id: Arc::from(format!("r{resp}")),
                    item_id: Arc::from(format!("i{resp}")),
                    payload: Bytes::from_static(b"AAAA"),
                    bytes,
                }),
                2 => p.start(),
                3 => {
                    while let Some(wire) = p.next_wire() {
                        match wire {
                            Wire::Media { mark: Some(m), .. } | Wire::Mark(m) => sent_marks.push(m),
                            Wire::Media { .. } => {}
                        }
                    }
                }
                4 => {
                    if let Some(m) = sent_marks.first().cloned() {
                        sent_marks.remove(0);
                        p.on_mark(&m);
                    }
                }
                _ => {
                    let outcome = p.clear(Some(Arc::from(format!("r{resp}"))));
                    if let Some((_, ms)) = outcome.truncate {
                        prop_assert!(ms * 8 <= 1_000_000);
                    }
                    sent_marks.clear();
                }
            }
            prop_assert!(p.queued_ms() * 8 <= 24_000);
            prop_assert!(p.marks_pending() <= MAX_PENDING_MARKS);
            // Sent and unconfirmed audio never exceeds the budget by more than one chunk.
            prop_assert!(p.unconfirmed_ms() * 8 <= 16_000 + 2_000);
        }
    }
}

/// Arbitrary form parameters, repeated names and non-ASCII included.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(("[A-Za-z]{1,8}", ".{0,20}"), 0..6)
}

proptest! {
    #[test]
    fn a_signature_validates_for_its_request_only(
        token in "[a-f0-9]{1,40}",
        path in "[a-z/]{0,20}",
        params in params(),
        flip in any::<usize>(),
    ) {
        let url = format!("https://bridge.example.com/{path}");
        let sig = signature::compute(&token, &url, &params);
        prop_assert!(signature::validate(&token, &url, &params, &sig));
        // The default port written out is the same URL to Twilio.
        let with_port = format!("https://bridge.example.com:443/{path}");
        prop_assert!(signature::validate(&token, &with_port, &params, &sig));
        // Any other URL, token or parameter set fails.
        let other_url = format!("{url}x");
        prop_assert!(!signature::validate(&token, &other_url, &params, &sig));
        let other_token = format!("{token}0");
        prop_assert!(!signature::validate(&other_token, &url, &params, &sig));
        let mut more = params.clone();
        more.push(("Extra".into(), "1".into()));
        prop_assert!(!signature::validate(&token, &url, &more, &sig));
        // One bit of the MAC flipped fails.
        let mut raw = base64::engine::general_purpose::STANDARD.decode(&sig).unwrap();
        let at = flip % raw.len();
        raw[at] ^= 1 << (flip % 8);
        let flipped = base64::engine::general_purpose::STANDARD.encode(&raw);
        prop_assert!(!signature::validate(&token, &url, &params, &flipped));
    }

    #[test]
    fn signature_headers_of_any_shape_are_refused_without_panic(header in ".{0,64}") {
        let url = "https://bridge.example.com/voice";
        let good = signature::compute("tok", url, &[]);
        prop_assert_eq!(signature::validate("tok", url, &[], &header), header.trim() == good);
    }

    #[test]
    fn a_stream_token_is_valid_for_its_own_call_only(
        key in "[a-f0-9]{8,32}",
        sid in "CA[a-f0-9]{32}",
        other in "CA[a-f0-9]{32}",
        garbage in ".{0,40}",
    ) {
        let token = signature::stream_token(&key, &sid);
        prop_assert!(signature::stream_token_valid(&key, &sid, &token));
        prop_assert_eq!(signature::stream_token_valid(&key, &other, &token), other == sid);
        let other_key = format!("{key}x");
        prop_assert!(!signature::stream_token_valid(&other_key, &sid, &token));
        prop_assert_eq!(signature::stream_token_valid(&key, &sid, &garbage), garbage == token);
    }
}

/// Any event the call can feed the turns machine.
fn turn_event() -> impl Strategy<Value = Event> {
    let id = prop_oneof![Just("r1"), Just("r2"), Just("r3")].prop_map(String::from);
    prop_oneof![
        Just(Event::UpstreamReady),
        Just(Event::UpstreamLost),
        Just(Event::SpeechStarted),
        Just(Event::SpeechStopped),
        id.clone()
            .prop_map(|response_id| Event::ResponseCreated { response_id }),
        id.clone()
            .prop_map(|response_id| Event::ResponseDone { response_id }),
        id.clone()
            .prop_map(|response_id| Event::CancelCheck { response_id }),
        "[0-9*#]".prop_map(|digit| Event::Dtmf { digit }),
        (1u64..6).prop_map(|generation| Event::DtmfQuiet { generation }),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0u64..5_000)
        )
            .prop_map(|(cleared, interrupted_response, heard)| Event::Cleared {
                outcome: ClearOutcome {
                    cleared,
                    truncate: heard.map(|ms| (Arc::from("i1"), ms)),
                    interrupted_audio: cleared,
                },
                interrupted_response,
            }),
    ]
}

proptest! {
    /// Whatever the order of events: one response at a time (no `response.create` while one
    /// is in flight or already asked for), the greeting at most once, nothing sent to a leg
    /// that is away, a truncate only from a clear's answer, and the held digits bounded.
    #[test]
    fn the_turns_machine_keeps_its_rules(events in proptest::collection::vec(turn_event(), 1..300)) {
        let mut turns = Turns::new(TurnsConfig {
            greeting: Some("Greet.".into()),
            dtmf_response_delay_ms: 100,
            cancel_grace_ms: 50,
        });
        let mut out = Vec::new();
        let mut ready = false;
        let mut greetings = 0;
        for event in events {
            // Session events come from a ready leg only.
            let from_leg = matches!(
                event,
                Event::ResponseCreated { .. }
                    | Event::ResponseDone { .. }
                    | Event::SpeechStarted
                    | Event::SpeechStopped
            );
            if (from_leg && !ready) || (matches!(event, Event::UpstreamReady) && ready) {
                continue; // a leg is ready once, until it is lost
            }
            let was_cleared = matches!(event, Event::Cleared { .. });
            match &event {
                Event::UpstreamReady => ready = true,
                Event::UpstreamLost => ready = false,
                _ => {}
            }
            let in_flight_before = turns.in_flight().is_some();
            turns.on_event(event, &mut out);
            let creates = out.iter().filter(|a| matches!(a, Action::CreateResponse { .. })).count();
            prop_assert!(creates <= 1, "two responses asked for at once: {out:?}");
            if creates == 1 {
                prop_assert!(ready, "a response asked of a leg that is away: {out:?}");
                prop_assert!(!in_flight_before || turns.in_flight().is_none(),
                    "a response asked for while one is in flight: {out:?}");
            }
            for action in out.drain(..) {
                match action {
                    Action::CreateResponse { instructions: Some(_) } => greetings += 1,
                    Action::Digit { .. } => prop_assert!(ready, "a digit sent to a leg that is away"),
                    Action::Truncate { .. } => prop_assert!(was_cleared, "a truncate without a clear"),
                    _ => {}
                }
            }
            prop_assert!(greetings <= 1, "greeted twice");
            prop_assert!(turns.held_len() <= MAX_HELD_DIGITS);
        }
    }
}
