//! Offline Whisper engine (whisper.cpp through `whisper-rs`): the default, no cloud account.
//!
//! Whisper does not stream, so each session's task cuts its audio into utterances: an
//! utterance starts at a speech batch (with the non-speech just before it as pre-roll), and
//! ends after `end_of_utterance` of silence (non-speech batches, gaps in positions left by the
//! VAD gate, or wall time without audio), at `max_utterance`, at `Finalize`, and at end of
//! input. Each ended utterance becomes a final decode job; while one grows, an interim job
//! re-decodes it every `interim_interval` of new audio, but only if a worker is idle and the
//! session has no decode in flight, so under load interims are skipped and finals are only
//! delayed. Jobs go through one bounded queue (finals first) to `workers` OS threads (decoding
//! is blocking CPU work, never done on tokio's threads), each owning a decoder state over one
//! shared model.
//! Results are positioned on the session clock (the utterance's first and last sample). At most
//! `max_sessions` streams are open; more are refused with [`SttError::Overloaded`]. The session
//! task keeps the growing utterance and up to [`MAX_WAITING_FINALS`] ended ones; at end of
//! input it decodes them all, sends their finals and closes the results channel.

mod config;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use pipeline::engine::LatencyClock;
use pipeline::metrics::{Counter, Gauge, Histogram, whisper as m};
use pipeline::{
    AudioBatch, EngineAudio, EngineInput, EngineResult, EngineResults, ResultSender, StreamConfig,
    SttEngine, SttError, SttStream,
};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

pub use config::{MAX_UTTERANCE_LIMIT_MS, WhisperConfig, WhisperConfigError, WhisperSettings};

/// The only rate Whisper reads.
pub const SAMPLE_RATE_HZ: u32 = 16_000;
/// Non-speech kept ahead of an utterance when the VAD does not gate (with the gate on, the
/// VAD's own pre-roll arrives as non-speech and is kept the same way, up to this much).
const PRE_ROLL_SAMPLES: usize = 8_000;
/// Ended utterances a session may hold while its decodes are delayed; beyond this it stops
/// reading audio, so the pressure reaches the edges before it (and their overflow policies).
pub const MAX_WAITING_FINALS: usize = 2;
/// Whisper is unreliable on very short input; shorter utterances are padded with silence.
const MIN_DECODE_SAMPLES: usize = 16_000;

/// How many encoder frames (20 ms each, 1500 = 30 s) a decode uses: the utterance plus a
/// margin, never below a floor. Smaller is faster (the encoder is most of the cost for short
/// utterances) but too small a window costs accuracy. Measured on the eight sentences of
/// `tests.rs` (`measure_audio_ctx_rules`, one thread): full window WER 0.118, 1.46 s per
/// sentence; floor 512 + 64: WER 0.118, 0.36 s; floor 384 + 64: WER 0.118, 0.27 s; floor
/// 256 + 32: WER 0.237. The default keeps twice the smallest window that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioCtxRule {
    /// 0 = always the full 30 s window.
    pub min_frames: usize,
    pub margin_frames: usize,
}

impl AudioCtxRule {
    pub const DEFAULT: AudioCtxRule = AudioCtxRule {
        min_frames: 512,
        margin_frames: 64,
    };
    pub const FULL: AudioCtxRule = AudioCtxRule {
        min_frames: 0,
        margin_frames: 0,
    };

    /// The `audio_ctx` for `samples` of 16 kHz audio.
    pub fn frames(self, samples: usize) -> usize {
        if self.min_frames == 0 {
            return 1_500;
        }
        (samples.div_ceil(320) + self.margin_frames).clamp(self.min_frames, 1_500)
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum WhisperError {
    #[error(transparent)]
    Config(#[from] WhisperConfigError),
    #[error("stt.whisper needs stt.sample_rate_hz = {SAMPLE_RATE_HZ}, got {0}")]
    SampleRate(u32),
    #[error(
        "Whisper model {} not found: run `voxflow models install` (or set stt.whisper.model_path)",
        path.display()
    )]
    ModelMissing { path: PathBuf },
    #[error(
        "cannot load Whisper model {}: {message}; run `voxflow models install --force` to rebuild it (or set stt.whisper.model_path)",
        path.display()
    )]
    ModelLoad { path: PathBuf, message: String },
    #[error("stt.whisper.language = {0:?} but the model is English-only; use \"en\"")]
    EnglishOnly(String),
    #[error("cannot start a Whisper worker: {0}")]
    Worker(String),
}

