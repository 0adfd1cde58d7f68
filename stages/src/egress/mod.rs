//! Egress: transcripts in, JSON text frames out on the session's socket.
//!
//! Consumes [`EngineResult`]s in order and writes `transcript` messages (times in milliseconds
//! on the session's audio clock); writes `ready` first, a `warning` whenever audio was dropped
//! since the last one, and at the end either `closed` + close 1000 (1001 when the server is
//! shutting down) or, if the session failed, `error` + the error's close code. Holds nothing
//! back. A write that does not complete within the write timeout means the client is gone or
//! too slow; the session ends.

use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt};
use pipeline::audio::samples_to_ms;
use pipeline::edge::EdgeRx;
use pipeline::metrics::{ErrorKind, StageMetrics, sessions};
use pipeline::protocol::{EffectiveConfig, ServerMessage};
use pipeline::session::close_code;
use pipeline::{EngineResult, EngineResults, SessionShared};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How a session's egress ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every result was delivered and the socket closed normally.
    Completed,
    /// The session failed and the client was told.
    Failed,
    /// The client could not be written to.
    ClientGone,
}

/// Where egress takes results from.
pub enum Results {
    /// A queue (the egress edge), fed by the stt stage's relay task.
    Queued(EdgeRx<Box<EngineResult>>),
    /// The engine's own result queue (the egress edge at capacity 0): no relay task and no
    /// second queue per session. An engine's failure is handled here, as the relay would.
    Engine {
        results: EngineResults,
        stt: StageMetrics,
        egress: StageMetrics,
    },
}

impl Results {
    /// Egress's metrics.
    fn metrics(&self) -> &StageMetrics {
        match self {
            Results::Queued(input) => input.metrics(),
            Results::Engine { egress, .. } => egress,
        }
    }

    /// The next result; `None` once the engine has sent its last one or failed (then the
    /// session holds its error).
    async fn recv(&mut self, session: &SessionShared) -> Option<Box<EngineResult>> {
        match self {
            Results::Queued(input) => input.recv().await,
            Results::Engine {
                results,
                stt,
                egress,
            } => match results.recv_boxed().await? {
                Ok(result) => {
                    stt.sent(1);
                    egress.received(1);
                    Some(result)
                }
                Err(error) => {
                    crate::stt::engine_failed(&error, stt, session);
                    None
                }
            },
        }
    }

    /// Stop taking results: the engine (or the relay) sees its output closed.
    fn close(&mut self) {
        match self {
            Results::Queued(input) => input.close(),
            Results::Engine { results, .. } => results.close(),
        }
    }
}

pub struct Egress<S> {
    sink: S,
    session_id: String,
    config: EffectiveConfig,
    write_timeout: Duration,
    session: Arc<SessionShared>,
    reported_us: u64,
    retry_after_ms: u64,
    interim: pipeline::metrics::Counter,
    finals: pipeline::metrics::Counter,
}

struct WriteFailed;

