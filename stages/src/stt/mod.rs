//! STT: batches in, transcripts out, through one engine stream per session.
//!
//! Consumes [`AudioBatch`]es and `Finalize` markers and hands them to the session's
//! [`SttStream`] as soon as the engine has room (its small input channel is the "busy" signal the
//! batch stage accumulates behind); produces the engine's [`EngineResult`]s, in order, for
//! egress. At end of input it half-closes the stream and keeps relaying until the engine has sent
//! its last finals. An engine error ends the session with the engine's code.

pub mod config;
pub mod google;
pub mod whisper;

use std::sync::Arc;

use pipeline::edge::{EdgeRx, EdgeTx};
use pipeline::metrics::ErrorKind;
use pipeline::processor::on_send_error;
use pipeline::session::close_code;
use pipeline::{
    AudioBatch, EngineInput, EngineResult, Flow, SessionError, SessionShared, SttError, SttStream,
};
use tokio::time::Instant;

/// How an engine error looks to the client.
pub fn session_error(error: &SttError) -> SessionError {
    match error {
        SttError::Overloaded(message) => SessionError {
            code: "overloaded",
            message: message.clone(),
            close_code: close_code::TRY_AGAIN_LATER,
        },
        SttError::Unavailable(message) => SessionError {
            code: "engine_unavailable",
            message: message.clone(),
            close_code: close_code::TRY_AGAIN_LATER,
        },
        SttError::Rejected { code, message } => SessionError {
            code: "engine_error",
            message: format!("{code}: {message}"),
            close_code: close_code::INTERNAL_ERROR,
        },
    }
}

/// Run the STT stage until the engine has sent its last result or the session fails.
pub async fn run(
    stream: SttStream,
    mut input: EdgeRx<Flow<AudioBatch>>,
    output: EdgeTx<EngineResult>,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let SttStream { audio, mut results } = stream;
    let mut audio = Some(audio);
    let mut pending: Option<EngineInput> = None;
    loop {
        let mut half_close = false;
        tokio::select! {
            biased;
            permit = async { audio.as_ref().expect("open while input is").reserve().await },
                if pending.is_some() =>
            {
                match permit {
                    Ok(permit) => permit.send(pending.take().expect("checked")),
                    // The engine ended its stream early; its results channel says why.
                    Err(_) => pending = None,
                }
            }
            result = results.recv() => match result {
                Some(Ok(result)) => {
                    let started = Instant::now();
                    let sent = output.send(result).await;
                    metrics.processing.record(started.elapsed().as_secs_f64());
                    if let Err(error) = sent {
                        on_send_error(&error, &metrics, &session);
                        input.close();
                        return;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "STT engine failed; ending the session.");
                    metrics.error(ErrorKind::Engine);
                    session.fail(session_error(&error));
                    input.close();
                    return;
                }
                // The engine has sent everything.
                None => return,
            },
            flow = input.recv(), if pending.is_none() && audio.is_some() => match flow {
                Some(Flow::Data(batch)) => pending = Some(EngineInput::Audio(batch)),
                Some(Flow::Finalize) => pending = Some(EngineInput::Finalize),
                // End of input: half-close; the engine flushes and closes its results.
                None => half_close = true,
            },
        }
        if half_close {
            audio = None;
        }
    }
}