/// What [`check_model`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub n_vocab: i32,
    pub multilingual: bool,
    pub model_type: String,
}

/// Load a ggml model as the engine would, to check it.
///
/// # Errors
/// [`WhisperError::ModelMissing`] or [`WhisperError::ModelLoad`].
pub fn check_model(path: &Path) -> Result<ModelInfo, WhisperError> {
    let context = load(path)?;
    Ok(ModelInfo {
        n_vocab: context.n_vocab(),
        multilingual: context.is_multilingual(),
        model_type: context
            .model_type_readable_str_lossy()
            .map(|s| s.into_owned())
            .unwrap_or_default(),
    })
}

fn load(path: &Path) -> Result<WhisperContext, WhisperError> {
    // Route whisper.cpp's and ggml's log lines into whisper-rs's hooks, which drop them
    // (errors still come back as values).
    whisper_rs::install_logging_hooks();
    if !path.is_file() {
        return Err(WhisperError::ModelMissing {
            path: path.to_owned(),
        });
    }
    WhisperContext::new_with_params(path, WhisperContextParameters::default()).map_err(|e| {
        WhisperError::ModelLoad {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })
}

/// The Whisper engine: one loaded model, a pool of workers, a bounded job queue.
pub struct WhisperEngine {
    inner: Arc<Inner>,
}

struct Inner {
    settings: WhisperSettings,
    jobs: Arc<JobQueue>,
    seats: Arc<Semaphore>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No session is left: let the workers finish.
        self.jobs.close();
    }
}

/// Decode settings every worker shares.
#[derive(Debug, Clone)]
struct DecodeSettings {
    threads: i32,
    language: String,
    audio_ctx: AudioCtxRule,
}

struct Job {
    is_final: bool,
    samples: Vec<f32>,
    queued_at: Instant,
    reply: oneshot::Sender<Result<Decoded, String>>,
}

/// The bounded queue between the sessions and the workers.
///
/// `queue_capacity` slots (a FIFO semaphore, so sessions waiting for room are served in turn)
/// bound the waiting jobs. Workers take finals before interims. An interim is only queued when
/// a worker is idle and no other job is waiting for it: it never waits behind other work, and
/// never makes a final wait except for a decode already running.
///
/// Metric handles are looked up when used (once per job): the engine is built before the
/// metrics recorder is installed, and handles taken earlier would record nothing.
struct JobQueue {
    slots: Arc<Semaphore>,
    waiting: Mutex<Waiting>,
    wake: Condvar,
}

#[derive(Default)]
struct Waiting {
    finals: VecDeque<(Job, OwnedSemaphorePermit)>,
    interims: VecDeque<(Job, OwnedSemaphorePermit)>,
    idle_workers: usize,
    closed: bool,
}

impl Waiting {
    fn len(&self) -> usize {
        self.finals.len() + self.interims.len()
    }
}

