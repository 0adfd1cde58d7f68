//! One session: audio taken in the caller's task, upstream streams driven by a task of its own.
//!
//! The session's state (the audio not yet covered by a final, the current upstream stream's
//! request side and its record of positions) sits behind a lock shared by two sides:
//!
//! - [`Input`], the session's `EngineAudio`. The stt stage calls it, by default inside the
//!   socket's task: it buffers each batch and, while the upstream stream has room, encodes the
//!   request and queues it at once. A batch costs no task wake-up besides the one that carries
//!   the request into HTTP/2.
//! - the session task. It opens, half-closes, rotates and retries upstream streams, reads their
//!   responses, sends results, keeps the timers, and sends what backed up while a stream was
//!   full. Input wakes it only when one of those is due (see [`Core::needs_task`]); a session
//!   streaming steadily wakes it about once per result.
//!
//! Neither side holds the lock across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    RecognitionConfig, SpeechContext, StreamingRecognitionConfig, StreamingRecognizeRequest,
    StreamingRecognizeResponse, recognition_config::AudioEncoding,
    streaming_recognize_request::StreamingRequest,
};
use pipeline::metrics::{self, Counter, Histogram};
use pipeline::{
    AudioBatch, AudioSink, EngineAudio, EngineClosed, EngineInput, EngineResult, ResultSender,
    StreamConfig, SttError, TrySendError,
};
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout};
use tonic::Status;

use super::{
    ENGINE, PendingResponses, SessionSlot, Settings, Shared, StreamSlot, code_name, grpc,
    is_transient,
};

/// Google's limit on the audio in one request: 25,600 bytes of LINEAR16.
pub(crate) const MAX_CHUNK_SAMPLES: u64 = 12_800;

/// Start a session: spawns its task; returns its input.
pub(super) fn open(
    shared: Arc<Shared>,
    slot: SessionSlot,
    config: &StreamConfig,
    results: ResultSender,
) -> EngineAudio {
    let rate = config.sample_rate_hz.max(1);
    let link = Arc::new(Link {
        core: Mutex::new(Core::new(&shared.settings, rate)),
        wake: Notify::new(),
        shared,
    });
    let task = Task::new(Arc::clone(&link), config, results);
    tokio::spawn(task.run(slot));
    EngineAudio::new(Input { link })
}

/// What the input side and the session task share.
struct Link {
    shared: Arc<Shared>,
    core: Mutex<Core>,
    /// Wakes the session task: something only it can do is due.
    wake: Notify,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // Plain state, consistent between statements: usable after a panic elsewhere.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn settings(&self) -> &Settings {
        &self.shared.settings
    }
}

/// Audio not yet covered by a final, with when it reached the engine. A session holds one
/// per batch (per 20 ms frame when idle) since its last final: 40 bytes, not the 56 of the
/// batch and its `Instant`.
struct Buffered {
    samples: Vec<i16>,
    start_sample: u64,
    /// When it reached the engine, in [`ARRIVAL_TICK`]s after [`Core::epoch`].
    arrived: u32,
    speech: bool,
}

/// The resolution of [`Buffered::arrived`]: fine enough for a latency histogram, and a `u32`
/// of them spans about five days.
const ARRIVAL_TICK: Duration = Duration::from_micros(100);

impl Buffered {
    fn end_sample(&self) -> u64 {
        self.start_sample + self.samples.len() as u64
    }
}

/// `len` samples of a stream's audio, from `stream_start` on the stream's clock, were the
/// session's samples from `session_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub stream_start: u64,
    pub session_start: u64,
    pub len: u64,
}

/// Map a position on a stream's clock to the session clock.
pub(crate) fn to_session(segments: &[Segment], stream_pos: u64) -> Option<u64> {
    let index = segments
        .partition_point(|s| s.stream_start <= stream_pos)
        .checked_sub(1)?;
    let segment = segments[index];
    Some(segment.session_start + (stream_pos - segment.stream_start).min(segment.len))
}

/// Record that the session's samples `[from, from + len)` went out at stream offset `stream_pos`.
pub(crate) fn record_segment(segments: &mut Vec<Segment>, stream_pos: u64, from: u64, len: u64) {
    if let Some(last) = segments.last_mut()
        && last.stream_start + last.len == stream_pos
        && last.session_start + last.len == from
    {
        last.len += len;
        return;
    }
    segments.push(Segment {
        stream_start: stream_pos,
        session_start: from,
        len,
    });
}

/// An upstream stream's response side: waiting for headers, then a stream of responses.
enum Responses {
    Pending(PendingResponses),
    Open(Box<grpc::Responses>),
}

