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
    window: Vec<i16>,
    /// Samples still inside the hangover after the last speech window.
    hangover_left: u64,
    held: VecDeque<AudioFrame>,
    held_samples: u64,
}

/// earshot, what it has not seen since it last ran, and when it needs to run.
struct Model {
    detector: Box<earshot::Detector>,
    shortcut: Shortcut,
    /// The last windows not fed to the detector: a ring, `unfed_len` of them from
    /// `unfed_start`. Boxed: the stage is moved through several nested futures, each of which
    /// would otherwise hold its own copy.
    unfed: Box<[[i16; WINDOW]; RESYNC_WINDOWS]>,
    unfed_start: usize,
    unfed_len: usize,
    /// Windows the detector has scored, replays included (for tests).
    #[cfg(test)]
    runs: u64,
}

impl Model {
    fn new(settings: &VadSettings) -> Model {
        Model {
            detector: earshot::Detector::default_boxed(),
            shortcut: Shortcut::new(settings.max_unscored_windows, settings.threshold),
            unfed: Box::new([[0; WINDOW]; RESYNC_WINDOWS]),
            unfed_start: 0,
            unfed_len: 0,
            #[cfg(test)]
            runs: 0,
        }
    }

    /// Whether a full window is speech, scoring it only if the shortcut says so.
    fn classify(&mut self, window: &[i16], threshold: f32) -> bool {
        let energy = shortcut::energy(window);
        let plan = self.shortcut.plan(energy);
        match plan {
            Plan::Speech | Plan::Silence => {
                self.skip(window);
                return plan == Plan::Speech;
            }
            Plan::Score => {
                for i in 0..self.unfed_len {
                    let index = (self.unfed_start + i) % RESYNC_WINDOWS;
                    #[cfg(test)]
                    {
                        self.runs += 1;
                    }
                    self.detector.predict_i16(&self.unfed[index]);
                }
            }
            Plan::Check => {}
        }
        self.unfed_start = 0;
        self.unfed_len = 0;
        let score = self.predict(window);
        self.shortcut.scored(energy, score);
        score >= threshold
    }

    fn predict(&mut self, window: &[i16]) -> f32 {
        #[cfg(test)]
        {
            self.runs += 1;
        }
        self.detector.predict_i16(window)
    }

    /// Remember a window the detector did not see; the oldest goes when the ring is full.
    fn skip(&mut self, window: &[i16]) {
        let index = (self.unfed_start + self.unfed_len) % RESYNC_WINDOWS;
        self.unfed[index].copy_from_slice(window);
        if self.unfed_len == RESYNC_WINDOWS {
            self.unfed_start = (self.unfed_start + 1) % RESYNC_WINDOWS;
        } else {
            self.unfed_len += 1;
        }
    }
}

impl Vad {
    pub fn new(settings: VadSettings, gate: bool) -> Vad {
        Vad {
            settings,
            gate: gate && settings.enabled,
            model: settings.enabled.then(|| Model::new(&settings)),
            window: Vec::with_capacity(WINDOW),
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
            let take = (WINDOW - self.window.len()).min(rest.len());
            self.window.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.window.len() < WINDOW {
                break;
            }
            if model.classify(&self.window, self.settings.threshold) {
                self.hangover_left = self.settings.hangover_samples;
                speech = true;
            } else {
                self.hangover_left = self.hangover_left.saturating_sub(WINDOW as u64);
            }
            self.window.clear();
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
