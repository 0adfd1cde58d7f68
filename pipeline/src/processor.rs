//! Synchronous stages and the adapter that runs one as a task.
//!
//! Pure transforms (decode, resample, VAD) implement [`Processor`]: no timers, no I/O, easy to
//! test synchronously and to benchmark. [`run_processor`] runs one as a task behind its input
//! edge; [`Inline`] runs one in the task that feeds it. Either way per-item processing time is
//! recorded, `Finalize` markers are forwarded after flushing, and at end of input the processor
//! flushes before its output is dropped, so shutdown follows the graph.
//!
//! A stage's output is a [`Downstream`]: the next edge, or the next stage run inline, chosen per
//! edge by configuration ([`Route`]).

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
}

/// [`Processor::process`], its time recorded as `metrics`' processing time.
fn process_timed<P: Processor>(
    processor: &mut P,
    item: P::In,
    out: &mut Vec<P::Out>,
    metrics: &StageMetrics,
) -> Result<(), P::Error> {
    let started = Instant::now();
    let result = processor.process(item, out);
    metrics.processing(started.elapsed());
    result
}

/// Run `processor` between its input edge and `output` until its input ends or the session
/// fails.
pub async fn run_processor<P: Processor, D: Downstream<P::Out>>(
    mut processor: P,
    mut input: EdgeRx<Flow<P::In>>,
    mut output: D,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let mut out = Vec::with_capacity(4);
    while let Some(flow) = input.recv().await {
        let finalize = match flow {
            Flow::Data(item) => {
                if let Err(error) = process_timed(&mut processor, item, &mut out, &metrics) {
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
        if forward(&mut out, &mut output, &metrics, &session, finalize)
            .await
            .is_err()
        {
            input.close();
            return;
        }
    }
    processor.flush(&mut out);
    // End of input: a failure here only means downstream already ended; nothing more to do.
    if forward(&mut out, &mut output, &metrics, &session, false)
        .await
        .is_ok()
    {
        output.finish().await;
    }
}

/// Where a stage sends its output: the next stage's input edge, or the next stage itself, run
/// in the sending task (an edge configured with capacity 0: no queue, no task wake-up per item).
pub trait Downstream<T>: Send {
    /// Send one item (the edge's policy applies).
    fn send_data(&mut self, item: T) -> impl Future<Output = Result<(), EdgeError>> + Send;
    /// Send a `Finalize` marker (never dropped).
    fn send_finalize(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send;
    /// End of input: emit whatever inline stages hold. The caller then drops `self`.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;

    /// Whether an item sent now would go through without waiting.
    fn has_room(&mut self) -> bool {
        true
    }

    /// Send `item` if it would go through without waiting; otherwise hand it back. What
    /// [`Downstream::has_room`] then [`Downstream::send_data`] do, in one step where the
    /// downstream can check and take at once (the STT stage: one engine lock per frame, not two).
    fn offer(&mut self, item: T) -> impl Future<Output = Result<Option<T>, EdgeError>> + Send
    where
        T: Send,
    {
        async move {
            if self.has_room() {
                self.send_data(item).await.map(|()| None)
            } else {
                Ok(Some(item))
            }
        }
    }

    /// Resolves once an item sent now would go through without waiting. Cancel-safe.
    fn ready(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Whether an inline stage holds items until the stage after it has room (batch does).
    fn has_pending(&self) -> bool {
        false
    }

    /// Wait for that room, then send what is held. Cancel-safe: the caller polls it beside its
    /// own input while [`Downstream::has_pending`] says so.
    fn send_pending(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        std::future::ready(Ok(()))
    }
}

impl<T: AudioLength + Send + 'static> Downstream<T> for EdgeTx<Flow<T>> {
    async fn send_data(&mut self, item: T) -> Result<(), EdgeError> {
        EdgeTx::send_data(self, item).await
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        EdgeTx::send_finalize(self).await
    }

    async fn finish(&mut self) {}

    fn has_room(&mut self) -> bool {
        EdgeTx::has_room(self)
    }

    async fn ready(&mut self) -> Result<(), EdgeError> {
        // Only this stage sends on the edge: room seen now is room at the next send.
        self.reserve().await.map(drop)
    }
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

    fn has_room(&mut self) -> bool {
        (**self).has_room()
    }

    fn offer(&mut self, item: T) -> impl Future<Output = Result<Option<T>, EdgeError>> + Send {
        (**self).offer(item)
    }

    fn ready(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        (**self).ready()
    }

    fn has_pending(&self) -> bool {
        (**self).has_pending()
    }

    fn send_pending(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        (**self).send_pending()
    }
}

/// The next stage as configured: run in the sender's task, or behind a queue in its own.
pub enum Route<I, Q> {
    Inline(I),
    Queued(Q),
}

impl<T, I, Q> Downstream<T> for Route<I, Q>
where
    T: Send,
    I: Downstream<T>,
    Q: Downstream<T>,
{
    async fn send_data(&mut self, item: T) -> Result<(), EdgeError> {
        match self {
            Route::Inline(next) => next.send_data(item).await,
            Route::Queued(next) => next.send_data(item).await,
        }
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        match self {
            Route::Inline(next) => next.send_finalize().await,
            Route::Queued(next) => next.send_finalize().await,
        }
    }

    async fn finish(&mut self) {
        match self {
            Route::Inline(next) => next.finish().await,
            Route::Queued(next) => next.finish().await,
        }
    }

    fn has_room(&mut self) -> bool {
        match self {
            Route::Inline(next) => next.has_room(),
            Route::Queued(next) => next.has_room(),
        }
    }

    async fn offer(&mut self, item: T) -> Result<Option<T>, EdgeError> {
        match self {
            Route::Inline(next) => next.offer(item).await,
            Route::Queued(next) => next.offer(item).await,
        }
    }

    async fn ready(&mut self) -> Result<(), EdgeError> {
        match self {
            Route::Inline(next) => next.ready().await,
            Route::Queued(next) => next.ready().await,
        }
    }

    fn has_pending(&self) -> bool {
        match self {
            Route::Inline(next) => next.has_pending(),
            Route::Queued(next) => next.has_pending(),
        }
    }

    async fn send_pending(&mut self) -> Result<(), EdgeError> {
        match self {
            Route::Inline(next) => next.send_pending().await,
            Route::Queued(next) => next.send_pending().await,
        }
    }
}

/// A processor run inside the task that feeds it, in front of its own downstream: what
/// [`run_processor`] does, without a queue and a task wake-up per item.
///
/// A queue between two synchronous stages buys nothing but a task wake-up per item: neither
/// side waits on I/O, so the queue never absorbs a burst the upstream queue could not. Run
/// inline, each stage keeps its own metrics (received, sent, processing time under its own
/// `stage` label) and its format checks; only the queue-depth and send-blocked series of the
/// fused edge stay at zero.
pub struct Inline<P: Processor, D> {
    processor: P,
    /// The feeding stage's, for its `sent` count (an edge would count it).
    from: StageMetrics,
    metrics: StageMetrics,
    output: D,
    session: Arc<SessionShared>,
    out: Vec<P::Out>,
}

impl<P: Processor, D: Downstream<P::Out>> Inline<P, D> {
    /// `from` are the feeding stage's metrics, `metrics` the processor's.
    pub fn new(
        processor: P,
        from: StageMetrics,
        metrics: StageMetrics,
        output: D,
        session: Arc<SessionShared>,
    ) -> Inline<P, D> {
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

impl<P: Processor, D: Downstream<P::Out>> Downstream<P::In> for Inline<P, D> {
    async fn send_data(&mut self, item: P::In) -> Result<(), EdgeError> {
        self.from.sent(1);
        self.metrics.received(1);
        if let Err(error) = process_timed(&mut self.processor, item, &mut self.out, &self.metrics) {
            stage_failed(&error, &self.metrics, &self.session);
            self.out.clear();
            // The session has failed and says why; the caller only needs to stop.
            return Err(EdgeError::Closed);
        }
        forward(
            &mut self.out,
            &mut self.output,
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
            &mut self.output,
            &self.metrics,
            &self.session,
            true,
        )
        .await
    }

    async fn finish(&mut self) {
        self.processor.flush(&mut self.out);
        // A failure only means downstream already ended; nothing more to do.
        if forward(
            &mut self.out,
            &mut self.output,
            &self.metrics,
            &self.session,
            false,
        )
        .await
        .is_ok()
        {
            self.output.finish().await;
        }
    }

    fn has_room(&mut self) -> bool {
        self.output.has_room()
    }

    fn ready(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        self.output.ready()
    }

    fn has_pending(&self) -> bool {
        self.output.has_pending()
    }

    fn send_pending(&mut self) -> impl Future<Output = Result<(), EdgeError>> + Send {
        self.output.send_pending()
    }
}

/// Send everything in `out` (and a marker if asked) downstream.
async fn forward<T, D: Downstream<T>>(
    out: &mut Vec<T>,
    output: &mut D,
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

    /// The end of the line: what reached it, in order (`None` for a marker).
    #[derive(Default)]
    struct Collect(Vec<Option<u64>>);
    impl Downstream<AudioFrame> for Collect {
        async fn send_data(&mut self, item: AudioFrame) -> Result<(), EdgeError> {
            self.0.push(Some(item.start_sample));
            Ok(())
        }
        async fn send_finalize(&mut self) -> Result<(), EdgeError> {
            self.0.push(None);
            Ok(())
        }
        async fn finish(&mut self) {}
    }

    #[tokio::test]
    async fn inline_stages_run_in_sequence_with_flush_passing_through() {
        let metrics = |stage| StageMetrics::new(stage);
        let session = Arc::new(SessionShared::new());
        let s = || Arc::clone(&session);
        let last = Inline::new(
            Pairs::default(),
            metrics("resample"),
            metrics("vad"),
            Collect::default(),
            s(),
        );
        let middle = Inline::new(Twice, metrics("decode"), metrics("resample"), last, s());
        let mut first = Inline::new(
            Pairs::default(),
            metrics("ingress"),
            metrics("decode"),
            middle,
            s(),
        );
        first.send_data(frame(1)).await.unwrap();
        assert!(
            first.output.output.output.0.is_empty(),
            "the first stage holds frame 1"
        );
        first.send_data(frame(2)).await.unwrap();
        // 1 and 2 released, doubled to 1 1 2 2, paired by the last stage.
        assert_eq!(
            first.output.output.output.0,
            [Some(1), Some(1), Some(2), Some(2)]
        );
        first.send_data(frame(3)).await.unwrap();
        // A marker: each stage flushes before passing it on, so the held frame comes out
        // (doubled, and the last stage's held copy too) ahead of it.
        first.send_finalize().await.unwrap();
        assert_eq!(first.output.output.output.0[4..], [Some(3), Some(3), None]);
        first.send_data(frame(4)).await.unwrap();
        first.finish().await;
        assert_eq!(first.output.output.output.0[7..], [Some(4), Some(4)]);
    }
}
