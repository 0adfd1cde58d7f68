use super::*;

fn frame(start: u64, len: usize, speech: bool) -> AudioFrame {
    AudioFrame {
        samples: (0..len).map(|i| (start as usize + i) as i16).collect(),
        sample_rate_hz: 16_000,
        start_sample: start,
        speech,
    }
}

#[test]
fn limits_come_from_both_duration_and_bytes() {
    let config = BatchConfig {
        max_duration_ms: 100,
        max_bytes: 25_600,
    };
    assert_eq!(config.validate(16_000).unwrap().max_samples, 1_600);
    let config = BatchConfig {
        max_duration_ms: 1_000,
        max_bytes: 25_600,
    };
    assert_eq!(config.validate(16_000).unwrap().max_samples, 12_800);
    assert!(
        BatchConfig {
            max_duration_ms: 100,
            max_bytes: 30_000
        }
        .validate(16_000)
        .is_err()
    );
}

#[test]
fn frames_accumulate_until_the_limit_and_keep_every_sample() {
    let mut builder = Builder::new(1_600);
    let mut out = Vec::new();
    for n in 0..12 {
        builder.push(frame(n * 320, 320, n % 2 == 0), &mut out);
    }
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].samples.len(), 1_600);
    assert_eq!(out[1].start_sample, 1_600);
    let rest = builder.take();
    assert_eq!(rest.start_sample, 3_200);
    assert_eq!(rest.samples.len(), 640);
    let all: Vec<i16> = out
        .iter()
        .chain([&rest])
        .flat_map(|b| b.samples.clone())
        .collect();
    assert_eq!(all, (0..3_840).map(|i| i as i16).collect::<Vec<_>>());
}

#[test]
fn an_oversized_frame_is_split() {
    let mut builder = Builder::new(1_600);
    let mut out = Vec::new();
    builder.push(frame(0, 4_000, true), &mut out);
    assert_eq!(
        out.iter().map(|b| b.samples.len()).collect::<Vec<_>>(),
        [1_600, 1_600]
    );
    assert_eq!(builder.take().samples.len(), 800);
}

#[test]
fn a_gap_starts_a_new_batch() {
    let mut builder = Builder::new(1_600);
    let mut out = Vec::new();
    builder.push(frame(0, 320, true), &mut out);
    assert!(out.is_empty());
    builder.push(frame(3_200, 320, true), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].end_sample(), 320);
    assert_eq!(builder.take().start_sample, 3_200);
}
