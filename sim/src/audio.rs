//! WAV files in and out of the simulated caller, whose line speaks 8 kHz G.711 µ-law.
//!
//! A Twilio caller sends 8 kHz µ-law mono in 20 ms frames of 160 bytes. People feed the
//! simulator whatever recordings they have, so this module:
//! - parses RIFF/WAVE ([`read_wav`]): µ-law at 8 kHz, or 16-bit PCM at 8, 16, 24 or 48 kHz,
//!   mono or multichannel (mixed down), with a clear error for anything else;
//! - converts that to the caller's line format ([`to_mulaw_8k`]): µ-law passes through
//!   byte-for-byte, PCM is low-pass filtered, decimated and encoded;
//! - writes µ-law WAV files to keep what the caller heard ([`write_wav_mulaw`]) and makes test
//!   tones ([`tone_mulaw`], [`write_wav_pcm16`]).
//!
//! Pure code with no I/O: callers read and write the files themselves.

use std::f64::consts::PI;
use std::fmt;

use callbridge_fakes::g711;

/// The caller's line rate.
pub const SAMPLE_RATE: u32 = 8000;

/// `WAVE_FORMAT_PCM`.
const TAG_PCM: u16 = 1;
/// `WAVE_FORMAT_MULAW`.
const TAG_MULAW: u16 = 7;
/// `WAVE_FORMAT_EXTENSIBLE`: the real format tag is the first two bytes of a GUID.
const TAG_EXTENSIBLE: u16 = 0xFFFE;
/// The last 14 bytes shared by every `KSDATAFORMAT_SUBTYPE_*` GUID derived from a format tag.
const GUID_TAIL: [u8; 14] = [
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71,
];

/// The low-pass is flat up to here: the top of the telephone band.
const PASSBAND_HZ: f64 = 3400.0;
/// Everything from here up would alias into the 0–4 kHz band after decimation to 8 kHz.
const STOPBAND_HZ: f64 = 4000.0;
/// Designed attenuation: 10 dB above the 60 dB the tests demand, as Kaiser's length formula
/// is an estimate.
const STOPBAND_DB: f64 = 70.0;

/// Why a WAV file cannot be used; the message says what was found and, where it helps, what
/// would have worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioError {
    /// The bytes do not start with a `RIFF....WAVE` header.
    NotWav,
    /// A chunk declares more bytes than are left: the file was cut short.
    Truncated {
        chunk: [u8; 4],
        declared: usize,
        available: usize,
    },
    /// A chunk every WAV file needs (`fmt ` or `data`) is absent.
    MissingChunk(&'static str),
    /// The file contradicts itself: a short `fmt ` chunk, zero channels, a partial frame.
    Malformed(String),
    /// A well-formed file in a format, sample width or rate this module does not convert.
    Unsupported(String),
}

impl fmt::Display for AudioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotWav => write!(f, "not a WAV file (no RIFF/WAVE header)"),
            Self::Truncated {
                chunk,
                declared,
                available,
            } => write!(
                f,
                "truncated WAV file: chunk \"{}\" declares {declared} bytes, {available} remain",
                chunk.escape_ascii()
            ),
            Self::MissingChunk(id) => write!(f, "WAV file has no \"{id}\" chunk"),
            Self::Malformed(why) => write!(f, "malformed WAV file: {why}"),
            Self::Unsupported(what) => write!(f, "unsupported WAV file: {what}"),
        }
    }
}

impl std::error::Error for AudioError {}

/// The PCM rates that reach 8 kHz by keeping every 1st, 2nd, 3rd or 6th sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PcmRate {
    /// The line rate: encoded as is.
    Hz8000 = 8000,
    /// Wideband speech.
    Hz16000 = 16000,
    /// OpenAI Realtime's PCM16.
    Hz24000 = 24000,
    /// Most recorders.
    Hz48000 = 48000,
}

impl PcmRate {
    /// The rate for `hz`, if it is one of the four supported.
    pub fn from_hz(hz: u32) -> Option<Self> {
        [Self::Hz8000, Self::Hz16000, Self::Hz24000, Self::Hz48000]
            .into_iter()
            .find(|rate| rate.hz() == hz)
    }

