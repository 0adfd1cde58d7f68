//! Per-stage throughput, in 20 ms frames per second (one real-time stream is 50 frames/s).
//!
//! `cargo bench --bench stages`; each group reports elements = frames.

use std::hint::black_box;

use base64::Engine as _;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pipeline::audio::PayloadData;
use pipeline::{AudioFormat, AudioFrame, Encoding, Payload, Processor};
use stages::batch::Builder;
use stages::decode::Decode;
use stages::resample::Resample;
use stages::vad::{Vad, VadConfig};

const FRAMES: usize = 250; // 5 s of audio per iteration

fn speech_16k() -> Vec<i16> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");
    voxflow::client::read_wav(std::path::Path::new(path))
        .unwrap()
        .0
}

/// `FRAMES` frames of speech at `rate` (naively decimated or repeated: content does not
/// matter for decode cost, only size).
fn frames_at(rate: u32) -> Vec<Vec<i16>> {
    let speech = speech_16k();
    let per_frame = rate as usize / 50;
    (0..FRAMES)
        .map(|f| {
            (0..per_frame)
                .map(|i| speech[(f * per_frame + i) * 16_000 / rate as usize % speech.len()])
                .collect()
        })
        .collect()
}

fn payloads(encoding: Encoding, rate: u32) -> Vec<Payload> {
    let binary = |bytes: Vec<u8>| Payload {
        data: PayloadData::Binary(Bytes::from(bytes)),
        audio_us: 20_000,
    };
    let frames = frames_at(rate);
    match encoding {
        Encoding::Linear16 => frames
            .iter()
            .map(|f| binary(f.iter().flat_map(|s| s.to_le_bytes()).collect()))
            .collect(),
        Encoding::Float32 => frames
            .iter()
            .map(|f| {
                binary(
                    f.iter()
                        .flat_map(|&s| (f32::from(s) / 32_768.0).to_le_bytes())
                        .collect(),
                )
            })
            .collect(),
        Encoding::Mulaw | Encoding::Alaw => frames
            .iter()
            .map(|f| binary(f.iter().map(|&s| (s >> 8) as u8).collect()))
            .collect(),
        Encoding::Opus => {
            let mut encoder =
                opus::Encoder::new(rate, opus::Channels::Mono, opus::Application::Voip).unwrap();
            frames
                .iter()
                .map(|f| binary(encoder.encode_vec(f, 4_000).unwrap()))
                .collect()
        }
    }
}

/// Time a fresh processor from `make` over `input`, one item at a time, outputs consumed.
fn bench_processor<P: Processor>(b: &mut criterion::Bencher, make: impl Fn() -> P, input: &[P::In])
where
    P::In: Clone,
{
    b.iter_batched(
        || (make(), input.to_vec()),
        |(mut processor, input)| {
            let mut out = Vec::with_capacity(2);
            for item in input {
                processor.process(item, &mut out).unwrap();
                black_box(&out);
                out.clear();
            }
        },
        criterion::BatchSize::SmallInput,
    )
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(FRAMES as u64));
    for (encoding, rate) in [
        (Encoding::Linear16, 16_000),
        (Encoding::Float32, 48_000),
        (Encoding::Mulaw, 8_000),
        (Encoding::Alaw, 8_000),
        (Encoding::Opus, 16_000),
        (Encoding::Opus, 48_000),
    ] {
        let input = payloads(encoding, rate);
        let format = AudioFormat {
            encoding,
            sample_rate_hz: rate,
            channels: 1,
        };
        group.bench_with_input(
            BenchmarkId::new(encoding.as_str(), rate),
            &input,
            |b, input| bench_processor(b, || Decode::new(format).unwrap(), input),
        );
    }
    // The tutorial's form: the base64 inside the JSON, after ingress has sliced it out.
    let input: Vec<Payload> = payloads(Encoding::Linear16, 16_000)
        .into_iter()
        .map(|p| match p.data {
            PayloadData::Binary(bytes) => Payload {
                data: PayloadData::Base64(Bytes::from(
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                )),
                audio_us: 20_000,
            },
            PayloadData::Base64(_) => unreachable!(),
        })
        .collect();
    let format = AudioFormat {
        encoding: Encoding::Linear16,
        sample_rate_hz: 16_000,
        channels: 1,
    };
    group.bench_function("LINEAR16-base64/16000", |b| {
        bench_processor(b, || Decode::new(format).unwrap(), &input)
    });
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingress");
    group.throughput(Throughput::Elements(FRAMES as u64));
    let messages: Vec<String> = frames_at(16_000)
        .iter()
        .map(|f| {
            let bytes: Vec<u8> = f.iter().flat_map(|s| s.to_le_bytes()).collect();
            let content = base64::engine::general_purpose::STANDARD.encode(bytes);
            format!(r#"{{"audio_id":"bench-session","content":"{content}"}}"#)
        })
        .collect();
    group.bench_function("parse-json/tutorial", |b| {
        b.iter(|| {
            for message in &messages {
                black_box(pipeline::protocol::parse(message).unwrap());
            }
        })
    });
    group.finish();
}

