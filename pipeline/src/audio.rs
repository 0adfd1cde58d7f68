//! Audio types shared by the stages.
//!
//! Positions are integer sample counts on the session's audio clock at the engine's rate;
//! they become milliseconds only at the edges (egress, warnings).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::AudioLength;

/// Encodings a client may send. Names follow Google Speech-to-Text's `AudioEncoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Encoding {
    /// Signed 16-bit little-endian PCM.
    Linear16,
    /// One raw Opus packet per message (what Android's MediaCodec emits).
    Opus,
    /// G.711 μ-law, 8 bits per sample.
    Mulaw,
    /// G.711 A-law, 8 bits per sample.
    Alaw,
    /// 32-bit little-endian IEEE float PCM (what browsers capture).
    Float32,
}

impl Encoding {
    pub const ALL: [Encoding; 5] = [
        Encoding::Linear16,
        Encoding::Opus,
        Encoding::Mulaw,
        Encoding::Alaw,
        Encoding::Float32,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Linear16 => "LINEAR16",
            Encoding::Opus => "OPUS",
            Encoding::Mulaw => "MULAW",
            Encoding::Alaw => "ALAW",
            Encoding::Float32 => "FLOAT32",
        }
    }

    pub fn parse(name: &str) -> Option<Encoding> {
        Encoding::ALL
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(name))
    }

    /// Bytes per sample per channel, for fixed-size encodings.
    pub fn bytes_per_sample(self) -> Option<usize> {
        match self {
            Encoding::Linear16 => Some(2),
            Encoding::Mulaw | Encoding::Alaw => Some(1),
            Encoding::Float32 => Some(4),
            Encoding::Opus => None,
        }
    }

    /// Sample rates this encoding can carry.
    pub fn supports_rate(self, rate_hz: u32) -> bool {
        match self {
            Encoding::Opus => matches!(rate_hz, 8_000 | 12_000 | 16_000 | 24_000 | 48_000),
            _ => (8_000..=48_000).contains(&rate_hz),
        }
    }
}

/// The format of a session's input audio, fixed when the session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormat {
    pub encoding: Encoding,
    pub sample_rate_hz: u32,
    pub channels: u16,
}

impl AudioFormat {
    /// Duration of `len` encoded bytes, in microseconds, if the encoding has a fixed size.
    pub fn bytes_to_us(&self, len: usize) -> Option<u64> {
        let frame = self.encoding.bytes_per_sample()? * usize::from(self.channels);
        Some((len / frame) as u64 * 1_000_000 / u64::from(self.sample_rate_hz))
    }
}

/// An encoded audio message as it came off the socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub data: PayloadData,
    /// Estimated audio length (exact for fixed-size encodings; one Opus frame otherwise),
    /// used only to report drops before decode.
    pub audio_us: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PayloadData {
    /// The `content` of a JSON message: base64 text, decoded by the decode stage.
    Base64(Bytes),
    /// A binary WebSocket frame.
    Binary(Bytes),
}

impl AudioLength for Payload {
    fn audio_us(&self) -> u64 {
        self.audio_us
    }
}

/// Mono PCM at some rate, with its position on the session clock.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFrame {
    pub samples: Vec<i16>,
    pub sample_rate_hz: u32,
    /// Index of the first sample, counted at `sample_rate_hz` since the session began.
    pub start_sample: u64,
    /// Set by the VAD stage; `true` until then.
    pub speech: bool,
}

impl AudioFrame {
    pub fn end_sample(&self) -> u64 {
        self.start_sample + self.samples.len() as u64
    }
}

impl AudioLength for AudioFrame {
    fn audio_us(&self) -> u64 {
        self.samples.len() as u64 * 1_000_000 / u64::from(self.sample_rate_hz.max(1))
    }
}

/// Contiguous audio for one STT request, at the engine's rate.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioBatch {
    pub samples: Vec<i16>,
    pub sample_rate_hz: u32,
    pub start_sample: u64,
    /// Whether any frame in the batch was speech.
    pub speech: bool,
}

impl AudioBatch {
    pub fn end_sample(&self) -> u64 {
        self.start_sample + self.samples.len() as u64
    }

    /// Size of the batch on the wire as LINEAR16.
    pub fn len_bytes(&self) -> usize {
        self.samples.len() * 2
    }
}

impl AudioLength for AudioBatch {
    fn audio_us(&self) -> u64 {
        self.samples.len() as u64 * 1_000_000 / u64::from(self.sample_rate_hz.max(1))
    }
}

/// Convert a sample position to milliseconds at `rate_hz`.
pub fn samples_to_ms(samples: u64, rate_hz: u32) -> u64 {
    samples * 1_000 / u64::from(rate_hz.max(1))
}
