use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whisper reads at most 30 s per decode; keep a margin for the padding the engine adds.
pub const MAX_UTTERANCE_LIMIT_MS: u64 = 28_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WhisperConfig {
    /// A ggml Whisper model (`voxflow models install` writes the default one; `voxflow models
    /// convert` makes one from a CTranslate2 directory). Relative paths are from the working
    /// directory. Missing: `voxflow serve` refuses to start and says what to run.
    pub model_path: PathBuf,
    /// Model workers: OS threads, each with its own decoder state (about 20 MB for tiny.en),
    /// all sharing one loaded model. At most this many utterances are decoded at once; more
    /// wait in the queue (`voxflow_whisper_queue_depth_jobs`).
    pub workers: usize,
    /// CPU threads each worker uses for one decode. workers × threads_per_worker should not
    /// exceed the cores, or decodes slow each other down.
    pub threads_per_worker: usize,
    /// Decode jobs waiting for a worker, over all sessions; workers take finals first. Interims
    /// are only queued for an idle worker, so under load they are skipped
    /// (`voxflow_whisper_interims_skipped_total`) and finals wait
    /// (`voxflow_whisper_queue_wait_seconds`). When it is full, a session holds up to two ended
    /// utterances, then stops reading audio: the pressure moves to the edges before the engine.
    pub queue_capacity: usize,
    /// Sessions this engine serves at once; further sessions are refused with `overloaded`
    /// (close 1013, `voxflow_sessions_refused_total{reason="engine"}`) rather than slowing
    /// everyone down. On 2 shared cores, 8 talkers speaking most of the time kept finals within
    /// ~1.7 s (p90) of the end of speech, 12 within ~3.7 s, 16 fell behind for good
    /// (`measure_concurrent_sessions` in tests.rs).
    pub max_sessions: usize,
    /// Re-decode the growing utterance after this much new audio to send an interim result,
    /// but only while a worker is free for it: under load interims are skipped first.
    /// 0 = finals only.
    pub interim_interval_ms: u64,
    /// An utterance this long is finalized even while speech goes on (Whisper reads at most
    /// 30 s at once; longer utterances also make every interim decode slower).
    pub max_utterance_ms: u64,
    /// Silence that ends an utterance, on top of the VAD's hangover. With the VAD gate on, the
    /// engine sees no audio during silence, so this is also wall time without audio.
    pub end_of_utterance_ms: u64,
    /// Keep non-speech (beyond the VAD's pre-roll and hangover) from the engine: silence is
    /// never decoded, and Whisper invents less text from noise.
    pub vad_gate: bool,
    /// Language the model transcribes (`en` for the English-only tiny.en). Sessions asking for
    /// another language (their `language_code`, e.g. `de-DE`) are refused.
    pub language: String,
}

impl Default for WhisperConfig {
    fn default() -> Self {
        WhisperConfig {
            model_path: PathBuf::from("models/ggml-tiny.en.bin"),
            workers: 2,
            threads_per_worker: 1,
            queue_capacity: 4,
            max_sessions: 8,
            interim_interval_ms: 1_000,
            max_utterance_ms: 10_000,
            end_of_utterance_ms: 300,
            vad_gate: true,
            language: "en".into(),
        }
    }
}

/// [`WhisperConfig`] checked, in the engine's units.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperSettings {
    pub model_path: PathBuf,
    pub workers: NonZeroUsize,
    pub threads_per_worker: NonZeroUsize,
    pub queue_capacity: NonZeroUsize,
    pub max_sessions: NonZeroUsize,
    /// `None`: no interims.
    pub interim_interval: Option<Duration>,
    pub max_utterance: Duration,
    pub end_of_utterance: Duration,
    pub vad_gate: bool,
    pub language: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stt.whisper.{key}: {message}")]
pub struct WhisperConfigError {
    pub key: &'static str,
    pub message: String,
}

impl WhisperConfig {
    /// Check every value, without touching the model file.
    ///
    /// # Errors
    /// The first invalid value, by key.
    pub fn validate(&self) -> Result<WhisperSettings, WhisperConfigError> {
        let nonzero = |key: &'static str, value: usize| {
            NonZeroUsize::new(value).ok_or(WhisperConfigError {
                key,
                message: "must be at least 1".into(),
            })
        };
        if self.model_path.as_os_str().is_empty() {
            return Err(WhisperConfigError {
                key: "model_path",
                message: "must name a ggml model file".into(),
            });
        }
        if !(1_000..=MAX_UTTERANCE_LIMIT_MS).contains(&self.max_utterance_ms) {
            return Err(WhisperConfigError {
                key: "max_utterance_ms",
                message: format!(
                    "must be 1000..={MAX_UTTERANCE_LIMIT_MS}, got {}",
                    self.max_utterance_ms
                ),
            });
        }
        if self.end_of_utterance_ms == 0 || self.end_of_utterance_ms > 10_000 {
            return Err(WhisperConfigError {
                key: "end_of_utterance_ms",
                message: format!("must be 1..=10000, got {}", self.end_of_utterance_ms),
            });
        }
        if self.interim_interval_ms != 0 && self.interim_interval_ms < 100 {
            return Err(WhisperConfigError {
                key: "interim_interval_ms",
                message: format!(
                    "must be 0 (off) or at least 100, got {}",
                    self.interim_interval_ms
                ),
            });
        }
        let language = self.language.trim().to_ascii_lowercase();
        if language.len() < 2 || !language.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(WhisperConfigError {
                key: "language",
                message: format!(
                    "must be a Whisper language code such as \"en\", got {:?}",
                    self.language
                ),
            });
        }
        Ok(WhisperSettings {
            model_path: self.model_path.clone(),
            workers: nonzero("workers", self.workers)?,
            threads_per_worker: nonzero("threads_per_worker", self.threads_per_worker)?,
            queue_capacity: nonzero("queue_capacity", self.queue_capacity)?,
            max_sessions: nonzero("max_sessions", self.max_sessions)?,
            interim_interval: (self.interim_interval_ms > 0)
                .then(|| Duration::from_millis(self.interim_interval_ms)),
            max_utterance: Duration::from_millis(self.max_utterance_ms),
            end_of_utterance: Duration::from_millis(self.end_of_utterance_ms),
            vad_gate: self.vad_gate,
            language,
        })
    }
}
