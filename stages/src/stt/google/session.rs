//! One session's task: audio in, upstream streams one after another, results out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    RecognitionConfig, SpeechContext, StreamingRecognitionConfig, StreamingRecognizeRequest,
    StreamingRecognizeResponse, recognition_config::AudioEncoding,
    streaming_recognize_request::StreamingRequest,
};
use pipeline::metrics::{self, Counter, Histogram};
use pipeline::{AudioBatch, EngineInput, EngineResult, StreamConfig, SttError};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tonic::Status;

use super::{ENGINE, PendingResponses, SessionSlot, Shared, StreamSlot, code_name, is_transient};

/// Google's limit on the audio in one request: 25,600 bytes of LINEAR16.
pub(crate) const MAX_CHUNK_SAMPLES: u64 = 12_800;

type Results = mpsc::Sender<Result<EngineResult, SttError>>;

pub(super) async fn run(
    shared: Arc<Shared>,
    slot: SessionSlot,
    config: StreamConfig,
    input: mpsc::Receiver<EngineInput>,
    results: Results,
) {
    let mut session = Session::new(shared, config, results);
    session.run(input).await;
    tracing::debug!(
        engine = ENGINE,
        streams = session.streams,
        rotations = session.rotations,
        retries = session.retries,
        replayed_ms = session.replayed_samples * 1_000 / u64::from(session.rate),
        "Google session ended."
    );
    drop(slot);
}

/// Audio not yet covered by a final, with when it reached the engine.
struct Buffered {
    batch: AudioBatch,
    arrived: Instant,
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
    Open(Box<tonic::Streaming<StreamingRecognizeResponse>>),
}

