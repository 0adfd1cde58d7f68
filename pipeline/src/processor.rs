//! Synchronous stages and the adapter that runs one as a task.
//!
//! Pure transforms (decode, resample, VAD) implement [`Processor`]: no timers, no I/O, easy to
//! test synchronously and to benchmark. [`run_processor`] moves items between edges around it,
//! records per-item processing time, forwards `Finalize` markers after flushing, and flushes at
//! end of input before dropping its output so shutdown follows the graph.

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::edge::{EdgeError, EdgeRx, EdgeTx};
use crate::metrics::{ErrorKind, StageMetrics};
use crate::session::{SessionError, SessionShared, close_code};
use crate::{AudioLength, Flow};

/// An error that ends the session: its metric label and what the client is told.
pub trait StageError: std::error::Error {
    fn kind(&self) -> ErrorKind;
    fn to_session_error(&self) -> SessionError;
}

impl StageError for std::convert::Infallible {
    fn kind(&self) -> ErrorKind {
        match *self {}
    }

    fn to_session_error(&self) -> SessionError {
        match *self {}
    }
}

/// A synchronous stage.
pub trait Processor: Send + 'static {
    type In: Send + AudioLength + 'static;
    type Out: Send + AudioLength + 'static;
    type Error: StageError + Send;

    /// Transform one item, pushing zero or more outputs.
    ///
    /// # Errors
    /// An error ends the session; the adapter counts it and reports it to the client.
    fn process(&mut self, item: Self::In, out: &mut Vec<Self::Out>) -> Result<(), Self::Error>;

    /// Emit everything held back. Called at a `Finalize` marker and at end of input.
    fn flush(&mut self, out: &mut Vec<Self::Out>);

    /// [`Processor::process`], recording its time as `metrics`' processing time. A [`Chain`]
    /// records each of its stages under its own name instead.
    ///
    /// # Errors
    /// As [`Processor::process`].
    fn process_recorded(
        &mut self,
        item: Self::In,
        out: &mut Vec<Self::Out>,
        metrics: &StageMetrics,
    ) -> Result<(), Self::Error> {
        let started = Instant::now();
        let result = self.process(item, out);
        metrics.processing(started.elapsed());
        result
    }
}

/// Two processors in one task: `first`'s outputs go straight into `second`, with no queue
/// between them (an edge configured with capacity 0).
///
/// A queue between two synchronous stages buys nothing but a task wake-up per item: neither
/// side waits on I/O, so the queue never absorbs a burst the upstream queue could not. Fusing
/// them keeps each stage's metrics (received, sent, processing time under its own `stage`
/// label) and its format checks; only the queue-depth and send-blocked series of the fused
/// edge stay at zero.
///
/// Nest to the right for longer chains, `Chain(decode, Chain(resample, vad))`, so that every
/// hand-over is counted under the stages on either side of it.
pub struct Chain<A: Processor, B> {
    first: A,
    first_metrics: StageMetrics,
    second: B,
    second_metrics: StageMetrics,
    between: Vec<A::Out>,
}

impl<A, B> Chain<A, B>
where
    A: Processor,
    B: Processor<In = A::Out>,
{
    pub fn new(
        first: A,
        first_metrics: StageMetrics,
        second: B,
        second_metrics: StageMetrics,
    ) -> Chain<A, B> {
        Chain {
            first,
            first_metrics,
            second,
            second_metrics,
            between: Vec::with_capacity(4),
        }
    }

    /// Hand what the first stage produced to the second, counted on both sides.
    fn pass_on(&mut self, out: &mut Vec<B::Out>) -> Result<(), ChainError<A::Error, B::Error>> {
        let n = self.between.len() as u64;
        self.first_metrics.sent(n);
        self.second_metrics.received(n);
        for item in self.between.drain(..) {
            self.second
                .process_recorded(item, out, &self.second_metrics)
                .map_err(ChainError::Second)?;
        }
        Ok(())
    }
}

/// The error of whichever stage of a [`Chain`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError<A, B> {
    #[error(transparent)]
    First(A),
    #[error(transparent)]
    Second(B),
}

impl<A: StageError, B: StageError> StageError for ChainError<A, B> {
    fn kind(&self) -> ErrorKind {
        match self {
            ChainError::First(e) => e.kind(),
            ChainError::Second(e) => e.kind(),
        }
    }

    fn to_session_error(&self) -> SessionError {
        match self {
            ChainError::First(e) => e.to_session_error(),
            ChainError::Second(e) => e.to_session_error(),
        }
    }
}