/// The current upstream stream's request side and what was sent on it. Its response side is
/// the task's ([`Task::responses`]), dropped first whenever a stream is let go, so that letting
/// go resets the stream rather than half-closing it.
struct Upstream {
    /// `None` once half-closed.
    requests: Option<grpc::Requests>,
    /// Held for the stream's life (frees the connection's stream count).
    _slot: StreamSlot,
    opened: Instant,
    segments: Vec<Segment>,
    samples_sent: u64,
    /// Session position after the last sample sent.
    sent_end: u64,
    first_audio_at: Option<Instant>,
    got_result: bool,
    /// Half-close as soon as possible (silence, forced rotation).
    closing: bool,
    close_reason: &'static str,
    half_closed_at: Option<Instant>,
}

impl Upstream {
    /// Where this stream's audio began on the session clock (0 before any was sent).
    fn sent_end_start(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.session_start)
    }
}

/// The session's state, behind [`Link::core`].
struct Core {
    rate: u32,
    /// What [`Buffered::arrived`] counts from.
    epoch: Instant,
    buffer: VecDeque<Buffered>,
    buffered_samples: u64,
    speech_batches: usize,
    /// Session position after the last sample received.
    received_end: u64,
    /// Furthest position ever sent upstream: audio before it in a new stream is a replay.
    max_sent_end: u64,
    last_final_end: u64,
    /// Half-close once everything before this is sent (Finalize, end of input).
    finalize_at: Option<u64>,
    input_done: bool,
    upstream: Option<Upstream>,
    last_speech_end: u64,
    last_speech_at: Instant,
    retry_at: Option<Instant>,
    /// Refuse input beyond this much buffered audio (backpressure to the batch stage).
    cap_samples: u64,
    rotate_after_samples: u64,
    silence_close_samples: u64,
    preroll_samples: u64,
    /// The task was woken and has not looked at the state since.
    task_told: bool,
    /// The task has ended: input is refused.
    task_ended: bool,
    /// Input waiting for room below `cap_samples`.
    input_waker: Option<Waker>,
    rotations: u64,
}

impl Core {
    fn new(settings: &Settings, rate: u32) -> Core {
        let samples =
            |duration: Duration| (duration.as_micros() * u128::from(rate) / 1_000_000) as u64;
        let cap_secs = settings.rotate_after.as_secs() + 60;
        Core {
            rate,
            epoch: Instant::now(),
            buffer: VecDeque::new(),
            buffered_samples: 0,
            speech_batches: 0,
            received_end: 0,
            max_sent_end: 0,
            last_final_end: 0,
            finalize_at: None,
            input_done: false,
            upstream: None,
            last_speech_end: 0,
            last_speech_at: Instant::now(),
            retry_at: None,
            cap_samples: cap_secs * u64::from(rate),
            rotate_after_samples: samples(settings.rotate_after),
            silence_close_samples: samples(settings.silence_close),
            preroll_samples: samples(settings.preroll),
            task_told: false,
            task_ended: false,
            input_waker: None,
            rotations: 0,
        }
    }

