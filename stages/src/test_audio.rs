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