impl<A, B> Processor for Chain<A, B>
where
    A: Processor,
    B: Processor<In = A::Out>,
    A::Error: 'static,
    B::Error: 'static,
{
    type In = A::In;
    type Out = B::Out;
    type Error = ChainError<A::Error, B::Error>;

    fn process(&mut self, item: A::In, out: &mut Vec<B::Out>) -> Result<(), Self::Error> {
        // Without the task's metrics (benches, tests): time nothing, count nothing.
        self.first
            .process(item, &mut self.between)
            .map_err(ChainError::First)?;
        for item in self.between.drain(..) {
            self.second.process(item, out).map_err(ChainError::Second)?;
        }
        Ok(())
    }

    fn process_recorded(
        &mut self,
        item: A::In,
        out: &mut Vec<B::Out>,
        _metrics: &StageMetrics,
    ) -> Result<(), Self::Error> {
        self.first
            .process_recorded(item, &mut self.between, &self.first_metrics)
            .map_err(ChainError::First)?;
        self.pass_on(out)
    }

    fn flush(&mut self, out: &mut Vec<B::Out>) {
        self.first.flush(&mut self.between);
        // Flushing happens at a marker or at the end; a failure here has nowhere to go but the
        // log (the session is ending or the item was the last).
        if let Err(error) = self.pass_on(out) {
            tracing::warn!(stage = self.second_metrics.stage, %error, "Stage failed while flushing.");
        }
        self.second.flush(out);
    }
}

/// Run `processor` between two edges until its input ends or the session fails.
pub async fn run_processor<P: Processor>(
    mut processor: P,
    mut input: EdgeRx<Flow<P::In>>,
    output: EdgeTx<Flow<P::Out>>,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let mut out = Vec::with_capacity(4);
    while let Some(flow) = input.recv().await {
        let finalize = match flow {
            Flow::Data(item) => {
                if let Err(error) = processor.process_recorded(item, &mut out, &metrics) {
                    stage_failed(&error, &metrics, &session);
                    input.close();
                    return;
                }
                false
            }
            Flow::Finalize => {
                processor.flush(&mut out);
                true
            }
        };
        if forward(&mut out, &output, &metrics, &session, finalize)
            .await
            .is_err()
        {
            input.close();
            return;
        }
    }
    processor.flush(&mut out);
    // End of input: a failure here only means downstream already ended; nothing more to do.
    let _ = forward(&mut out, &output, &metrics, &session, false).await;
}

/// Where an async stage sends its output: the next edge, or processors run inline in the
/// sending task before the next edge ([`Inline`]; an edge configured with capacity 0).
pub trait Downstream<T>: Send {
    /// Send one item (the edge's policy applies).
    fn send_data(&mut self, item: T) -> impl Future<Output = Result<(), EdgeError>> + Send;
    /// Send a `Finalize` marker (never dropped).
    fn send_finalize(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send;
    /// End of input: emit whatever inline stages hold. The caller then drops `self`.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

impl<T: AudioLength + Send + 'static> Downstream<T> for EdgeTx<Flow<T>> {
    async fn send_data(&mut self, item: T) -> Result<(), EdgeError> {
        EdgeTx::send_data(self, item).await
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        EdgeTx::send_finalize(self).await
    }

    async fn finish(&mut self) {}
}

/// A boxed downstream: what a chain of inline stages is passed down as, so the nested futures
/// that carry it (session, ingress, read loop) each hold a pointer, not a copy of kilobytes.
impl<T: Send, D: Downstream<T>> Downstream<T> for Box<D> {
    fn send_data(&mut self, item: T) -> impl Future<Output = Result<(), EdgeError>> + Send {
        (**self).send_data(item)
    }

    fn send_finalize(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        (**self).send_finalize()
    }

    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        (**self).finish()
    }
}

/// A processor run inside the task that feeds it, in front of its output edge: what
/// [`run_processor`] does, without a queue and a task wake-up per item.
pub struct Inline<P: Processor> {
    processor: P,
    /// The feeding stage's, for its `sent` count (an edge would count it).
    from: StageMetrics,
    metrics: StageMetrics,
    output: EdgeTx<Flow<P::Out>>,
    session: Arc<SessionShared>,
    out: Vec<P::Out>,
}

impl<P: Processor> Inline<P> {
    /// `from` are the feeding stage's metrics, `metrics` the processor's (the first stage's,
    /// for a [`Chain`]).
    pub fn new(
        processor: P,
        from: StageMetrics,
        metrics: StageMetrics,
        output: EdgeTx<Flow<P::Out>>,
        session: Arc<SessionShared>,
    ) -> Inline<P> {
        Inline {
            processor,
            from,
            metrics,
            output,
            session,
            out: Vec::with_capacity(4),
        }
    }
}

impl<P: Processor> Downstream<P::In> for Inline<P> {
    async fn send_data(&mut self, item: P::In) -> Result<(), EdgeError> {
        self.from.sent(1);
        self.metrics.received(1);
        if let Err(error) = self
            .processor
            .process_recorded(item, &mut self.out, &self.metrics)
        {
            stage_failed(&error, &self.metrics, &self.session);
            self.out.clear();
            // The session has failed and says why; the caller only needs to stop.
            return Err(EdgeError::Closed);
        }
        forward(
            &mut self.out,
            &self.output,
            &self.metrics,
            &self.session,
            false,
        )
        .await
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        self.processor.flush(&mut self.out);
        forward(
            &mut self.out,
            &self.output,
            &self.metrics,
            &self.session,
            true,
        )
        .await
    }