    /// `now` as [`Buffered::arrived`] counts it. Per batch: `u64` arithmetic, not the `u128`
    /// division `Duration::as_micros` would need.
    fn arrival_ticks(&self, now: Instant) -> u32 {
        const TICK_US: u64 = ARRIVAL_TICK.as_micros() as u64;
        let since = now.duration_since(self.epoch);
        let ticks =
            since.as_secs() * (1_000_000 / TICK_US) + u64::from(since.subsec_micros()) / TICK_US;
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    fn on_input(&mut self, input: Option<EngineInput>) {
        match input {
            Some(EngineInput::Audio(batch)) => self.on_audio(batch),
            Some(EngineInput::Finalize) => {
                if self.upstream.is_some() || self.speech_batches > 0 {
                    self.finalize_at = Some(self.received_end.max(self.finalize_at.unwrap_or(0)));
                }
            }
            None => {
                self.input_done = true;
                self.finalize_at = Some(self.received_end.max(self.finalize_at.unwrap_or(0)));
            }
        }
    }

    fn on_audio(&mut self, mut batch: AudioBatch) {
        if batch.sample_rate_hz != self.rate {
            tracing::warn!(
                engine = ENGINE,
                expected = self.rate,
                got = batch.sample_rate_hz,
                "Dropped a batch at the wrong rate."
            );
            return;
        }
        // Positions are authoritative; audio never goes back in time.
        if batch.start_sample < self.received_end {
            let overlap = (self.received_end - batch.start_sample) as usize;
            if overlap >= batch.samples.len() {
                return;
            }
            batch.samples.drain(..overlap);
            batch.start_sample = self.received_end;
        }
        if batch.samples.is_empty() {
            return;
        }
        let now = Instant::now();
        if batch.speech {
            self.last_speech_end = batch.end_sample();
            self.last_speech_at = now;
        } else if let Some(up) = &mut self.upstream
            && !up.closing
            && batch
                .end_sample()
                .saturating_sub(self.last_speech_end.max(up.sent_end_start()))
                >= self.silence_close_samples
        {
            up.closing = true;
            up.close_reason = "silence";
        }
        self.received_end = batch.end_sample();
        self.buffered_samples += batch.samples.len() as u64;
        self.speech_batches += usize::from(batch.speech);
        let arrived = self.arrival_ticks(now);
        self.buffer.push_back(Buffered {
            samples: batch.samples,
            start_sample: batch.start_sample,
            arrived,
            speech: batch.speech,
        });
    }

    /// With no stream and nothing worth transcribing, keep only the pre-roll.
    fn trim_idle(&mut self) {
        if self.upstream.is_none() && self.speech_batches == 0 {
            self.finalize_at = None;
            self.trim_to(self.received_end.saturating_sub(self.preroll_samples));
        }
    }

    /// Send what the request stream has room for now, without waiting.
    fn send_ready(&mut self) {
        loop {
            let Some(up) = &self.upstream else { return };
            if up.closing || up.requests.is_none() {
                return;
            }
            let before = up.sent_end;
            self.send_chunk();
            if self
                .upstream
                .as_ref()
                .is_none_or(|up| up.sent_end == before)
            {
                return;
            }
        }
    }

    fn send_chunk(&mut self) {
        let Some(up) = &mut self.upstream else { return };
        let Some((index, from, to)) = next_chunk(&self.buffer, up.sent_end, self.finalize_at)
        else {
            return;
        };
        let Some(requests) = &mut up.requests else {
            return;
        };
        if !requests.has_room() {
            return;
        }
        let len = (to - from) as usize;
        let buffer = &self.buffer;
        requests.send_audio(len, |bytes| {
            let mut written = 0;
            for batch in buffer.range(index..) {
                if batch.start_sample >= to {
                    break;
                }
                let start = (from.max(batch.start_sample) - batch.start_sample) as usize;
                let end = (to.min(batch.end_sample()) - batch.start_sample) as usize;
                let out = &mut bytes[written..written + (end - start) * 2];
                // Fixed-size pairs, not a push per sample: this loop compiles to vector stores.
                for (pair, sample) in out.chunks_exact_mut(2).zip(&batch.samples[start..end]) {
                    pair.copy_from_slice(&sample.to_le_bytes());
                }
                written += out.len();
            }
        });
        record_segment(&mut up.segments, up.samples_sent, from, len as u64);
        up.samples_sent += len as u64;
        up.sent_end = to;
        up.first_audio_at.get_or_insert_with(Instant::now);
        self.max_sent_end = self.max_sent_end.max(to);
        if up.samples_sent >= self.rotate_after_samples && !up.closing {
            // Out of time for a boundary: half-close so Google finalizes everything sent.
            up.closing = true;
            up.close_reason = "rotation";
            self.rotations += 1;
            metrics::engine::rotation(ENGINE, "forced");
        }
    }

    /// Whether everything before a pending finalize has been sent.
    fn finalize_due(&self, up: &Upstream) -> bool {
        self.finalize_at
            .is_some_and(|at| next_chunk(&self.buffer, up.sent_end, Some(at)).is_none())
    }

    /// Whether the task has something to do that input cannot do itself: open a stream,
    /// half-close one, send audio that backed up behind a full stream, or finish.
    fn needs_task(&self) -> bool {
        if self.input_done {
            return true;
        }
        match &self.upstream {
            None => self.speech_batches > 0 && self.retry_at.is_none(),
            Some(up) => {
                up.requests.is_some()
                    && (up.closing
                        || self.finalize_due(up)
                        || next_chunk(&self.buffer, up.sent_end, self.finalize_at).is_some())
            }
        }
    }

    /// True when the task should be woken now: it has something to do and was not told yet.
    fn tell_task(&mut self) -> bool {
        if self.task_told || !self.needs_task() {
            return false;
        }
        self.task_told = true;
        true
    }

    /// Let input go on if it was waiting for room.
    fn wake_input(&mut self) {
        if (self.buffered_samples < self.cap_samples || self.task_ended)
            && let Some(waker) = self.input_waker.take()
        {
            waker.wake();
        }
    }

    /// Buffered audio that an earlier stream already received.
    fn replay_samples(&self) -> u64 {
        self.buffer
            .iter()
            .map(|b| {
                let end = b.end_sample().min(self.max_sent_end);
                end.saturating_sub(b.start_sample)
            })
            .sum()
    }

    fn uncovered_start(&self) -> u64 {
        self.buffer
            .front()
            .map_or(self.received_end, |b| b.start_sample)
            .max(self.last_final_end)
    }

    /// A final ending at `end`, unless it repeats one already sent: whether it advanced, and
    /// the result to send (none for an empty transcript).
    fn final_result(
        &mut self,
        text: String,
        confidence: f32,
        end: u64,
        latency: &Histogram,
    ) -> (bool, Option<EngineResult>) {
        if end <= self.last_final_end {
            return (false, None);
        }
        let start = self.uncovered_start().min(end);
        let last = end - 1;
        if let Some(b) = self
            .buffer
            .iter()
            .find(|b| b.start_sample <= last && last < b.end_sample())
        {
            let arrived = self.epoch + ARRIVAL_TICK * b.arrived;
            latency.record(arrived.elapsed().as_secs_f64());
        }
        self.trim_to(end);
        self.last_final_end = end;
        let result = (!text.is_empty()).then_some(EngineResult {
            is_final: true,
            transcript: text,
            stability: 1.0,
            confidence,
            start_sample: start,
            end_sample: end,
        });
        (true, result)
    }

    /// After a final, whether to replace a stream past half its life: what is left to replay
    /// is the audio since that final, the least it will ever be.
    fn rotate_at_boundary(&self, settings: &Settings) -> bool {
        let Some(up) = &self.upstream else {
            return false;
        };
        if up.closing || up.requests.is_none() {
            return false;
        }
        let audio = Duration::from_micros(up.samples_sent * 1_000_000 / u64::from(self.rate));
        up.opened.elapsed().max(audio) >= settings.rotate_after / 2
    }

    /// Drop buffered audio before `position`.
    fn trim_to(&mut self, position: u64) {
        while let Some(front) = self.buffer.front_mut() {
            if front.end_sample() <= position {
                self.buffered_samples -= front.samples.len() as u64;
                self.speech_batches -= usize::from(front.speech);
                self.buffer.pop_front();
            } else {
                if front.start_sample < position {
                    let cut = (position - front.start_sample) as usize;
                    front.samples.drain(..cut);
                    front.start_sample = position;
                    self.buffered_samples -= cut as u64;
                }
                break;
            }
        }
        // After a final (or while idle, down to the pre-roll) little is left: give back most of
        // a deque that a long stretch between finals grew, rather than hold its peak for the
        // session's life. Shrinking to twice what is left leaves room to grow before the next
        // shrink, so a steady length never reallocates.
        let len = self.buffer.len();
        if self.buffer.capacity() > 16 && len < self.buffer.capacity() / 4 {
            self.buffer.shrink_to(2 * len);
        }
    }
}

/// The session's input: what the stt stage hands audio to.
struct Input {
    link: Arc<Link>,
}

impl AudioSink for Input {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EngineClosed>> {
        let mut core = self.link.lock();
        if core.task_ended {
            return Poll::Ready(Err(EngineClosed));
        }
        if core.buffered_samples < core.cap_samples {
            return Poll::Ready(Ok(()));
        }
        match &core.input_waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => core.input_waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn try_send(&mut self, input: EngineInput) -> Result<(), TrySendError> {
        let tell = {
            let mut core = self.link.lock();
            if core.task_ended {
                return Err(TrySendError::Closed);
            }
            if core.buffered_samples >= core.cap_samples {
                return Err(TrySendError::Full(input));
            }
            core.on_input(Some(input));
            core.send_ready();
            core.trim_idle();
            core.tell_task()
        };
        if tell {
            self.link.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for Input {
    /// End of input: the task sends what is left, half-closes, and relays the last finals.
    fn drop(&mut self) {
        let tell = {
            let mut core = self.link.lock();
            core.on_input(None);
            core.tell_task()
        };
        if tell {
            self.link.wake.notify_one();
        }
    }
}

/// What the task does next.
enum Step {
    Open,
    Wait {
        timer: Option<Instant>,
        /// Audio backed up behind the stream's request side: wait for room on it.
        backlog: bool,
    },
    Done,
}

enum Wake {
    Response(Result<Option<StreamingRecognizeResponse>, Status>),
    Writable,
    Told,
    Timer,
}

/// Keep going, or end the task (results closed, or a final error sent).
type Flow = Result<(), ()>;

struct Metrics {
    opened: Counter,
    open_latency: Histogram,
    replayed: Histogram,
    first_result: Histogram,
    final_latency: Histogram,
}

struct Task {
    link: Arc<Link>,
    first_request: StreamingRecognizeRequest,
    results: ResultSender,
    /// The response side of `Core::upstream` (see [`Upstream`]).
    responses: Option<Responses>,
    attempts: u32,
    metrics: Metrics,
    /// One timer for the task's whole life, moved only when its deadline changes.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    streams: u64,
    retries: u64,
    replayed_samples: u64,
}

impl Task {
    fn new(link: Arc<Link>, config: &StreamConfig, results: ResultSender) -> Task {
        let settings = link.settings();
        let model = config
            .model
            .clone()
            .unwrap_or_else(|| settings.model.clone());
        let recognition = RecognitionConfig {
            encoding: AudioEncoding::Linear16 as i32,
            sample_rate_hertz: i32::try_from(config.sample_rate_hz.max(1)).unwrap_or(i32::MAX),
            audio_channel_count: 1,
            language_code: config.language_code.clone(),
            alternative_language_codes: config.alternative_language_codes.clone(),
            max_alternatives: 1,
            profanity_filter: config.profanity_filter,
            speech_contexts: if config.phrase_hints.is_empty() {
                Vec::new()
            } else {
                vec![SpeechContext {
                    phrases: config.phrase_hints.clone(),
                    boost: 0.0,
                }]
            },
            enable_word_time_offsets: config.word_time_offsets,
            enable_automatic_punctuation: config.punctuation,
            model,
            use_enhanced: settings.use_enhanced,
            ..Default::default()
        };
        let first_request = StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::StreamingConfig(
                StreamingRecognitionConfig {
                    config: Some(recognition),
                    single_utterance: false,
                    interim_results: config.interim_results,
                    ..Default::default()
                },
            )),
        };
        Task {
            first_request,
            results,
            responses: None,
            attempts: 0,
            metrics: Metrics {
                opened: metrics::engine::upstream_opened(ENGINE),
                open_latency: metrics::engine::upstream_open(ENGINE),
                replayed: metrics::engine::replayed(ENGINE),
                first_result: metrics::engine::first_result(ENGINE),
                final_latency: metrics::engine::final_latency(ENGINE),
            },
            timer: Box::pin(sleep_until(Instant::now())),
            timer_at: None,
            streams: 0,
            retries: 0,
            replayed_samples: 0,
            link,
        }
    }

    // Not an `async fn`, which would keep `self` twice in the task (see `Egress::run`).
    #[allow(clippy::manual_async_fn)]
    fn run(mut self, slot: SessionSlot) -> impl Future<Output = ()> {
        async move {
            self.drive().await;
            let rotations = {
                let mut core = self.link.lock();
                core.task_ended = true;
                core.wake_input();
                self.responses = None;
                core.upstream = None;
                core.rotations
            };
            tracing::debug!(
                engine = ENGINE,
                streams = self.streams,
                rotations,
                retries = self.retries,
                replayed_ms = self.replayed_samples * 1_000 / u64::from(self.link.lock().rate),
                "Google session ended."
            );
            drop(slot);
        }
    }

    async fn drive(&mut self) {
        loop {
            let (timer, backlog) = match self.housekeeping() {
                Step::Done => return,
                Step::Open => {
                    // Boxed: opening a stream (a tonic call) takes kilobytes of future that
                    // only this moment needs; held inline, every session's task would carry it.
                    if Box::pin(self.open()).await.is_err() {
                        return;
                    }
                    continue;
                }
                Step::Wait { timer, backlog } => (timer, backlog),
            };
            let timer = timer.map(|t| t.max(Instant::now()));
            if timer != self.timer_at {
                if let Some(at) = timer {
                    self.timer.as_mut().reset(at);
                }
                self.timer_at = timer;
            }
            let timer_set = self.timer_at.is_some();
            let wake = tokio::select! {
                biased;
                () = self.results.closed() => return,
                response = next_response(self.responses.as_mut()) => Wake::Response(response),
                () = writable(&self.link), if backlog => Wake::Writable,
                () = self.link.wake.notified() => Wake::Told,
                () = &mut self.timer, if timer_set => Wake::Timer,
            };
            let flow = match wake {
                Wake::Response(response) => self.on_response(response).await,
                Wake::Writable => {
                    self.link.lock().send_ready();
                    Ok(())
                }
                Wake::Told => Ok(()),
                Wake::Timer => {
                    self.timer_at = None;
                    self.on_timer().await
                }
            };
            if flow.is_err() {
                return;
            }
        }
    }

    /// Look at the state: half-close, trim and wake input as it requires; say what is next.
    fn housekeeping(&mut self) -> Step {
        let link = Arc::clone(&self.link);
        let settings = link.settings();
        let mut core = link.lock();
        core.task_told = false;
        if core.upstream.is_none() {
            self.responses = None;
            if core.speech_batches == 0 {
                core.trim_idle();
            } else if core.retry_at.is_none() {
                return Step::Open;
            }
        }
        let now = Instant::now();
        let finalize_due = core
            .upstream
            .as_ref()
            .is_some_and(|up| core.finalize_due(up));
        let input_done = core.input_done;
        if let Some(up) = &mut core.upstream
            && up.requests.is_some()
            && (up.closing || finalize_due)
        {
            if !up.closing {
                up.close_reason = if input_done { "end" } else { "finalize" };
            }
            if let Some(mut requests) = up.requests.take() {
                requests.finish();
            }
            up.half_closed_at = Some(now);
        }
        if core.input_done && core.upstream.is_none() && core.speech_batches == 0 {
            return Step::Done;
        }
        core.wake_input();
        let mut timer = core.retry_at.filter(|_| core.upstream.is_none());
        let mut backlog = false;
        if let Some(up) = &core.upstream {
            let deadline = if let Some(half_closed) = up.half_closed_at {
                Some(half_closed + settings.drain_timeout)
            } else if up.closing {
                None
            } else {
                let silence = core.last_speech_at.max(up.opened) + settings.silence_close;
                Some(silence.min(up.opened + settings.rotate_after))
            };
            timer = min_instant(timer, deadline);
            if !up.closing && next_chunk(&core.buffer, up.sent_end, core.finalize_at).is_some() {
                backlog = up.requests.is_some();
            }
        }
        Step::Wait { timer, backlog }
    }

    async fn open(&mut self) -> Flow {
        let shared = Arc::clone(&self.link.shared);
        let opened = timeout(
            shared.settings.open_timeout,
            shared.open_upstream(&self.first_request, self.metrics.open_latency.clone()),
        )
        .await;
        let opened = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) => return self.on_stream_error(status).await,
            Err(_) => {
                let status = Status::deadline_exceeded("opening the upstream stream timed out");
                return self.on_stream_error(status).await;
            }
        };
        self.metrics.opened.increment(1);
        self.streams += 1;
        let mut core = self.link.lock();
        let replay = core.replay_samples();
        if replay > 0 {
            self.replayed_samples += replay;
            self.metrics
                .replayed
                .record(replay as f64 / f64::from(core.rate));
        }
        tracing::debug!(
            engine = ENGINE,
            replay_samples = replay,
            "Opened an upstream stream."
        );
        core.upstream = Some(Upstream {
            requests: Some(opened.requests),
            _slot: opened.slot,
            opened: Instant::now(),
            segments: Vec::new(),
            samples_sent: 0,
            sent_end: 0,
            first_audio_at: None,
            got_result: false,
            closing: false,
            close_reason: "end",
            half_closed_at: None,
        });
        self.responses = Some(Responses::Pending(opened.responses));
        core.send_ready();
        Ok(())
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        let expired = {
            let link = Arc::clone(&self.link);
            let settings = link.settings();
            let mut core = link.lock();
            let last_speech_at = core.last_speech_at;
            match &mut core.upstream {
                None => {
                    if core.retry_at.is_some_and(|at| at <= now) {
                        core.retry_at = None;
                    }
                    false
                }
                Some(up) => {
                    if let Some(half_closed) = up.half_closed_at {
                        now >= half_closed + settings.drain_timeout
                    } else {
                        if !up.closing {
                            if now >= up.opened + settings.rotate_after {
                                up.closing = true;
                                up.close_reason = "rotation";
                                core.rotations += 1;
                                metrics::engine::rotation(ENGINE, "forced");
                            } else if now >= last_speech_at.max(up.opened) + settings.silence_close
                            {
                                up.closing = true;
                                up.close_reason = "silence";
                            }
                        }
                        false
                    }
                }
            }
        };
        if expired {
            let status = Status::deadline_exceeded("no end of stream after half-close");
            return self.on_stream_error(status).await;
        }
        Ok(())
    }