impl JobQueue {
    fn new(capacity: usize) -> JobQueue {
        JobQueue {
            slots: Arc::new(Semaphore::new(capacity)),
            waiting: Mutex::new(Waiting::default()),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait for a free slot (for a final).
    async fn slot(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        Arc::clone(&self.slots).acquire_owned().await
    }

    fn push_final(&self, job: Job, slot: OwnedSemaphorePermit) {
        let mut waiting = self.lock();
        waiting.finals.push_back((job, slot));
        m::queue_depth().set(waiting.len() as f64);
        self.wake.notify_one();
    }

    /// Queue an interim if a worker is idle for it; otherwise hand the job back.
    fn try_push_interim(&self, job: Job) -> Result<(), Job> {
        let mut waiting = self.lock();
        if waiting.closed || waiting.idle_workers <= waiting.len() {
            return Err(job);
        }
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            return Err(job);
        };
        waiting.interims.push_back((job, slot));
        m::queue_depth().set(waiting.len() as f64);
        self.wake.notify_one();
        Ok(())
    }

    /// Block until there is a job (finals first); `None` once closed and empty.
    fn next(&self) -> Option<Job> {
        let mut waiting = self.lock();
        waiting.idle_workers += 1;
        loop {
            let next = match waiting.finals.pop_front() {
                Some(job) => Some(job),
                None => waiting.interims.pop_front(),
            };
            if let Some((job, _slot)) = next {
                waiting.idle_workers -= 1;
                m::queue_depth().set(waiting.len() as f64);
                return Some(job);
            }
            if waiting.closed {
                waiting.idle_workers -= 1;
                return None;
            }
            waiting = self
                .wake
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.slots.close();
        self.wake.notify_all();
    }
}

/// A decode's text and the mean probability of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub text: String,
    pub confidence: f32,
}

impl WhisperEngine {
    /// Load the model and start the workers. `sample_rate_hz` is `stt.sample_rate_hz`.
    ///
    /// # Errors
    /// Invalid settings, a wrong rate, a missing or unloadable model (the message says to run
    /// `voxflow models install`).
    pub fn new(config: &WhisperConfig, sample_rate_hz: u32) -> Result<WhisperEngine, WhisperError> {
        Self::with_audio_ctx(config, sample_rate_hz, AudioCtxRule::DEFAULT)
    }

    /// As [`WhisperEngine::new`], with another `audio_ctx` rule (for measurements).
    ///
    /// # Errors
    /// As [`WhisperEngine::new`].
    pub fn with_audio_ctx(
        config: &WhisperConfig,
        sample_rate_hz: u32,
        audio_ctx: AudioCtxRule,
    ) -> Result<WhisperEngine, WhisperError> {
        let settings = config.validate()?;
        if sample_rate_hz != SAMPLE_RATE_HZ {
            return Err(WhisperError::SampleRate(sample_rate_hz));
        }
        let context = load(&settings.model_path)?;
        if !context.is_multilingual() && settings.language != "en" {
            return Err(WhisperError::EnglishOnly(settings.language));
        }
        let decode = DecodeSettings {
            threads: i32::try_from(settings.threads_per_worker.get()).unwrap_or(i32::MAX),
            language: settings.language.clone(),
            audio_ctx,
        };
        // Every state first: a failure then leaves no worker thread behind.
        let states = (0..settings.workers.get())
            .map(|_| context.create_state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WhisperError::Worker(e.to_string()))?;
        let jobs = Arc::new(JobQueue::new(settings.queue_capacity.get()));
        for (index, state) in states.into_iter().enumerate() {
            let worker = Worker {
                state,
                queue: Arc::clone(&jobs),
                decode: decode.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("whisper-{index}"))
                .spawn(move || worker.run());
            if let Err(error) = spawned {
                // Let the workers already started end.
                jobs.close();
                return Err(WhisperError::Worker(error.to_string()));
            }
        }
        tracing::info!(
            model = %settings.model_path.display(),
            workers = settings.workers.get(),
            threads_per_worker = settings.threads_per_worker.get(),
            max_sessions = settings.max_sessions.get(),
            "Whisper engine ready."
        );
        Ok(WhisperEngine {
            inner: Arc::new(Inner {
                seats: Arc::new(Semaphore::new(settings.max_sessions.get())),
                settings,
                jobs,
            }),
        })
    }
}

impl SttEngine for WhisperEngine {
    fn name(&self) -> &'static str {
        "whisper"
    }

    fn vad_gate(&self) -> bool {
        self.inner.settings.vad_gate
    }

