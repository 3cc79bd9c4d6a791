//! G.711 µ-law codec (ITU-T G.711, "bias 0x84" variant), as specified in
//! `reference/protocols.md` section C.
//!
//! Twilio Media Streams carry `audio/x-mulaw` at 8000 Hz mono, one byte per sample. When the
//! OpenAI leg also speaks `audio/pcmu` the bridge passes payloads through untouched; this module
//! is for the places that need linear samples (level metering, generated silence or tones, the
//! 24 kHz PCM16 fallback, test fakes).
//!
//! The encoder is the classic "bias 0x84" one, not the Sun/CCITT "shift right by 2, bias 33"
//! encoder behind Python's `audioop.lin2ulaw`: the two differ by one code on 381 negative inputs
//! (e.g. −1 is `0x7F` here, `0x7E` there), so compare encoders by round-trip error, not bytes.
//! The decoder is unique and matches `audioop.ulaw2lin` for all 256 codes.

/// The µ-law code of a zero sample. `0x7F` ("negative zero") also decodes to 0, but `0xFF` is
/// what the encoder produces for 0, so use this one to fill gaps.
pub const SILENCE: u8 = 0xFF;

/// 8000 samples/s at one byte per sample: a 20 ms frame is 160 bytes.
pub const BYTES_PER_MS: usize = 8;

/// Added to the magnitude before segmenting so that every segment boundary sits on a power of
/// two; the decoder subtracts it again.
const BIAS: i32 = 0x84;

/// Largest magnitude that still fits the top segment after `BIAS` is added (32635 + 132 = 32767).
const CLIP: i32 = 32635;

/// Segment (exponent) of a biased magnitude `m`, indexed by `m >> 7`: the position of the
/// highest set bit among bits 14..7 of `m`, minus 7.
static EXPONENT: [u8; 256] = build_exponent_table();

/// Linear value of each of the 256 codes, computed at compile time from the formula in
/// section C, so decoding is one load.
static DECODE: [i16; 256] = build_decode_table();

const fn build_exponent_table() -> [u8; 256] {
    let mut table = [0u8; 256];
    // Index 0 is never used: the biased magnitude is at least 132, so `m >> 7` is at least 1.
    let mut i = 1;
    while i < 256 {
        table[i] = (i as u8).ilog2() as u8;
        i += 1;
    }
    table
}

const fn decode_formula(code: u8) -> i16 {
    let u = !code;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    // The largest magnitude is ((15 << 3) + 132) << 7) - 132 = 32124, so the cast is lossless.
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

const fn build_decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = decode_formula(i as u8);
        i += 1;
    }
    table
}

/// Encodes one 16-bit linear sample as a µ-law code.
///
/// Magnitudes above 32635 are clipped, so 32767 and −32768 land on the extreme codes `0x80` and
/// `0x00` (which decode to ±32124).
pub fn encode(sample: i16) -> u8 {
    // Widen first: `i16::MIN.abs()` would overflow.
    let x = i32::from(sample);
    let sign: u8 = if x < 0 { 0x80 } else { 0 };
    let magnitude = x.abs().min(CLIP) + BIAS;
    let exponent = EXPONENT[((magnitude >> 7) & 0xFF) as usize];
    let mantissa = ((magnitude >> (exponent + 3)) & 0x0F) as u8;
    !(sign | (exponent << 4) | mantissa)
}

/// Decodes one µ-law code to a 16-bit linear sample (range ±32124).
pub fn decode(code: u8) -> i16 {
    DECODE[usize::from(code)]
}

/// Appends the µ-law codes of `samples` to `out`.
///
/// Appends rather than overwrites so a caller can reuse one buffer per call (clear it first)
/// or build a frame from several pieces without copying.
pub fn encode_into(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len());
    out.extend(samples.iter().map(|&sample| encode(sample)));
}

