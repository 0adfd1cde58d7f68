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

use std::collections::VecDeque;
use std::sync::Arc;

use pipeline::edge::{EdgeRx, EdgeTx};
use pipeline::metrics::{ErrorKind, Histogram};
use pipeline::processor::on_send_error;
use pipeline::session::close_code;
use pipeline::{
    AudioBatch, EngineInput, EngineResult, Flow, SessionError, SessionShared, SttError, SttStream,
};
use tokio::time::{Duration, Instant};

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

/// When audio reached the engine, to time its results: first result, and the latency of each
/// final from the moment the last audio it covers was handed over.
struct LatencyClock {
    first_audio: Option<Instant>,
    first_result: Option<Histogram>,
    final_latency: Histogram,
    /// `(end_sample, handed_over)` of the batches not yet covered by a final, oldest first.
    sent: VecDeque<(u64, Instant)>,
}

/// Batches remembered between finals; older ones are forgotten (a final that far back is timed
/// from a later batch, so its latency reads low rather than the memory growing).
const SENT_REMEMBERED: usize = 4096;

impl LatencyClock {
    fn new(engine: &'static str) -> LatencyClock {
        LatencyClock {
            first_audio: None,
            first_result: Some(pipeline::metrics::engine::first_result(engine)),
            final_latency: pipeline::metrics::engine::final_latency(engine),
            sent: VecDeque::new(),
        }
    }

    fn handed_over(&mut self, input: &EngineInput) {
        if let EngineInput::Audio(batch) = input {
            let now = Instant::now();
            self.first_audio.get_or_insert(now);
            if self.sent.len() == SENT_REMEMBERED {
                self.sent.pop_front();
            }
            self.sent.push_back((batch.end_sample(), now));
        }
    }

    /// Time `result`; for a final, its latency (also recorded).
    fn received(&mut self, result: &EngineResult) -> Option<Duration> {
        let now = Instant::now();
        if let Some(first_audio) = self.first_audio
            && let Some(histogram) = self.first_result.take()
        {
            histogram.record(now.saturating_duration_since(first_audio).as_secs_f64());
        }
        if !result.is_final {
            return None;
        }
        // The batch holding the final's last sample; everything up to it is now covered.
        let index = self
            .sent
            .iter()
            .position(|&(end, _)| end >= result.end_sample);
        let Some(index) = index else {
            self.sent.clear();
            return None;
        };
        let latency = now.saturating_duration_since(self.sent[index].1);
        self.final_latency.record(latency.as_secs_f64());
        let covered = if self.sent[index].0 == result.end_sample {
            index + 1
        } else {
            index
        };
        self.sent.drain(..covered);
        Some(latency)
    }
}

/// Run the STT stage until the engine has sent its last result or the session fails.
/// `engine` is the engine's name, for the latency metrics' `engine` label.
pub async fn run(
    stream: SttStream,
    engine: &'static str,
    mut input: EdgeRx<Flow<AudioBatch>>,
    output: EdgeTx<EngineResult>,
    session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    let mut clock = LatencyClock::new(engine);
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
                    Ok(permit) => {
                        let input = pending.take().expect("checked");
                        clock.handed_over(&input);
                        permit.send(input);
                    }
                    // The engine ended its stream early; its results channel says why.
                    Err(_) => pending = None,
                }
            }
            result = results.recv() => match result {
                Some(Ok(result)) => {
                    clock.received(&result);
                    let started = Instant::now();
                    let sent = output.send(result).await;
                    metrics.processing(started.elapsed());
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

#[cfg(test)]
mod tests;
