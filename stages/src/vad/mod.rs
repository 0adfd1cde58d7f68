//! VAD: frames in, the same frames marked speech or non-speech out.
//!
//! Consumes [`AudioFrame`]s at 16 kHz and scores each 16 ms window with earshot; a frame is
//! speech if any of its windows is, or if it falls within the hangover after speech. Keeps the
//! detector state, the samples of an unfinished window and, when the engine gates on the VAD,
//! up to `pre_roll` of recent non-speech frames: those are sent ahead of the next speech frame
//! so onsets are intact, and otherwise discarded (counted in `voxflow_vad_gated_audio_seconds`,
//! a policy, not a loss). `flush` discards the held non-speech frames the same way.

mod config;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::convert::Infallible;

use pipeline::metrics::{Histogram, sessions};
use pipeline::{AudioFrame, AudioLength, Processor};

pub use config::{VadConfig, VadError, VadSettings};

/// earshot scores windows of exactly this many samples at 16 kHz.
const WINDOW: usize = 256;

pub struct Vad {
    settings: VadSettings,
    gate: bool,
    detector: Option<Box<earshot::Detector>>,
    window: Vec<i16>,
    /// Samples still inside the hangover after the last speech window.
    hangover_left: u64,
    held: VecDeque<AudioFrame>,
    held_samples: u64,
    gated: Histogram,
}

impl Vad {
    pub fn new(settings: VadSettings, gate: bool) -> Vad {
        Vad {
            settings,
            gate: gate && settings.enabled,
            detector: settings.enabled.then(earshot::Detector::default_boxed),
            window: Vec::with_capacity(WINDOW),
            hangover_left: 0,
            held: VecDeque::new(),
            held_samples: 0,
            gated: sessions::vad_gated(),
        }
    }

    /// Score the frame's windows; true if any is speech or the hangover is still running.
    fn classify(&mut self, samples: &[i16]) -> bool {
        let Some(detector) = self.detector.as_mut() else {
            return true;
        };
        let mut speech = self.hangover_left > 0;
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (WINDOW - self.window.len()).min(rest.len());
            self.window.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.window.len() < WINDOW {
                break;
            }
            if detector.predict_i16(&self.window) >= self.settings.threshold {
                self.hangover_left = self.settings.hangover_samples;
                speech = true;
            } else {
                self.hangover_left = self.hangover_left.saturating_sub(WINDOW as u64);
            }
            self.window.clear();
        }
        speech
    }

    fn discard_held(&mut self) {
        for frame in self.held.drain(..) {
            self.gated.record(frame.audio_us() as f64 / 1e6);
        }
        self.held_samples = 0;
    }
}

impl Processor for Vad {
    type In = AudioFrame;
    type Out = AudioFrame;
    type Error = Infallible;

    fn process(
        &mut self,
        mut frame: AudioFrame,
        out: &mut Vec<AudioFrame>,
    ) -> Result<(), Infallible> {
        frame.speech = self.classify(&frame.samples);
        if !self.gate {
            out.push(frame);
            return Ok(());
        }
        if frame.speech {
            out.extend(self.held.drain(..));
            self.held_samples = 0;
            out.push(frame);
            return Ok(());
        }
        self.held_samples += frame.samples.len() as u64;
        self.held.push_back(frame);
        while self.held_samples > self.settings.pre_roll_samples {
            let Some(old) = self.held.pop_front() else {
                break;
            };
            self.held_samples -= old.samples.len() as u64;
            self.gated.record(old.audio_us() as f64 / 1e6);
        }
        Ok(())
    }

    fn flush(&mut self, _out: &mut Vec<AudioFrame>) {
        self.discard_held();
    }
}