    fn open(&self, config: StreamConfig) -> Result<SttStream, SttError> {
        if config.sample_rate_hz != SAMPLE_RATE_HZ {
            return Err(SttError::Rejected {
                code: "INVALID_ARGUMENT".into(),
                message: format!(
                    "the Whisper engine reads {SAMPLE_RATE_HZ} Hz audio, not {} Hz",
                    config.sample_rate_hz
                ),
            });
        }
        let language = &self.inner.settings.language;
        let asked = primary_language(&config.language_code);
        if !asked.is_empty() && asked != *language {
            return Err(SttError::Rejected {
                code: "INVALID_ARGUMENT".into(),
                message: format!(
                    "this server's Whisper model transcribes {language:?}, not {:?}",
                    config.language_code
                ),
            });
        }
        let permit = Arc::clone(&self.inner.seats)
            .try_acquire_owned()
            .map_err(|_| {
                SttError::Overloaded(format!(
                    "all {} Whisper sessions are in use; retry later",
                    self.inner.settings.max_sessions
                ))
            })?;
        let seat = Seat::new(permit, m::streams());
        let (audio, audio_rx) = EngineAudio::channel(2);
        let (results_tx, results_rx) = EngineResults::channel(4);
        let session = Session::new(Arc::clone(&self.inner), config.interim_results);
        tokio::spawn(session.run(audio_rx, results_tx, seat));
        Ok(SttStream {
            audio,
            results: results_rx,
        })
    }
}

