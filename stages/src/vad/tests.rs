use super::*;
use crate::test_audio::speech_16k;

fn settings() -> VadSettings {
    VadConfig::default().validate(16_000).unwrap()
}

fn frames(samples: &[i16]) -> Vec<AudioFrame> {
    samples
        .chunks(320)
        .enumerate()
        .map(|(i, s)| AudioFrame {
            samples: s.to_vec(),
            sample_rate_hz: 16_000,
            start_sample: i as u64 * 320,
            speech: true,
        })
        .collect()
}

#[test]
fn speech_is_marked_and_silence_is_not() {
    let speech = speech_16k();
    let mut vad = Vad::new(settings(), false);
    let mut out = Vec::new();
    for frame in frames(&speech) {
        vad.process(frame, &mut out).unwrap();
    }
    // The fixture has 0.5 s of silence, then speech, then 1 s of silence.
    let lead = &out[..20];
    let tail = &out[out.len() - 30..];
    let body = &out[40..out.len() - 80];
    assert!(
        lead.iter().all(|f| !f.speech),
        "leading silence marked as speech"
    );
    assert!(
        tail.iter().all(|f| !f.speech),
        "trailing silence marked as speech"
    );
    let voiced = body.iter().filter(|f| f.speech).count();
    assert!(
        voiced * 10 >= body.len() * 8,
        "{voiced} of {} speech frames voiced",
        body.len()
    );
    // Without the gate nothing is withheld.
    assert_eq!(
        out.iter().map(|f| f.samples.len()).sum::<usize>(),
        speech.len()
    );
}

#[test]
fn the_gate_keeps_pre_roll_and_drops_the_rest_of_the_silence() {
    let speech = speech_16k();
    let mut vad = Vad::new(settings(), true);
    let mut out = Vec::new();
    for frame in frames(&speech) {
        vad.process(frame, &mut out).unwrap();
    }
    vad.flush(&mut out);
    let first = &out[0];
    // Speech starts near 0.5 s; with 300 ms of pre-roll the first frame sent is near 0.2 s.
    assert!(
        (2_400..=5_200).contains(&first.start_sample),
        "first frame at {}",
        first.start_sample
    );
    let sent: usize = out.iter().map(|f| f.samples.len()).sum();
    assert!(
        sent < speech.len() - 16_000,
        "gate should hold back most of the silence"
    );
    // What is sent is the original audio, untouched.
    for frame in &out {
        let start = frame.start_sample as usize;
        assert_eq!(frame.samples, speech[start..start + frame.samples.len()]);
    }
}

#[test]
fn disabled_vad_marks_everything_as_speech() {
    let config = VadConfig {
        enabled: false,
        ..VadConfig::default()
    };
    let mut vad = Vad::new(config.validate(8_000).unwrap(), true);
    let mut out = Vec::new();
    vad.process(frames(&[0; 640])[0].clone(), &mut out).unwrap();
    assert!(out[0].speech);
}
