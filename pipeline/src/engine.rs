//! The speech-to-text engine seam.
//!
//! The `stt` stage opens one [`SttStream`] per session and drives it: audio and finalize
//! requests go in through its [`EngineAudio`] (not ready means the engine is busy, which is when
//! the batch stage accumulates), results come out in order. Dropping the `EngineAudio`
//! half-closes the stream; the engine then sends its last finals and closes the results channel.
//!
//! `EngineAudio` is a sink the engine implements, not a queue: an engine that keeps its own
//! buffer (Google) takes each batch in the caller's task, with no task wake-up per batch; one
//! that wants a queue and a task uses [`EngineAudio::channel`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tokio_util::sync::PollSender;

use crate::metrics::Histogram;

use crate::AudioLength;
use crate::audio::AudioBatch;

/// What the session asks of the engine, fixed when the stream opens.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Rate of the LINEAR16 audio the engine receives.
    pub sample_rate_hz: u32,
    pub language_code: String,
    pub alternative_language_codes: Vec<String>,
    pub model: Option<String>,
    pub interim_results: bool,
    pub punctuation: bool,
    pub profanity_filter: bool,
    pub word_time_offsets: bool,
    pub phrase_hints: Vec<String>,
}

/// Input to an engine stream.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineInput {
    Audio(AudioBatch),
    /// Produce a final for everything sent so far.
    Finalize,
}

/// A transcript, positioned on the session's audio clock (samples at the engine's rate).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineResult {
    pub is_final: bool,
    pub transcript: String,
    pub stability: f32,
    pub confidence: f32,
    pub start_sample: u64,
    pub end_sample: u64,
}

impl AudioLength for EngineResult {
    fn audio_us(&self) -> u64 {
        0
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SttError {
    /// The engine cannot take another stream now; the client should retry (close 1013).
    #[error("engine at capacity: {0}")]
    Overloaded(String),
    /// The engine could not be reached or failed after retries.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the stream or its audio; retrying will not help. `code` is the
    /// engine's own status name (e.g. a gRPC code such as `INVALID_ARGUMENT`).
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
}

/// The engine stream has ended (its results say why); it takes no more input.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("the engine stream has ended")]
pub struct EngineClosed;

/// Why an engine did not take an input now.
#[derive(Debug)]
pub enum TrySendError {
    /// No room now: here is the input back; wait for [`EngineAudio::ready`].
    Full(EngineInput),
    /// The stream has ended.
    Closed,
}

/// An engine's input side, as the engine implements it.
pub trait AudioSink: Send {
    /// Ready when one more input would be taken now. Registers `cx` to be woken when that
    /// changes.
    ///
    /// # Errors
    /// [`EngineClosed`] once the stream has ended.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EngineClosed>>;

    /// Take `input` if there is room now. (One call per input on the hot path: no separate
    /// readiness check.)
    ///
    /// # Errors
    /// [`TrySendError::Full`] with the input when there is no room, [`TrySendError::Closed`]
    /// once the stream has ended.
    fn try_send(&mut self, input: EngineInput) -> Result<(), TrySendError>;
}

/// Where a session's audio enters its engine stream. Dropping it ends the input.
pub struct EngineAudio(Box<dyn AudioSink>);

impl EngineAudio {
    pub fn new(sink: impl AudioSink + 'static) -> EngineAudio {
        EngineAudio(Box::new(sink))
    }

    /// A queue of `capacity` inputs, for an engine that reads its input in a task of its own.
    pub fn channel(capacity: usize) -> (EngineAudio, mpsc::Receiver<EngineInput>) {
        let (tx, rx) = mpsc::channel(capacity);
        (EngineAudio::new(Channel(PollSender::new(tx))), rx)
    }

    /// See [`AudioSink::poll_ready`].
    ///
    /// # Errors
    /// [`EngineClosed`] once the stream has ended.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EngineClosed>> {
        self.0.poll_ready(cx)
    }

    /// Wait until one more input would be taken.
    ///
    /// # Errors
    /// [`EngineClosed`] once the stream has ended.
    pub async fn ready(&mut self) -> Result<(), EngineClosed> {
        poll_fn(|cx| self.0.poll_ready(cx)).await
    }

    /// Whether one more input would be taken now, without waiting.
    pub fn has_room(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.0.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// See [`AudioSink::try_send`].
    ///
    /// # Errors
    /// As [`AudioSink::try_send`].
    pub fn try_send(&mut self, input: EngineInput) -> Result<(), TrySendError> {
        self.0.try_send(input)
    }

    /// Hand `input` over, waiting for room.
    ///
    /// # Errors
    /// [`EngineClosed`] once the stream has ended.
    pub async fn send(&mut self, mut input: EngineInput) -> Result<(), EngineClosed> {
        loop {
            match self.0.try_send(input) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed) => return Err(EngineClosed),
                Err(TrySendError::Full(back)) => {
                    input = back;
                    self.ready().await?;
                }
            }
        }
    }
}

/// [`EngineAudio::channel`]'s sink.
struct Channel(PollSender<EngineInput>);

impl AudioSink for Channel {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EngineClosed>> {
        self.0.poll_reserve(cx).map_err(|_| EngineClosed)
    }

    fn try_send(&mut self, input: EngineInput) -> Result<(), TrySendError> {
        let mut cx = Context::from_waker(Waker::noop());
        match self.0.poll_reserve(&mut cx) {
            Poll::Ready(Ok(())) => self.0.send_item(input).map_err(|_| TrySendError::Closed),
            Poll::Ready(Err(_)) => Err(TrySendError::Closed),
            Poll::Pending => Err(TrySendError::Full(input)),
        }
    }
}