struct Upstream {
    /// Dropped first, so that dropping an `Upstream` resets the stream (abort) rather than
    /// half-closing it.
    responses: Responses,
    /// `None` once half-closed.
    requests: Option<mpsc::Sender<Vec<u8>>>,
    /// Held for the stream's life (frees the connection's stream count); also says how busy the
    /// connection is.
    slot: StreamSlot,
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

enum Wake {
    Response(Result<Option<StreamingRecognizeResponse>, Status>),
    Writable(bool),
    Input(Option<EngineInput>),
    Timer,
    ResultsClosed,
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

struct Session {
    shared: Arc<Shared>,
    rate: u32,
    first_request: StreamingRecognizeRequest,
    results: Results,
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
    attempts: u32,
    retry_at: Option<Instant>,
    /// Stop taking input beyond this much buffered audio (backpressure to the batch stage).
    cap_samples: u64,
    metrics: Metrics,
    /// One timer for the task's whole life, moved only when its deadline changes: a fresh
    /// `sleep_until` on every wake-up (~100 a second per session) costs more than the work.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    streams: u64,
    rotations: u64,
    retries: u64,
    replayed_samples: u64,
}

impl Session {
    fn new(shared: Arc<Shared>, config: StreamConfig, results: Results) -> Session {
        let rate = config.sample_rate_hz.max(1);
        let settings = &shared.settings;
        let model = config
            .model
            .clone()
            .unwrap_or_else(|| settings.model.clone());
        let recognition = RecognitionConfig {
            encoding: AudioEncoding::Linear16 as i32,
            sample_rate_hertz: i32::try_from(rate).unwrap_or(i32::MAX),
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
        let cap_secs = settings.rotate_after.as_secs() + 60;
        Session {
            rate,
            first_request,
            results,
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
            attempts: 0,
            retry_at: None,
            cap_samples: cap_secs * u64::from(rate),
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
            rotations: 0,
            retries: 0,
            replayed_samples: 0,
            shared,
        }
    }

    fn samples(&self, duration: Duration) -> u64 {
        (duration.as_micros() * u128::from(self.rate) / 1_000_000) as u64
    }

    async fn run(&mut self, mut input: mpsc::Receiver<EngineInput>) {
        loop {
            if self.housekeeping().await.is_err() {
                return;
            }
            if self.input_done && self.upstream.is_none() && self.speech_batches == 0 {
                return;
            }
            match self.wait(&mut input).await {
                Wake::Response(response) => {
                    if self.on_response(response).await.is_err() {
                        return;
                    }
                }
                Wake::Writable(true) => self.send_chunk(),
                // The stream's request side is gone; its response side says why.
                Wake::Writable(false) => {}
                Wake::Input(input) => {
                    self.on_input(input);
                    // Forward at once if the request stream has room, rather than on the next
                    // wake-up: one pass through the loop per frame instead of two.
                    self.send_ready();
                }
                Wake::Timer => {
                    self.timer_at = None;
                    if self.on_timer().await.is_err() {
                        return;
                    }
                }
                Wake::ResultsClosed => return,
            }
        }
    }

    /// Open, half-close and trim as the state requires.
    async fn housekeeping(&mut self) -> Flow {
        if self.upstream.is_none() {
            if self.speech_batches == 0 {
                // Nothing worth transcribing: keep only the pre-roll.
                self.finalize_at = None;
                let keep = self.samples(self.shared.settings.preroll);
                self.trim_to(self.received_end.saturating_sub(keep));
            } else if self.retry_at.is_none() {
                self.open().await?;
            }
        }
        let finalize_at = self.finalize_at;
        if let Some(up) = &mut self.upstream
            && up.requests.is_some()
        {
            let finalize_due = finalize_at
                .is_some_and(|at| next_chunk(&self.buffer, up.sent_end, Some(at)).is_none());
            if up.closing || finalize_due {
                if !up.closing {
                    up.close_reason = if self.input_done { "end" } else { "finalize" };
                }
                up.requests = None;
                up.half_closed_at = Some(Instant::now());
            }
        }
        Ok(())
    }

    async fn wait(&mut self, input: &mut mpsc::Receiver<EngineInput>) -> Wake {
        let now = Instant::now();
        let settings = &self.shared.settings;
        let mut timer: Option<Instant> = self.retry_at.filter(|_| self.upstream.is_none());
        let wants_input = !self.input_done && self.buffered_samples < self.cap_samples;
        let (responses, requests) = match &mut self.upstream {
            Some(up) => {
                let deadline = if let Some(half_closed) = up.half_closed_at {
                    Some(half_closed + settings.drain_timeout)
                } else if up.closing {
                    None
                } else {
                    let silence = self.last_speech_at.max(up.opened) + settings.silence_close;
                    Some(silence.min(up.opened + settings.rotate_after))
                };
                timer = min_instant(timer, deadline);
                let hold = hold_until(&self.buffer, up, self.finalize_at, settings, now);
                timer = min_instant(timer, hold);
                let can_send = !up.closing
                    && hold.is_none()
                    && next_chunk(&self.buffer, up.sent_end, self.finalize_at).is_some();
                (
                    Some(&mut up.responses),
                    up.requests.as_ref().filter(|_| can_send),
                )
            }
            None => (None, None),
        };
        let timer = timer.map(|t| t.max(now));
        if timer != self.timer_at {
            if let Some(at) = timer {
                self.timer.as_mut().reset(at);
            }
            self.timer_at = timer;
        }
        let timer_set = self.timer_at.is_some();
        tokio::select! {
            biased;
            () = self.results.closed() => Wake::ResultsClosed,
            response = next_response(responses) => Wake::Response(response),
            writable = writable(requests) => Wake::Writable(writable),
            input = input.recv(), if wants_input => Wake::Input(input),
            () = &mut self.timer, if timer_set => Wake::Timer,
        }
    }

    async fn open(&mut self) -> Flow {
        let opened = timeout(
            self.shared.settings.open_timeout,
            self.shared.open_upstream(
                self.first_request.clone(),
                self.metrics.open_latency.clone(),
            ),
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
        let replay = self.replay_samples();
        if replay > 0 {
            self.replayed_samples += replay;
            self.metrics
                .replayed
                .record(replay as f64 / f64::from(self.rate));
        }
        tracing::debug!(
            engine = ENGINE,
            replay_samples = replay,
            "Opened an upstream stream."
        );
        self.upstream = Some(Upstream {
            requests: Some(opened.requests),
            responses: Responses::Pending(opened.responses),
            slot: opened.slot,
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
        Ok(())
    }

    /// Buffered audio that an earlier stream already received.
    fn replay_samples(&self) -> u64 {
        self.buffer
            .iter()
            .map(|b| {
                let end = b.batch.end_sample().min(self.max_sent_end);
                end.saturating_sub(b.batch.start_sample)
            })
            .sum()
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
        let silence_close = self.samples(self.shared.settings.silence_close);
        if batch.speech {
            self.last_speech_end = batch.end_sample();
            self.last_speech_at = Instant::now();
        } else if let Some(up) = &mut self.upstream
            && !up.closing
            && batch
                .end_sample()
                .saturating_sub(self.last_speech_end.max(up.sent_end_start()))
                >= silence_close
        {
            up.closing = true;
            up.close_reason = "silence";
        }
        self.received_end = batch.end_sample();
        self.buffered_samples += batch.samples.len() as u64;
        self.speech_batches += usize::from(batch.speech);
        self.buffer.push_back(Buffered {
            batch,
            arrived: Instant::now(),
        });
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
        let Some(requests) = &up.requests else { return };
        let settings = &self.shared.settings;
        if hold_until(&self.buffer, up, self.finalize_at, settings, Instant::now()).is_some() {
            return;
        }
        let Some((index, from, to)) = next_chunk(&self.buffer, up.sent_end, self.finalize_at)
        else {
            return;
        };
        let len = (to - from) as usize;
        let mut bytes = Vec::with_capacity(len * 2);
        for buffered in self.buffer.range(index..) {
            let batch = &buffered.batch;
            if batch.start_sample >= to {
                break;
            }
            let start = (from.max(batch.start_sample) - batch.start_sample) as usize;
            let end = (to.min(batch.end_sample()) - batch.start_sample) as usize;
            for sample in &batch.samples[start..end] {
                bytes.extend_from_slice(&sample.to_le_bytes());
            }
        }
        // Room was reserved by `wait`; only this task sends.
        if requests.try_send(bytes).is_err() {
            return;
        }
        record_segment(&mut up.segments, up.samples_sent, from, len as u64);
        up.samples_sent += len as u64;
        up.sent_end = to;
        up.first_audio_at.get_or_insert_with(Instant::now);
        self.max_sent_end = self.max_sent_end.max(to);
        let rotate_after = (self.shared.settings.rotate_after.as_micros() * u128::from(self.rate)
            / 1_000_000) as u64;
        if up.samples_sent >= rotate_after && !up.closing {
            // Out of time for a boundary: half-close so Google finalizes everything sent.
            up.closing = true;
            up.close_reason = "rotation";
            self.rotations += 1;
            metrics::engine::rotation(ENGINE, "forced");
        }
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        if self.upstream.is_none() {
            if self.retry_at.is_some_and(|at| at <= now) {
                self.retry_at = None;
            }
            return Ok(());
        }
        let settings = &self.shared.settings;
        let Some(up) = &mut self.upstream else {
            return Ok(());
        };
        if let Some(half_closed) = up.half_closed_at {
            if now >= half_closed + settings.drain_timeout {
                let status = Status::deadline_exceeded("no end of stream after half-close");
                return self.on_stream_error(status).await;
            }
        } else if !up.closing {
            if now >= up.opened + settings.rotate_after {
                up.closing = true;
                up.close_reason = "rotation";
                self.rotations += 1;
                metrics::engine::rotation(ENGINE, "forced");
            } else if now >= self.last_speech_at.max(up.opened) + settings.silence_close {
                up.closing = true;
                up.close_reason = "silence";
            }
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
        let Some(up) = &mut self.upstream else {
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
        let rate = u64::from(self.rate);
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
                // Google splits an interim into a stable and an unstable part; together they are
                // the hypothesis.
                let entry = interim.get_or_insert_with(|| (String::new(), result.stability, end));
                entry.0.push_str(text);
                entry.2 = entry.2.max(end);
            }
        }
        let mut had_final = false;
        for (text, confidence, end) in finals {
            had_final |= self.emit_final(text, confidence, end).await?;
        }
        if let Some((text, stability, end)) = interim {
            let text = text.trim();
            if !text.is_empty() && end > self.last_final_end {
                let result = EngineResult {
                    is_final: false,
                    transcript: text.to_string(),
                    stability,
                    confidence: 0.0,
                    start_sample: self.uncovered_start(),
                    end_sample: end,
                };
                self.results.send(Ok(result)).await.map_err(|_| ())?;
            }
        }
        if had_final {
            self.maybe_rotate_at_boundary();
        }
        Ok(())
    }

    fn uncovered_start(&self) -> u64 {
        self.buffer
            .front()
            .map_or(self.received_end, |b| b.batch.start_sample)
            .max(self.last_final_end)
    }

    /// Emit a final ending at `end` unless it repeats one already sent; true if it advanced.
    async fn emit_final(&mut self, text: String, confidence: f32, end: u64) -> Result<bool, ()> {
        if end <= self.last_final_end {
            return Ok(false);
        }
        let start = self.uncovered_start().min(end);
        let last = end - 1;
        if let Some(b) = self
            .buffer
            .iter()
            .find(|b| b.batch.start_sample <= last && last < b.batch.end_sample())
        {
            self.metrics
                .final_latency
                .record(b.arrived.elapsed().as_secs_f64());
        }
        self.trim_to(end);
        self.last_final_end = end;
        self.attempts = 0;
        if !text.is_empty() {
            let result = EngineResult {
                is_final: true,
                transcript: text,
                stability: 1.0,
                confidence,
                start_sample: start,
                end_sample: end,
            };
            self.results.send(Ok(result)).await.map_err(|_| ())?;
        }
        Ok(true)
    }

    /// After a final, replace a stream past half its life: what is left to replay is the audio
    /// since that final, the least it will ever be.
    fn maybe_rotate_at_boundary(&mut self) {
        let settings = &self.shared.settings;
        let Some(up) = &self.upstream else { return };
        if up.closing || up.requests.is_none() {
            return;
        }
        let half = settings.rotate_after / 2;
        let audio = Duration::from_micros(up.samples_sent * 1_000_000 / u64::from(self.rate));
        if up.opened.elapsed().max(audio) >= half {
            self.upstream = None;
            self.rotations += 1;
            metrics::engine::rotation(ENGINE, "boundary");
            metrics::engine::upstream_closed(ENGINE, "rotation");
        }
    }

    /// The upstream stream ended without error.
    async fn on_stream_end(&mut self) -> Flow {
        let Some(up) = self.upstream.take() else {
            return Ok(());
        };
        if up.requests.is_some() {
            // Ended by the server before we half-closed: what it did not finalize is replayed.
            return self
                .on_stream_error(Status::aborted("the upstream stream ended unasked"))
                .await;
        }
        // After a half-close Google finalizes everything it received.
        metrics::engine::upstream_closed(ENGINE, up.close_reason);
        self.trim_to(up.sent_end);
        self.last_final_end = self.last_final_end.max(up.sent_end);
        if self.finalize_at.is_some_and(|at| at <= up.sent_end) {
            self.finalize_at = None;
        }
        self.attempts = 0;
        Ok(())
    }

    async fn on_stream_error(&mut self, status: Status) -> Flow {
        if self.upstream.take().is_some() {
            metrics::engine::upstream_closed(ENGINE, "error");
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
        if self.attempts > self.shared.settings.max_retries {
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
        self.retry_at = Some(Instant::now() + delay);
        Ok(())
    }

    /// Exponential backoff with jitter: uniformly within the upper half of the current step.
    fn backoff(&self) -> Duration {
        let settings = &self.shared.settings;
        let exponent = self.attempts.saturating_sub(1).min(20);
        let step = settings
            .retry_initial
            .saturating_mul(1 << exponent)
            .min(settings.retry_max);
        let step_us = step.as_micros() as u64;
        let jittered = rand::rng().random_range(step_us / 2..=step_us.max(1));
        Duration::from_micros(jittered)
    }

    /// Drop buffered audio before `position`.
    fn trim_to(&mut self, position: u64) {
        while let Some(front) = self.buffer.front_mut() {
            if front.batch.end_sample() <= position {
                self.buffered_samples -= front.batch.samples.len() as u64;
                self.speech_batches -= usize::from(front.batch.speech);
                self.buffer.pop_front();
            } else {
                if front.batch.start_sample < position {
                    let cut = (position - front.batch.start_sample) as usize;
                    front.batch.samples.drain(..cut);
                    front.batch.start_sample = position;
                    self.buffered_samples -= cut as u64;
                }
                break;
            }
        }
    }
}

impl Upstream {
    /// Where this stream's audio began on the session clock (0 before any was sent).
    fn sent_end_start(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.session_start)
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
    let index = buffer.partition_point(|b| b.batch.end_sample() <= sent_end);
    let first = &buffer.get(index)?.batch;
    let from = first.start_sample.max(sent_end);
    let max_to = limit.unwrap_or(u64::MAX).min(from + MAX_CHUNK_SAMPLES);
    if from >= max_to {
        return None;
    }
    let mut to = first.end_sample().min(max_to);
    for next in buffer.range(index + 1..) {
        if to == max_to || next.batch.start_sample != to {
            break;
        }
        to = next.batch.end_sample().min(max_to);
    }
    Some((index, from, to))
}

/// Until when to hold the next chunk back so it leaves with more audio, if at all: only on a
/// connection carrying more than `coalesce_above_streams` streams, only while the chunk is
/// shorter than two of its batches, never past `coalesce` after its first audio arrived, and
/// never when a finalize or the end of input is waiting on it.
fn hold_until(
    buffer: &VecDeque<Buffered>,
    up: &Upstream,
    finalize_at: Option<u64>,
    settings: &super::Settings,
    now: Instant,
) -> Option<Instant> {
    if settings.coalesce.is_zero()
        || finalize_at.is_some()
        || up.slot.connection_streams() <= settings.coalesce_above_streams
    {
        return None;
    }
    let (index, from, to) = next_chunk(buffer, up.sent_end, None)?;
    let first = &buffer[index];
    if to - from >= 2 * first.batch.samples.len() as u64 {
        return None;
    }
    let until = first.arrived + settings.coalesce;
    (until > now).then_some(until)
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

async fn writable(requests: Option<&mpsc::Sender<Vec<u8>>>) -> bool {
    match requests {
        Some(requests) => requests.reserve().await.is_ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    fn buffered(start_sample: u64, len: usize) -> Buffered {
        Buffered {
            batch: AudioBatch {
                samples: vec![0; len],
                sample_rate_hz: 16_000,
                start_sample,
                speech: true,
            },
            arrived: Instant::now(),
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
        assert_eq!(next_chunk(&buffer, 0, Some(500)), Some((0, 0, 500)));
        assert_eq!(next_chunk(&buffer, 500, Some(500)), None);
        assert_eq!(next_chunk(&buffer, 2320, None), None);
        let long: VecDeque<Buffered> = (0..50).map(|i| buffered(i * 320, 320)).collect();
        assert_eq!(next_chunk(&long, 0, None), Some((0, 0, MAX_CHUNK_SAMPLES)));
    }
}