/// Appends the linear samples of `codes` to `out`; see [`encode_into`] for why it appends.
pub fn decode_into(codes: &[u8], out: &mut Vec<i16>) {
    out.reserve(codes.len());
    out.extend(codes.iter().map(|&code| decode(code)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The segment of a magnitude and its quantisation step, from the segment table of section C
    /// (written out independently of the encoder's exponent table).
    fn segment(magnitude: i32) -> (u8, i32) {
        const UPPER: [i32; 7] = [123, 379, 891, 1915, 3963, 8059, 16251];
        let exponent = UPPER
            .iter()
            .position(|&upper| magnitude <= upper)
            .unwrap_or(7);
        (exponent as u8, 8 << exponent)
    }

    /// Every vector in the table of section C, in both directions.
    #[test]
    fn section_c_vectors() {
        let cases: [(i16, u8, i16); 10] = [
            (0, 0xFF, 0),
            (1, 0xFF, 0),
            (-1, 0x7F, 0),
            (100, 0xF2, 104),
            (-100, 0x72, -104),
            (1000, 0xCE, 988),
            (8159, 0x9F, 8316),
            (32767, 0x80, 32124),
            (32635, 0x80, 32124),
            (-32768, 0x00, -32124),
        ];
        for (sample, code, decoded) in cases {
            assert_eq!(encode(sample), code, "encode({sample})");
            assert_eq!(decode(code), decoded, "decode({code:#04x})");
        }
        assert_eq!(decode(0xFE), 8);
        assert_eq!(decode(0x7E), -8);
    }

    /// Both zero codes decode to silence, and the constants match 8 kHz one-byte samples.
    #[test]
    fn silence_and_rate() {
        assert_eq!(decode(SILENCE), 0);
        assert_eq!(decode(0x7F), 0);
        assert_eq!(encode(0), SILENCE);
        assert_eq!(BYTES_PER_MS * 20, 160);
    }

    /// Over every i16, the encoder picks the segment the table says, and the decoded value is
    /// within half a step of the input (the decoder returns the middle of the interval); inputs
    /// clipped at 32635 stay within one step.
    #[test]
    fn round_trip_error_is_bounded_by_the_segment_step() {
        for sample in i16::MIN..=i16::MAX {
            let code = encode(sample);
            let magnitude = i32::from(sample).abs();
            let (exponent, step) = segment(magnitude.min(CLIP));
            assert_eq!((!code >> 4) & 0x07, exponent, "segment of {sample}");
            let error = (i32::from(decode(code)) - i32::from(sample)).abs();
            let bound = if magnitude > CLIP { step } else { step / 2 };
            assert!(error <= bound, "{sample}: error {error} > {bound}");
            if sample != 0 && decode(code) != 0 {
                assert_eq!(decode(code) < 0, sample < 0, "sign of {sample}");
            }
        }
    }

    /// The quantiser never reorders samples: decode(encode(x)) is non-decreasing in x.
    #[test]
    fn round_trip_is_monotonic() {
        let mut previous = decode(encode(i16::MIN));
        for sample in i16::MIN + 1..=i16::MAX {
            let current = decode(encode(sample));
            assert!(current >= previous, "{sample}: {current} < {previous}");
            previous = current;
        }
    }

    /// Every decoded value is a fixed point of the codec: re-encoding it loses nothing.
    #[test]
    fn decoded_values_re_encode_exactly() {
        for code in 0..=u8::MAX {
            let value = decode(code);
            assert_eq!(decode(encode(value)), value, "code {code:#04x}");
        }
    }

    /// The `_into` forms append, element for element, to what is already in the buffer.
    #[test]
    fn into_forms_append() {
        let samples = [0i16, -1, 100, -100, 1000, 8159, 32767, -32768];
        let mut codes = vec![0xAA];
        encode_into(&samples, &mut codes);
        assert_eq!(
            codes,
            [0xAA, 0xFF, 0x7F, 0xF2, 0x72, 0xCE, 0x9F, 0x80, 0x00]
        );

        let mut decoded = vec![7i16];
        decode_into(&codes[1..], &mut decoded);
        assert_eq!(decoded, [7, 0, 0, 104, -104, 988, 8316, 32124, -32124]);

        let mut empty = Vec::new();
        encode_into(&[], &mut empty);
        assert!(empty.is_empty());
    }
}