    /// Samples per second.
    pub fn hz(self) -> u32 {
        self as u32
    }
}

/// Mono audio read from a WAV file, kept in its stored encoding until [`to_mulaw_8k`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audio {
    /// 8 kHz µ-law codes exactly as stored, so they can reach the line untouched.
    MuLaw8k(Vec<u8>),
    /// 16-bit linear samples, channels already averaged (multichannel µ-law lands here too).
    Pcm16 { rate: PcmRate, samples: Vec<i16> },
}

impl Audio {
    /// Length in milliseconds, rounded down.
    pub fn duration_ms(&self) -> u64 {
        let (len, rate) = match self {
            Self::MuLaw8k(codes) => (codes.len(), SAMPLE_RATE),
            Self::Pcm16 { rate, samples } => (samples.len(), rate.hz()),
        };
        len as u64 * 1000 / u64::from(rate)
    }
}

/// Parses a RIFF/WAVE file held in memory.
///
/// Chunks may come in any order; unknown ones (`LIST`, `fact`, `cue `, …) are skipped, and a
/// missing pad byte after an odd-sized last chunk is forgiven, as many writers omit it.
pub fn read_wav(bytes: &[u8]) -> Result<Audio, AudioError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(AudioError::NotWav);
    }
    // The RIFF size only trims trailing junk (e.g. an appended ID3 tag): streaming writers leave
    // it 0 or 0xFFFFFFFF, so a value outside the buffer is ignored and the chunks decide.
    let riff_end = (le32(bytes, 4) as usize).saturating_add(8);
    let end = if (12..=bytes.len()).contains(&riff_end) {
        riff_end
    } else {
        bytes.len()
    };

    let (mut fmt_chunk, mut data) = (None, None);
    let mut rest = &bytes[12..end];
    while rest.len() >= 8 {
        let chunk = [rest[0], rest[1], rest[2], rest[3]];
        let (declared, body) = (le32(rest, 4) as usize, &rest[8..]);
        if declared > body.len() {
            return Err(AudioError::Truncated {
                chunk,
                declared,
                available: body.len(),
            });
        }
        match &chunk {
            b"fmt " => fmt_chunk = fmt_chunk.or(Some(&body[..declared])),
            b"data" => data = data.or(Some(&body[..declared])),
            _ => {}
        }
        // Odd-sized chunks are followed by one pad byte.
        rest = body.get(declared + declared % 2..).unwrap_or_default();
    }

    let (mulaw, channels, rate) = parse_fmt(fmt_chunk.ok_or(AudioError::MissingChunk("fmt "))?)?;
    let data = data.ok_or(AudioError::MissingChunk("data"))?;
    if mulaw && channels == 1 {
        return Ok(Audio::MuLaw8k(data.to_vec()));
    }
    let sample_len = if mulaw { 1 } else { 2 };
    if data.len() % (channels * sample_len) != 0 {
        return Err(AudioError::Malformed(format!(
            "{} data bytes are not a whole number of {}-byte frames",
            data.len(),
            channels * sample_len
        )));
    }
    let sample = |s: &[u8]| {
        i64::from(if mulaw {
            g711::decode(s[0])
        } else {
            i16::from_le_bytes([s[0], s[1]])
        })
    };
    // Averaging the channels; truncating the mean costs under one LSB, below µ-law's step.
    let samples = data
        .chunks_exact(channels * sample_len)
        .map(|frame| {
            let sum: i64 = frame.chunks_exact(sample_len).map(sample).sum();
            // invariant: the mean of i16 values is an i16.
            (sum / channels as i64) as i16
        })
        .collect();
    Ok(Audio::Pcm16 { rate, samples })
}

