//! When the VAD model has to run, and when its answer is already known.
//!
//! earshot costs about 5 µs per 16 ms window, and it is not stateless: each call shifts the
//! window into a 48 ms analysis buffer (pre-emphasis carries across calls), convolves over the
//! mel features of the last three windows and updates a two-layer recurrent (minGRU) state. Its
//! score lags the audio by a few windows and moves smoothly, and a frame's decision can only
//! change where speech starts or ends. So the model runs where that can happen, and elsewhere the
//! answer is taken as known:
//!
//! - In speech: after a confident score the frames are speech through the hangover whatever the
//!   next windows score; only the end of speech needs the model. So up to `max_skip` windows are
//!   speech unscored, until [`QUIET_RUN`] windows in a row fall to the background level (speech
//!   ending, or pausing); then the model scores every window again and finds the end. After
//!   `max_skip` windows one window is checked without replay ([`Plan::Check`]): still confident,
//!   skipping goes on; if not (the end, or a splice the model did not like), every window is
//!   scored from there, and the hangover covers the one window checked. The
//!   skipped windows never reached its recurrent state, so that end can land a few frames off;
//!   where speech ends in sound as loud as itself, it is found up to `max_skip` windows late.
//! - Outside speech: once the score has settled (three windows in a row of similar energy and
//!   non-speech scores within [`SETTLE_DELTA`]), more of the same audio cannot move it, so
//!   windows within 3 dB of the background it settled on are non-speech unscored. Any other
//!   window (an onset, or the background stopping) is scored at once, and so is one window in
//!   `max_skip + 1`, to follow slow changes and catch speech barely louder than the background.
//!
//! Before the model runs after skipped windows it is fed the last [`RESYNC_WINDOWS`] of them, so
//! its analysis buffer holds contiguous audio; only its recurrent state has missed the rest.
//! The periodic checks are the exception ([`Plan::Check`]).

/// Samples per earshot window: 16 ms at 16 kHz.
pub(super) const WINDOW: usize = 256;

/// Skipped windows replayed to the model before it scores again: with the scored window they fill
/// its 48 ms analysis buffer, so it never scores a spliced spectrum.
pub(super) const RESYNC_WINDOWS: usize = 2;

/// Three non-speech scores in a row this close (on similar audio) mean the model has settled on
/// the background. Scores move by several times this per window while speech fades out or
/// builds up; on steady noise they jitter by less.
const SETTLE_DELTA: f32 = 0.01;

/// Background-level windows in a row that end an unscored stretch of speech (48 ms): word gaps
/// shorter than this cost nothing, and the model, which takes about 100 ms of silence to call the
/// end of speech, still sees the end.
const QUIET_RUN: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Replay the skipped windows to the model, then score this one.
    Score,
    /// Score this window without replaying: the periodic check of a settled background or of
    /// confident speech. A check costs one window instead of three; on a steady background the
    /// 48 ms the model analyses looks alike spliced or not, and in speech a doubtful check only
    /// returns to scoring every window (measured on the loadtest's clip: 10.5 → 6.9 model runs
    /// per second, with the same decisions on the fixtures to within one frame).
    Check,
    /// Speech, without the model.
    Speech,
    /// Non-speech, without the model.
    Silence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Score every window.
    Watch,
    /// The last score was confident speech.
    Speech,
    /// The score has settled on non-speech.
    Background,
}

/// Decides window by window whether the model must run. Pure bookkeeping: the caller computes
/// each window's energy (sum of squared samples) and reports the scores.
#[derive(Debug)]
pub(super) struct Shortcut {
    /// Windows that may be skipped in a row; 0 scores every window.
    max_skip: u32,
    threshold: f32,
    /// Scores at or above this start an unscored stretch of speech: halfway between the threshold
    /// and 1, so the model's state is well inside speech and a few windows cannot flip it.
    confident: f32,
    mode: Mode,
    /// Windows skipped since the model last ran.
    skipped: u32,
    /// Background-level windows in a row within the current unscored speech.
    quiet_run: u32,
    last_score: f32,
    last_energy: u64,
    /// Non-speech scores in a row within `SETTLE_DELTA` of the one before.
    steady: u32,
    /// Energy of the louder of the last two windows the model settled on; windows within 3 dB
    /// of it are the background.
    background: u64,
}

impl Shortcut {
    pub(super) fn new(max_skip: u32, threshold: f32) -> Shortcut {
        Shortcut {
            max_skip,
            threshold,
            confident: (1.0 + threshold) / 2.0,
            mode: Mode::Watch,
            skipped: 0,
            quiet_run: 0,
            last_score: 0.0,
            last_energy: 0,
            steady: 0,
            background: 0,
        }
    }

    /// Whether a window is no louder than the background (within 3 dB).
    fn quiet(&self, energy: u64) -> bool {
        louder_at_most_3_db(energy, self.background)
    }

    /// What to do with the next window.
    pub(super) fn plan(&mut self, energy: u64) -> Plan {
        let skip = match self.mode {
            Mode::Watch => false,
            Mode::Speech => {
                self.quiet_run = if self.quiet(energy) {
                    self.quiet_run + 1
                } else {
                    0
                };
                self.quiet_run < QUIET_RUN
            }
            // Much quieter is a change too: a speech onset can be softer than a loud background
            // that has just stopped.
            Mode::Background => similar(energy, self.background),
        };
        if !skip {
            return Plan::Score;
        }
        if self.skipped >= self.max_skip {
            return Plan::Check;
        }
        self.skipped += 1;
        if self.mode == Mode::Speech {
            Plan::Speech
        } else {
            Plan::Silence
        }
    }

    /// The model scored the window that [`plan`](Self::plan) returned [`Plan::Score`] or
    /// [`Plan::Check`] for.
    pub(super) fn scored(&mut self, energy: u64, score: f32) {
        self.skipped = 0;
        // Similar audio too: the score lags a change in the audio by a few windows.
        let settling = score < self.threshold
            && self.last_score < self.threshold
            && (score - self.last_score).abs() < SETTLE_DELTA
            && similar(energy, self.last_energy);
        self.steady = if settling { self.steady + 1 } else { 0 };
        if score >= self.confident && !self.quiet(energy) {
            self.mode = Mode::Speech;
            self.quiet_run = 0;
        } else if self.steady >= 2 {
            self.mode = Mode::Background;
            self.background = energy.max(self.last_energy);
        } else {
            self.mode = Mode::Watch;
        }
        self.last_score = score;
        self.last_energy = energy;
    }
}

/// Whether window energy `a` exceeds `b` by at most a factor 2 (3 dB). One unit per sample on
/// top, so digital silence and dither compare as equal.
fn louder_at_most_3_db(a: u64, b: u64) -> bool {
    a <= 2 * b + WINDOW as u64
}

/// Whether two window energies are within 3 dB of each other.
fn similar(a: u64, b: u64) -> bool {
    louder_at_most_3_db(a, b) && louder_at_most_3_db(b, a)
}

/// Sum of the squared samples.
pub(super) fn energy(window: &[i16]) -> u64 {
    // Two squares fit a u32 (at most 2 × 2^30): summing pairs that way vectorizes, and is four
    // times as fast as widening every square to u64.
    let square = |s: i16| i32::from(s).pow(2).unsigned_abs();
    window
        .chunks_exact(2)
        .map(|pair| u64::from(square(pair[0]) + square(pair[1])))
        .sum()
}