fn resample(c: &mut Criterion) {
    let mut group = c.benchmark_group("resample");
    group.throughput(Throughput::Elements(FRAMES as u64));
    for rate in [16_000u32, 8_000, 44_100, 48_000] {
        let frames: Vec<AudioFrame> = frames_at(rate)
            .into_iter()
            .map(|samples| AudioFrame {
                samples,
                sample_rate_hz: rate,
                start_sample: 0,
                speech: true,
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("to-16000", rate), &frames, |b, frames| {
            bench_processor(b, || Resample::new(rate, 16_000).unwrap(), frames)
        });
    }
    group.finish();
}

fn vad_and_batch(c: &mut Criterion) {
    let as_frames = |frames: Vec<Vec<i16>>| -> Vec<AudioFrame> {
        frames
            .into_iter()
            .enumerate()
            .map(|(i, samples)| AudioFrame {
                samples,
                sample_rate_hz: 16_000,
                start_sample: i as u64 * 320,
                speech: true,
            })
            .collect()
    };
    // The fixture's first 5 s: 0.5 s of silence, then speech.
    let frames = as_frames(frames_at(16_000));
    // Speech only: 5 s from the fixture's first word on.
    let speech = speech_16k();
    let speech_only = as_frames(
        speech[8_000..]
            .chunks_exact(320)
            .take(FRAMES)
            .map(<[i16]>::to_vec)
            .collect(),
    );
    // A quiet room: deterministic white noise at -60 dBFS.
    let mut state = 1u32;
    let silence = as_frames(
        (0..FRAMES)
            .map(|_| {
                (0..320)
                    .map(|_| {
                        // An LCG (Numerical Recipes); uniform in ±57 has an RMS of 33.
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (i32::from((state >> 16) as u16) * 115 / 65_536 - 57) as i16
                    })
                    .collect()
            })
            .collect(),
    );
    let mut group = c.benchmark_group("vad");
    group.throughput(Throughput::Elements(FRAMES as u64));
    let settings = VadConfig::default().validate(16_000).unwrap();
    let every_window = VadConfig {
        max_unscored_ms: 0,
        ..VadConfig::default()
    }
    .validate(16_000)
    .unwrap();
    // `earshot` keeps its id (the default settings on the fixture's start) so runs compare
    // across versions; `-every-window` is the model on every window, as before the shortcuts.
    // The silence runs after 5 s of the same noise: a long session's quiet stretches, not the
    // first seconds of a fresh detector settling.
    for (id, input, warm) in [
        ("earshot", &frames, false),
        ("speech", &speech_only, false),
        ("silence", &silence, true),
    ] {
        for (suffix, settings) in [("", settings), ("-every-window", every_window)] {
            let make = || {
                let mut vad = Vad::new(settings, false);
                if warm {
                    let mut out = Vec::new();
                    for frame in input.iter().cloned() {
                        vad.process(frame, &mut out).unwrap();
                    }
                }
                vad
            };
            group.bench_function(format!("{id}{suffix}"), |b| bench_processor(b, make, input));
        }
    }
    group.finish();
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("accumulate-100ms", |b| {
        b.iter_batched(
            || (Builder::new(1_600), frames.clone()),
            |(mut builder, frames)| {
                let mut full = Vec::new();
                for frame in frames {
                    builder.push(frame, &mut full);
                    black_box(full.drain(..).count());
                }
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decode, parse, resample, vad_and_batch);
criterion_main!(benches);
