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

/// Property tests: any bytes, in any declared format, as binary or base64 — never a panic, and
/// never more samples than the input can carry.
mod properties {
    use proptest::prelude::*;

    use super::*;

    const ENCODINGS: [Encoding; 5] = [
        Encoding::Linear16,
        Encoding::Opus,
        Encoding::Mulaw,
        Encoding::Alaw,
        Encoding::Float32,
    ];

    fn valid_format() -> impl Strategy<Value = AudioFormat> {
        (
            0..ENCODINGS.len(),
            prop::sample::select(vec![8_000u32, 12_000, 16_000, 24_000, 48_000]),
            1u16..=2,
        )
            .prop_map(|(e, rate, channels)| format(ENCODINGS[e], rate, channels))
    }

    /// Most samples `bytes` decoded bytes can yield, mono, in `format`.
    fn bound(format: AudioFormat, bytes: usize) -> usize {
        match format.encoding.bytes_per_sample() {
            Some(size) => bytes / size / usize::from(format.channels),
            None => OPUS_MAX_SAMPLES,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_format_is_checked_not_trusted(e in 0..ENCODINGS.len(), rate: u32, channels: u16) {
            let format = format(ENCODINGS[e], rate, channels);
            let ok = ENCODINGS[e].supports_rate(rate) && (1..=2).contains(&channels);
            prop_assert_eq!(Decode::new(format).is_ok(), ok);
        }

        #[test]
        fn binary_garbage_never_panics_and_output_is_bounded(
            format in valid_format(),
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2_000), 1..8),
        ) {
            let mut decode = Decode::new(format).unwrap();
            let mut position = 0u64;
            for bytes in frames {
                let len = bytes.len();
                let mut out = Vec::new();
                if decode.process(binary(bytes), &mut out).is_ok() {
                    let samples: usize = out.iter().map(|f| f.samples.len()).sum();
                    prop_assert!(samples <= bound(format, len));
                    for frame in &out {
                        prop_assert_eq!(frame.start_sample, position);
                        position = frame.end_sample();
                    }
                }
            }
        }

        #[test]
        fn base64_garbage_never_panics_and_output_is_bounded(
            format in valid_format(),
            text in "[A-Za-z0-9+/=@ -]{0,3000}",
        ) {
            let mut decode = Decode::new(format).unwrap();
            let len = text.len();
            let payload = Payload {
                data: PayloadData::Base64(Bytes::from(text)),
                audio_us: 0,
            };
            let mut out = Vec::new();
            if decode.process(payload, &mut out).is_ok() {
                let samples: usize = out.iter().map(|f| f.samples.len()).sum();
                prop_assert!(samples <= bound(format, len * 3 / 4 + 3));
            }
        }

        #[test]
        fn the_fast_base64_path_accepts_and_refuses_what_the_scalar_decoder_does(
            text in "[A-Za-z0-9+/]{0,64}(=|==)?|[A-Za-z0-9+/=@ -]{0,64}",
        ) {
            let mut fast = Vec::new();
            let fast = super::super::decode_base64(text.as_bytes(), &mut fast).map(|()| fast);
            let scalar = super::super::BASE64.decode(text.as_bytes());
            prop_assert_eq!(fast.ok(), scalar.ok());
        }

        #[test]
        fn base64_of_any_bytes_decodes_like_the_bytes(
            format in valid_format(),
            bytes in prop::collection::vec(any::<u8>(), 0..2_000),
        ) {
            // Opus decoders keep state between packets: compare fresh decoders.
            let text = BASE64.encode(&bytes);
            let mut a = Decode::new(format).unwrap();
            let mut b = Decode::new(format).unwrap();
            let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
            let ra = a.process(binary(bytes), &mut out_a).is_ok();
            let rb = b
                .process(
                    Payload {
                        data: PayloadData::Base64(Bytes::from(text)),
                        audio_us: 0,
                    },
                    &mut out_b,
                )
                .is_ok();
            prop_assert_eq!(ra, rb);
            prop_assert_eq!(out_a, out_b);
        }
    }
}
