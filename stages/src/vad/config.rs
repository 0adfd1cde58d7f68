use serde::{Deserialize, Serialize};

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
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            enabled: true,
            threshold: 0.5,
            hangover_ms: 300,
            pre_roll_ms: 300,
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
        if self.enabled && sample_rate_hz != 16_000 {
            return Err(VadError::Rate(sample_rate_hz));
        }
        let samples = |ms: u64| ms * u64::from(sample_rate_hz) / 1000;
        Ok(VadSettings {
            enabled: self.enabled,
            threshold: self.threshold,
            hangover_samples: samples(self.hangover_ms),
            pre_roll_samples: samples(self.pre_roll_ms),
        })
    }
}
