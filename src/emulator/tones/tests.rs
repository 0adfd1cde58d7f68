use pipeline::{AudioFrame, Processor};
use stages::resample::Resample;

use super::*;

/// Deterministic pseudo-random numbers (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % n.max(1)
    }
}

fn block_len(rate_hz: u32) -> u64 {
    u64::from(rate_hz / 50)
}

/// Run `audio` through a fresh recognizer in pushes of random size (1 to 2 blocks), then flush.
fn recognize(audio: &[i16], rate_hz: u32, rng: &mut Rng) -> Vec<Event> {
    let mut recognizer = Recognizer::new(rate_hz);
    let mut events = Vec::new();
    let mut rest = audio;
    while !rest.is_empty() {
        let take = (1 + rng.below(2 * block_len(rate_hz)) as usize).min(rest.len());
        recognizer.push(&rest[..take], &mut events);
        rest = &rest[take..];
    }
    recognizer.flush(&mut events);
    events
}

/// A marker placed in a stream: its id and first and last-plus-one sample.
#[derive(Debug, Clone, Copy)]
struct Placed {
    id: u16,
    start: u64,
    end: u64,
}

/// Markers in `events`: (id, end_sample).
fn markers(events: &[Event]) -> Vec<(u16, u64)> {
    events
        .iter()
        .filter_map(|e| match *e {
            Event::Marker { id, end_sample } => Some((id, end_sample)),
            _ => None,
        })
        .collect()
}

/// Every placed marker is reported once, in order, at most 1.2 blocks before its end (plus
/// `slack` samples either way); nothing else is reported as a marker; no word ends inside a
/// marker past its first block; events come in order.
fn check_markers(events: &[Event], placed: &[Placed], rate_hz: u32, slack: u64, what: &str) {
    let found = markers(events);
    let ids: Vec<u16> = found.iter().map(|&(id, _)| id).collect();
    let want: Vec<u16> = placed.iter().map(|p| p.id).collect();
    assert_eq!(ids, want, "{what}: marker ids");
    let block = block_len(rate_hz);
    // A block the last digit fills nearly all of counts as whole (see `read_marker`).
    let early = block + block / 5;
    for (&(id, end), p) in found.iter().zip(placed) {
        assert!(
            end + early + slack >= p.end && end <= p.end + slack,
            "{what}: marker {id} ends at {end}, its audio at {} (block {block})",
            p.end
        );
    }
    let mut previous = 0;
    for event in events {
        let (Event::Word { end_sample, .. }
        | Event::Utterance { end_sample, .. }
        | Event::Marker { end_sample, .. }) = *event;
        assert!(end_sample >= previous, "{what}: out of order: {event:?}");
        previous = end_sample;
        if let Event::Word { end_sample, .. } = event {
            assert!(
                !placed
                    .iter()
                    .any(|p| *end_sample > p.start + block && *end_sample <= p.end),
                "{what}: a word from marker audio: {event:?}"
            );
        }
    }
}

#[test]
fn marker_transcripts_round_trip() {
    for id in 0..MARKER_IDS {
        assert_eq!(parse_marker(&marker_transcript(id)), Some(id));
    }
    assert_eq!(marker_transcript(MARKER_IDS + 17), "marker 17");
    for not_a_marker in [
        "",
        "marker",
        "marker ",
        "marker 512",
        "marker 017",
        "marker +17",
        "marker -1",
        "marker 17 ",
        " marker 17",
        "Marker 17",
        "marker 1 7",
        "w1 marker 17",
        "marker 99999999",
    ] {
        assert_eq!(parse_marker(not_a_marker), None, "{not_a_marker:?}");
    }
}

#[test]
fn marker_audio_is_marker_ms_long() {
    for rate in [8_000, 11_025, 16_000, 22_050, 44_100, 48_000] {
        assert_eq!(
            marker(5, rate).len(),
            ms_to_samples(MARKER_MS, rate),
            "{rate}"
        );
    }
    assert_eq!(marker(MARKER_IDS + 5, 16_000), marker(5, 16_000));
}

