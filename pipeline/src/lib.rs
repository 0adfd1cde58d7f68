//! The voxflow stage runtime.
//!
//! `ws ingress → decode → resample → vad → batch → stt → egress`
//!
//! Stages are tasks (or synchronous [`Processor`]s run by [`run_processor`]) joined by bounded
//! [`edge`]s. Each edge has a capacity, a send timeout and an [`OverflowPolicy`] applied when
//! the timeout expires; every item an edge drops is counted in the metrics catalog and reported
//! to the session so the client is told.
//!
//! # Layout
//! - [`audio`]: shared audio types (`Encoding`, `AudioFormat`, `AudioFrame`, `AudioBatch`).
//! - [`edge`]: bounded, timed, accounted channels between stages.
//! - [`processor`]: the synchronous stage shape and the adapter that runs it as a task.
//! - [`session`]: what the stages of one session share (drops to report, a fatal error).
//! - [`rare`]: a future polled only when it was woken, for rare events beside hot ones.
//! - [`engine`]: the `SttEngine` trait the `stt` stage drives.
//! - [`metrics`]: every metric name and label voxflow emits.
//! - `testing` (feature `testing`): a deterministic in-process engine for tests.

pub mod audio;
pub mod edge;
pub mod engine;
pub mod metrics;
pub mod processor;
pub mod protocol;
pub mod rare;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;

pub use audio::{AudioBatch, AudioFormat, AudioFrame, Encoding, Payload};
pub use edge::{EdgeError, EdgeRx, EdgeSettings, EdgeTx, OverflowPolicy, edge};
pub use engine::{
    AudioSink, EngineAudio, EngineClosed, EngineInput, EngineResult, EngineResults, LatencyClock,
    ResultSender, StreamConfig, SttEngine, SttError, SttStream, TrySendError,
};
pub use processor::{Processor, run_processor};
pub use session::{SessionError, SessionShared};

/// Stable stage ids: the only values of the `stage` metric label and span field.
pub mod stage {
    pub const INGRESS: &str = "ingress";
    pub const DECODE: &str = "decode";
    pub const RESAMPLE: &str = "resample";
    pub const VAD: &str = "vad";
    pub const BATCH: &str = "batch";
    pub const STT: &str = "stt";
    pub const EGRESS: &str = "egress";
    /// Every stage, in graph order.
    pub const ALL: [&str; 7] = [INGRESS, DECODE, RESAMPLE, VAD, BATCH, STT, EGRESS];
}

/// What flows on an edge: data, or an in-band request to finalize what came before it.
///
/// A `Finalize` marker travels with the audio so that "finalize what was sent so far" means
/// exactly the audio that preceded it, whatever the queues hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Flow<T> {
    Data(T),
    Finalize,
}

/// How much audio an item carries, so drops can be reported in milliseconds.
pub trait AudioLength {
    /// Audio carried, in microseconds (0 for markers).
    fn audio_us(&self) -> u64;
}

impl<T: AudioLength> AudioLength for Box<T> {
    fn audio_us(&self) -> u64 {
        (**self).audio_us()
    }
}

impl<T: AudioLength> AudioLength for Flow<T> {
    fn audio_us(&self) -> u64 {
        match self {
            Flow::Data(item) => item.audio_us(),
            Flow::Finalize => 0,
        }
    }
}
