use serde::{Deserialize, Serialize};

use super::google::GoogleConfig;
use super::whisper::WhisperConfig;

/// Which engine transcribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Whisper on this machine (whisper.cpp): no account, no network; the default.
    Whisper,
    /// Google Cloud Speech-to-Text v1 (or any server speaking its gRPC API, e.g. the emulator).
    Google,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SttConfig {
    pub engine: EngineKind,
    /// Rate of the LINEAR16 audio sent to the engine; input is resampled to it.
    pub sample_rate_hz: u32,
    /// Defaults for sessions that do not say otherwise in `start`.
    pub language_code: String,
    pub interim_results: bool,
    pub google: GoogleConfig,
    pub whisper: WhisperConfig,
}

impl Default for SttConfig {
    fn default() -> Self {
        SttConfig {
            engine: EngineKind::Whisper,
            sample_rate_hz: 16_000,
            language_code: "en-US".into(),
            interim_results: true,
            google: GoogleConfig::default(),
            whisper: WhisperConfig::default(),
        }
    }
}