/// Clean markers at every rate and block alignment, with and without silence between them,
/// come back exactly, and make no words.
#[test]
fn every_marker_is_answered_once_at_any_alignment() {
    for rate in [8_000, 11_025, 16_000, 22_050, 44_100, 48_000] {
        let mut rng = Rng(u64::from(rate));
        // Every id at 16 kHz; at other rates a spread that still visits every digit value.
        let ids: Vec<u16> = if rate == 16_000 {
            (0..MARKER_IDS).collect()
        } else {
            (0..MARKER_IDS).step_by(7).chain([MARKER_IDS - 1]).collect()
        };
        let mut audio = Vec::new();
        let mut placed = Vec::new();
        for id in ids {
            // Half the markers follow the previous one directly.
            if rng.below(2) == 0 {
                audio.resize(audio.len() + rng.below(3 * block_len(rate)) as usize, 0);
            }
            let start = audio.len() as u64;
            audio.extend(marker(id, rate));
            let end = audio.len() as u64;
            placed.push(Placed { id, start, end });
        }
        let events = recognize(&audio, rate, &mut rng);
        check_markers(&events, &placed, rate, 0, &format!("{rate} Hz"));
        assert_eq!(events.len(), placed.len(), "{rate} Hz: only markers");
    }
}

/// The marker is answered before the audio after it arrives; the words before it are final
/// first, and words after it start a new utterance.
#[test]
fn marker_is_final_at_once_after_the_words_before_it() {
    let rate = 16_000;
    let mut audio = tone_words(&[1, 2], rate);
    let start = audio.len() as u64;
    audio.extend(marker(300, rate));
    let end = audio.len() as u64;
    let mut recognizer = Recognizer::new(rate);
    let mut events = Vec::new();
    recognizer.push(&audio, &mut events);
    let word_end = |words: u64| {
        (words - 1) * ms_to_samples(TONE_MS + GAP_MS, rate) as u64
            + ms_to_samples(TONE_MS, rate) as u64
    };
    assert_eq!(
        events,
        [
            Event::Word {
                symbols: vec![1],
                end_sample: word_end(1),
            },
            Event::Word {
                symbols: vec![1, 2],
                end_sample: word_end(2),
            },
            Event::Utterance {
                symbols: vec![1, 2],
                end_sample: word_end(2),
            },
            // Aligned blocks: the last digit's second block ends one block before the marker.
            Event::Marker {
                id: 300,
                end_sample: end - block_len(rate),
            },
        ]
    );
    assert!(word_end(2) <= start);
    events.clear();
    let mut after = tone_words(&[3], rate);
    after.extend(silence(UTTERANCE_GAP_MS + 20, rate));
    recognizer.push(&after, &mut events);
    let finals: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Utterance { symbols, .. } => Some(transcript(symbols)),
            _ => None,
        })
        .collect();
    assert_eq!(finals, ["w3"]);
}

/// A marker cut short by the end of the stream, or broken in the middle, is no marker, and the
/// digits heard so far are ordinary words again.
#[test]
fn broken_markers_are_not_markers() {
    let rate = 16_000;
    let whole = marker(0o123, rate);
    let tone = ms_to_samples(MARKER_TONE_MS, rate);
    let mut rng = Rng(7);
    // Cut before the last digit has two whole blocks.
    let events = recognize(&whole[..3 * tone + tone / 2], rate, &mut rng);
    assert!(markers(&events).is_empty(), "{events:?}");
    // A digit too short: 30 ms of the middle digit missing leave one whole block.
    let mut short = whole[..2 * tone].to_vec();
    short.extend(&whole[2 * tone + tone / 2..]);
    let events = recognize(&short, rate, &mut rng);
    assert!(markers(&events).is_empty(), "{events:?}");
    let words: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Utterance { symbols, .. } => Some(transcript(symbols)),
            _ => None,
        })
        .collect();
    assert_eq!(words, ["w1 w10 w3"]);
    // A start tone with no digits, then a whole marker: only the marker.
    let mut audio = whole[..tone].to_vec();
    audio.extend(silence(100, rate));
    let start = audio.len() as u64;
    audio.extend(&whole);
    let placed = [Placed {
        id: 0o123,
        start,
        end: audio.len() as u64,
    }];
    let events = recognize(&audio, rate, &mut rng);
    check_markers(&events, &placed, rate, 0, "after a lone start tone");
}

/// G.711 μ-law compression of one sample (what a client sending MULAW does).
fn linear_to_mulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    let sign = if sample < 0 { 0x80 } else { 0 };
    let magnitude = i32::from(sample).abs().min(32_635) + BIAS;
    // The segment is the position of the highest bit above the 8 a linear segment spans.
    let exponent = (31 - magnitude.leading_zeros() as i32 - 7).clamp(0, 7);
    let mantissa = (magnitude >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) | mantissa) as u8
}

