//! VAD: frames in, the same frames marked speech or non-speech out.
//!
//! Consumes [`AudioFrame`]s at 16 kHz and classifies each 16 ms window with earshot, running the
//! model only where its answer can change a frame (see [`shortcut`]); a frame is speech if any
//! of its windows is, or if it falls within the hangover after speech. Keeps the detector state,
//! the samples of an unfinished window, the last windows the model skipped and, when the engine
//! gates on the VAD, up to `pre_roll` of recent non-speech frames: those are sent ahead of the
//! next speech frame so onsets are intact, and otherwise discarded (counted in
//! `voxflow_vad_gated_audio_seconds`, a policy, not a loss). `flush` discards the held non-speech
//! frames the same way.

mod config;
mod shortcut;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use pipeline::metrics::sessions;
use pipeline::{AudioFrame, AudioLength, Processor};

pub use config::{VadConfig, VadError, VadSettings};
use shortcut::{Plan, RESYNC_WINDOWS, Shortcut, WINDOW};

pub struct Vad {
    settings: VadSettings,
    gate: bool,
    model: Option<Model>,
    /// Samples still inside the hangover after the last speech window.
    hangover_left: u64,
    held: VecDeque<AudioFrame>,
    held_samples: u64,
}

/// earshot, what it has not seen since it last ran, and when it needs to run.
struct Model {
    detector: Box<earshot::Detector>,
    shortcut: Shortcut,
    /// A ring of windows: the last ones not fed to the detector (`unfed_len` of them from
    /// `unfed_start`), then the one being filled (`filled` samples). A skipped window joins the
    /// ring where it was filled, without a copy. Boxed: the stage is moved through several
    /// nested futures, each of which would otherwise hold its own copy.
    ring: Box<[[i16; WINDOW]; RING]>,
    unfed_start: usize,
    unfed_len: usize,
    filled: usize,
    /// Windows the detector has scored, replays included (for tests).
    #[cfg(test)]
    runs: u64,
}

impl Model {
    fn new(settings: &VadSettings) -> Model {
        Model {
            detector: earshot::Detector::default_boxed(),
            shortcut: Shortcut::new(settings.max_unscored_windows, settings.threshold),
            ring: Box::new([[0; WINDOW]; RING]),
            unfed_start: 0,
            unfed_len: 0,
            filled: 0,
            #[cfg(test)]
            runs: 0,
        }
    }

    /// The ring slot of the window being filled: the one after the unfed windows.
    fn current(&self) -> usize {
        (self.unfed_start + self.unfed_len) % RING
    }

    /// Add samples to the window being filled; how many it took (all, or up to a full window).
    fn fill(&mut self, samples: &[i16]) -> usize {
        let current = self.current();
        let take = (WINDOW - self.filled).min(samples.len());
        self.ring[current][self.filled..self.filled + take].copy_from_slice(&samples[..take]);
        self.filled += take;
        take
    }

    /// Whether the window just filled is speech, scoring it only if the shortcut says so.
    fn classify(&mut self, threshold: f32) -> bool {
        debug_assert_eq!(self.filled, WINDOW);
        self.filled = 0;
        let current = self.current();
        let energy = shortcut::energy(&self.ring[current]);
        let plan = self.shortcut.plan(energy);
        match plan {
            Plan::Speech | Plan::Silence => {
                // Kept as the newest unfed window; the oldest goes when there are too many.
                if self.unfed_len == RESYNC_WINDOWS {
                    self.unfed_start = (self.unfed_start + 1) % RING;
                } else {
                    self.unfed_len += 1;
                }
                return plan == Plan::Speech;
            }
            Plan::Score => {
                for i in 0..self.unfed_len {
                    let index = (self.unfed_start + i) % RING;
                    #[cfg(test)]
                    {
                        self.runs += 1;
                    }
                    self.detector.predict_i16(&self.ring[index]);
                }
            }
            Plan::Check => {}
        }
        #[cfg(test)]
        {
            self.runs += 1;
        }
        let score = self.detector.predict_i16(&self.ring[current]);
        self.unfed_start = 0;
        self.unfed_len = 0;
        self.shortcut.scored(energy, score);
        score >= threshold
    }
}

/// The unfed windows, and the one being filled.
const RING: usize = RESYNC_WINDOWS + 1;

impl Vad {
    pub fn new(settings: VadSettings, gate: bool) -> Vad {
        Vad {
            settings,
            gate: gate && settings.enabled,
            model: settings.enabled.then(|| Model::new(&settings)),
            hangover_left: 0,
            held: VecDeque::new(),
            held_samples: 0,
        }
    }

    /// Classify the frame's windows; true if any is speech or the hangover is still running.
    fn classify(&mut self, samples: &[i16]) -> bool {
        let Some(model) = self.model.as_mut() else {
            return true;
        };
        let mut speech = self.hangover_left > 0;
        let mut rest = samples;
        while !rest.is_empty() {
            rest = &rest[model.fill(rest)..];
            if model.filled < WINDOW {
                break;
            }
            if model.classify(self.settings.threshold) {
                self.hangover_left = self.settings.hangover_samples;
                speech = true;
            } else {
                self.hangover_left = self.hangover_left.saturating_sub(WINDOW as u64);
            }
        }
        speech
    }

    /// Windows the model has scored so far, replays included.
    #[cfg(test)]
    fn model_runs(&self) -> u64 {
        self.model.as_ref().map_or(0, |m| m.runs)
    }

    fn discard_held(&mut self) {
        for frame in self.held.drain(..) {
            sessions::vad_gated(Duration::from_micros(frame.audio_us()));
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
            sessions::vad_gated(Duration::from_micros(old.audio_us()));
        }
        Ok(())
    }

    fn flush(&mut self, _out: &mut Vec<AudioFrame>) {
        self.discard_held();
    }
}
