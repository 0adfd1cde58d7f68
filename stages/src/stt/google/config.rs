use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoogleConfig {
    /// `https://speech.googleapis.com`, a regional endpoint, or `http://HOST:PORT` for an emulator.
    pub endpoint: String,
    /// Keep non-speech (beyond the VAD's pre-roll and hangover) from Google: silence is neither
    /// billed nor able to trip Google's audio timeout.
    pub vad_gate: bool,
}

impl Default for GoogleConfig {
    fn default() -> Self {
        GoogleConfig {
            endpoint: "https://speech.googleapis.com".into(),
            vad_gate: true,
        }
    }
}
