//! STT: batches in, transcripts out, through one engine stream per session.
//!
//! Consumes [`AudioBatch`]es and `Finalize` markers and hands them to the session's
//! [`EngineAudio`] as soon as the engine has room (an engine without room is the "busy" signal
//! the batch stage accumulates behind). With its edge at capacity 0 (the default) it does so in
//! the task that feeds it ([`Stt`]); otherwise in a task of its own behind a queue ([`run`]).
//! Produces the engine's [`EngineResult`]s, in order, for egress ([`relay`], a task woken per
//! result). At end of input it drops the engine's input, which half-closes the stream; the relay
//! goes on until the engine has sent its last finals. An engine error ends the session with the
//! engine's code.

pub mod config;
pub mod google;
pub mod whisper;

use std::sync::Arc;

use pipeline::edge::{EdgeRx, EdgeTx, Room, wait_for_room};
use pipeline::metrics::{ErrorKind, StageMetrics};
use pipeline::processor::{Downstream, on_send_error};
use pipeline::session::close_code;
use pipeline::{
    AudioBatch, AudioLength, EdgeError, EdgeSettings, EngineAudio, EngineInput, EngineResult,
    EngineResults, Flow, SessionError, SessionShared, SttError, TrySendError,
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

/// The STT stage run in the task that feeds it (its edge at capacity 0).
pub struct Stt {
    audio: EngineAudio,
    /// The feeding stage's (batch), for its `sent` count and, under the edge's policy, drops.
    from: StageMetrics,
    metrics: StageMetrics,
    /// The edge's send timeout and overflow policy, for waiting on a busy engine.
    settings: EdgeSettings,
    session: Arc<SessionShared>,
}

impl Stt {
    pub fn new(
        audio: EngineAudio,
        from: StageMetrics,
        metrics: StageMetrics,
        settings: EdgeSettings,
        session: Arc<SessionShared>,
    ) -> Stt {
        Stt {
            audio,
            from,
            metrics,
            settings,
            session,
        }
    }

    async fn hand_over(&mut self, input: EngineInput) -> Result<(), EdgeError> {
        let audio_us = match &input {
            EngineInput::Audio(batch) => batch.audio_us(),
            EngineInput::Finalize => 0,
        };
        let reliable = matches!(input, EngineInput::Finalize);
        let Some(input) = self.try_take(input)? else {
            return Ok(());
        };
        // Boxed: waiting takes a timer and more, which every frame's future (and so every
        // session's task) would otherwise carry for a path that is rare.
        Box::pin(self.wait_to_hand_over(input, audio_us, reliable)).await
    }

    /// The engine is busy: wait as an edge would, under the edge's timeout and policy.
    async fn wait_to_hand_over(
        &mut self,
        mut input: EngineInput,
        audio_us: u64,
        reliable: bool,
    ) -> Result<(), EdgeError> {
        loop {
            let audio = &mut self.audio;
            let ready = async { audio.ready().await.map_err(|_| EdgeError::Closed) };
            let room = wait_for_room(
                &self.settings,
                &self.from,
                &self.session,
                audio_us,
                reliable,
                ready,
            )
            .await;
            match room {
                Ok(Room::Ready) => {}
                Ok(Room::Dropped) => return Ok(()),
                Err(error) => {
                    on_send_error(&error, &self.from, &self.session);
                    return Err(error);
                }
            }
            match self.try_take(input)? {
                Some(back) => input = back,
                None => return Ok(()),
            }
        }
    }

    /// Give `input` to the engine if it has room now (counted as sent); `Some` hands it back
    /// when the engine is busy.
    fn try_take(&mut self, input: EngineInput) -> Result<Option<EngineInput>, EdgeError> {
        match try_hand_over(&mut self.audio, input, &self.metrics) {
            Ok(()) => {
                self.counted();
                Ok(None)
            }
            Err(TrySendError::Full(input)) => Ok(Some(input)),
            Err(TrySendError::Closed) => Err(EdgeError::Closed),
        }
    }

    fn counted(&self) {
        self.from.sent(1);
        self.metrics.received(1);
    }
}

/// Give `input` to the engine if it has room, timed as the stage's processing: for an engine
/// that takes audio in the caller's task (Google), that is its buffering and request encoding.
fn try_hand_over(
    audio: &mut EngineAudio,
    input: EngineInput,
    metrics: &StageMetrics,
) -> Result<(), TrySendError> {
    let started = Instant::now();
    let handed = audio.try_send(input);
    if handed.is_ok() {
        metrics.processing(started.elapsed());
    }
    handed
}

impl Downstream<AudioBatch> for Stt {
    async fn send_data(&mut self, batch: AudioBatch) -> Result<(), EdgeError> {
        self.hand_over(EngineInput::Audio(batch)).await
    }

    async fn send_finalize(&mut self) -> Result<(), EdgeError> {
        self.hand_over(EngineInput::Finalize).await
    }

    /// Nothing held: dropping the stage drops the engine's input, which ends it.
    async fn finish(&mut self) {}

    fn has_room(&mut self) -> bool {
        self.audio.has_room()
    }

    async fn offer(&mut self, batch: AudioBatch) -> Result<Option<AudioBatch>, EdgeError> {
        match self.try_take(EngineInput::Audio(batch))? {
            None => Ok(None),
            Some(EngineInput::Audio(batch)) => Ok(Some(batch)),
            // An engine hands back what it was given; anything else is a broken engine.
            Some(EngineInput::Finalize) => Err(EdgeError::Closed),
        }
    }

    async fn ready(&mut self) -> Result<(), EdgeError> {
        self.audio.ready().await.map_err(|_| EdgeError::Closed)
    }
}

/// The STT stage behind its own queue: hand each input to the engine, waiting while it is busy,
/// until the input ends (then the engine's input is dropped) or the engine has ended.
pub async fn run(
    mut audio: EngineAudio,
    mut input: EdgeRx<Flow<AudioBatch>>,
    _session: Arc<SessionShared>,
) {
    let metrics = input.metrics().clone();
    while let Some(flow) = input.recv().await {
        let item = match flow {
            Flow::Data(batch) => EngineInput::Audio(batch),
            Flow::Finalize => EngineInput::Finalize,
        };
        let mut item = Some(item);
        while let Some(next) = item.take() {
            match try_hand_over(&mut audio, next, &metrics) {
                Ok(()) => {}
                Err(TrySendError::Full(back)) if audio.ready().await.is_ok() => item = Some(back),
                // The engine ended its stream early; the relay reports why.
                Err(_) => {
                    input.close();
                    return;
                }
            }
        }
    }
}

/// The engine failed: count it under the stt stage and end the session with its error.
pub(crate) fn engine_failed(error: &SttError, metrics: &StageMetrics, session: &SessionShared) {
    tracing::warn!(%error, "STT engine failed; ending the session.");
    metrics.error(ErrorKind::Engine);
    session.fail(session_error(error));
}

/// Relay the engine's results to egress until the engine has sent its last one, or fails:
/// then the session ends with the engine's error. `metrics` are the stt stage's.
// Not an `async fn`, which would keep its arguments twice in the task (see `Egress::run`).
#[allow(clippy::manual_async_fn)]
pub fn relay(
    mut results: EngineResults,
    output: EdgeTx<Box<EngineResult>>,
    metrics: StageMetrics,
    session: Arc<SessionShared>,
) -> impl Future<Output = ()> {
    async move {
        // Boxed as the engine queued it: the queue to egress holds pointers too.
        while let Some(result) = results.recv_boxed().await {
            match result {
                Ok(result) => {
                    if let Err(error) = output.send(result).await {
                        on_send_error(&error, &metrics, &session);
                        return;
                    }
                }
                Err(error) => {
                    engine_failed(&error, &metrics, &session);
                    return;
                }
            }
        }
    }
}