    async fn on_response(
        &mut self,
        response: Result<Option<StreamingRecognizeResponse>, Status>,
    ) -> Flow {
        let response = match response {
            Ok(Some(response)) => response,
            Ok(None) => return self.on_stream_end().await,
            Err(status) => return self.on_stream_error(status).await,
        };
        if let Some(error) = response.error.filter(|e| e.code != 0) {
            let status = Status::new(tonic::Code::from(error.code), error.message);
            return self.on_stream_error(status).await;
        }
        let mut out = Vec::new();
        {
            let link = Arc::clone(&self.link);
            let mut core = link.lock();
            let core = &mut *core;
            let Some(up) = &mut core.upstream else {
                return Ok(());
            };
            if !up.got_result && !response.results.is_empty() {
                up.got_result = true;
                if let Some(first_audio) = up.first_audio_at {
                    self.metrics
                        .first_result
                        .record(first_audio.elapsed().as_secs_f64());
                }
            }
            let rate = u64::from(core.rate);
            let mut finals = Vec::new();
            let mut interim: Option<(String, f32, u64)> = None;
            for result in &response.results {
                let (text, confidence) = result
                    .alternatives
                    .first()
                    .map(|a| (a.transcript.as_str(), a.confidence))
                    .unwrap_or(("", 0.0));
                let stream_end = result
                    .result_end_time
                    .as_ref()
                    .map(|d| {
                        let secs = u64::try_from(d.seconds).unwrap_or(0);
                        let nanos = u64::try_from(d.nanos).unwrap_or(0);
                        secs * rate + nanos * rate / 1_000_000_000
                    })
                    .unwrap_or(up.samples_sent)
                    .min(up.samples_sent);
                let end = to_session(&up.segments, stream_end).unwrap_or(up.sent_end);
                if result.is_final {
                    finals.push((text.trim().to_string(), confidence, end));
                } else {
                    // Google splits an interim into a stable and an unstable part; together
                    // they are the hypothesis.
                    let entry =
                        interim.get_or_insert_with(|| (String::new(), result.stability, end));
                    entry.0.push_str(text);
                    entry.2 = entry.2.max(end);
                }
            }
            let mut had_final = false;
            for (text, confidence, end) in finals {
                let (advanced, result) =
                    core.final_result(text, confidence, end, &self.metrics.final_latency);
                if advanced {
                    had_final = true;
                    self.attempts = 0;
                }
                out.extend(result);
            }
            if let Some((text, stability, end)) = interim {
                let text = text.trim();
                if !text.is_empty() && end > core.last_final_end {
                    out.push(EngineResult {
                        is_final: false,
                        transcript: text.to_string(),
                        stability,
                        confidence: 0.0,
                        start_sample: core.uncovered_start(),
                        end_sample: end,
                    });
                }
            }
            if had_final && core.rotate_at_boundary(link.settings()) {
                // Responses first: letting go of the stream resets it.
                self.responses = None;
                core.upstream = None;
                core.rotations += 1;
                metrics::engine::rotation(ENGINE, "boundary");
                metrics::engine::upstream_closed(ENGINE, "rotation");
            }
            core.wake_input();
        }
        for result in out {
            self.results.send(Ok(result)).await.map_err(|_| ())?;
        }
        Ok(())
    }

