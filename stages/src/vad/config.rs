use serde::{Deserialize, Serialize};

use super::shortcut::WINDOW;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// Run voice-activity detection. When off, every frame counts as speech.
    pub enabled: bool,
    /// Score (0..1) at or above which a 16 ms window is speech.
    pub threshold: f32,
    /// Audio after the last speech window still marked as speech, so word endings and short
    /// pauses reach the engine.
    pub hangover_ms: u64,
    /// Non-speech audio kept before speech and sent with it when an engine gates on the VAD,
    /// so word onsets are not clipped. Costs memory per session (32 bytes per ms).
    pub pre_roll_ms: u64,
    /// Longest stretch the VAD may classify without running its model, where the answer is
    /// already known: inside confident speech, and in background audio the model has settled
    /// on. Each 16 ms window not scored saves about 5 µs of CPU. Speech that ends in sound as
    /// loud as itself (music, a television) is found to end up to this much later. 0 scores
    /// every window.
    pub max_unscored_ms: u64,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            enabled: true,
            threshold: 0.5,
            hangover_ms: 300,
            pre_roll_ms: 300,
            max_unscored_ms: 500,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VadError {
    #[error("vad.threshold must be between 0 and 1, got {0}")]
    Threshold(f32),
    #[error("vad.{0} must be at most 10000 ms")]
    TooLong(&'static str),
    #[error("the VAD needs 16000 Hz audio; the engine takes {0} Hz (set vad.enabled = false)")]
    Rate(u32),
}

/// Validated VAD settings, in samples at the engine's rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadSettings {
    pub enabled: bool,
    pub threshold: f32,
    pub hangover_samples: u64,
    pub pre_roll_samples: u64,
    /// 16 ms windows that may go unscored in a row.
    pub max_unscored_windows: u32,
}

impl VadConfig {
    /// # Errors
    /// When a value is out of range or the engine's rate is not 16 kHz.
    pub fn validate(&self, sample_rate_hz: u32) -> Result<VadSettings, VadError> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(VadError::Threshold(self.threshold));
        }
        if self.hangover_ms > 10_000 {
            return Err(VadError::TooLong("hangover_ms"));
        }
        if self.pre_roll_ms > 10_000 {
            return Err(VadError::TooLong("pre_roll_ms"));
        }
        if self.max_unscored_ms > 10_000 {
            return Err(VadError::TooLong("max_unscored_ms"));
        }
        if self.enabled && sample_rate_hz != 16_000 {
            return Err(VadError::Rate(sample_rate_hz));
        }
        let samples = |ms: u64| ms * u64::from(sample_rate_hz) / 1000;
        Ok(VadSettings {
            enabled: self.enabled,
            threshold: self.threshold,
            hangover_samples: samples(self.hangover_ms),
            pre_roll_samples: samples(self.pre_roll_ms),
            max_unscored_windows: u32::try_from(samples(self.max_unscored_ms) / WINDOW as u64)
                .unwrap_or(u32::MAX),
        })
    }
}