/// One open engine stream.
pub struct SttStream {
    pub audio: EngineAudio,
    pub results: EngineResults,
}

/// An engine stream's results, in order; the stream has ended when `recv` returns `None`.
///
/// Boxed on the queue: its blocks hold 32 items each whether or not they are used, so a
/// session keeps 32 pointers there rather than 32 results (~1.5 KiB less per block).
pub struct EngineResults(mpsc::Receiver<Queued>);

/// A result as queued: pointers either way.
type Queued = Result<Box<EngineResult>, Box<SttError>>;

impl EngineResults {
    /// A queue of `capacity` results.
    pub fn channel(capacity: usize) -> (ResultSender, EngineResults) {
        let (tx, rx) = mpsc::channel(capacity);
        (ResultSender(tx), EngineResults(rx))
    }

    pub async fn recv(&mut self) -> Option<Result<EngineResult, SttError>> {
        self.recv_boxed().await.map(|result| result.map(|r| *r))
    }

    /// [`EngineResults::recv`], the result still in the box it was queued in (for passing on).
    pub async fn recv_boxed(&mut self) -> Option<Result<Box<EngineResult>, SttError>> {
        self.0.recv().await.map(|result| result.map_err(|e| *e))
    }

    /// Take no more results: the engine's sends fail from now on, which ends its stream.
    pub fn close(&mut self) {
        self.0.close();
    }
}

/// Where an engine sends a stream's results.
#[derive(Clone)]
pub struct ResultSender(mpsc::Sender<Queued>);

impl ResultSender {
    /// Wait for room, then queue `result`.
    ///
    /// # Errors
    /// [`EngineClosed`] when the session no longer reads results.
    pub async fn send(&self, result: Result<EngineResult, SttError>) -> Result<(), EngineClosed> {
        self.0
            .send(result.map(Box::new).map_err(Box::new))
            .await
            .map_err(|_| EngineClosed)
    }

    /// Resolves once the session no longer reads results.
    pub async fn closed(&self) {
        self.0.closed().await;
    }
}

/// A speech-to-text engine shared by all sessions.
pub trait SttEngine: Send + Sync + 'static {
    /// Stable name, used as the `engine` metric label.
    fn name(&self) -> &'static str;

    /// Whether the VAD should keep non-speech from this engine (pre-roll and hangover kept).
    fn vad_gate(&self) -> bool;

    /// Whether new sessions can be served now (upstream reachable, model loaded). `/readyz`
    /// answers 503 while this is false, so a load balancer stops sending sessions here.
    fn ready(&self) -> bool {
        true
    }

    /// Open a stream. Called from within a tokio runtime; the engine spawns what it needs.
    ///
    /// # Errors
    /// [`SttError::Overloaded`] when shared capacity is exhausted, so the session is refused
    /// rather than everyone degraded.
    fn open(&self, config: StreamConfig) -> Result<SttStream, SttError>;
}

/// When audio reached an engine, to time its results (`voxflow_stt_first_result_seconds` and
/// `voxflow_stt_final_latency_seconds`): the first result from the first audio, each final
/// from the moment the last audio it covers was handed over. For engines with no closer
/// vantage point (Google times each upstream stream itself).
pub struct LatencyClock {
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
    pub fn new(engine: &'static str) -> LatencyClock {
        LatencyClock {
            first_audio: None,
            first_result: Some(crate::metrics::engine::first_result(engine)),
            final_latency: crate::metrics::engine::final_latency(engine),
            sent: VecDeque::new(),
        }
    }

    pub fn handed_over(&mut self, batch: &AudioBatch) {
        let now = Instant::now();
        self.first_audio.get_or_insert(now);
        if self.sent.len() == SENT_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((batch.end_sample(), now));
    }

    /// Time `result`; for a final, its latency (also recorded).
    pub fn received(&mut self, result: &EngineResult) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(start_sample: u64, samples: usize) -> AudioBatch {
        AudioBatch {
            samples: vec![0; samples],
            sample_rate_hz: 16_000,
            start_sample,
            speech: true,
        }
    }

    fn result(is_final: bool, end_sample: u64) -> EngineResult {
        EngineResult {
            is_final,
            transcript: String::new(),
            stability: 1.0,
            confidence: 1.0,
            start_sample: 0,
            end_sample,
        }
    }

    /// A final is timed from the moment the batch holding its last sample reached the engine.
    #[tokio::test(start_paused = true)]
    async fn finals_are_timed_from_their_last_batch() {
        let mut clock = LatencyClock::new("test");
        clock.handed_over(&batch(0, 1600));
        tokio::time::advance(Duration::from_millis(100)).await;
        clock.handed_over(&batch(1600, 1600));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            clock.received(&result(false, 3200)),
            None,
            "interims are not finals"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        // Covers the first batch only: timed from t=0.
        assert_eq!(
            clock.received(&result(true, 1600)),
            Some(Duration::from_millis(450))
        );
        // The rest: timed from the second batch at t=100 ms.
        assert_eq!(
            clock.received(&result(true, 3200)),
            Some(Duration::from_millis(350))
        );
        // Nothing left to time.
        assert_eq!(clock.received(&result(true, 3200)), None);
        // A final ending inside a batch is timed from that batch, which stays for the next final.
        clock.handed_over(&batch(3200, 1600));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(
            clock.received(&result(true, 4000)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            clock.received(&result(true, 4800)),
            Some(Duration::from_millis(50))
        );
    }
}
