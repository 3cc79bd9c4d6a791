//! Reading the hold audio: a WAV file of 8 kHz mono G.711 μ-law, the format Twilio plays, so
//! its bytes go to the caller as they are (no transcoding at run time).

/// The μ-law samples of `file`, or what is wrong with it.
pub fn read_mulaw_8k(file: &[u8]) -> Result<Vec<u8>, String> {
    if file.len() < 12 || &file[0..4] != b"RIFF" || &file[8..12] != b"WAVE" {
        return Err("not a WAV file (no RIFF/WAVE header)".into());
    }
    let mut format: Option<(u16, u16, u32, u16)> = None;
    let mut at = 12;
    while at + 8 <= file.len() {
        let id = &file[at..at + 4];
        let size = u32::from_le_bytes([file[at + 4], file[at + 5], file[at + 6], file[at + 7]]);
        let body_start = at + 8;
        let body_end = body_start
            .checked_add(size as usize)
            .filter(|&end| end <= file.len());
        match id {
            b"fmt " => {
                let end = body_end.ok_or("the fmt chunk runs past the end of the file")?;
                let body = &file[body_start..end];
                if body.len() < 16 {
                    return Err("the fmt chunk is too short".into());
                }
                let u16_at = |i: usize| u16::from_le_bytes([body[i], body[i + 1]]);
                let mut tag = u16_at(0);
                if tag == 0xFFFE && body.len() >= 26 {
                    // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two
                    // bytes.
                    tag = u16_at(24);
                }
                let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                format = Some((tag, u16_at(2), rate, u16_at(14)));
            }
            b"data" => {
                let (tag, channels, rate, bits) =
                    format.ok_or("the data chunk comes before the fmt chunk")?;
                if tag != 7 || channels != 1 || rate != 8_000 || bits != 8 {
                    return Err(format!(
                        "must be 8 kHz mono G.711 μ-law (format 7, 8 bits); this one is format \
                         {tag}, {channels} channel(s), {rate} Hz, {bits} bits (convert it with \
                         `ffmpeg -i in.wav -ar 8000 -ac 1 -acodec pcm_mulaw hold.wav`)"
                    ));
                }
                // A truncated data chunk (a common writer bug) is read to the end of the file.
                let end = body_end.unwrap_or(file.len());
                let samples = file[body_start..end].to_vec();
                if samples.is_empty() {
                    return Err("the data chunk is empty".into());
                }
                return Ok(samples);
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body_start + size as usize + (size as usize & 1);
    }
    Err("no data chunk".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(4 + 8 + 18 + 8 + data.len() as u32).to_le_bytes());
        out.extend_from_slice(b"WAVE");
        out.extend_from_slice(b"fmt ");
        out.extend_from_slice(&18u32.to_le_bytes());
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&rate.to_le_bytes());
        out.extend_from_slice(&(rate * u32::from(channels)).to_le_bytes());
        out.extend_from_slice(&channels.to_le_bytes());
        out.extend_from_slice(&bits.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_mulaw_8k_mono() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(read_mulaw_8k(&wav(7, 1, 8_000, 8, &data)).unwrap(), data);
    }

    #[test]
    fn refuses_everything_else() {
        for (file, why) in [
            (wav(1, 1, 8_000, 16, &[0; 4]), "format 1"),
            (wav(7, 2, 8_000, 8, &[0; 4]), "2 channel"),
            (wav(7, 1, 16_000, 8, &[0; 4]), "16000 Hz"),
            (wav(7, 1, 8_000, 8, &[]), "empty"),
            (b"ID3\x03 not a wav at all".to_vec(), "RIFF"),
            (b"RIFF\0\0\0\0WAVE".to_vec(), "no data"),
        ] {
            let err = read_mulaw_8k(&file).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        // A fmt chunk claiming more bytes than the file has.
        let mut file = wav(7, 1, 8_000, 8, &[1, 2]);
        file[16] = 0xff;
        assert!(read_mulaw_8k(&file).is_err());
    }
}
