//! G.711 µ-law (`reference/protocols.md` C), written here from the standard's description so
//! that the fakes never judge the service's audio with the service's own codec.
//!
//! The encoder is the classic "bias 0x84" one: clip the magnitude to 32635, add 132, find the
//! segment (the highest set bit among bits 14..7), keep four mantissa bits, invert. The
//! decoder is the inverse formula. (Python's `audioop.lin2ulaw` is a different encoder that
//! disagrees by one code on 381 negative inputs; compare encoders by round-trip error.)

/// µ-law at 8 kHz: 8 bytes (samples) per millisecond; a 20 ms frame is 160 bytes.
pub const BYTES_PER_MS: usize = 8;

/// The code of a zero sample (`0x7F` also decodes to 0).
pub const SILENCE: u8 = 0xFF;

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Encodes one 16-bit linear sample.
pub fn encode(sample: i16) -> u8 {
    let x = i32::from(sample);
    let sign: u8 = if x < 0 { 0x80 } else { 0 };
    let m = x.abs().min(CLIP) + BIAS;
    // Segment: how far the highest set bit sits above bit 7 (m is at least 132, so bit 7 or
    // higher is always set).
    let mut exponent = 7u8;
    while exponent > 0 && m & (0x80 << exponent) == 0 {
        exponent -= 1;
    }
    let mantissa = ((m >> (exponent + 3)) & 0x0F) as u8;
    !(sign | (exponent << 4) | mantissa)
}

/// Decodes one µ-law code (range ±32124).
pub fn decode(code: u8) -> i16 {
    let u = !code;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0F);
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    let x = if u & 0x80 != 0 { -magnitude } else { magnitude };
    // |x| <= 32124.
    x as i16
}

/// Appends the codes of `samples` to `out`.
pub fn encode_into(samples: &[i16], out: &mut Vec<u8>) {
    out.extend(samples.iter().map(|&s| encode(s)));
}

/// Appends the samples of `codes` to `out`.
pub fn decode_into(codes: &[u8], out: &mut Vec<i16>) {
    out.extend(codes.iter().map(|&c| decode(c)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vector of the table in section C, both ways.
    #[test]
    fn reference_vectors() {
        for (input, code, decoded) in [
            (0i16, 0xFFu8, 0i16),
            (1, 0xFF, 0),
            (-1, 0x7F, 0),
            (100, 0xF2, 104),
            (-100, 0x72, -104),
            (1000, 0xCE, 988),
            (8159, 0x9F, 8316),
            (32767, 0x80, 32124),
            (32635, 0x80, 32124),
            (-32768, 0x00, -32124),
        ] {
            assert_eq!(encode(input), code, "encode({input})");
            assert_eq!(decode(code), decoded, "decode({code:#04x})");
        }
        assert_eq!(decode(0xFE), 8);
        assert_eq!(decode(0x7E), -8);
        assert_eq!(decode(SILENCE), 0);
    }

    /// Every input decodes back within half the step of its segment (section C's table).
    #[test]
    fn round_trip_error_is_within_the_segment_step() {
        const UPPER: [i32; 7] = [123, 379, 891, 1915, 3963, 8059, 16251];
        for x in i16::MIN..=i16::MAX {
            let m = i32::from(x).abs().min(CLIP);
            let segment = UPPER.iter().position(|&u| m <= u).unwrap_or(7);
            let step = 8 << segment;
            let back = i32::from(decode(encode(x)));
            let err = (back - i32::from(x).clamp(-CLIP, CLIP)).abs();
            assert!(err <= step / 2 + 1, "{x} -> {back} (step {step})");
        }
    }

    /// Decoding then encoding gives the code back (one code per level, except ±0).
    #[test]
    fn every_code_survives_decode_encode() {
        for code in 0..=255u8 {
            let back = encode(decode(code));
            if code == 0x7F {
                assert_eq!(back, 0xFF, "negative zero encodes as positive zero");
            } else {
                assert_eq!(back, code);
            }
        }
    }
}
