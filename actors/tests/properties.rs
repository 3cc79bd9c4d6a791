//! Property tests: peer input and sequences of events that no hand-written case covers.
//! Arbitrary bytes and structured mutations never panic, never grow a bound, and checks agree
//! with an independent decoder. Bounded (proptest's default case count), part of the normal
//! test command.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;

use callbridge_actors::protocol::{base64_audio_len, openai, twilio, twiml};
use callbridge_actors::session::inbound::{Inbound, InboundConfig, JITTER_ALLOWANCE_MS};
use callbridge_actors::session::playback::{
    Chunk, Playback, PlaybackConfig, Wire, MAX_PENDING_MARKS,
};

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
