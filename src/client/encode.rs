//! Client-side audio encoding for `voxflow stream` and the load tester.

use anyhow::bail;
use pipeline::Encoding;

pub enum Encoder {
    Linear16 {
        rate: u32,
    },
    Float32 {
        rate: u32,
    },
    Mulaw {
        rate: u32,
    },
    Alaw {
        rate: u32,
    },
    Opus {
        rate: u32,
        channels: u16,
        encoder: Box<opus::Encoder>,
    },
}

impl Encoder {
    /// # Errors
    /// When the encoding cannot carry this rate or channel count.
    pub fn new(encoding: Encoding, rate: u32, channels: u16) -> anyhow::Result<Encoder> {
        if !encoding.supports_rate(rate) {
            bail!(
                "{} cannot carry {rate} Hz audio; resample the file first",
                encoding.as_str()
            );
        }
        Ok(match encoding {
            Encoding::Linear16 => Encoder::Linear16 { rate },
            Encoding::Float32 => Encoder::Float32 { rate },
            Encoding::Mulaw => Encoder::Mulaw { rate },
            Encoding::Alaw => Encoder::Alaw { rate },
            Encoding::Opus => {
                let layout = if channels == 2 {
                    opus::Channels::Stereo
                } else {
                    opus::Channels::Mono
                };
                let encoder = opus::Encoder::new(rate, layout, opus::Application::Voip)?;
                Encoder::Opus {
                    rate,
                    channels,
                    encoder: Box::new(encoder),
                }
            }
        })
    }

    pub fn rate(&self) -> u32 {
        match self {
            Encoder::Linear16 { rate }
            | Encoder::Float32 { rate }
            | Encoder::Mulaw { rate }
            | Encoder::Alaw { rate }
            | Encoder::Opus { rate, .. } => *rate,
        }
    }

    /// Samples per channel in one frame of `frame_ms`; Opus allows only 10, 20, 40 or 60 ms.
    pub fn frame_samples(&self, frame_ms: u32) -> usize {
        let frame_ms = match self {
            Encoder::Opus { .. } if ![10, 20, 40, 60].contains(&frame_ms) => 20,
            _ => frame_ms,
        };
        (self.rate() * frame_ms / 1000) as usize
    }

    /// Encode interleaved samples (one frame).
    ///
    /// # Errors
    /// Opus refuses a frame of the wrong length.
    pub fn encode(&mut self, samples: &[i16]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Encoder::Linear16 { .. } => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
            Encoder::Float32 { .. } => samples
                .iter()
                .flat_map(|&s| (f32::from(s) / 32_768.0).to_le_bytes())
                .collect(),
            Encoder::Mulaw { .. } => samples.iter().map(|&s| mulaw(s)).collect(),
            Encoder::Alaw { .. } => samples.iter().map(|&s| alaw(s)).collect(),
            Encoder::Opus {
                encoder,
                channels,
                rate,
            } => {
                // The last frame of a file is usually short; Opus needs whole frames.
                let whole = (*rate as usize / 50) * usize::from(*channels);
                let mut frame = samples.to_vec();
                if frame.len() < whole {
                    frame.resize(whole, 0);
                }
                encoder.encode_vec(&frame, 4_000)?
            }
        })
    }
}

/// G.711 μ-law compression of one sample.
fn mulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let mut value = i32::from(sample);
    let sign = if value < 0 { 0x80 } else { 0 };
    if value < 0 {
        value = -value;
    }
    let value = value.min(CLIP) + BIAS;
    let exponent = (7 - (value as u32).leading_zeros().saturating_sub(17).min(7)) as i32;
    let mantissa = (value >> (exponent + 3)) & 0x0f;
    !((sign | (exponent << 4) | mantissa) as u8)
}

/// G.711 A-law compression of one sample.
fn alaw(sample: i16) -> u8 {
    let value = i32::from(sample);
    let (sign, magnitude) = if value >= 0 {
        (0x80, value)
    } else {
        (0, -value - 1)
    };
    let magnitude = magnitude.min(32_767) >> 3;
    let encoded = if magnitude < 32 {
        magnitude >> 1
    } else {
        let exponent = 31 - (magnitude as u32).leading_zeros() as i32 - 4;
        (exponent << 4) | ((magnitude >> exponent) & 0x0f)
    };
    ((sign | encoded) as u8) ^ 0x55
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g711_round_trips_within_quantisation() {
        for sample in (-32_000i16..32_000).step_by(97) {
            for (byte, tolerance) in [(mulaw(sample), "mulaw"), (alaw(sample), "alaw")] {
                let decoded = if tolerance == "mulaw" {
                    mulaw_expand(byte)
                } else {
                    alaw_expand(byte)
                };
                let error = (i32::from(decoded) - i32::from(sample)).abs();
                let allowed = (i32::from(sample).abs() / 16).max(16);
                assert!(
                    error <= allowed,
                    "{tolerance}: {sample} → {byte:#04x} → {decoded}"
                );
            }
        }
    }

    // Independent expansions (G.711 formulas), so the test does not check the code against itself.
    fn mulaw_expand(byte: u8) -> i16 {
        let u = !byte;
        let magnitude = ((((u & 0x0f) as i32) << 3) + 0x84) << ((u >> 4) & 7);
        (if u & 0x80 != 0 {
            0x84 - magnitude
        } else {
            magnitude - 0x84
        }) as i16
    }

    fn alaw_expand(byte: u8) -> i16 {
        let a = byte ^ 0x55;
        let exponent = (a >> 4) & 7;
        let mantissa = (a & 0x0f) as i32;
        let magnitude = if exponent == 0 {
            (mantissa << 4) + 8
        } else {
            ((mantissa << 4) + 0x108) << (exponent - 1)
        };
        (if a & 0x80 != 0 { magnitude } else { -magnitude }) as i16
    }
}
