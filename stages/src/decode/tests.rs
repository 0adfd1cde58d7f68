use bytes::Bytes;
use pipeline::audio::PayloadData;

use super::*;

fn format(encoding: Encoding, rate: u32, channels: u16) -> AudioFormat {
    AudioFormat {
        encoding,
        sample_rate_hz: rate,
        channels,
    }
}

fn binary(bytes: Vec<u8>) -> Payload {
    Payload {
        data: PayloadData::Binary(Bytes::from(bytes)),
        audio_us: 0,
    }
}

fn decode_all(decode: &mut Decode, payloads: Vec<Payload>) -> Vec<AudioFrame> {
    let mut out = Vec::new();
    for p in payloads {
        decode.process(p, &mut out).unwrap();
    }
    out
}

#[test]
fn linear16_binary_and_base64_give_the_same_samples_with_positions() {
    let samples: Vec<i16> = (0..640).map(|i| (i * 37 % 2000 - 1000) as i16).collect();
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut decode = Decode::new(format(Encoding::Linear16, 16_000, 1)).unwrap();
    let text = base64::engine::general_purpose::STANDARD.encode(&bytes[640..]);
    let frames = decode_all(
        &mut decode,
        vec![
            binary(bytes[..640].to_vec()),
            Payload {
                data: PayloadData::Base64(Bytes::from(text)),
                audio_us: 0,
            },
        ],
    );
    assert_eq!(frames[0].samples, samples[..320]);
    assert_eq!(frames[1].samples, samples[320..]);
    assert_eq!((frames[0].start_sample, frames[1].start_sample), (0, 320));
}

#[test]
fn stereo_is_downmixed() {
    let bytes: Vec<u8> = [100i16, 300, -50, -150]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let mut decode = Decode::new(format(Encoding::Linear16, 16_000, 2)).unwrap();
    let frames = decode_all(&mut decode, vec![binary(bytes)]);
    assert_eq!(frames[0].samples, [200, -100]);
}

#[test]
fn g711_tables_match_known_points() {
    // Silence codes and full scale, per G.711.
    assert_eq!(g711::MULAW[0xff], 0);
    assert_eq!(g711::MULAW[0x7f], 0);
    assert_eq!(g711::MULAW[0x00], -32_124);
    assert_eq!(g711::MULAW[0x80], 32_124);
    assert_eq!(g711::ALAW[0xd5], 8);
    assert_eq!(g711::ALAW[0x55], -8);
    assert_eq!(g711::ALAW[0xaa], 32_256);
    // Monotonic within a sign half.
    for i in 0x80..0xff {
        assert!(g711::MULAW[i] >= g711::MULAW[i + 1]);
    }
}

#[test]
fn float32_is_scaled_and_clamped() {
    let bytes: Vec<u8> = [0.5f32, -1.0, 2.0, f32::NAN]
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let mut decode = Decode::new(format(Encoding::Float32, 16_000, 1)).unwrap();
    let frames = decode_all(&mut decode, vec![binary(bytes)]);
    assert_eq!(frames[0].samples, [16_383, -32_767, 32_767, 0]);
}

#[test]
fn opus_round_trips_speech() {
    let speech = crate::test_audio::speech_16k();
    let mut encoder =
        opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut decode = Decode::new(format(Encoding::Opus, 16_000, 1)).unwrap();
    let packets: Vec<Payload> = speech
        .chunks_exact(320)
        .map(|frame| binary(encoder.encode_vec(frame, 4_000).unwrap()))
        .collect();
    let n = packets.len();
    let frames = decode_all(&mut decode, packets);
    assert_eq!(frames.len(), n);
    assert!(frames.iter().all(|f| f.samples.len() == 320));
    let energy: f64 = frames
        .iter()
        .flat_map(|f| &f.samples)
        .map(|&s| f64::from(s).powi(2))
        .sum();
    assert!(
        energy > 1e9,
        "decoded Opus should carry the speech's energy, got {energy}"
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut decode = Decode::new(format(Encoding::Linear16, 16_000, 1)).unwrap();
    let mut out = Vec::new();
    let odd = decode.process(binary(vec![1, 2, 3]), &mut out).unwrap_err();
    assert_eq!(odd.to_session_error().close_code, 1007);
    let base64 = Payload {
        data: PayloadData::Base64(Bytes::from_static(b"@@@")),
        audio_us: 0,
    };
    assert_eq!(
        decode
            .process(base64, &mut out)
            .unwrap_err()
            .to_session_error()
            .code,
        "invalid_base64"
    );
    let mut opus = Decode::new(format(Encoding::Opus, 48_000, 1)).unwrap();
    assert!(opus.process(binary(vec![0xff; 3]), &mut out).is_err());
    assert!(Decode::new(format(Encoding::Opus, 44_100, 1)).is_err());
    assert!(Decode::new(format(Encoding::Linear16, 16_000, 3)).is_err());
    assert!(out.is_empty());
}
