//! Synchronous stages and the adapter that runs one as a task.
//!
//! Pure transforms (decode, resample, VAD) implement [`Processor`]: no timers, no I/O, easy to
//! test synchronously and to benchmark. [`run_processor`] moves items between edges around it,
//! records per-item processing time, forwards `Finalize` markers after flushing, and flushes at
//! end of input before dropping its output so shutdown follows the graph.

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
                let started = Instant::now();
                let result = processor.process(item, &mut out);
                metrics.processing.record(started.elapsed().as_secs_f64());
                if let Err(error) = result {
                    tracing::warn!(stage = metrics.stage, %error, "Stage failed; ending the session.");
                    metrics.error(error.kind());
                    session.fail(error.to_session_error());
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