#[test]
fn mulaw_markers_are_recognized() {
    for rate in [8_000, 16_000] {
        let mut rng = Rng(u64::from(rate) + 1);
        let mut audio = Vec::new();
        let mut placed = Vec::new();
        for id in 0..MARKER_IDS {
            audio.resize(audio.len() + rng.below(block_len(rate)) as usize, 0);
            let start = audio.len() as u64;
            audio.extend(marker(id, rate));
            placed.push(Placed {
                id,
                start,
                end: audio.len() as u64,
            });
        }
        let decoded: Vec<i16> = audio
            .iter()
            .map(|&s| super::super::mulaw_to_linear(linear_to_mulaw(s)))
            .collect();
        let events = recognize(&decoded, rate, &mut rng);
        check_markers(&events, &placed, rate, 0, &format!("μ-law {rate} Hz"));
    }
}

fn speech_16k() -> Vec<i16> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");
    hound::WavReader::open(path)
        .expect("speech fixture")
        .samples::<i16>()
        .map(Result::unwrap)
        .collect()
}

/// `samples` at `to_hz`, through the gateway's own resampler (delay-compensated: sample `i`
/// lands at `i * to_hz / from_hz`).
fn resample(samples: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    let mut resampler = Resample::new(from_hz, to_hz).expect("supported rates");
    let mut frames = Vec::new();
    for (i, chunk) in samples.chunks(from_hz as usize / 50).enumerate() {
        let frame = AudioFrame {
            samples: chunk.to_vec(),
            sample_rate_hz: from_hz,
            start_sample: (i * chunk.len()) as u64,
            speech: true,
        };
        resampler.process(frame, &mut frames).unwrap();
    }
    resampler.flush(&mut frames);
    frames.into_iter().flat_map(|f| f.samples).collect()
}

/// A minute of espeak speech at `source_hz`, cut into pieces of 0–2.5 s taken anywhere in it,
/// with a marker between every two pieces and no silence around them; sent to a recognizer at
/// `stream_hz` (through the resampler when the rates differ, as the gateway does), as μ-law
/// when `mulaw`. Markers come back exactly; speech makes none.
fn markers_in_speech(source_hz: u32, stream_hz: u32, mulaw: bool) {
    let what = format!("{source_hz} Hz -> {stream_hz} Hz, mulaw {mulaw}");
    let speech = speech_16k();
    let speech = if source_hz == 16_000 {
        speech
    } else {
        resample(&speech, 16_000, source_hz)
    };
    let mut rng = Rng(u64::from(source_hz) << 20 | u64::from(stream_hz) << 1 | u64::from(mulaw));
    let mut audio = Vec::new();
    let mut placed = Vec::new();
    let mut id = 0u16;
    while audio.len() < 60 * source_hz as usize {
        let len = rng.below(u64::from(source_hz) * 5 / 2) as usize;
        let from = rng.below(speech.len() as u64) as usize;
        audio.extend(speech.iter().cycle().skip(from).take(len));
        let start = audio.len() as u64;
        audio.extend(marker(id, source_hz));
        placed.push(Placed {
            id,
            start,
            end: audio.len() as u64,
        });
        id = (id + 97) % MARKER_IDS;
    }
    audio.extend(speech.iter().take(source_hz as usize));
    let mut slack = 0;
    if stream_hz != source_hz {
        audio = resample(&audio, source_hz, stream_hz);
        let at = |p: u64| p * u64::from(stream_hz) / u64::from(source_hz);
        for p in &mut placed {
            (p.start, p.end) = (at(p.start), at(p.end));
        }
        // The resampler's filter spreads each tone change over a few samples either way.
        slack = u64::from(stream_hz / 1_000);
    }
    if mulaw {
        for s in &mut audio {
            *s = super::super::mulaw_to_linear(linear_to_mulaw(*s));
        }
    }
    let events = recognize(&audio, stream_hz, &mut rng);
    assert!(placed.len() > 30, "{what}: {} markers", placed.len());
    check_markers(&events, &placed, stream_hz, slack, &what);
}

#[test]
fn markers_in_speech_16k() {
    markers_in_speech(16_000, 16_000, false);
}

#[test]
fn markers_in_speech_8k_and_48k() {
    markers_in_speech(8_000, 8_000, false);
    markers_in_speech(48_000, 48_000, false);
}

#[test]
fn markers_in_speech_resampled_to_16k() {
    markers_in_speech(8_000, 16_000, false);
    markers_in_speech(48_000, 16_000, false);
}

#[test]
fn markers_in_mulaw_speech() {
    markers_in_speech(8_000, 8_000, true);
}