    /// The upstream stream ended without error.
    async fn on_stream_end(&mut self) -> Flow {
        let unasked = {
            let mut core = self.link.lock();
            self.responses = None;
            let Some(up) = core.upstream.take() else {
                return Ok(());
            };
            if up.requests.is_some() {
                true
            } else {
                // After a half-close Google finalizes everything it received.
                metrics::engine::upstream_closed(ENGINE, up.close_reason);
                core.trim_to(up.sent_end);
                core.last_final_end = core.last_final_end.max(up.sent_end);
                if core.finalize_at.is_some_and(|at| at <= up.sent_end) {
                    core.finalize_at = None;
                }
                core.wake_input();
                false
            }
        };
        if unasked {
            // Ended by the server before we half-closed: what it did not finalize is replayed.
            return self
                .on_stream_error(Status::aborted("the upstream stream ended unasked"))
                .await;
        }
        self.attempts = 0;
        Ok(())
    }

    async fn on_stream_error(&mut self, status: Status) -> Flow {
        {
            let mut core = self.link.lock();
            self.responses = None;
            if core.upstream.take().is_some() {
                metrics::engine::upstream_closed(ENGINE, "error");
            }
        }
        let code = code_name(status.code());
        if !is_transient(status.code()) {
            tracing::warn!(
                engine = ENGINE,
                code,
                message = status.message(),
                "Google rejected the stream."
            );
            let error = SttError::Rejected {
                code: code.to_string(),
                message: status.message().to_string(),
            };
            let _ = self.results.send(Err(error)).await;
            return Err(());
        }
        self.attempts += 1;
        if self.attempts > self.link.settings().max_retries {
            tracing::warn!(
                engine = ENGINE,
                code,
                attempts = self.attempts,
                "Giving up on Google."
            );
            let error = SttError::Unavailable(format!(
                "{code}: {} (after {} attempts)",
                status.message(),
                self.attempts
            ));
            let _ = self.results.send(Err(error)).await;
            return Err(());
        }
        self.retries += 1;
        metrics::engine::retry(ENGINE, code);
        // A stream that hit Google's duration limit or audio timeout is replaced at once.
        let delay = if status.code() == tonic::Code::OutOfRange && self.attempts == 1 {
            Duration::ZERO
        } else {
            self.backoff()
        };
        tracing::info!(
            engine = ENGINE,
            code,
            message = status.message(),
            attempt = self.attempts,
            delay_ms = delay.as_millis() as u64,
            "Upstream stream failed; reopening."
        );
        self.link.lock().retry_at = Some(Instant::now() + delay);
        Ok(())
    }