impl<S> Egress<S>
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    pub fn new(
        sink: S,
        session_id: String,
        config: EffectiveConfig,
        write_timeout: Duration,
        session: Arc<SessionShared>,
    ) -> Egress<S> {
        Egress {
            sink,
            session_id,
            config,
            write_timeout,
            session,
            reported_us: 0,
            retry_after_ms: 1_000,
            interim: sessions::transcripts(false),
            finals: sessions::transcripts(true),
        }
    }

    /// The wait suggested with errors that close with 1013 (try again later).
    pub fn with_retry_after(mut self, retry_after: Duration) -> Egress<S> {
        self.retry_after_ms = retry_after.as_millis() as u64;
        self
    }

    /// Run until the transcripts end or the session fails.
    // Not an `async fn`: that would keep `self` and `input` twice in the task (as arguments and
    // as the body's bindings; rustc does not overlap the two), hundreds of bytes per session.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, mut input: Results) -> impl Future<Output = Outcome> + use<S> {
        async move {
            let metrics = input.metrics().clone();
            let ready = ServerMessage::Ready {
                session_id: &self.session_id,
                config: &self.config,
            }
            .to_json();
            if self.write(ready).await.is_err() {
                return Outcome::ClientGone;
            }
            metrics.sent(1);
            loop {
                let step = tokio::select! {
                    biased;
                    () = self.session.changed() => self.report().await,
                    result = input.recv(&self.session) => match result {
                        Some(result) => {
                            let started = Instant::now();
                            let json = self.transcript(&result);
                            metrics.processing(started.elapsed());
                            let written = self.write(json).await;
                            if written.is_ok() {
                                metrics.sent(1);
                                if result.is_final { self.finals.increment(1) } else { self.interim.increment(1) }
                            }
                            written.map(|()| None)
                        }
                        None => break,
                    },
                };
                match step {
                    Ok(None) => {}
                    Ok(Some(outcome)) => {
                        input.close();
                        return outcome;
                    }
                    Err(WriteFailed) => {
                        metrics.error(ErrorKind::Socket);
                        input.close();
                        return Outcome::ClientGone;
                    }
                }
            }
            // Input ended: either every stage finished, or one failed and closed its output.
            match self.report().await {
                Ok(Some(outcome)) => outcome,
                Ok(None) => {
                    let (reason, code) = if self.session.time_limit_reached() {
                        ("max_duration", close_code::TRY_AGAIN_LATER)
                    } else if self.session.going_away() {
                        ("shutdown", close_code::GOING_AWAY)
                    } else {
                        ("stop", close_code::NORMAL)
                    };
                    let closed = ServerMessage::Closed { reason }.to_json();
                    if self.write(closed).await.is_err() || self.close(code, reason).await.is_err()
                    {
                        return Outcome::ClientGone;
                    }
                    Outcome::Completed
                }
                Err(WriteFailed) => Outcome::ClientGone,
            }
        }
    }

    /// Tell the client about new drops and a fatal error; `Some` when the session is over.
    async fn report(&mut self) -> Result<Option<Outcome>, WriteFailed> {
        if let Some(payload) = self.session.take_pong() {
            self.send(Message::Pong(payload)).await?;
        }
        if let Some(code) = self.session.client_closed() {
            // The client is done: answer its close and send nothing more.
            self.close(code, "").await?;
            return Ok(Some(Outcome::ClientGone));
        }
        let (_, dropped_us) = self.session.drops();
        if dropped_us > self.reported_us {
            let dropped_ms = (dropped_us - self.reported_us) / 1_000;
            self.reported_us = dropped_us;
            sessions::client_warning("audio_dropped");
            let warning = ServerMessage::Warning {
                code: "audio_dropped",
                message: format!(
                    "{dropped_ms} ms of audio were dropped because the server could not keep up"
                ),
                dropped_ms: Some(dropped_ms),
            };
            self.write(warning.to_json()).await?;
        }
        let Some(error) = self.session.fatal() else {
            return Ok(None);
        };
        sessions::client_error(error.code);
        let message = ServerMessage::Error {
            code: error.code,
            message: &error.message,
            retry_after_ms: (error.close_code == close_code::TRY_AGAIN_LATER)
                .then_some(self.retry_after_ms),
        }
        .to_json();
        self.write(message).await?;
        self.close(error.close_code, error.code).await?;
        Ok(Some(Outcome::Failed))
    }

    fn transcript(&self, result: &EngineResult) -> String {
        let rate = self.config.engine_sample_rate_hertz;
        ServerMessage::Transcript {
            audio_id: &self.config.audio_id,
            is_final: result.is_final,
            transcript: &result.transcript,
            stability: result.stability,
            confidence: result.confidence,
            start_ms: samples_to_ms(result.start_sample, rate),
            end_ms: samples_to_ms(result.end_sample, rate),
        }
        .to_json()
    }

    async fn write(&mut self, text: String) -> Result<(), WriteFailed> {
        self.send(Message::text(text)).await
    }

    async fn send(&mut self, message: Message) -> Result<(), WriteFailed> {
        match timeout(self.write_timeout, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::debug!(%error, "Socket write failed.");
                Err(WriteFailed)
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.write_timeout.as_millis() as u64,
                    "Client too slow to read; ending the session."
                );
                Err(WriteFailed)
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &str) -> Result<(), WriteFailed> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        match timeout(
            self.write_timeout,
            self.sink.send(Message::Close(Some(frame))),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            _ => Err(WriteFailed),
        }
    }
}
