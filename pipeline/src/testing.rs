//! Test helpers: a deterministic in-process engine. Never selectable by users.
//!
//! [`CountingEngine`] "transcribes" audio as a description of what it received: each final is
//! `samples=N sum=S` for the audio since the previous final, where `S` is the wrapping sum of the
//! samples. Tests can therefore assert exactly how much audio reached the engine, and that it
//! was the right audio. It can be stalled (stops reading audio) and told to fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

use crate::engine::{
    EngineAudio, EngineInput, EngineResult, EngineResults, LatencyClock, ResultSender,
    StreamConfig, SttEngine, SttError, SttStream,
};

#[derive(Clone)]
pub struct CountingEngine {
    stalled: watch::Receiver<bool>,
    /// Reject every stream after this many batches with `INVALID_ARGUMENT`.
    pub fail_after_batches: Option<u64>,
    /// Batches received over all streams.
    pub batches: Arc<AtomicU64>,
    pub gate: bool,
}

/// Stalls and resumes a [`CountingEngine`].
pub struct StallHandle(watch::Sender<bool>);

impl StallHandle {
    pub fn stall(&self) {
        self.0.send_replace(true);
    }

    pub fn resume(&self) {
        self.0.send_replace(false);
    }
}

impl CountingEngine {
    pub fn new() -> (CountingEngine, StallHandle) {
        let (tx, rx) = watch::channel(false);
        let engine = CountingEngine {
            stalled: rx,
            fail_after_batches: None,
            batches: Arc::new(AtomicU64::new(0)),
            gate: false,
        };
        (engine, StallHandle(tx))
    }
}

/// Parse a `samples=N sum=S` transcript.
pub fn parse_counts(transcript: &str) -> Option<(u64, u64)> {
    let mut parts = transcript.split_whitespace();
    let samples = parts.next()?.strip_prefix("samples=")?.parse().ok()?;
    let sum = parts.next()?.strip_prefix("sum=")?.parse().ok()?;
    Some((samples, sum))
}

/// The wrapping sum the engine reports for `samples`.
pub fn checksum(samples: &[i16]) -> u64 {
    samples
        .iter()
        .fold(0u64, |acc, &s| acc.wrapping_add(s as u16 as u64))
        & 0xffff_ffff
}

impl SttEngine for CountingEngine {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn vad_gate(&self) -> bool {
        self.gate
    }

    fn open(&self, config: StreamConfig) -> Result<SttStream, SttError> {
        let (audio, audio_rx) = EngineAudio::channel(1);
        let (results_tx, results_rx) = EngineResults::channel(4);
        tokio::spawn(run(self.clone(), config, audio_rx, results_tx));
        Ok(SttStream {
            audio,
            results: results_rx,
        })
    }
}

async fn run(
    engine: CountingEngine,
    config: StreamConfig,
    mut audio: mpsc::Receiver<EngineInput>,
    results: ResultSender,
) {
    let mut stalled = engine.stalled.clone();
    let (mut count, mut sum, mut start, mut end) = (0u64, 0u64, None::<u64>, 0u64);
    let mut since_interim = 0u64;
    let mut clock = LatencyClock::new("counting");
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            // The handle is gone: never stalled again.
        }
        let Some(input) = audio.recv().await else {
            break;
        };
        match input {
            EngineInput::Audio(batch) => {
                clock.handed_over(&batch);
                let n = engine.batches.fetch_add(1, Ordering::Relaxed) + 1;
                if engine.fail_after_batches.is_some_and(|limit| n > limit) {
                    let _ = results
                        .send(Err(SttError::Rejected {
                            code: "INVALID_ARGUMENT".into(),
                            message: "test engine told to fail".into(),
                        }))
                        .await;
                    return;
                }
                start.get_or_insert(batch.start_sample);
                end = batch.end_sample();
                count += batch.samples.len() as u64;
                sum = (sum + checksum(&batch.samples)) & 0xffff_ffff;
                since_interim += batch.samples.len() as u64;
                // One interim per half second of audio, like a streaming engine's cadence.
                if config.interim_results && since_interim >= u64::from(config.sample_rate_hz) / 2 {
                    since_interim = 0;
                    let interim = EngineResult {
                        is_final: false,
                        transcript: format!("samples={count} sum={sum}"),
                        stability: 0.5,
                        confidence: 0.0,
                        start_sample: start.unwrap_or(0),
                        end_sample: end,
                    };
                    clock.received(&interim);
                    if results.send(Ok(interim)).await.is_err() {
                        return;
                    }
                }
            }
            EngineInput::Finalize => {
                if emit_final(&results, &mut clock, &mut count, &mut sum, &mut start, end)
                    .await
                    .is_err()
                {
                    return;
                }
                since_interim = 0;
            }
        }
    }
    let _ = emit_final(&results, &mut clock, &mut count, &mut sum, &mut start, end).await;
}

async fn emit_final(
    results: &ResultSender,
    clock: &mut LatencyClock,
    count: &mut u64,
    sum: &mut u64,
    start: &mut Option<u64>,
    end: u64,
) -> Result<(), ()> {
    let Some(first) = start.take() else {
        return Ok(());
    };
    let result = EngineResult {
        is_final: true,
        transcript: format!("samples={count} sum={sum}"),
        stability: 1.0,
        confidence: 1.0,
        start_sample: first,
        end_sample: end,
    };
    *count = 0;
    *sum = 0;
    clock.received(&result);
    results.send(Ok(result)).await.map_err(|_| ())
}