/// Checks a `fmt ` chunk against what this module converts: (is µ-law, channels, rate).
fn parse_fmt(chunk: &[u8]) -> Result<(bool, usize, PcmRate), AudioError> {
    if chunk.len() < 16 {
        return Err(AudioError::Malformed(format!(
            "fmt chunk of {} bytes (need 16)",
            chunk.len()
        )));
    }
    let (mut tag, channels, hz) = (le16(chunk, 0), usize::from(le16(chunk, 2)), le32(chunk, 4));
    // For extensible formats this is the container width; `wValidBitsPerSample` may be smaller
    // (e.g. 12 bits in 16), but the samples still read correctly as 16-bit.
    let bits = le16(chunk, 14);
    if tag == TAG_EXTENSIBLE {
        if chunk.len() < 40 {
            return Err(AudioError::Malformed(format!(
                "extensible fmt chunk of {} bytes (need 40)",
                chunk.len()
            )));
        }
        let guid = &chunk[24..40];
        if guid[2..] != GUID_TAIL {
            return Err(AudioError::Unsupported(format!(
                "extensible sub-format {guid:02x?}"
            )));
        }
        tag = le16(guid, 0);
    }
    let (mulaw, name, want_bits, rates) = match tag {
        TAG_PCM => (false, "PCM", 16, "8000, 16000, 24000 or 48000"),
        TAG_MULAW => (true, "µ-law", 8, "8000"),
        other => {
            let name = match other {
                3 => " (IEEE float)",
                6 => " (A-law)",
                _ => "",
            };
            let expected = "expected 1 (PCM) or 7 (µ-law)";
            return Err(AudioError::Unsupported(format!(
                "format tag {other}{name}, {expected}"
            )));
        }
    };
    if bits != want_bits {
        let what = format!("{bits}-bit {name} (expected {want_bits}-bit)");
        return Err(AudioError::Unsupported(what));
    }
    if channels == 0 {
        return Err(AudioError::Malformed("0 channels".into()));
    }
    match PcmRate::from_hz(hz) {
        Some(rate) if !mulaw || rate == PcmRate::Hz8000 => Ok((mulaw, channels, rate)),
        _ => Err(AudioError::Unsupported(format!(
            "sample rate {hz} Hz for {name} (expected {rates})"
        ))),
    }
}

/// Converts audio to the caller's line format: 8 kHz µ-law, one byte per sample.
///
/// 8 kHz µ-law comes back byte-for-byte (an echo test compares the reply to these bytes);
/// PCM above 8 kHz goes through [`decimate`] first, so nothing above 4 kHz aliases.
pub fn to_mulaw_8k(audio: &Audio) -> Vec<u8> {
    let encode = |samples: &[i16]| {
        let mut out = Vec::with_capacity(samples.len());
        g711::encode_into(samples, &mut out);
        out
    };
    match audio {
        Audio::MuLaw8k(codes) => codes.clone(),
        Audio::Pcm16 {
            rate: PcmRate::Hz8000,
            samples,
        } => encode(samples),
        Audio::Pcm16 { rate, samples } => {
            encode(&decimate(samples, (rate.hz() / SAMPLE_RATE) as usize))
        }
    }
}

/// Low-pass filters `samples` (at `factor` × 8 kHz) and keeps every `factor`th output.
///
/// The filter is a linear-phase Kaiser-windowed sinc with its delay removed, so output `k`
/// lines up with input `k × factor`; beyond both ends the input counts as silence. Only the
/// kept outputs are computed.
fn decimate(samples: &[i16], factor: usize) -> Vec<i16> {
    if factor <= 1 {
        return samples.to_vec();
    }
    let taps = lowpass_taps(f64::from(SAMPLE_RATE) * factor as f64);
    let half = taps.len() / 2;
    (0..samples.len().div_ceil(factor))
        .map(|k| {
            let centre = k * factor;
            let first = centre.saturating_sub(half);
            let last = (centre + half).min(samples.len() - 1);
            let acc: f64 = samples[first..=last]
                .iter()
                .zip(&taps[first + half - centre..])
                .map(|(&x, &h)| f64::from(x) * h)
                .sum();
            acc.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
        })
        .collect()
}

