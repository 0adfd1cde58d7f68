//! Batch: frames in, STT requests out, without adding latency.
//!
//! Consumes speech-marked [`AudioFrame`]s at the engine's rate and produces [`AudioBatch`]es of
//! contiguous audio. When the STT stage has room, whatever is held goes out at once (usually one
//! frame); audio accumulates only while the STT stage is busy, up to `max_samples`, and a full
//! batch is sent under the edge's overflow policy. Keeps the one batch being built; flushes it at
//! a `Finalize` marker (which it forwards) and at end of input.

mod config;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use pipeline::edge::{EdgeRx, EdgeTx};
use pipeline::processor::on_send_error;
use pipeline::{AudioBatch, AudioFrame, EdgeError, Flow, SessionShared};
use tokio::time::Instant;

pub use config::{BatchConfig, BatchError, BatchSettings, MAX_REQUEST_BYTES};

/// Run the batch stage until its input ends or the session fails.
pub async fn run(
    settings: BatchSettings,
    mut input: EdgeRx<Flow<AudioFrame>>,
    output: EdgeTx<Flow<AudioBatch>>,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let mut builder = Builder::new(settings.max_samples);
    let result: Result<(), EdgeError> = async {
        loop {
            tokio::select! {
                biased;
                // The STT stage has room: send what is held now rather than wait for more.
                permit = output.reserve(), if builder.has_pending() => {
                    permit?.send(Flow::Data(builder.take()));
                }
                flow = input.recv() => match flow {
                    Some(Flow::Data(frame)) => {
                        let started = Instant::now();
                        let full = builder.push(frame);
                        metrics.processing(started.elapsed());
                        for batch in full {
                            output.send_data(batch).await?;
                        }
                    }
                    Some(Flow::Finalize) => {
                        if builder.has_pending() {
                            output.send_data(builder.take()).await?;
                        }
                        output.send_finalize().await?;
                    }
                    None => {
                        if builder.has_pending() {
                            output.send_data(builder.take()).await?;
                        }
                        return Ok(());
                    }
                },
            }
        }
    }
    .await;
    if let Err(error) = result {
        on_send_error(&error, &metrics, &session);
        input.close();
    }
}

/// Accumulates contiguous frames into batches of at most `max_samples`.
pub struct Builder {
    max_samples: usize,
    pending: Option<AudioBatch>,
}

impl Builder {
    pub fn new(max_samples: usize) -> Builder {
        Builder {
            max_samples,
            pending: None,
        }
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn take(&mut self) -> AudioBatch {
        self.pending.take().expect("checked by has_pending")
    }

    /// Add a frame; returns the batches that became full (or were cut by a gap in the audio).
    pub fn push(&mut self, frame: AudioFrame) -> Vec<AudioBatch> {
        let mut full = Vec::new();
        // A gap (audio the VAD gate held back) starts a new batch: batches are contiguous.
        if self
            .pending
            .as_ref()
            .is_some_and(|b| b.end_sample() != frame.start_sample)
        {
            full.push(self.take());
        }
        let mut offset = 0;
        while offset < frame.samples.len() {
            let batch = self.pending.get_or_insert_with(|| AudioBatch {
                samples: Vec::with_capacity(frame.samples.len()),
                sample_rate_hz: frame.sample_rate_hz,
                start_sample: frame.start_sample + offset as u64,
                speech: false,
            });
            let room = self.max_samples - batch.samples.len();
            let n = room.min(frame.samples.len() - offset);
            batch
                .samples
                .extend_from_slice(&frame.samples[offset..offset + n]);
            batch.speech |= frame.speech;
            offset += n;
            if batch.samples.len() == self.max_samples {
                full.push(self.take());
            }
        }
        full
    }
}
