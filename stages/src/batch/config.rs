use serde::{Deserialize, Serialize};

/// Google refuses a streaming request over 25,600 bytes of audio.
pub const MAX_REQUEST_BYTES: usize = 25_600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Longest audio one STT request may carry. Audio accumulates only while the engine is
    /// busy; a larger value rides out longer stalls without blocking upstream, at the cost of
    /// bigger (later) requests. Blocking shows in `voxflow_stage_send_blocked_seconds{stage="batch"}`.
    pub max_duration_ms: u64,
    /// Largest request, in bytes of LINEAR16 audio (at most 25,600, Google's limit).
    pub max_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_duration_ms: 100,
            max_bytes: MAX_REQUEST_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("batch.max_duration_ms must be between 10 and 10000, got {0}")]
    Duration(u64),
    #[error("batch.max_bytes must be between 320 and {MAX_REQUEST_BYTES}, got {0}")]
    Bytes(usize),
}

/// Validated batch settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most samples in one batch, from both limits, at the engine's rate.
    pub max_samples: usize,
}

impl BatchConfig {
    /// # Errors
    /// When a limit is out of range.
    pub fn validate(&self, sample_rate_hz: u32) -> Result<BatchSettings, BatchError> {
        if !(10..=10_000).contains(&self.max_duration_ms) {
            return Err(BatchError::Duration(self.max_duration_ms));
        }
        if !(320..=MAX_REQUEST_BYTES).contains(&self.max_bytes) {
            return Err(BatchError::Bytes(self.max_bytes));
        }
        let by_time = (self.max_duration_ms * u64::from(sample_rate_hz) / 1000) as usize;
        Ok(BatchSettings {
            max_samples: by_time.min(self.max_bytes / 2),
        })
    }
}