    /// Exponential backoff with jitter: uniformly within the upper half of the current step.
    fn backoff(&self) -> Duration {
        let settings = self.link.settings();
        let exponent = self.attempts.saturating_sub(1).min(20);
        let step = settings
            .retry_initial
            .saturating_mul(1 << exponent)
            .min(settings.retry_max);
        let step_us = step.as_micros() as u64;
        let jittered = rand::rng().random_range(step_us / 2..=step_us.max(1));
        Duration::from_micros(jittered)
    }
}

/// The next piece of buffered audio to send after `sent_end`: contiguous audio from one or
/// more buffered batches, at most [`MAX_CHUNK_SAMPLES`] and not beyond `limit`: (index of the
/// first batch, from, to) on the session clock.
///
/// Spanning batches is what makes this the adaptive batcher: while the request stream has room
/// every batch goes out on its own at once; when it is full (the connection is busy), audio
/// waits here and leaves as one larger request, so a loaded gateway sends fewer messages instead
/// of queueing more of them.
fn next_chunk(
    buffer: &VecDeque<Buffered>,
    sent_end: u64,
    limit: Option<u64>,
) -> Option<(usize, u64, u64)> {
    // Usually all was sent, or all but the newest batch: look from the back.
    let last = buffer.len().checked_sub(1)?;
    if buffer[last].end_sample() <= sent_end {
        return None;
    }
    let index = if last == 0 || buffer[last - 1].end_sample() <= sent_end {
        last
    } else {
        buffer.partition_point(|b| b.end_sample() <= sent_end)
    };
    let first = buffer.get(index)?;
    let from = first.start_sample.max(sent_end);
    let max_to = limit.unwrap_or(u64::MAX).min(from + MAX_CHUNK_SAMPLES);
    if from >= max_to {
        return None;
    }
    let mut to = first.end_sample().min(max_to);
    for next in buffer.range(index + 1..) {
        if to == max_to || next.start_sample != to {
            break;
        }
        to = next.end_sample().min(max_to);
    }
    Some((index, from, to))
}

fn min_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The next response; cancel-safe (the pending headers future lives in `responses`).
async fn next_response(
    responses: Option<&mut Responses>,
) -> Result<Option<StreamingRecognizeResponse>, Status> {
    let Some(responses) = responses else {
        return std::future::pending().await;
    };
    loop {
        match responses {
            Responses::Pending(pending) => {
                *responses = Responses::Open(Box::new(pending.as_mut().await?));
            }
            Responses::Open(stream) => return stream.message().await,
        }
    }
}

/// Resolves when the stream's request side has room (a failed one never has: its response
/// side then says why). The send happens under the lock, by whoever takes it next.
async fn writable(link: &Link) {
    std::future::poll_fn(|cx| {
        let mut core = link.lock();
        match core.upstream.as_mut().and_then(|up| up.requests.as_mut()) {
            Some(requests) => requests.poll_room(cx),
            None => Poll::Pending,
        }
    })
    .await;
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    fn buffered(start_sample: u64, len: usize) -> Buffered {
        Buffered {
            samples: vec![0; len],
            start_sample,
            arrived: 0,
            speech: true,
        }
    }

    #[test]
    fn a_chunk_spans_contiguous_batches_up_to_a_gap_a_limit_or_the_maximum() {
        // 0..320, 320..640, 640..960, then a gap (the VAD gate) and 2000..2320.
        let buffer: VecDeque<Buffered> = [(0, 320), (320, 320), (640, 320), (2000, 320)]
            .into_iter()
            .map(|(start, len)| buffered(start, len))
            .collect();
        assert_eq!(next_chunk(&buffer, 0, None), Some((0, 0, 960)));
        assert_eq!(next_chunk(&buffer, 400, None), Some((1, 400, 960)));
        assert_eq!(next_chunk(&buffer, 960, None), Some((3, 2000, 2320)));
        assert_eq!(next_chunk(&buffer, 2100, None), Some((3, 2100, 2320)));
        assert_eq!(next_chunk(&buffer, 0, Some(500)), Some((0, 0, 500)));
        assert_eq!(next_chunk(&buffer, 500, Some(500)), None);
        assert_eq!(next_chunk(&buffer, 2320, None), None);
        assert_eq!(next_chunk(&VecDeque::new(), 0, None), None);
        let long: VecDeque<Buffered> = (0..50).map(|i| buffered(i * 320, 320)).collect();
        assert_eq!(next_chunk(&long, 0, None), Some((0, 0, MAX_CHUNK_SAMPLES)));
        assert_eq!(
            next_chunk(&long, 49 * 320, None),
            Some((49, 49 * 320, 50 * 320))
        );
    }
}