/// An odd-length low-pass FIR for input at `rate` Hz, flat to [`PASSBAND_HZ`] and down
/// [`STOPBAND_DB`] from [`STOPBAND_HZ`], with unity gain at DC (Kaiser's design formulas).
fn lowpass_taps(rate: f64) -> Vec<f64> {
    let transition = 2.0 * PI * (STOPBAND_HZ - PASSBAND_HZ) / rate;
    let order = ((STOPBAND_DB - 8.0) / (2.285 * transition)).ceil() as usize;
    // An even order gives an odd tap count, so the delay is a whole number of samples.
    let order = order + order % 2;
    let centre = order as f64 / 2.0;
    let cutoff = (PASSBAND_HZ + STOPBAND_HZ) / 2.0 / rate;
    let beta = 0.1102 * (STOPBAND_DB - 8.7);
    let mut taps: Vec<f64> = (0..=order)
        .map(|n| {
            let t = n as f64 - centre;
            let sinc = if t == 0.0 {
                2.0 * cutoff
            } else {
                (2.0 * PI * cutoff * t).sin() / (PI * t)
            };
            let r = t / centre;
            sinc * bessel_i0(beta * (1.0 - r * r).sqrt()) / bessel_i0(beta)
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.iter_mut().for_each(|h| *h /= sum);
    taps
}

/// The modified Bessel function I₀, by its power series (converges fast for the β used here).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term) = (1.0, 1.0);
    for k in 1..200 {
        term *= x / 2.0 / k as f64;
        sum += term * term;
        if term * term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// An 8 kHz mono µ-law WAV holding `mulaw` unchanged; [`read_wav`] reads back the same bytes.
///
/// Has the 18-byte `fmt ` (cbSize 0) and the `fact` chunk that the spec requires for non-PCM
/// formats.
///
/// # Panics
/// If `mulaw` is over 4 GiB, which a RIFF file cannot describe.
pub fn write_wav_mulaw(mulaw: &[u8]) -> Vec<u8> {
    let mut fmt_chunk = fmt_payload(TAG_MULAW, 1, SAMPLE_RATE, 8);
    fmt_chunk.extend_from_slice(&0u16.to_le_bytes());
    let fact = chunk_len(mulaw.len()).to_le_bytes();
    riff(&[(b"fmt ", &fmt_chunk), (b"fact", &fact), (b"data", mulaw)])
}

/// A mono 16-bit PCM WAV at `rate` Hz (any rate, so tests can also write unsupported ones).
///
/// # Panics
/// If `samples` is over 4 GiB, which a RIFF file cannot describe.
pub fn write_wav_pcm16(samples: &[i16], rate: u32) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    riff(&[
        (b"fmt ", &fmt_payload(TAG_PCM, 1, rate, 16)),
        (b"data", &data),
    ])
}

/// `ms` milliseconds of a sine at `freq_hz` and peak `amplitude`, as 8 kHz µ-law.
pub fn tone_mulaw(freq_hz: f64, ms: u32, amplitude: i16) -> Vec<u8> {
    let count = ms as usize * g711::BYTES_PER_MS;
    let mut out = Vec::with_capacity(count);
    g711::encode_into(&sine(freq_hz, SAMPLE_RATE, count, amplitude, 0.0), &mut out);
    out
}

/// `count` samples of a sine; each sample's phase is computed directly, so long tones don't drift.
fn sine(freq_hz: f64, rate: u32, count: usize, amplitude: i16, phase: f64) -> Vec<i16> {
    let step = 2.0 * PI * freq_hz / f64::from(rate);
    (0..count)
        .map(|n| (f64::from(amplitude) * (step * n as f64 + phase).sin()).round() as i16)
        .collect()
}

/// The first 16 bytes of a `fmt ` chunk, which every format shares.
fn fmt_payload(tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
    let block_align = channels * bits / 8;
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.saturating_mul(u32::from(block_align)).to_le_bytes());
    out.extend_from_slice(&block_align.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out
}

/// A RIFF/WAVE file of `chunks`, each padded to an even length.
fn riff(chunks: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
    let body_len: usize = chunks.iter().map(|(_, c)| 8 + c.len() + c.len() % 2).sum();
    let mut out = Vec::with_capacity(12 + body_len);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&chunk_len(4 + body_len).to_le_bytes());
    out.extend_from_slice(b"WAVE");
    for (id, payload) in chunks {
        out.extend_from_slice(*id);
        out.extend_from_slice(&chunk_len(payload.len()).to_le_bytes());
        out.extend_from_slice(payload);
        if payload.len() % 2 == 1 {
            out.push(0);
        }
    }
    out
}

fn chunk_len(len: usize) -> u32 {
    u32::try_from(len).expect("RIFF chunks are limited to 4 GiB")
}

/// Little-endian u16 at `at`; callers have checked the length.
fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Little-endian u32 at `at`; callers have checked the length.
fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loud enough that µ-law's finest step (8) sits far below a −50 dB residual.
    const LOUD: i16 = 16000;

    /// RMS of the middle of `samples`, skipping the 100 samples at each end where the filter
    /// runs into the zero padding and the tone's abrupt start and stop splash across the band.
    fn rms(samples: &[i16]) -> f64 {
        let middle = &samples[100..samples.len() - 100];
        let power: f64 = middle.iter().map(|&s| f64::from(s).powi(2)).sum();
        (power / middle.len() as f64).sqrt()
    }

    /// How far `level` is below a full `LOUD` sine, in dB (silence counts as RMS 0.01).
    fn db_down(level: f64) -> f64 {
        20.0 * (f64::from(LOUD) / 2f64.sqrt() / level.max(0.01)).log10()
    }

    fn decode(codes: &[u8]) -> Vec<i16> {
        let mut out = Vec::new();
        g711::decode_into(codes, &mut out);
        out
    }

    fn zero_crossings(samples: &[i16]) -> usize {
        samples
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count()
    }

    /// One second of a `LOUD` tone; the phase offset keeps samples off exact zeros so that zero
    /// crossings count cleanly.
    fn second_of(freq_hz: f64, rate: u32) -> Vec<i16> {
        sine(freq_hz, rate, rate as usize, LOUD, 0.4)
    }

    /// `samples` written as a mono PCM WAV, read back and converted to the line format.
    fn through_wav(samples: &[i16], rate: u32) -> Vec<u8> {
        to_mulaw_8k(&read_wav(&write_wav_pcm16(samples, rate)).expect("valid test WAV"))
    }

    /// A 40-byte WAVE_FORMAT_EXTENSIBLE fmt chunk whose GUID is derived from `sub_tag`.
    fn extensible(sub_tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let mut out = fmt_payload(TAG_EXTENSIBLE, channels, rate, bits);
        out.extend_from_slice(&[22, 0]); // cbSize
        out.extend_from_slice(&bits.to_le_bytes()); // wValidBitsPerSample
        out.extend_from_slice(&3u32.to_le_bytes()); // dwChannelMask: front left and right
        out.extend_from_slice(&sub_tag.to_le_bytes());
        out.extend_from_slice(&GUID_TAIL);
        out
    }

    fn le_bytes(samples: &[i16]) -> Vec<u8> {
        samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    /// xorshift64: deterministic pseudo-random bytes without a dependency.
    fn noise(mut x: u64, len: usize) -> Vec<u8> {
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        (0..len).map(|_| next()).collect()
    }

    /// A µ-law WAV reads back as the very same bytes, including every code and an odd length.
    #[test]
    fn mulaw_round_trip_is_byte_identical() {
        let mut codes = tone_mulaw(1000.0, 100, LOUD);
        codes.extend((0..=255u8).cycle().take(513));
        let audio = read_wav(&write_wav_mulaw(&codes)).unwrap();
        assert_eq!(audio, Audio::MuLaw8k(codes.clone()));
        assert_eq!(to_mulaw_8k(&audio), codes);
    }

    /// The µ-law writer's RIFF size, 18-byte fmt (cbSize 0), fact and padded data are as the
    /// spec lays them out.
    #[test]
    fn mulaw_writer_follows_the_spec() {
        let file = write_wav_mulaw(&[1, 2, 3]);
        let mut expected = b"RIFF\x36\0\0\0WAVEfmt \x12\0\0\0\x07\0\x01\0".to_vec();
        expected.extend_from_slice(b"\x40\x1f\0\0\x40\x1f\0\0\x01\0\x08\0\0\0"); // 8000 Hz, 8000 B/s
        expected.extend_from_slice(b"fact\x04\0\0\0\x03\0\0\0data\x03\0\0\0\x01\x02\x03\0");
        assert_eq!(file, expected);
    }

    /// Chunks in any order, unknown odd-sized chunks, trailing junk and a missing final pad byte
    /// are all tolerated.
    #[test]
    fn chunk_order_padding_and_unknown_chunks() {
        let fmt_chunk = write_wav_mulaw(&[])[20..38].to_vec();
        let chunks: [(&[u8; 4], &[u8]); 4] = [
            (b"LIST", b"INFOabc"),
            (b"data", &[9, 8, 7]),
            (b"junk", &[0; 5]),
            (b"fmt ", &fmt_chunk),
        ];
        let mut file = riff(&chunks);
        assert_eq!(read_wav(&file).unwrap(), Audio::MuLaw8k(vec![9, 8, 7]));
        file.extend_from_slice(b"ID3 trailing junk");
        assert_eq!(read_wav(&file).unwrap(), Audio::MuLaw8k(vec![9, 8, 7]));
        let file = write_wav_mulaw(&[1, 2, 3]);
        assert_eq!(
            read_wav(&file[..file.len() - 1]).unwrap(),
            Audio::MuLaw8k(vec![1, 2, 3])
        );
    }

    /// 8 kHz PCM is encoded sample by sample with the bridge's own G.711 encoder.
    #[test]
    fn pcm_8k_is_encoded_with_g711() {
        let samples = [0, 1, -1, 1000, -32768, 32767, 12345];
        let expected: Vec<u8> = samples.iter().map(|&s| g711::encode(s)).collect();
        assert_eq!(through_wav(&samples, 8000), expected);
    }

    /// A 1 kHz tone at 16, 24 and 48 kHz keeps its level (±0.5 dB) and frequency at 8 kHz.
    #[test]
    fn in_band_tone_keeps_level_and_frequency() {
        for rate in [16000, 24000, 48000] {
            let out = decode(&through_wav(&second_of(1000.0, rate), rate));
            assert_eq!(out.len(), 8000, "{rate} Hz: one second at 8 kHz");
            let loss = db_down(rms(&out));
            assert!(loss.abs() < 0.5, "{rate} Hz: level changed by {loss:.2} dB");
            let crossings = zero_crossings(&out);
            assert!(
                (1980..=2020).contains(&crossings),
                "{rate} Hz: {crossings} crossings"
            );
        }
    }

    /// Tones above 4 kHz leave the µ-law line at least 50 dB below an in-band tone, where
    /// plain decimation would alias them to audible 1–2 kHz tones.
    #[test]
    fn out_of_band_tone_is_removed() {
        for (rate, freq) in [(16000, 6000.0), (24000, 7000.0), (48000, 6000.0)] {
            let down = db_down(rms(&decode(&through_wav(&second_of(freq, rate), rate))));
            assert!(
                down >= 50.0,
                "{freq} Hz at {rate} Hz: only {down:.1} dB down"
            );
        }
    }

    /// The measurement above catches aliasing: keeping every 6th sample without filtering turns
    /// 6 kHz at 48 kHz into a full-level 2 kHz tone.
    #[test]
    fn naive_decimation_fails_the_measurement() {
        let naive: Vec<i16> = second_of(6000.0, 48000).into_iter().step_by(6).collect();
        let down = db_down(rms(&naive));
        assert!(down < 3.0, "aliased tone measured {down:.1} dB down");
    }

    /// Before µ-law, the filter is flat (±0.05 dB) to 3.4 kHz and at least 60 dB down from
    /// 4 kHz to the input's Nyquist frequency, at every factor.
    #[test]
    fn decimation_filter_response() {
        for factor in [2, 3, 6] {
            let rate = 8000 * factor as u32;
            for freq in [300.0, 1000.0, 2500.0, 3400.0] {
                let loss = db_down(rms(&decimate(&second_of(freq, rate), factor)));
                assert!(loss.abs() < 0.05, "{freq} Hz at {rate} Hz: {loss:.3} dB");
            }
            let nyquist = f64::from(rate) / 2.0;
            for freq in [
                4000.0,
                4100.0,
                5000.0,
                6000.0,
                nyquist - 500.0,
                nyquist - 50.0,
            ] {
                let down = db_down(rms(&decimate(&second_of(freq, rate), factor)));
                assert!(
                    down >= 60.0,
                    "{freq} Hz at {rate} Hz: only {down:.1} dB down"
                );
            }
        }
    }

    /// Stereo PCM and stereo µ-law are mixed down to mono by averaging the channels.
    #[test]
    fn stereo_is_mixed_down() {
        let interleaved = le_bytes(&[1000, 3000, -2000, 0, 30000, 32000, -32768, -32768]);
        let file = riff(&[
            (b"fmt ", &fmt_payload(TAG_PCM, 2, 16000, 16)),
            (b"data", &interleaved),
        ]);
        let samples = vec![2000, -1000, 31000, -32768];
        assert_eq!(
            read_wav(&file).unwrap(),
            Audio::Pcm16 {
                rate: PcmRate::Hz16000,
                samples
            }
        );

        let codes = [1000, 3000, -500, -500].map(g711::encode);
        let mut fmt_chunk = fmt_payload(TAG_MULAW, 2, 8000, 8);
        fmt_chunk.extend_from_slice(&[0, 0]);
        let file = riff(&[(b"fmt ", &fmt_chunk), (b"data", &codes)]);
        let mean = |a, b| ((i32::from(g711::decode(a)) + i32::from(g711::decode(b))) / 2) as i16;
        let samples = vec![mean(codes[0], codes[1]), mean(codes[2], codes[3])];
        assert_eq!(
            read_wav(&file).unwrap(),
            Audio::Pcm16 {
                rate: PcmRate::Hz8000,
                samples
            }
        );
    }

    /// WAVE_FORMAT_EXTENSIBLE with a PCM or µ-law sub-format reads like the plain tags; other
    /// sub-formats are refused.
    #[test]
    fn extensible_format_is_parsed() {
        let data = le_bytes(&[5, -7, 8, 10]);
        let file = riff(&[
            (b"fmt ", &extensible(TAG_PCM, 2, 48000, 16)),
            (b"data", &data),
        ]);
        let samples = vec![-1, 9];
        assert_eq!(
            read_wav(&file).unwrap(),
            Audio::Pcm16 {
                rate: PcmRate::Hz48000,
                samples
            }
        );

        let file = riff(&[
            (b"fmt ", &extensible(TAG_MULAW, 1, 8000, 8)),
            (b"data", &[1, 2]),
        ]);
        assert_eq!(read_wav(&file).unwrap(), Audio::MuLaw8k(vec![1, 2]));

        let float = riff(&[(b"fmt ", &extensible(3, 1, 48000, 32)), (b"data", &[0; 4])]);
        let error = read_wav(&float).unwrap_err().to_string();
        assert!(error.contains("format tag 3 (IEEE float)"), "{error}");
        let mut fmt_chunk = extensible(TAG_PCM, 1, 48000, 16);
        fmt_chunk[30] ^= 0xFF; // no longer a GUID derived from a format tag
        let odd = riff(&[(b"fmt ", &fmt_chunk), (b"data", &[0; 4])]);
        assert!(read_wav(&odd)
            .unwrap_err()
            .to_string()
            .contains("extensible sub-format"));
    }

    /// Each unsupported or broken input is refused with a message that names the problem.
    #[test]
    fn unsupported_inputs_are_named() {
        let with_fmt = |fmt_chunk: &[u8]| riff(&[(b"fmt ", fmt_chunk), (b"data", &[0; 12])]);
        let pcm = |channels, rate, bits| fmt_payload(TAG_PCM, channels, rate, bits);
        let mulaw_16k = [fmt_payload(TAG_MULAW, 1, 16000, 8), vec![0, 0]].concat();
        let mut cut = write_wav_pcm16(&[1, 2, 3, 4], 8000);
        cut.truncate(cut.len() - 2);
        let cases = [
            (
                write_wav_pcm16(&[0; 4], 44100),
                "unsupported WAV file: sample rate 44100 Hz for PCM (expected 8000, 16000, \
                 24000 or 48000)",
            ),
            (with_fmt(&pcm(1, 8000, 8)), "8-bit PCM (expected 16-bit)"),
            (with_fmt(&pcm(1, 48000, 24)), "24-bit PCM (expected 16-bit)"),
            (
                with_fmt(&mulaw_16k),
                "sample rate 16000 Hz for µ-law (expected 8000)",
            ),
            (
                with_fmt(&fmt_payload(6, 1, 8000, 8)),
                "format tag 6 (A-law)",
            ),
            (
                with_fmt(&pcm(0, 8000, 16)),
                "malformed WAV file: 0 channels",
            ),
            (
                with_fmt(&pcm(1, 8000, 16)[..14]),
                "fmt chunk of 14 bytes (need 16)",
            ),
            (riff(&[(b"fmt ", &pcm(1, 8000, 16))]), "no \"data\" chunk"),
            (riff(&[(b"data", &[0; 2])]), "no \"fmt \" chunk"),
            (cut, "chunk \"data\" declares 8 bytes, 6 remain"),
            (
                riff(&[(b"fmt ", &pcm(2, 8000, 16)), (b"data", &[0; 6])]),
                "6 data bytes are not a whole number of 4-byte frames",
            ),
            (b"RIFX\0\0\0\0WAVE".to_vec(), "not a WAV file"),
            (Vec::new(), "not a WAV file"),
        ];
        for (file, message) in cases {
            let error = read_wav(&file).expect_err(message).to_string();
            assert!(error.contains(message), "{error:?} lacks {message:?}");
        }
    }

    /// Every strict prefix of valid files is an error, never a panic or a partial success.
    #[test]
    fn every_truncation_is_an_error() {
        let data = le_bytes(&[1, 2, 3, 4, 5, 6]);
        let stereo = riff(&[
            (b"LIST", b"odd"),
            (b"fmt ", &extensible(TAG_PCM, 2, 24000, 16)),
            (b"data", &data),
        ]);
        let mulaw = write_wav_mulaw(&tone_mulaw(440.0, 5, LOUD));
        for file in [mulaw, write_wav_pcm16(&[1, -1, 2], 16000), stereo] {
            read_wav(&file).expect("the whole file reads");
            for len in 0..file.len() {
                assert!(
                    read_wav(&file[..len]).is_err(),
                    "{len} of {} bytes",
                    file.len()
                );
            }
        }
    }

    /// Random bytes, with or without a RIFF header, and random corruptions of a valid file
    /// never panic.
    #[test]
    fn garbage_never_panics() {
        let data = le_bytes(&[1, 2, 3, 4]);
        let valid = riff(&[
            (b"fmt ", &extensible(TAG_PCM, 2, 48000, 16)),
            (b"data", &data),
        ]);
        for seed in 1..2000u64 {
            let junk = noise(seed, (seed % 97) as usize);
            let _ = read_wav(&junk);
            let _ = read_wav(&[b"RIFF\xff\xff\xff\xffWAVE".as_slice(), &junk].concat());
            let mut corrupt = valid.clone();
            for (i, byte) in noise(seed, 3).into_iter().enumerate() {
                let at = (seed as usize * 31 + i * 17) % corrupt.len();
                corrupt[at] = byte;
            }
            let _ = read_wav(&corrupt);
        }
    }

    /// A generated tone has 8 samples per millisecond, its peak level and its frequency.
    #[test]
    fn tone_has_length_level_and_frequency() {
        let tone = tone_mulaw(500.0, 1000, LOUD);
        assert_eq!(tone.len(), 8000);
        let decoded = decode(&tone);
        let loss = db_down(rms(&decoded));
        assert!(loss.abs() < 0.1, "level changed by {loss:.2} dB");
        assert!((998..=1001).contains(&zero_crossings(&decoded)));
        assert_eq!(Audio::MuLaw8k(tone).duration_ms(), 1000);
        let samples = vec![0; 4800];
        assert_eq!(
            Audio::Pcm16 {
                rate: PcmRate::Hz48000,
                samples
            }
            .duration_ms(),
            100
        );
    }
}
