//! Batch: frames in, STT requests out, without adding latency.
//!
//! Consumes speech-marked [`AudioFrame`]s at the engine's rate and produces [`AudioBatch`]es of
//! contiguous audio. When the STT stage has room, whatever is held goes out at once (usually one
//! frame); audio accumulates only while the STT stage is busy, up to `max_samples`, and a full
//! batch is sent under the edge's overflow policy. Keeps the one batch being built; flushes it at
//! a `Finalize` marker (which it forwards) and at end of input.
//!
//! With its edge at capacity 0 (the default) it runs in the task that feeds it ([`Batch`]):
//! the feeding task also waits for the STT stage's room while a batch is held
//! ([`Downstream::send_pending`]). Otherwise it runs behind a queue in a task of its own ([`run`]).

mod config;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use pipeline::edge::EdgeRx;
use pipeline::metrics::StageMetrics;
use pipeline::processor::{Downstream, on_send_error};
use pipeline::{AudioBatch, AudioFrame, EdgeError, Flow, SessionShared};
use tokio::time::Instant;

pub use config::{BatchConfig, BatchError, BatchSettings, MAX_REQUEST_BYTES};

/// Run the batch stage behind its own queue until its input ends or the session fails.
pub async fn run<D: Downstream<AudioBatch>>(
    settings: BatchSettings,
    mut input: EdgeRx<Flow<AudioFrame>>,
    mut output: D,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let mut builder = Builder::new(settings.max_samples);
    let mut full = Vec::new();
    let result: Result<(), EdgeError> = async {
        loop {
            tokio::select! {
                biased;
                // The STT stage has room: send what is held now rather than wait for more.
                ready = output.ready(), if builder.has_pending() => {
                    ready?;
                    output.send_data(builder.take()).await?;
                }
                flow = input.recv() => match flow {
                    Some(Flow::Data(frame)) => {
                        let started = Instant::now();
                        builder.push(frame, &mut full);
                        metrics.processing(started.elapsed());
                        for batch in full.drain(..) {
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
                        output.finish().await;
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

/// The batch stage run in the task that feeds it (its edge at capacity 0).
pub struct Batch<D> {
    builder: Builder,
    output: D,
    /// The feeding stage's (the VAD), for its `sent` count (an edge would count it).
    from: StageMetrics,
    metrics: StageMetrics,
    session: Arc<SessionShared>,
    full: Vec<AudioBatch>,
}

impl<D: Downstream<AudioBatch>> Batch<D> {
    pub fn new(
        settings: BatchSettings,
        output: D,
        from: StageMetrics,
        metrics: StageMetrics,
        session: Arc<SessionShared>,
    ) -> Batch<D> {
        Batch {
            builder: Builder::new(settings.max_samples),
            output,
            from,
            metrics,
            session,
            full: Vec::new(),
        }
    }

    async fn send(&mut self, batch: AudioBatch) -> Result<(), EdgeError> {
        self.output
            .send_data(batch)
            .await
            .inspect_err(|e| on_send_error(e, &self.metrics, &self.session))
    }

    async fn send_held(&mut self) -> Result<(), EdgeError> {
        if self.builder.has_pending() {
            let batch = self.builder.take();
            self.send(batch).await?;
        }
        Ok(())
    }
}

impl<D: Downstream<AudioBatch>> Downstream<AudioFrame> for Batch<D> {
    async fn send_data(&mut self, frame: AudioFrame) -> Result<(), EdgeError> {
        self.from.sent(1);
        self.metrics.received(1);
        let started = Instant::now();
        self.builder.push(frame, &mut self.full);
        self.metrics.processing(started.elapsed());
        while !self.full.is_empty() {
            let batch = self.full.remove(0);
            self.send(batch).await?;
        }
        // The STT stage has room: send what is held now rather than wait for more.
        if self.builder.has_pending() {
            let batch = self.builder.take();
            let refused = self
                .output
                .offer(batch)
                .await
                .inspect_err(|e| on_send_error(e, &self.metrics, &self.session))?;
            if let Some(batch) = refused {
                self.builder.hold(batch);
            }
        }
        Ok(())
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        self.send_held().await?;
        self.output
            .send_finalize()
            .await
            .inspect_err(|e| on_send_error(e, &self.metrics, &self.session))
    }

    async fn finish(&mut self) {
        if self.send_held().await.is_ok() {
            self.output.finish().await;
        }
    }

    fn has_pending(&self) -> bool {
        self.builder.has_pending() || self.output.has_pending()
    }

    /// Cancel-safe: the held batch is taken only once the STT stage has room, and a send with
    /// room completes without waiting (this stage is its only sender).
    async fn send_pending(&mut self) -> Result<(), EdgeError> {
        if self.builder.has_pending() {
            self.output.ready().await?;
            self.send_held().await
        } else {
            self.output.send_pending().await
        }
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

    /// Hold again a batch just taken (the stage after had no room for it after all).
    pub fn hold(&mut self, batch: AudioBatch) {
        debug_assert!(self.pending.is_none());
        self.pending = Some(batch);
    }

    /// Add a frame; the batches that became full (or were cut by a gap in the audio) go to
    /// `full`.
    pub fn push(&mut self, frame: AudioFrame, full: &mut Vec<AudioBatch>) {
        // A gap (audio the VAD gate held back) starts a new batch: batches are contiguous.
        if self
            .pending
            .as_ref()
            .is_some_and(|b| b.end_sample() != frame.start_sample)
        {
            full.push(self.take());
        }
        if self.pending.is_none() && frame.samples.len() <= self.max_samples {
            // The usual case, a frame into an empty batch: its samples, as they are.
            let batch = AudioBatch {
                samples: frame.samples,
                sample_rate_hz: frame.sample_rate_hz,
                start_sample: frame.start_sample,
                speech: frame.speech,
            };
            if batch.samples.len() == self.max_samples {
                full.push(batch);
            } else {
                self.pending = Some(batch);
            }
            return;
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
    }
}
