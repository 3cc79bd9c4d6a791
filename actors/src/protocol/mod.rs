//! Wire formats, as pure code: no actors, no sockets, no clocks.
//!
//! Each module turns bytes from a peer into typed events and typed commands into the exact text
//! the peer expects (`reference/protocols.md` is the source for every field). Actors call these;
//! the unit tests beside each module use the reference's examples and test vectors.

pub mod g711;
pub mod live;
pub mod openai;
pub mod signature;
pub mod twilio;
pub mod twiml;
pub mod wav;

/// A JSON string that borrows from the frame when it has no escapes. Serde borrows a bare
/// `Cow<str>` field marked `#[serde(borrow)]` but not one inside an `Option`; this wrapper makes
/// `Option<JsonStr>` borrow too, which keeps the per-frame audio path free of copies.
#[derive(Debug, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct JsonStr<'a>(#[serde(borrow)] pub std::borrow::Cow<'a, str>);

/// Length in bytes of the audio a standard base64 string carries, or `None` when the string is
/// not canonical base64 (wrong alphabet, length not a multiple of 4, misplaced padding, or
/// non-zero bits under the padding, as in `"AB=="`, which a strict decoder refuses).
///
/// Audio passes through the bridge as base64 text, undecoded. This check is what makes that safe:
/// it proves the payload can be spliced into JSON without escaping and that the peer will be able
/// to decode it, at the cost of one pass over the bytes and no allocation.
pub fn base64_audio_len(b64: &str) -> Option<usize> {
    let bytes = b64.as_bytes();
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return None;
    }
    let padding = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if padding > 2 {
        return None;
    }
    let body = &bytes[..bytes.len() - padding];
    // One table lookup per byte, folded without a branch per byte: this runs over every
    // payload in both directions.
    if body
        .iter()
        .fold(0u8, |bad, &b| bad | (BASE64_CLASS[b as usize] ^ 1))
        != 0
    {
        return None;
    }
    // The last character before the padding carries 4 (one `=`: 2) bits that decode to
    // nothing; canonical base64 has them zero.
    if padding > 0 {
        let last = sextet(body[body.len() - 1]);
        let unused_mask = if padding == 2 { 0x0F } else { 0x03 };
        if last & unused_mask != 0 {
            return None;
        }
    }
    Some(bytes.len() / 4 * 3 - padding)
}

/// 1 for the 64 characters of the standard base64 alphabet, 0 for every other byte.
const BASE64_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' {
            table[i] = 1;
        }
        i += 1;
    }
    table
};

/// The 6-bit value of a standard base64 character (already checked to be one).
fn sextet(b: u8) -> u8 {
    match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        _ => 63,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn base64_audio_len_matches_decoding() {
        let engine = base64::engine::general_purpose::STANDARD;
        for n in 1..50usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            let text = engine.encode(&data);
            assert_eq!(base64_audio_len(&text), Some(n), "{text}");
        }
    }

    #[test]
    fn base64_audio_len_agrees_with_the_strict_decoder_on_padding_bits() {
        let engine = base64::engine::general_purpose::STANDARD;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for &c in alphabet {
            for text in [format!("A{}==", c as char), format!("AA{}=", c as char)] {
                assert_eq!(
                    base64_audio_len(&text).is_some(),
                    engine.decode(&text).is_ok(),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn base64_audio_len_rejects_what_is_not_base64() {
        for bad in [
            "",
            "abc",
            "ab\"c",
            "a===",
            "ab=c",
            "ab c",
            "\\/8=",
            "////=====",
            "AB==",
            "AAB=",
        ] {
            assert_eq!(base64_audio_len(bad), None, "{bad:?}");
        }
    }
}
