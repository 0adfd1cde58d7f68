//! The whole inline stage chain a session runs per audio message (decode → resample → VAD →
//! batch → STT hand-over, metrics included), for one session and for many sessions taken in
//! turn, as a loaded gateway does: the second shows what a frame costs once the other sessions
//! have pushed this one's state out of the caches.
//!
//! `cargo bench --bench chain`; elements = frames (one real-time stream is 50 frames/s).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pipeline::audio::PayloadData;
use pipeline::engine::{AudioSink, EngineClosed, TrySendError};
use pipeline::metrics::StageMetrics;
use pipeline::processor::{Downstream, Inline};
use pipeline::{
    AudioFormat, EdgeSettings, Encoding, EngineAudio, EngineInput, OverflowPolicy, Payload,
    SessionShared,
};
use stages::batch::{Batch, BatchConfig};
use stages::decode::Decode;
use stages::resample::Resample;
use stages::stt::Stt;
use stages::vad::{Vad, VadConfig};
use tokio::time::Instant;

/// An engine that takes every input at once and keeps nothing: the chain's cost alone.
struct Discard;

impl AudioSink for Discard {
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), EngineClosed>> {
        Poll::Ready(Ok(()))
    }

    fn try_send(&mut self, input: EngineInput) -> Result<(), TrySendError> {
        std::hint::black_box(input);
        Ok(())
    }
}

/// The speech fixture as the tutorial's base64 `content` of 20 ms LINEAR16 frames.
fn payloads() -> Vec<Payload> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/speech-16k.wav");
    let speech = voxflow::client::read_wav(std::path::Path::new(path))
        .unwrap()
        .0;
    speech
        .chunks_exact(320)
        .map(|frame| {
            let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            Payload {
                data: PayloadData::Base64(Bytes::from(text)),
                audio_us: 20_000,
            }
        })
        .collect()
}

/// One session's chain, built as the server builds it with its default (inline) edges.
fn chain() -> impl Downstream<Payload> {
    let format = AudioFormat {
        encoding: Encoding::Linear16,
        sample_rate_hz: 16_000,
        channels: 1,
    };
    let session = Arc::new(SessionShared::new());
    let m = |stage| StageMetrics::new(stage);
    let edge = EdgeSettings {
        capacity: 0,
        send_timeout: Duration::from_millis(100),
        overflow: OverflowPolicy::Block,
    };
    let stt = Stt::new(
        EngineAudio::new(Discard),
        m("batch"),
        m("stt"),
        edge,
        Arc::clone(&session),
    );
    let batch = Batch::new(
        BatchConfig::default().validate(16_000).unwrap(),
        stt,
        m("vad"),
        m("batch"),
        Arc::clone(&session),
    );
    let vad = Inline::new(
        Vad::new(VadConfig::default().validate(16_000).unwrap(), false),
        m("resample"),
        m("vad"),
        batch,
        Arc::clone(&session),
    );
    let resample = Inline::new(
        Resample::new(16_000, 16_000).unwrap(),
        m("decode"),
        m("resample"),
        vad,
        Arc::clone(&session),
    );
    Box::new(Inline::new(
        Decode::new(format).unwrap(),
        m("ingress"),
        m("decode"),
        resample,
        session,
    ))
}

fn whole_chain(c: &mut Criterion) {
    let payloads = payloads();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Elements(1));
    for sessions in [1usize, 1_000] {
        let mut chains: Vec<_> = (0..sessions).map(|_| chain()).collect();
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("json-linear16-16k", sessions), |b| {
            b.iter_custom(|frames| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..frames {
                        // Session after session, then the next frame: each session's state
                        // has gone cold by its next turn when there are many.
                        let session = next % sessions;
                        let frame = next / sessions % payloads.len();
                        next += 1;
                        chains[session]
                            .send_data(payloads[frame].clone())
                            .await
                            .unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, whole_chain);
criterion_main!(benches);
