//! Ingress: WebSocket messages in, encoded audio payloads and finalize markers out.
//!
//! Consumes the read half of a session's socket; produces [`Payload`]s (base64 content sliced
//! out of the JSON frame without copying, or binary frames) and `Finalize` markers for decode.
//! Keeps only the session's format (to estimate payload durations for drop reports). A `stop`,
//! shutdown, or the end of the socket ends it; ending drops its output, so the rest of the graph
//! flushes and finishes. Bad input fails the session with the documented code; it never panics.
//! While decode's queue is full, ingress stops reading: backpressure reaches the client's TCP
//! socket. With a maximum burst set, it also stops reading while the client is further ahead of
//! real time than the burst allows, so a client cannot push audio faster than it is spoken.

mod frames;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use pipeline::audio::PayloadData;
use pipeline::metrics::{ErrorKind, StageMetrics};
use pipeline::processor::{Downstream, on_send_error};
use pipeline::protocol::{ClientMessage, ProtocolError, parse};
use pipeline::rare::Rare;
use pipeline::session::close_code;
use pipeline::{AudioFormat, Encoding, Flow, Payload, SessionError, SessionShared};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub use frames::FrameReader;

/// Audio assumed per Opus packet when reporting drops before decode.
const OPUS_PACKET_US: u64 = 20_000;

/// Why ingress stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressEnd {
    /// The client sent `stop`: drain and close normally.
    Stopped,
    /// The server is shutting down: drain and close with 1001.
    Shutdown,
    /// The socket closed or broke: nobody to send results to.
    ClientGone,
    /// The client sent a close frame: egress answers it (the session has its code), then the
    /// session ends.
    ClientClosed,
    /// Bad input or a full queue; the session has recorded the error.
    Failed,
}

pub struct Ingress {
    format: AudioFormat,
    idle_timeout: Duration,
    session: Arc<SessionShared>,
    metrics: StageMetrics,
    /// Audio a client may send ahead of real time before ingress stops reading; `None`: any.
    max_burst: Option<Duration>,
    /// Audio received so far, in microseconds (estimated as for [`Payload::audio_us`]).
    received_us: AtomicU64,
}

impl Ingress {
    pub fn new(
        format: AudioFormat,
        idle_timeout: Duration,
        session: Arc<SessionShared>,
        metrics: StageMetrics,
    ) -> Ingress {
        Ingress {
            format,
            idle_timeout,
            session,
            metrics,
            max_burst: None,
            received_us: AtomicU64::new(0),
        }
    }

    /// Pace the client to real time plus `max_burst` of audio (`None`: no pacing).
    pub fn with_max_burst(mut self, max_burst: Option<Duration>) -> Ingress {
        self.max_burst = max_burst;
        self
    }

    /// How long to stop reading so the client is at most `max_burst` ahead of real time.
    fn ahead_of_real_time(&self, began: Instant) -> Option<Duration> {
        let burst = self.max_burst?;
        let received = Duration::from_micros(self.received_us.load(Ordering::Relaxed));
        received.checked_sub(began.elapsed() + burst)
    }