    async fn finish(&mut self) {
        self.processor.flush(&mut self.out);
        // A failure only means downstream already ended; nothing more to do.
        let _ = forward(
            &mut self.out,
            &self.output,
            &self.metrics,
            &self.session,
            false,
        )
        .await;
    }
}

/// Send everything in `out` (and a marker if asked) downstream.
async fn forward<T: AudioLength>(
    out: &mut Vec<T>,
    output: &EdgeTx<Flow<T>>,
    metrics: &StageMetrics,
    session: &SessionShared,
    finalize: bool,
) -> Result<(), EdgeError> {
    for item in out.drain(..) {
        output
            .send_data(item)
            .await
            .inspect_err(|e| on_send_error(e, metrics, session))?;
    }
    if finalize {
        output
            .send_finalize()
            .await
            .inspect_err(|e| on_send_error(e, metrics, session))?;
    }
    Ok(())
}

/// A processor failed: count it, log it, and end the session with its error.
fn stage_failed<E: StageError>(error: &E, metrics: &StageMetrics, session: &SessionShared) {
    tracing::warn!(stage = metrics.stage, %error, "Stage failed; ending the session.");
    metrics.error(error.kind());
    session.fail(error.to_session_error());
}

/// What a stage does when its output refuses an item. Shared by every stage.
pub fn on_send_error(error: &EdgeError, metrics: &StageMetrics, session: &SessionShared) {
    match error {
        // Downstream ended first: it has already reported why.
        EdgeError::Closed => {}
        EdgeError::Overflow => {
            tracing::warn!(
                stage = metrics.stage,
                "Output queue full past its send timeout; closing the session."
            );
            session.fail(SessionError {
                code: "overloaded",
                message: format!(
                    "the {} stage could not keep up (queue full past its send timeout)",
                    metrics.stage
                ),
                close_code: close_code::TRY_AGAIN_LATER,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::AudioFrame;

    fn frame(position: u64) -> AudioFrame {
        AudioFrame {
            samples: vec![position as i16; 4],
            sample_rate_hz: 16_000,
            start_sample: position,
            speech: false,
        }
    }

    /// Emits every frame twice.
    struct Twice;
    impl Processor for Twice {
        type In = AudioFrame;
        type Out = AudioFrame;
        type Error = Infallible;
        fn process(
            &mut self,
            item: AudioFrame,
            out: &mut Vec<AudioFrame>,
        ) -> Result<(), Infallible> {
            out.push(item.clone());
            out.push(item);
            Ok(())
        }
        fn flush(&mut self, _out: &mut Vec<AudioFrame>) {}
    }

    /// Holds every other frame until the next one or a flush.
    #[derive(Default)]
    struct Pairs(Option<AudioFrame>);
    impl Processor for Pairs {
        type In = AudioFrame;
        type Out = AudioFrame;
        type Error = Infallible;
        fn process(
            &mut self,
            item: AudioFrame,
            out: &mut Vec<AudioFrame>,
        ) -> Result<(), Infallible> {
            match self.0.take() {
                Some(held) => out.extend([held, item]),
                None => self.0 = Some(item),
            }
            Ok(())
        }
        fn flush(&mut self, out: &mut Vec<AudioFrame>) {
            out.extend(self.0.take());
        }
    }

    fn positions(frames: &[AudioFrame]) -> Vec<u64> {
        frames.iter().map(|f| f.start_sample).collect()
    }

    #[test]
    fn a_chain_is_its_stages_in_sequence_with_flush_passing_through() {
        let metrics = |stage| StageMetrics::new(stage);
        let mut chain = Chain::new(
            Pairs::default(),
            metrics("decode"),
            Chain::new(Twice, metrics("resample"), Pairs::default(), metrics("vad")),
            metrics("resample"),
        );
        let mut out = Vec::new();
        chain
            .process_recorded(frame(1), &mut out, &metrics("decode"))
            .unwrap();
        assert!(out.is_empty(), "the first stage holds frame 1");
        chain
            .process_recorded(frame(2), &mut out, &metrics("decode"))
            .unwrap();
        // 1 and 2 released, doubled to 1 1 2 2, paired by the last stage.
        assert_eq!(positions(&out), [1, 1, 2, 2]);
        out.clear();
        chain.process(frame(3), &mut out).unwrap();
        assert!(out.is_empty());
        // Flush: the first stage's held frame goes through the rest before they flush, so the
        // last stage's held copy comes out too.
        chain.flush(&mut out);
        assert_eq!(positions(&out), [3, 3]);
    }
}