/// `en` from `en-US`, lowercased.
fn primary_language(code: &str) -> String {
    code.split(['-', '_'])
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// One of the `max_sessions` seats, given back when the session task ends.
struct Seat {
    _permit: OwnedSemaphorePermit,
    streams: Gauge,
}

impl Seat {
    fn new(permit: OwnedSemaphorePermit, streams: Gauge) -> Seat {
        streams.increment(1.0);
        Seat {
            _permit: permit,
            streams,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.streams.decrement(1.0);
    }
}

/// A model worker: one OS thread, one decoder state.
struct Worker {
    state: WhisperState,
    queue: Arc<JobQueue>,
    decode: DecodeSettings,
}

struct KindMetrics {
    queue_wait: Histogram,
    decode: Histogram,
    audio: Histogram,
}

impl KindMetrics {
    fn new(is_final: bool) -> KindMetrics {
        KindMetrics {
            queue_wait: m::queue_wait(is_final),
            decode: m::decode(is_final),
            audio: m::audio_decoded(is_final),
        }
    }
}

impl Worker {
    /// Decode jobs until the queue closes (the engine and all its sessions are gone).
    fn run(mut self) {
        while let Some(job) = self.queue.next() {
            if job.reply.is_closed() {
                // The session is gone; nobody would read the result.
                continue;
            }
            let metrics = KindMetrics::new(job.is_final);
            metrics
                .queue_wait
                .record(job.queued_at.elapsed().as_secs_f64());
            // tokio's clock falls back to the system clock outside a runtime.
            let started = Instant::now();
            let result = decode(&mut self.state, &self.decode, &job.samples, job.is_final);
            metrics.decode.record(started.elapsed().as_secs_f64());
            metrics
                .audio
                .record(job.samples.len() as f64 / f64::from(SAMPLE_RATE_HZ));
            if let Err(error) = &result {
                tracing::warn!(%error, "Whisper decode failed.");
            }
            let _ = job.reply.send(result.map_err(|e| e.to_string()));
        }
    }
}

/// Run Whisper on one utterance (16 kHz, [-1, 1)).
fn decode(
    state: &mut WhisperState,
    settings: &DecodeSettings,
    samples: &[f32],
    is_final: bool,
) -> Result<Decoded, whisper_rs::WhisperError> {
    let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
    params.set_n_threads(settings.threads);
    params.set_language(Some(&settings.language));
    params.set_translate(false);
    // Utterances are independent; feeding back earlier text makes errors repeat.
    params.set_no_context(true);
    // One utterance is one segment; no timestamp tokens to decode.
    params.set_single_segment(true);
    params.set_no_timestamps(true);
    params.set_suppress_blank(true);
    params.set_suppress_nst(true);
    if !is_final {
        // No re-decoding at higher temperatures when the greedy text looks unreliable: an
        // interim is soon replaced anyway, and its cost must stay one decode.
        params.set_temperature_inc(0.0);
    }
    params.set_audio_ctx(i32::try_from(settings.audio_ctx.frames(samples.len())).unwrap_or(0));
    params.set_print_special(false);
    params.set_print_progress(false);
    params.set_print_realtime(false);
    params.set_print_timestamps(false);
    state.full(params, samples)?;
    let mut text = String::new();
    let (mut p_sum, mut p_count) = (0.0f32, 0u32);
    for segment in state.as_iter() {
        text.push_str(&segment.to_str_lossy()?);
        for i in 0..segment.n_tokens() {
            if let Some(token) = segment.get_token(i) {
                // Special tokens (start, language, end of text) sit above the text vocabulary.
                if token.to_str_lossy().is_ok_and(|t| !t.starts_with("[_")) {
                    p_sum += token.token_probability();
                    p_count += 1;
                }
            }
        }
    }
    Ok(Decoded {
        text: clean_transcript(&text),
        confidence: if p_count == 0 {
            0.0
        } else {
            p_sum / p_count as f32
        },
    })
}

/// Drop Whisper's non-speech annotations (`[BLANK_AUDIO]`, `(music)`, …) and tidy spaces.
pub fn clean_transcript(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Audio being collected into an utterance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Utterance {
    pub id: u64,
    pub start_sample: u64,
    pub samples: Vec<i16>,
    /// Samples up to the end of the last speech batch.
    pub speech_len: usize,
    /// Length when the last interim was due.
    pub interim_len: usize,
}

impl Utterance {
    pub fn end_sample(&self) -> u64 {
        self.start_sample + self.samples.len() as u64
    }

    fn silence_len(&self) -> u64 {
        (self.samples.len() - self.speech_len) as u64
    }
}

/// Cuts a session's batches into utterances (all lengths in samples at 16 kHz).
#[derive(Debug)]
pub(crate) struct Segmenter {
    end_of_utterance: u64,
    max_utterance: usize,
    /// Recent non-speech while no utterance is open, ending at `idle_end`.
    idle: Vec<i16>,
    idle_end: u64,
    open: Option<Utterance>,
    next_id: u64,
}

impl Segmenter {
    pub fn new(settings: &WhisperSettings) -> Segmenter {
        let samples = |d: std::time::Duration| {
            u64::try_from(d.as_millis() * u128::from(SAMPLE_RATE_HZ) / 1_000).unwrap_or(u64::MAX)
        };
        Segmenter {
            end_of_utterance: samples(settings.end_of_utterance),
            max_utterance: usize::try_from(samples(settings.max_utterance)).unwrap_or(usize::MAX),
            idle: Vec::new(),
            idle_end: 0,
            open: None,
            next_id: 0,
        }
    }

    pub fn current(&self) -> Option<&Utterance> {
        self.open.as_ref()
    }

    /// Add a batch; utterances it ends go to `ended`.
    pub fn push(&mut self, batch: &AudioBatch, ended: &mut VecDeque<Utterance>) {
        let start = batch.start_sample;
        if let Some(open) = &mut self.open {
            let end = open.end_sample();
            if start > end {
                // Audio the VAD gate kept back: silence.
                let gap = start - end;
                if open.silence_len() + gap >= self.end_of_utterance {
                    ended.extend(self.close());
                } else {
                    open.samples.resize(open.samples.len() + gap as usize, 0);
                }
            }
        }
        if let Some(open) = &mut self.open {
            // Positions only grow; skip anything already held, defensively.
            let skip = usize::try_from(open.end_sample().saturating_sub(start))
                .unwrap_or(usize::MAX)
                .min(batch.samples.len());
            open.samples.extend_from_slice(&batch.samples[skip..]);
            if batch.speech {
                open.speech_len = open.samples.len();
            } else if open.silence_len() >= self.end_of_utterance {
                ended.extend(self.close());
                return;
            }
            if open.samples.len() >= self.max_utterance {
                ended.extend(self.close());
            }
        } else if batch.speech {
            let (start_sample, mut samples) = if !self.idle.is_empty() && self.idle_end == start {
                let held = std::mem::take(&mut self.idle);
                (start - held.len() as u64, held)
            } else {
                (start, Vec::new())
            };
            self.idle.clear();
            samples.extend_from_slice(&batch.samples);
            self.open = Some(Utterance {
                id: self.next_id,
                start_sample,
                speech_len: samples.len(),
                samples,
                interim_len: 0,
            });
            self.next_id += 1;
            if self
                .open
                .as_ref()
                .is_some_and(|o| o.samples.len() >= self.max_utterance)
            {
                ended.extend(self.close());
            }
        } else {
            // Non-speech between utterances: keep the latest as pre-roll.
            if self.idle_end != start {
                self.idle.clear();
            }
            self.idle.extend_from_slice(&batch.samples);
            self.idle_end = batch.end_sample();
            if self.idle.len() > PRE_ROLL_SAMPLES {
                let cut = self.idle.len() - PRE_ROLL_SAMPLES;
                self.idle.drain(..cut);
            }
        }
    }

    /// End the open utterance. Its trailing non-speech is cut off and kept as the pre-roll of
    /// the next one.
    pub fn close(&mut self) -> Option<Utterance> {
        let mut utterance = self.open.take()?;
        self.idle_end = utterance.end_sample();
        self.idle = utterance.samples.split_off(utterance.speech_len);
        if self.idle.len() > PRE_ROLL_SAMPLES {
            let cut = self.idle.len() - PRE_ROLL_SAMPLES;
            self.idle.drain(..cut);
        }
        Some(utterance)
    }

    /// Whether the open utterance grew by `interval` samples since the last interim was due;
    /// if so, that is now.
    pub fn take_interim(&mut self, interval: usize) -> Option<&Utterance> {
        let open = self.open.as_mut()?;
        if open.samples.len() - open.interim_len < interval {
            return None;
        }
        open.interim_len = open.samples.len();
        Some(open)
    }
}

/// A decode this session waits for.
struct InFlight {
    is_final: bool,
    utterance_id: u64,
    start_sample: u64,
    end_sample: u64,
    reply: oneshot::Receiver<Result<Decoded, String>>,
}

enum Event {
    Reply(Result<Result<Decoded, String>, oneshot::error::RecvError>),
    Room(Result<OwnedSemaphorePermit, AcquireError>),
    Input(Option<EngineInput>),
    Silence,
}

/// One stream's task: segment, submit, relay.
struct Session {
    inner: Arc<Inner>,
    skipped_in_flight: Counter,
    skipped_workers_busy: Counter,
    segmenter: Segmenter,
    interim_interval: Option<usize>,
    ended: VecDeque<Utterance>,
    in_flight: Option<InFlight>,
}

impl Session {
    fn new(inner: Arc<Inner>, interim_results: bool) -> Session {
        let interim_interval = inner
            .settings
            .interim_interval
            .filter(|_| interim_results)
            .map(|d| (d.as_millis() * u128::from(SAMPLE_RATE_HZ) / 1_000) as usize);
        Session {
            skipped_in_flight: m::interims_skipped("in_flight"),
            skipped_workers_busy: m::interims_skipped("workers_busy"),
            segmenter: Segmenter::new(&inner.settings),
            inner,
            interim_interval,
            ended: VecDeque::new(),
            in_flight: None,
        }
    }

    async fn run(
        mut self,
        mut audio: mpsc::Receiver<EngineInput>,
        results: ResultSender,
        _seat: Seat,
    ) {
        let inner = Arc::clone(&self.inner);
        let end_of_utterance = inner.settings.end_of_utterance;
        let mut input_open = true;
        let mut last_audio = Instant::now();
        let mut clock = LatencyClock::new("whisper");
        while input_open || !self.ended.is_empty() || self.in_flight.is_some() {
            let reading = input_open && self.ended.len() < MAX_WAITING_FINALS;
            if !reading {
                // Audio we do not read is not silence: restart the clock when reading resumes.
                last_audio = Instant::now();
            }
            let event = tokio::select! {
                biased;
                reply = async {
                    (&mut self.in_flight.as_mut().expect("guarded").reply).await
                }, if self.in_flight.is_some() => Event::Reply(reply),
                room = inner.jobs.slot(),
                    if self.in_flight.is_none() && !self.ended.is_empty() => Event::Room(room),
                input = audio.recv(), if reading => Event::Input(input),
                () = tokio::time::sleep_until(last_audio + end_of_utterance),
                    if reading && self.segmenter.current().is_some() => Event::Silence,
            };
            match event {
                Event::Reply(reply) => {
                    let job = self.in_flight.take().expect("a reply comes for a job");
                    let outcome = match reply {
                        Ok(Ok(decoded)) => Ok(self.result(&job, decoded)),
                        Ok(Err(message)) => Err(SttError::Unavailable(format!(
                            "Whisper decode failed: {message}"
                        ))),
                        Err(_) => Err(SttError::Unavailable("a Whisper worker stopped".into())),
                    };
                    match outcome {
                        Ok(None) => {}
                        Ok(Some(result)) => {
                            clock.received(&result);
                            if results.send(Ok(result)).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            let _ = results.send(Err(error)).await;
                            return;
                        }
                    }
                }
                Event::Room(Ok(slot)) => {
                    let utterance = self.ended.pop_front().expect("guarded");
                    let (job, in_flight) = job(true, &utterance);
                    inner.jobs.push_final(job, slot);
                    self.in_flight = Some(in_flight);
                }
                Event::Room(Err(_)) => {
                    let error = SttError::Unavailable("the Whisper workers stopped".into());
                    let _ = results.send(Err(error)).await;
                    return;
                }
                Event::Input(Some(EngineInput::Audio(batch))) => {
                    last_audio = Instant::now();
                    clock.handed_over(&batch);
                    self.segmenter.push(&batch, &mut self.ended);
                }
                Event::Input(Some(EngineInput::Finalize)) => {
                    self.ended.extend(self.segmenter.close());
                }
                Event::Input(None) => {
                    input_open = false;
                    self.ended.extend(self.segmenter.close());
                }
                Event::Silence => self.ended.extend(self.segmenter.close()),
            }
            self.maybe_interim();
        }
    }

    /// Submit an interim if one is due and a worker is idle for it; otherwise skip it.
    fn maybe_interim(&mut self) {
        let Some(interval) = self.interim_interval else {
            return;
        };
        if !self.ended.is_empty() {
            // Finals first.
            return;
        }
        let Some(utterance) = self.segmenter.take_interim(interval) else {
            return;
        };
        if self.in_flight.is_some() {
            self.skipped_in_flight.increment(1);
            return;
        }
        let (job, in_flight) = job(false, utterance);
        match self.inner.jobs.try_push_interim(job) {
            Ok(()) => self.in_flight = Some(in_flight),
            Err(_) => self.skipped_workers_busy.increment(1),
        }
    }

    /// The result to send for a finished decode, if any.
    fn result(&self, job: &InFlight, decoded: Decoded) -> Option<EngineResult> {
        if decoded.text.is_empty() {
            return None;
        }
        // An interim whose utterance ended while it was decoded is still sent: a final is
        // only submitted once nothing is in flight, so this interim precedes its utterance's
        // final, and on a loaded machine it is the first text the client sees.
        debug_assert!(
            job.is_final
                || self.segmenter.current().map(|u| u.id) == Some(job.utterance_id)
                || self.ended.front().map(|u| u.id) == Some(job.utterance_id)
        );
        Some(EngineResult {
            is_final: job.is_final,
            transcript: decoded.text,
            stability: if job.is_final { 1.0 } else { 0.5 },
            confidence: if job.is_final {
                decoded.confidence
            } else {
                0.0
            },
            start_sample: job.start_sample,
            end_sample: job.end_sample,
        })
    }
}

/// A decode job for `utterance`, and what the session keeps to wait for it.
fn job(is_final: bool, utterance: &Utterance) -> (Job, InFlight) {
    let (reply, rx) = oneshot::channel();
    let mut samples: Vec<f32> = utterance
        .samples
        .iter()
        .map(|&s| f32::from(s) / 32_768.0)
        .collect();
    if samples.len() < MIN_DECODE_SAMPLES {
        samples.resize(MIN_DECODE_SAMPLES, 0.0);
    }
    let job = Job {
        is_final,
        samples,
        queued_at: Instant::now(),
        reply,
    };
    let in_flight = InFlight {
        is_final,
        utterance_id: utterance.id,
        start_sample: utterance.start_sample,
        end_sample: utterance.end_sample(),
        reply: rx,
    };
    (job, in_flight)
}
