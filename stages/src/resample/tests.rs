use super::*;
use crate::test_audio::sine;

fn run(resample: &mut Resample, input: &[i16], chunk: usize) -> Vec<AudioFrame> {
    let mut out = Vec::new();
    for (i, piece) in input.chunks(chunk).enumerate() {
        let frame = AudioFrame {
            samples: piece.to_vec(),
            sample_rate_hz: 0,
            start_sample: (i * chunk) as u64,
            speech: true,
        };
        resample.process(frame, &mut out).unwrap();
    }
    resample.flush(&mut out);
    out
}

#[test]
fn same_rate_passes_through_byte_exact() {
    let input = sine(440.0, 16_000, 16_000, 10_000.0);
    let mut resample = Resample::new(16_000, 16_000).unwrap();
    assert!(resample.is_passthrough());
    let out = run(&mut resample, &input, 320);
    let samples: Vec<i16> = out.iter().flat_map(|f| f.samples.clone()).collect();
    assert_eq!(samples, input);
}

#[test]
fn every_supported_rate_yields_the_exact_length_and_keeps_the_tone() {
    for rate in [8_000, 11_025, 22_050, 24_000, 32_000, 44_100, 48_000] {
        let input = sine(1_000.0, rate, rate as usize, 16_000.0);
        let mut resample = Resample::new(rate, 16_000).unwrap();
        let out = run(&mut resample, &input, (rate / 50) as usize);
        let samples: Vec<i16> = out.iter().flat_map(|f| f.samples.clone()).collect();
        assert_eq!(samples.len(), 16_000, "{rate} Hz");
        // Positions are contiguous on the 16 kHz clock.
        let mut next = 0;
        for frame in &out {
            assert_eq!(frame.start_sample, next, "{rate} Hz");
            next = frame.end_sample();
        }
        // Count rising zero crossings in the settled middle: a 1 kHz tone has ~1000 per second.
        let middle = &samples[1_600..14_400];
        let crossings = middle.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
        assert!(
            (795..=805).contains(&crossings),
            "{rate} Hz: {crossings} crossings in 0.8 s"
        );
    }
}

#[test]
fn output_comes_out_while_streaming_not_only_at_flush() {
    let input = sine(300.0, 48_000, 48_000, 8_000.0);
    let mut resample = Resample::new(48_000, 16_000).unwrap();
    let mut out = Vec::new();
    for piece in input.chunks(960) {
        let frame = AudioFrame {
            samples: piece.to_vec(),
            sample_rate_hz: 48_000,
            start_sample: 0,
            speech: true,
        };
        resample.process(frame, &mut out).unwrap();
    }
    let streamed: usize = out.iter().map(|f| f.samples.len()).sum();
    assert!(streamed >= 15_500, "only {streamed} samples before flush");
}