    /// Read the socket until `stop`, shutdown, failure or disconnect. `first` is a message the
    /// caller already read (the one that started the session), handled before the socket.
    ///
    /// `output` is decode's input edge, or decode itself ([`Inline`](pipeline::processor::Inline)) when that edge has
    /// capacity 0; after a `stop` or at shutdown what it holds is flushed downstream.
    pub async fn run<S, D>(
        &self,
        socket: S,
        first: Option<Message>,
        mut output: D,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> IngressEnd
    where
        S: Stream<Item = Result<Message, WsError>> + Unpin,
        D: Downstream<Payload>,
    {
        let end = self.read(socket, first, &mut output, shutdown).await;
        if matches!(end, IngressEnd::Stopped | IngressEnd::Shutdown) {
            output.finish().await;
        }
        end
    }

    async fn read<S, D>(
        &self,
        mut socket: S,
        first: Option<Message>,
        output: &mut D,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> IngressEnd
    where
        S: Stream<Item = Result<Message, WsError>> + Unpin,
        D: Downstream<Payload>,
    {
        // Polled only when they fire, not at every frame (see `Rare`).
        let mut shutdown = Rare::new(shutdown);
        let began = Instant::now();
        if let Some(message) = first
            && let Some(end) = self.handle(message, Instant::now(), output).await
        {
            return end;
        }
        // One timer for the whole session, re-armed only when it fires: per-message resets
        // would cost a timer-wheel update for every frame.
        let mut last_message = Instant::now();
        let mut idle = Rare::new(sleep_until(last_message + self.idle_timeout));
        loop {
            let message = tokio::select! {
                biased;
                () = &mut shutdown => {
                    self.session.set_going_away();
                    return IngressEnd::Shutdown;
                }
                () = &mut idle => {
                    let deadline = last_message + self.idle_timeout;
                    if Instant::now() < deadline {
                        idle.inner_mut().reset(deadline);
                        continue;
                    }
                    return self.fail(SessionError {
                        code: "idle_timeout",
                        message: format!("no message for {} ms", self.idle_timeout.as_millis()),
                        close_code: close_code::POLICY_VIOLATION,
                    }, ErrorKind::Protocol);
                }
                // A stage run in this task holds audio until the one after it has room.
                sent = output.send_pending(), if output.has_pending() => {
                    if let Err(error) = sent {
                        on_send_error(&error, &self.metrics, &self.session);
                        return IngressEnd::Failed;
                    }
                    continue;
                }
                message = socket.next() => message,
            };
            let now = Instant::now();
            last_message = now;
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(WsError::Capacity(error))) => {
                    return self.fail(
                        SessionError {
                            code: "message_too_big",
                            message: error.to_string(),
                            close_code: close_code::MESSAGE_TOO_BIG,
                        },
                        ErrorKind::Protocol,
                    );
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "Socket read failed.");
                    self.metrics.error(ErrorKind::Socket);
                    return IngressEnd::ClientGone;
                }
                None => return IngressEnd::ClientGone,
            };
            if let Some(end) = self.handle(message, now, output).await {
                return end;
            }
            if let Some(wait) = self.ahead_of_real_time(began) {
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        self.session.set_going_away();
                        return IngressEnd::Shutdown;
                    }
                    // The client was not idle: it was held back.
                    () = tokio::time::sleep(wait) => last_message = Instant::now(),
                }
            }
        }
    }

    /// Handle one message, read at `started`; `Some` when ingress is done. (The read loop's
    /// clock reading serves both its idle timer and the processing time: one fewer per frame.)
    async fn handle<D: Downstream<Payload>>(
        &self,
        message: Message,
        started: Instant,
        output: &mut D,
    ) -> Option<IngressEnd> {
        self.metrics.received(1);
        let flow = match message {
            Message::Text(text) => {
                // Already checked to be UTF-8 (the frame reader did): parsed in place.
                let bytes: &Bytes = text.as_ref();
                match parse(text.as_str()) {
                    Ok(ClientMessage::Audio { content, .. }) => {
                        let base64 = if bytes.as_ptr_range().contains(&content.as_ptr()) {
                            // The usual case: slice the frame rather than copy the content.
                            bytes.slice_ref(content.as_bytes())
                        } else {
                            Bytes::from(content.into_owned())
                        };
                        let audio_us = self.estimate_us(base64.len() / 4 * 3);
                        Flow::Data(Payload {
                            data: PayloadData::Base64(base64),
                            audio_us,
                        })
                    }
                    Ok(ClientMessage::Finalize) => Flow::Finalize,
                    Ok(ClientMessage::Stop) => return Some(IngressEnd::Stopped),
                    Ok(ClientMessage::KeepAlive) => return None,
                    Ok(ClientMessage::Start(_)) => {
                        let error = ProtocolError::Violation(
                            "start must be the first message of a session".into(),
                        );
                        return Some(self.fail(error.to_session_error(), ErrorKind::Protocol));
                    }
                    Err(error) => {
                        return Some(self.fail(error.to_session_error(), ErrorKind::Protocol));
                    }
                }
            }
            Message::Binary(bytes) => {
                let audio_us = self.estimate_us(bytes.len());
                Flow::Data(Payload {
                    data: PayloadData::Binary(bytes),
                    audio_us,
                })
            }
            Message::Close(frame) => {
                // Echoed back, unless it is one an endpoint may not send (1005, 1006, …).
                let code = frame
                    .map(|f| f.code)
                    .filter(|code| code.is_allowed())
                    .map_or(close_code::NORMAL, u16::from);
                self.session.set_client_closed(code);
                return Some(IngressEnd::ClientClosed);
            }
            // Egress, which owns the socket's write side, answers.
            Message::Ping(payload) => {
                self.session.queue_pong(payload);
                return None;
            }
            Message::Pong(_) | Message::Frame(_) => return None,
        };
        self.metrics.processing(started.elapsed());
        let sent = match flow {
            Flow::Data(payload) => {
                self.received_us
                    .fetch_add(payload.audio_us, Ordering::Relaxed);
                output.send_data(payload).await
            }
            Flow::Finalize => output.send_finalize().await,
        };
        match sent {
            Ok(()) => None,
            Err(error) => {
                on_send_error(&error, &self.metrics, &self.session);
                Some(IngressEnd::Failed)
            }
        }
    }

    fn estimate_us(&self, len: usize) -> u64 {
        match self.format.encoding {
            Encoding::Opus => OPUS_PACKET_US,
            _ => self.format.bytes_to_us(len).unwrap_or(0),
        }
    }

    fn fail(&self, error: SessionError, kind: ErrorKind) -> IngressEnd {
        tracing::info!(code = error.code, message = %error.message, "Rejected client input.");
        self.metrics.error(kind);
        self.session.fail(error);
        IngressEnd::Failed
    }
}
