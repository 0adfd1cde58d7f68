//! The emulator's tone recognizer over real speech, the load test's input: every energetic
//! 20 ms block is classified, so this is the emulator's CPU cost per stream-second.
//!
//! `cargo bench --bench emulator`; elements = samples (16,000 per stream-second).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voxflow::emulator::tones::Recognizer;

const RATE: u32 = 16_000;
/// 5 s of audio per iteration.
const SAMPLES: usize = 5 * RATE as usize;

fn speech_16k() -> Vec<i16> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");
    voxflow::client::read_wav(std::path::Path::new(path))
        .unwrap()
        .0
}

fn recognizer(c: &mut Criterion) {
    let speech: Vec<i16> = speech_16k().into_iter().cycle().take(SAMPLES).collect();
    let mut group = c.benchmark_group("recognizer");
    group.throughput(Throughput::Elements(SAMPLES as u64));
    group.bench_function("speech/16000", |b| {
        let mut events = Vec::new();
        b.iter(|| {
            let mut recognizer = Recognizer::new(RATE);
            // 20 ms requests, as the gateway's batch stage sends when the engine keeps up.
            for chunk in speech.chunks(RATE as usize / 50) {
                recognizer.push(chunk, &mut events);
            }
            recognizer.flush(&mut events);
            black_box(&events);
            events.clear();
        })
    });
    group.finish();
}

criterion_group!(benches, recognizer);
criterion_main!(benches);
