//! The speech-to-text engine seam.
//!
//! The `stt` stage opens one [`SttStream`] per session and drives it: audio and finalize
//! requests go in through a small bounded channel (a full channel means the engine is busy, which
//! is when the batch stage accumulates), results come out in order. Dropping the audio sender
//! half-closes the stream; the engine then sends its last finals and closes the results channel.

use tokio::sync::mpsc;

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

/// One open engine stream.
pub struct SttStream {
    pub audio: mpsc::Sender<EngineInput>,
    pub results: mpsc::Receiver<Result<EngineResult, SttError>>,
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
