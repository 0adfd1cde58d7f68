use super::shortcut::{Plan, Shortcut, WINDOW};
use super::*;
use crate::test_audio::{noise, speech_16k};

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

/// Frame decisions and model runs for `samples` in 20 ms frames.
fn decide(settings: VadSettings, samples: &[i16]) -> (Vec<bool>, u64) {
    let mut vad = Vad::new(settings, false);
    let mut out = Vec::new();
    for frame in frames(samples) {
        vad.process(frame, &mut out).unwrap();
    }
    (out.iter().map(|f| f.speech).collect(), vad.model_runs())
}

fn every_window() -> VadSettings {
    VadConfig {
        max_unscored_ms: 0,
        ..VadConfig::default()
    }
    .validate(16_000)
    .unwrap()
}

/// Share of frames on which the shortcuts and the model on every window agree; panics unless
/// every onset the full model finds is found at most one frame (one 16 ms window) later.
fn agreement(samples: &[i16]) -> (f64, u64, u64) {
    let (exact, all_runs) = decide(every_window(), samples);
    let (fast, runs) = decide(settings(), samples);
    assert_eq!(exact.len(), fast.len());
    for onset in (0..exact.len()).filter(|&i| exact[i] && (i == 0 || !exact[i - 1])) {
        assert!(
            fast[onset] || fast.get(onset + 1) == Some(&true),
            "onset at frame {onset} found late: {:?}",
            &fast[onset..(onset + 8).min(fast.len())]
        );
    }
    let same = exact.iter().zip(&fast).filter(|(a, b)| a == b).count();
    (same as f64 / exact.len() as f64, runs, all_runs)
}

#[test]
fn shortcuts_keep_the_decisions_of_scoring_every_window() {
    let (agree, runs, all_runs) = agreement(&speech_16k());
    // Measured: 356 of 357 frames agree; the model ran on 44 of 446 windows (10 %).
    assert!(agree >= 0.98, "{:.1} % of frames agree", agree * 100.0);
    assert!(
        runs * 5 < all_runs,
        "the model ran {runs} times out of {all_runs}"
    );
}

#[test]
fn shortcuts_keep_the_decisions_through_pauses_and_noise() {
    // The fixture with pauses from 0.2 to 2 s cut in at its word gaps, under white noise at
    // -56 dBFS: speech ends and starts again into a background louder than the gaps were.
    let speech = speech_16k();
    let mut paused = Vec::new();
    let mut from = 0;
    for (gap_window, pause_ms) in [(74, 200), (105, 500), (164, 1000), (247, 2000), (296, 350)] {
        let at = gap_window * 256 + 128;
        paused.extend_from_slice(&speech[from..at]);
        paused.resize(paused.len() + pause_ms * 16, 0);
        from = at;
    }
    paused.extend_from_slice(&speech[from..]);
    let noisy: Vec<i16> = paused
        .iter()
        .zip(noise(paused.len(), 50.0))
        .map(|(&s, n)| s.saturating_add(n))
        .collect();
    let (agree, runs, all_runs) = agreement(&noisy);
    // Measured: 542 of 560 frames agree (96.8 %), all differences at the edges of speech, a few
    // frames each; the model ran on 164 of 699 windows (23 %).
    assert!(agree >= 0.965, "{:.1} % of frames agree", agree * 100.0);
    assert!(
        runs * 3 < all_runs,
        "the model ran {runs} times out of {all_runs}"
    );
}

#[test]
fn silence_stays_non_speech_and_costs_almost_nothing() {
    for (name, silence) in [
        ("digital silence", vec![0; 10 * 16_000]),
        ("noise at -60 dBFS", noise(10 * 16_000, 33.0)),
    ] {
        let (exact, all_runs) = decide(every_window(), &silence);
        let (fast, runs) = decide(settings(), &silence);
        assert!(exact.iter().all(|&s| !s), "{name}: model calls it speech");
        assert!(fast.iter().all(|&s| !s), "{name}: marked as speech");
        // Measured: 27 (digital silence) and 37 (noise) of 625 windows: a few to settle, then one
        // check every half second.
        assert!(
            runs * 10 < all_runs,
            "{name}: the model ran {runs} times out of {all_runs}"
        );
    }
}

#[test]
fn every_window_is_scored_when_max_unscored_is_zero() {
    let speech = speech_16k();
    let (_, runs) = decide(every_window(), &speech);
    assert_eq!(runs, (speech.len() / WINDOW) as u64);
}

#[test]
fn confident_speech_goes_unscored_until_the_budget_ends_or_the_audio_falls_quiet() {
    let loud = 1_000_000;
    let mut shortcut = Shortcut::new(4, 0.5);
    assert_eq!(shortcut.plan(loud), Plan::Score);
    // 0.6 is speech but not confident: keep scoring.
    shortcut.scored(loud, 0.6);
    assert_eq!(shortcut.plan(loud), Plan::Score);
    shortcut.scored(loud, 0.9);
    for _ in 0..4 {
        assert_eq!(shortcut.plan(loud), Plan::Speech);
    }
    assert_eq!(shortcut.plan(loud), Plan::Check, "budget spent");
    shortcut.scored(loud, 0.9);
    // Two quiet windows are a word gap; the third may be the end of speech.
    assert_eq!(shortcut.plan(0), Plan::Speech);
    assert_eq!(shortcut.plan(0), Plan::Speech);
    assert_eq!(shortcut.plan(0), Plan::Score);
}

#[test]
fn settled_background_goes_unscored_until_the_audio_changes() {
    let hum = 256 * 100 * 100; // -50 dBFS
    let mut shortcut = Shortcut::new(8, 0.5);
    // Three similar non-speech scores on similar audio: settled.
    for score in [0.2, 0.202, 0.201] {
        assert_eq!(shortcut.plan(hum), Plan::Score);
        shortcut.scored(hum, score);
    }
    assert_eq!(shortcut.plan(hum), Plan::Silence);
    assert_eq!(shortcut.plan(hum * 3 / 2), Plan::Silence, "within 3 dB");
    assert_eq!(shortcut.plan(hum * 3), Plan::Score, "louder: an onset?");
    shortcut.scored(hum * 3, 0.3);
    assert_eq!(shortcut.plan(hum), Plan::Score, "not settled again yet");
    for score in [0.2, 0.201, 0.2] {
        shortcut.scored(hum, score);
    }
    assert_eq!(
        shortcut.plan(hum / 3),
        Plan::Score,
        "much quieter is a change too"
    );
    // Settled again after three windows at the new level.
    for _ in 0..3 {
        shortcut.scored(hum / 3, 0.2);
    }
    for _ in 0..8 {
        assert_eq!(shortcut.plan(hum / 3), Plan::Silence);
    }
    assert_eq!(
        shortcut.plan(hum / 3),
        Plan::Check,
        "budget spent: a check, without replay"
    );
}

#[test]
fn max_unscored_is_bounded() {
    let config = VadConfig {
        max_unscored_ms: 10_001,
        ..VadConfig::default()
    };
    assert_eq!(
        config.validate(16_000),
        Err(VadError::TooLong("max_unscored_ms"))
    );
    assert_eq!(settings().max_unscored_windows, 31);
}

#[test]
fn energy_is_the_sum_of_squares_without_overflow() {
    assert_eq!(shortcut::energy(&[3, -4]), 25);
    assert_eq!(
        shortcut::energy(&[i16::MIN; WINDOW]),
        WINDOW as u64 * (1 << 30)
    );
}
