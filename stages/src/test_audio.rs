//! Audio for the stages' synchronous tests.

/// The committed espeak-ng fixture: speech with half a second of silence before and a second after.
pub fn speech_16k() -> Vec<i16> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/speech-16k.wav"
    );
    let mut reader = hound::WavReader::open(path).expect("fixture present");
    reader
        .samples::<i16>()
        .map(|s| s.expect("valid fixture"))
        .collect()
}

pub fn sine(freq_hz: f64, rate_hz: u32, samples: usize, amplitude: f64) -> Vec<i16> {
    (0..samples)
        .map(|i| {
            (amplitude
                * (2.0 * std::f64::consts::PI * freq_hz * i as f64 / f64::from(rate_hz)).sin())
                as i16
        })
        .collect()
}

/// Deterministic white noise with this RMS (uniformly distributed), to add to a signal.
pub fn noise(samples: usize, rms: f64) -> Vec<i16> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..samples)
        .map(|_| {
            // A 64-bit LCG (Knuth's MMIX constants): reproducible without a dependency.
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let uniform = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            // Uniform on [-0.5, 0.5) has an RMS of 1/√12.
            (uniform * rms * 12f64.sqrt()).round() as i16
        })
        .collect()
}
